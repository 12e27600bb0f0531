r"""SelMix fine-tuning loop costs, host path vs device-resident path (issue 23), on any backend.

Prints one table:
  * refresh (K = 10): one whole `_Run.refresh` (guard, validation pass over `--val` random uint8
    32x32 images, counts, prototypes, multipliers, G, P, the refresh's report and history file),
    host path (`evaluation.evaluate` batches streamed + jitted refresh) vs device path (split
    uploaded once, one compiled program); median of `--reps` after a compiled warm-up;
  * gain + P (K = `--k_large`, synthetic prototypes): the jitted `selmix_state` refresh alone
    (both paths compute it the same way);
  * loop vs step: fine-tuning loop time per step (`loop.run`, a refresh every `--refresh_every`
    steps; then the same loop without refreshes) against the bare jitted step called back to
    back (host path: on one fixed device batch; device path: its own draws), for each path;
  * N runs: `--runs` runs of the device path in one program (states stacked, step vmapped) vs
    the same runs one after another, time per step of all N.

  python benchmarks/loop_bench.py                   # ResNet-32, CIFAR-sized (a GPU's size)
  python benchmarks/loop_bench.py --smoke           # seconds on a CPU (small CNN, tiny sizes)
  python benchmarks/loop_bench.py --val 1000 --eval_batch 500 --steps 10 --refresh_every 5 \
    --runs 3 --reps 2                               # ResNet-32 at a size a CPU measures

Synthetic data (random images, uniform labels); nothing is downloaded. Steps and refreshes of a
real run cost the same for random and real pixels.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from selmix_jax import evaluation
from selmix_jax import finetune
from selmix_jax import loop
from selmix_jax import models
from selmix_jax import objectives
from selmix_jax import optim
from selmix_jax import selmix_state
from selmix_jax import train_state
from selmix_jax.data import pipeline
from selmix_jax.data import sources

SIZES = {
    # model, labeled, val, eval batch, pairs/step, K large, steps timed, refresh every, runs
    "full": dict(model="resnet32", width=None, labeled=11_165, val=10_000, eval_batch=2_000,
                 batch=64, k_large=1_000, steps=200, refresh_every=50, runs=7, reps=5),
    "smoke": dict(model="cnn_small", width=4, labeled=64, val=64, eval_batch=32, batch=8,
                  k_large=100, steps=8, refresh_every=4, runs=2, reps=2),
}


def _datasets(num_labeled, num_val, k=10, seed=0):
  rng = np.random.default_rng(seed)
  names = tuple(f"c{i}" for i in range(k))

  def source(n):
    images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    return sources.ArraySource(images, rng.integers(0, k, n).astype(np.int32), names)

  train, val, test = source(num_labeled), source(num_val), source(k * 4)
  labeled = pipeline.Split(train, np.arange(num_labeled))
  return pipeline.Datasets(
      labeled=labeled, unlabeled=None, val=pipeline.Split(val, np.arange(num_val)),
      test=pipeline.Split(test, np.arange(len(test))), num_classes=k, class_names=names,
      image_shape=(32, 32, 3), mean=np.full(3, 0.5, np.float32), std=np.full(3, 0.25, np.float32),
      labeled_class_counts=labeled.class_counts(k),
  )


def _config(size, **selmix):
  from selmix_jax.configs import base  # pylint: disable=g-import-not-at-top

  config = base.get_config()
  config.mode = "selmix"
  config.model.name = size["model"]
  if size["width"]:
    config.model.kwargs.width = size["width"]
  config.eval_batch_size = size["eval_batch"]
  config.data.num_workers = 0
  config.selmix.batch_size = size["batch"]
  config.selmix.refresh_every = size["refresh_every"]
  config.selmix.num_steps = 10**6
  config.selmix.log_every = config.selmix.eval_every = config.selmix.checkpoint_every = 0
  for key, value in selmix.items():
    setattr(config.selmix, key, value)
  return config


class _Bench:
  """Runs (finetune._Run) of one model and data set, on either path, in a scratch workdir."""

  def __init__(self, size, root):
    self.size, self.root, self.count = size, root, 0
    self.ds = _datasets(size["labeled"], size["val"])
    config = _config(size)
    self.model = models.from_config(config.model, self.ds.num_classes)
    variables = self.model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)
    self.schedule = optim.cosine_schedule(config.selmix.learning_rate, config.selmix.num_steps)
    tx = optim.make_selmix_optimizer(variables["params"], learning_rate=self.schedule)
    self.template = train_state.from_variables(self.model, variables, tx)

  def runs(self, *, device, configs):
    """`(runs, steps)` attached to a fresh host or device steps object."""
    runs = []
    for config in configs:
      self.count += 1
      workdir = os.path.join(self.root, f"run{self.count}")
      runs.append(finetune._Run(config, workdir, self.ds, self.template, self.schedule,
                                started=time.time()))
    resident = finetune._resident(configs[0], self.ds, runs, many=True) if device else None
    evaluate = evaluation.Evaluator(
        self.model, self.ds, batch_size=configs[0].eval_batch_size, resident=resident,
        options=None,
    )
    if device:
      steps = finetune._DeviceSteps(runs, configs[0], self.ds, resident, evaluate)
    else:
      steps = finetune._HostSteps(runs[0], configs[0], self.ds, evaluate)
    for i, r in enumerate(runs):
      r.attach(i, steps, evaluate)
    return runs, steps


def _median_time(fn, reps):
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def path_times(bench, *, device, reps, num_steps):
  """One run on one path: seconds `(per whole refresh, loop per step, loop per step without the
  refreshes, bare step)`."""
  runs, steps = bench.runs(device=device, configs=[_config(bench.size)])
  r, every = runs[0], bench.size["refresh_every"]
  actions = [loop.Periodic(every, r.refresh)]
  # Warm-up: one refresh interval compiles the step, the refresh and the feed.
  loop.run(start_step=0, num_steps=every, train_step=steps.train_step, before_step=actions)
  jax.block_until_ready(steps.metrics_of(0))
  counter = iter(range(1, 10**6))
  refresh = _median_time(lambda: (r.refresh(next(counter)), r.selmix.pair_probs)[1], reps)
  start = time.perf_counter()
  loop.run(start_step=every, num_steps=every + num_steps, train_step=steps.train_step,
           before_step=actions)
  jax.block_until_ready(steps.metrics_of(0))
  looped = (time.perf_counter() - start) / num_steps
  start = time.perf_counter()  # The same loop without its refreshes: what each step adds.
  loop.run(start_step=every + num_steps, num_steps=every + 2 * num_steps,
           train_step=steps.train_step)
  jax.block_until_ready(steps.metrics_of(0))
  plain = (time.perf_counter() - start) / num_steps
  bare = _bare_step(steps, num_steps)
  steps.close()
  r.close()
  return refresh, looped, plain, bare


def gain_time(k, reps):
  """Seconds of the jitted refresh (multipliers, G, P) at K = k with synthetic prototypes."""
  rng = np.random.default_rng(0)
  objective = objectives.from_config(_config(SIZES["smoke"]).objective)
  refresh = selmix_state.make_refresh_fn(objective, mix_weight=0.8, temperature=0.1)
  state = selmix_state.init(objective, k, np.zeros(4, np.int32), history_length=4)
  confusion = jnp.asarray(np.diag(rng.integers(5, 20, k)) + rng.integers(0, 2, (k, k)),
                          jnp.float32)
  args = (confusion, jnp.asarray(rng.normal(size=(k, 64)), jnp.float32),
          jnp.asarray(rng.normal(size=(64, k)) * 0.1, jnp.float32), jnp.zeros(k, jnp.float32),
          state.partner_labels)
  jax.block_until_ready(refresh(state, *args))
  return _median_time(lambda: refresh(state, *args).pair_probs, reps)


def _bare_step(steps, num_steps):
  """The compiled step called back to back (host path: on one fixed device batch)."""
  if isinstance(steps, finetune._DeviceSteps):
    call = lambda: steps.train_step(0)
  else:
    step = int(train_state.unreplicate(steps.state_repl.step))
    steps._open_feed(step)
    batch = steps.feed.next(step)
    steps.close()

    def call():
      steps.state_repl, steps.metrics = steps.p_train_step(steps.state_repl, batch, steps.key)
      return steps.metrics
  jax.block_until_ready(call())
  start = time.perf_counter()
  for _ in range(num_steps):
    out = call()
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / num_steps


def many_runs(bench, num_runs, num_steps):
  """Per-step seconds of N runs `(one program, one after another)` (steps only)."""
  pairs = ("gain", "uniform", "instance")
  configs = [_config(bench.size, pairs=pairs[i % 3], mix_weight_min=0.6 + 0.05 * i)
             for i in range(num_runs)]

  def per_step(runs_configs):
    runs, steps = bench.runs(device=True, configs=runs_configs)
    jax.block_until_ready(steps.train_step(0))
    start = time.perf_counter()
    for _ in range(num_steps):
      out = steps.train_step(0)
    jax.block_until_ready(out)
    for r in runs:
      r.close()
    return (time.perf_counter() - start) / num_steps

  together = per_step(configs)
  apart = sum(per_step([c]) for c in configs)
  return together, apart


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--smoke", action="store_true", help="CPU-sized: seconds, small CNN")
  for name in ("val", "eval_batch", "batch", "k_large", "steps", "refresh_every", "runs", "reps"):
    parser.add_argument(f"--{name}", type=int, default=None)
  parser.add_argument("--model", default=None, help="a models.from_config name (resnet32)")
  args = parser.parse_args(argv)
  size = dict(SIZES["smoke" if args.smoke else "full"])
  size.update({k: v for k, v in vars(args).items() if k in size and v is not None})
  if args.model:
    size.update(model=args.model, width=None)
  device = jax.devices()[0]
  print(f"jax {jax.__version__}, {jax.local_device_count()} x {device.device_kind} "
        f"({jax.default_backend()}); {size['model']}, {size['val']} val images, batch "
        f"{size['batch']} pairs, refresh every {size['refresh_every']}", flush=True)
  with tempfile.TemporaryDirectory() as root:
    bench = _Bench(size, root)
    paths = {path: path_times(bench, device=path == "device", reps=size["reps"],
                              num_steps=size["steps"])
             for path in ("host", "device")}
    gain = gain_time(size["k_large"], size["reps"])
    together, apart = many_runs(bench, size["runs"], max(size["steps"] // 4, 2))
  ms = lambda s: f"{1e3 * s:.2f}"
  rows = [(f"refresh, K = 10, {path} path (ms)", ms(t[0])) for path, t in paths.items()]
  rows.append((f"gain + P alone, K = {size['k_large']} (ms)", ms(gain)))
  for path, (_, loop_s, plain_s, step_s) in paths.items():
    rows.append((f"{path} path: loop per step / bare step (ms)",
                 f"{ms(loop_s)} / {ms(step_s)} = {loop_s / step_s:.2f}x"))
    rows.append((f"{path} path: loop without refreshes per step / bare step (ms)",
                 f"{ms(plain_s)} / {ms(step_s)} = {plain_s / step_s:.2f}x"))
  rows.append((f"{size['runs']} runs per step: one program / one after another (ms)",
               f"{ms(together)} / {ms(apart)} = {apart / together:.2f}x faster"))
  width = max(len(r[0]) for r in rows)
  print(f"| {'quantity'.ljust(width)} | value |\n|{'-' * (width + 2)}|---:|")
  for name, value in rows:
    print(f"| {name.ljust(width)} | {value} |")
  sys.stdout.flush()
  return {"paths": paths, "gain": gain, "many": (together, apart)}


if __name__ == "__main__":
  main()
