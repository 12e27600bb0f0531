"""Throughput of the training steps on one device: supervised and SelMix fine-tuning.

For each model, global batch `--batch` of 32x32x3 uint8 images (weak augmentation and
normalisation inside the step, as in training), the step pmapped over ONE device with the
state donated, as the trainers run it. Timed after compilation and `--warmup` steps; the
variants of one model are timed interleaved (one step of each in turn) so that load from
other processes hits them alike; median over `--steps`.

Variants:
- supervised: `steps.supervised_step` (pre-training optimiser, CE), B images per step.
- selmix (2 passes): `steps.selmix_step`, B pairs = 2B images, x1 and x2 in separate passes.
- selmix (fused): the same step with `fuse_passes=True`: one `vmap`ped pass over the stacked
  [2, B] batch, BatchNorm statistics still per pass (identical numbers, see tests).

Refresh share: a SelMix refresh is one evaluation pass over the validation set (`--val_size`
images, default 10,000 = CIFAR-10's 500 per class plus flips, via `evaluation.evaluate`, batch
`--eval_batch`) plus the jitted gain/P computation (negligible at K = 10, see gain_bench). Its
share of wall time is `refresh / (refresh + refresh_every * selmix step)` for `--refresh_every`
(SPEC default 50).

  python benchmarks/step_bench.py --models wrn28_2,resnet32 --batch 64 --steps 10
"""

import argparse
import functools
import statistics
import time

import jax
import numpy as np

from selmix_jax import evaluation
from selmix_jax import models
from selmix_jax import optim
from selmix_jax import steps
from selmix_jax import train_state
from selmix_jax.data import augment
from selmix_jax.data import sources

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2471, 0.2435, 0.2616)


def _batches(batch, num, seed=0):
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(num):
    images = rng.integers(0, 256, (2, 1, batch, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, (1, batch)).astype(np.int32)
    index = rng.integers(0, 50_000, (2, 1, batch)).astype(np.int32)
    out.append(
        {
            "supervised": {"images": images[0], "labels": labels, "index": index[0]},
            "selmix": {
                "images1": images[0],
                "labels1": labels,
                "index1": index[0],
                "images2": images[1],
                "index2": index[1],
            },
        }
    )
  return out


def variants(init_params, preprocess, only=None):
  """{label: (step body, optimiser, batch kind, images per example)} of the steps timed here."""
  out = {
      "supervised": (
          functools.partial(steps.supervised_step, preprocess_fn=preprocess),
          optim.make_pretrain_optimizer(learning_rate=0.03),
          "supervised",
          1,
      ),
      "selmix (2 passes)": (
          functools.partial(steps.selmix_step, preprocess_fn=preprocess),
          optim.make_selmix_optimizer(init_params["params"], learning_rate=3e-4),
          "selmix",
          2,
      ),
      "selmix (fused)": (
          functools.partial(steps.selmix_step, preprocess_fn=preprocess, fuse_passes=True),
          optim.make_selmix_optimizer(init_params["params"], learning_rate=3e-4),
          "selmix",
          2,
      ),
  }
  return {label: v for label, v in out.items() if only is None or label in only}


def bench_model(
    name, *, batch, num_steps, warmup, only=None, pipelined=False, **model_kwargs
):
  """Times the `variants` of model `name` (`models.get(name, num_classes=10, **model_kwargs)`).

  Returns:
    One row per variant: {'model', 'step', 'ms' (median of per-step times, synced after each
    step), 'examples_s', 'images_s', 'compile_s'}, plus 'pipelined_ms' (`num_steps` steps
    dispatched back to back, one sync at the end, per step) if `pipelined`. Every step gets
    its own host batch.
  """
  model = models.get(name, num_classes=10, **model_kwargs)
  device = jax.devices()[:1]
  preprocess = augment.make_preprocess("weak", mean=CIFAR_MEAN, std=CIFAR_STD)
  init_params = model.init(jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32), train=False)
  timed = variants(init_params, preprocess, only)
  data = _batches(batch, num_steps + warmup)
  key = jax.random.key(1)
  runners, states, compile_s = {}, {}, {}
  for label, (body, tx, kind, _) in timed.items():
    p_step = jax.pmap(
        body, axis_name="batch", in_axes=(0, 0, None), donate_argnums=(0,), devices=device
    )
    state = train_state.replicate(
        train_state.create(model, jax.random.key(0), (32, 32, 3), tx), devices=device
    )
    t0 = time.perf_counter()
    state, metrics = p_step(state, data[0][kind], key)
    jax.block_until_ready((state, metrics))
    compile_s[label] = time.perf_counter() - t0
    runners[label], states[label] = (p_step, kind), state
  times = {label: [] for label in timed}
  for i in range(num_steps + warmup):
    for label, (p_step, kind) in runners.items():
      t0 = time.perf_counter()
      states[label], metrics = p_step(states[label], data[i][kind], key)
      jax.block_until_ready((states[label], metrics))
      if i >= warmup:
        times[label].append(time.perf_counter() - t0)
  pipelined_s = {}
  if pipelined:
    for label, (p_step, kind) in runners.items():
      t0 = time.perf_counter()
      for i in range(warmup, num_steps + warmup):
        states[label], metrics = p_step(states[label], data[i][kind], key)
      jax.block_until_ready((states[label], metrics))
      pipelined_s[label] = (time.perf_counter() - t0) / num_steps
  rows = []
  for label, (_, _, _, images_per_example) in timed.items():
    t = statistics.median(times[label])
    rows.append(
        {
            "model": name,
            "step": label,
            "ms": 1e3 * t,
            "examples_s": batch / t,
            "images_s": images_per_example * batch / t,
            "compile_s": compile_s[label],
        }
    )
    if pipelined:
      rows[-1]["pipelined_ms"] = 1e3 * pipelined_s[label]
  return rows


def bench_refresh(name, *, val_size, eval_batch, **model_kwargs):
  """Seconds of one validation pass over `val_size` random 32x32 images (compiled, warm)."""
  model = models.get(name, num_classes=10, **model_kwargs)
  variables = model.init(jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32), train=False)
  # `evaluation.evaluate` splits every batch over all local devices.
  variables = train_state.replicate(dict(variables), devices=jax.local_devices())
  rng = np.random.default_rng(0)
  source = sources.ArraySource(
      images=rng.integers(0, 256, (val_size, 32, 32, 3), dtype=np.uint8),
      labels=rng.integers(0, 10, (val_size,)).astype(np.int32),
      class_names=tuple(str(k) for k in range(10)),
  )
  p_eval = evaluation.make_p_eval_step(
      model,
      num_classes=10,
      preprocess_fn=augment.make_preprocess("none", mean=CIFAR_MEAN, std=CIFAR_STD),
  )
  indices = np.arange(val_size)
  evaluation.evaluate(p_eval, variables, source, indices[:eval_batch], batch_size=eval_batch)
  t0 = time.perf_counter()
  evaluation.evaluate(p_eval, variables, source, indices, batch_size=eval_batch)
  return time.perf_counter() - t0


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--models", default="wrn28_2,resnet32")
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--val_size", type=int, default=10_000)
  parser.add_argument("--eval_batch", type=int, default=500)
  parser.add_argument("--refresh_every", type=int, default=50)
  args = parser.parse_args()
  print(f"jax {jax.__version__}, {jax.devices()[0].device_kind} x1, global batch {args.batch}")
  rows = []
  for name in args.models.split(","):
    rows += bench_model(name, batch=args.batch, num_steps=args.steps, warmup=args.warmup)
  print()
  print("| model | step | ms/step (median) | pairs or images in batch/s | images/s | compile s |")
  print("|---|---|---:|---:|---:|---:|")
  for r in rows:
    print(
        f"| {r['model']} | {r['step']} | {r['ms']:.0f} | {r['examples_s']:.1f} "
        f"| {r['images_s']:.1f} | {r['compile_s']:.1f} |"
    )
  print()
  for name in args.models.split(","):
    by = {r["step"]: r for r in rows if r["model"] == name}
    ratio = by["selmix (2 passes)"]["ms"] / by["selmix (fused)"]["ms"]
    print(f"{name}: fused / 2-pass SelMix speed ratio = {ratio:.2f}x")
  print()
  print(f"| model | validation pass ({args.val_size} images) s | eval images/s "
        f"| {args.refresh_every} SelMix steps s | refresh share of wall time |")
  print("|---|---:|---:|---:|---:|")
  for name in args.models.split(","):
    refresh = bench_refresh(name, val_size=args.val_size, eval_batch=args.eval_batch)
    train = args.refresh_every * next(
        r["ms"] for r in rows if r["model"] == name and r["step"] == "selmix (2 passes)"
    ) / 1e3
    print(f"| {name} | {refresh:.1f} | {args.val_size / refresh:.0f} | {train:.1f} "
          f"| {100 * refresh / (refresh + train):.0f} % |")


if __name__ == "__main__":
  main()
