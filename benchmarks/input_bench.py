"""Throughput of the training input paths.

Part `stream` (the streaming path, `loader.Feed`, on generated JPEGs):
  * writes `--images` JPEGs of 256-320 px (smooth random content plus noise, quality 90) to a
    temporary folder and wraps them as a `RandomAccessSource` (records read from disk on access,
    decoded, shorter side resized to 224, centre-cropped), as a TFDS ImageNet source is;
  * images/s of decode + resize: synchronously in this process (one thread), and through
    `loader.Feed` with 1, 2, ... worker processes (`--workers`; steady state after the first
    batch, whose wait — worker start-up — is listed apart); then the same batches from a plain
    `multiprocessing.Pool` of as many processes, returned (pickled through pipes) or decoded and
    dropped (the machine's own scaling for this work), for reference;
  * the training loop's time per step against its host time (loading a batch, 1 worker) and its
    device time (a supervised step of `cnn_small`, `--width`, at 224 px with `--augment` on a
    batch already on the device) measured apart. The device is one CPU core
    (`intra_op_parallelism_threads=1`), standing for an accelerator; the worker has the other.
    A second device step, a chain of 224 x 224 matrix products sized to the host time, is the
    balanced case where overlap matters most. Each runs with the JPEG files as host stage,
    where host and device also compete for the machine's cores, and with a stage that sleeps as
    long as decoding takes (no CPU), which isolates the pipeline's overlap from that
    competition.

Part `cifar` (the in-memory path on the offline CIFAR-10 JPEG copy): first load of the zip
(decode into memory, write the cache) and cached load; images/s of host gather of a random
batch (`uniform_indices` + `train_batch`) and of gather + transfer + jitted weak augmentation
for batches of 64 and 128 and for a FixMatch step's input.

  python benchmarks/input_bench.py [--parts stream,cifar] [--images 2000] [--batch 32]
      [--steps 20] [--workers 1,2] [--width 1] [--augment random_resized_crop]
      [--zip ../shared/data/cifar10-jpeg.zip]

Prints Markdown tables.
"""

from __future__ import annotations

import argparse
import functools
import multiprocessing
import os
import pathlib
import statistics
import tempfile
import time
from collections.abc import Sequence

import numpy as np
import PIL.Image

_REPO = pathlib.Path(__file__).resolve().parents[1]


class JpegFiles(Sequence):
  """Records `{'image': bytes}` read from files on access (picklable: just the paths)."""

  def __init__(self, paths):
    self.paths = list(paths)

  def __len__(self):
    return len(self.paths)

  def __getitem__(self, i):
    return {"image": pathlib.Path(self.paths[i]).read_bytes()}


class SleepingBatches:
  """A host stage as slow as decoding but using no CPU: `batch` after `seconds` of sleep."""

  def __init__(self, batch, seconds):
    self.batch, self.seconds = batch, seconds

  def __call__(self, step):
    del step
    time.sleep(self.seconds)
    return self.batch


class DiscardBatches:
  """`load(step)` decoded and dropped: the decoding alone, without returning the batch."""

  def __init__(self, load):
    self.load = load

  def __call__(self, step):
    self.load(step)


def write_jpegs(folder: pathlib.Path, n: int, seed: int = 0) -> list[pathlib.Path]:
  """`n` JPEGs of 256-320 px: an upsampled 8x8 random colour field plus noise, quality 90."""
  rng = np.random.default_rng(seed)
  paths = []
  for i in range(n):
    h, w = rng.integers(256, 321, 2)
    low = PIL.Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    image = np.asarray(low.resize((int(w), int(h)), PIL.Image.BICUBIC), np.float32)
    image = np.clip(image + rng.normal(0, 20, image.shape), 0, 255).astype(np.uint8)
    path = folder / f"{i:05d}.jpg"
    PIL.Image.fromarray(image).save(path, "JPEG", quality=90)
    paths.append(path)
  return paths


def stream_tables(args) -> None:
  import jax  # pylint: disable=g-import-not-at-top  (after XLA_FLAGS is set)

  from selmix_jax import models, optim, steps, train_state  # pylint: disable=g-import-not-at-top
  from selmix_jax.data import augment, loader, pipeline, sources  # pylint: disable=g-import-not-at-top

  folder = pathlib.Path(tempfile.mkdtemp(prefix="selmix_jpegs_"))
  start = time.perf_counter()
  paths = write_jpegs(folder, args.images)
  written = time.perf_counter() - start
  mean_kb = np.mean([p.stat().st_size for p in paths]) / 1e3
  labels = (np.arange(len(paths)) % 10).astype(np.int32)
  source = sources.RandomAccessSource(
    JpegFiles(paths),
    np.arange(len(paths)),
    labels,
    tuple("0123456789"),
    image_size=224,
    num_threads=1,
  )
  split = pipeline.Split(source, np.arange(len(paths)))
  batches = pipeline.UniformBatches(split, args.batch, seed=0, layout=pipeline.Layout(1))
  print(
    f"{len(paths)} JPEGs of 256-320 px written in {written:.1f} s, mean {mean_kb:.0f} kB; "
    f"batch {args.batch}, {args.steps} timed batches, {os.cpu_count()} CPUs, "
    f"load before: {os.getloadavg()[0]:.2f}"
  )

  rows = []
  start = time.perf_counter()
  for step in range(args.steps):
    batches(step)
  sync = (time.perf_counter() - start) / args.steps
  rows.append(("synchronous, this process (1 thread)", "-", f"{sync * 1e3:.0f}", args.batch / sync))

  def feed_rate(workers):
    # Every worker delivers a batch before the clock starts (each one's start-up is a process
    # spawn and imports, ~1 s; they start together but not at once on a busy machine).
    warmup = 2 * max(workers, 1)
    options = loader.Options(num_workers=workers, prefetch=2)
    start = time.perf_counter()
    with loader.Feed(batches, 0, warmup + args.steps, options=options) as feed:
      jax.block_until_ready(feed.next(0))
      first = time.perf_counter() - start
      for step in range(1, warmup):
        jax.block_until_ready(feed.next(step))
      start = time.perf_counter()
      for step in range(warmup, warmup + args.steps):
        jax.block_until_ready(feed.next(step))
      return first, (time.perf_counter() - start) / args.steps

  def pool_rate(workers, load):
    # The machine's own scaling: the same work in a plain multiprocessing pool.
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
      pool.map(load, range(workers))  # start-up
      start = time.perf_counter()
      for _ in pool.imap(load, range(args.steps), chunksize=1):
        pass
      return (time.perf_counter() - start) / args.steps

  rates, pool_rates = {}, {}
  for workers in args.workers:
    first, per_batch = feed_rate(workers)
    rates[workers] = args.batch / per_batch
    rows.append(
      (
        f"loader.Feed, {workers} worker process(es)",
        f"{first:.1f}",
        f"{per_batch * 1e3:.0f}",
        rates[workers],
      )
    )
  for name, load in (("batches returned", batches), ("decode only", DiscardBatches(batches))):
    for workers in args.workers:
      per_batch = pool_rate(workers, load)
      pool_rates[name, workers] = args.batch / per_batch
      rows.append(
        (
          f"reference: multiprocessing.Pool, {workers} process(es), {name}",
          "-",
          f"{per_batch * 1e3:.0f}",
          pool_rates[name, workers],
        )
      )
  print()
  print("| decode + resize to 224 | first batch s | ms / batch | images/s |")
  print("|---|---:|---:|---:|")
  for name, first, ms, rate in rows:
    print(f"| {name} | {first} | {ms} | {rate:,.0f} |")
  if 1 in rates and 2 in rates:
    print(
      f"\n2 workers / 1 worker: {rates[2] / rates[1]:.2f}x (loader.Feed), "
      f"{pool_rates['decode only', 2] / pool_rates['decode only', 1]:.2f}x (the machine's own "
      "scaling: multiprocessing.Pool, decode only)"
    )

  # The loop: host (1 worker) and device (one core) apart, then together.
  model = models.get("cnn_small", num_classes=10, width=args.width)
  tx = optim.make_pretrain_optimizer(learning_rate=0.01)
  device = jax.local_devices()[:1]
  p_step = jax.pmap(
    functools.partial(
      steps.supervised_step,
      preprocess_fn=augment.make_preprocess(
        "none" if args.augment == "none" else "weak",
        mean=0.5,
        std=0.25,
        crop="pad_crop" if args.augment == "none" else args.augment,
      ),
    ),
    axis_name="batch",
    in_axes=(0, 0, None),
    donate_argnums=(0,),
    devices=device,
  )
  state = train_state.replicate(
    train_state.create(model, jax.random.key(0), (224, 224, 3), tx), devices=device
  )
  key = jax.random.key(1)
  on_device = jax.device_put(batches(0), train_state.local_sharding(devices=device))
  carry = {"state": state}

  def train(batch):
    carry["state"], metrics = p_step(carry["state"], batch, key)
    return metrics

  def device_time(fn):
    jax.block_until_ready(fn(on_device))  # compile
    times = []
    for _ in range(args.steps):
      start = time.perf_counter()
      jax.block_until_ready(fn(on_device))
      times.append(time.perf_counter() - start)
    return statistics.median(times)

  host_s = args.batch / rates.get(1, args.batch / sync)
  # A second device step: a chain of 224 x 224 matrix products sized to take about the host time,
  # the balanced case where max(host, device) and their sum differ most.
  per_product = device_time(_matmul_chain(10)) / 10
  balanced = _matmul_chain(max(1, round(host_s / per_product)))

  def loop_time(load, fn):
    options = loader.Options(num_workers=1, prefetch=2)
    with loader.Feed(load, 0, args.steps + 2, options=options) as feed:
      for step in range(2):  # worker start-up, not timed
        jax.block_until_ready(fn(feed.next(step)))
      start = time.perf_counter()
      for step in range(2, args.steps + 2):
        out = fn(feed.next(step))
      jax.block_until_ready(out)
      return (time.perf_counter() - start) / args.steps

  print()
  print(
    f"Training loop, batch {args.batch} at 224 px, 1 worker; the device is one core. Device "
    f"steps: 'train' = supervised step of cnn_small width {args.width} with {args.augment}; "
    "'matmuls' = 224 x 224 products sized to the host time. Host stages: the JPEG files, or "
    "a stage that sleeps as long (no CPU, so no competition with the device for cores)."
  )
  print()
  print(
    "| device step | host stage | host ms | device ms | loop ms / step | max | sum | loop / max |"
  )
  print("|---|---|---:|---:|---:|---:|---:|---:|")
  simulated = SleepingBatches(batches(0), host_s)
  for device_name, fn in (("train", train), ("matmuls", balanced)):
    device_s = device_time(fn)
    for host_name, load in (("decode JPEGs", batches), ("sleep", simulated)):
      loop_s = loop_time(load, fn)
      print(
        f"| {device_name} | {host_name} | {host_s * 1e3:.0f} | {device_s * 1e3:.0f} | "
        f"{loop_s * 1e3:.0f} | {max(host_s, device_s) * 1e3:.0f} | "
        f"{(host_s + device_s) * 1e3:.0f} | {loop_s / max(host_s, device_s):.2f} |"
      )
  print(f"\nload after: {os.getloadavg()[0]:.2f}")


def _matmul_chain(n):
  """A jitted device step of `n` 224 x 224 matrix products on a batch's first image."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  @jax.jit
  def step(batch):
    x = batch["images"][0, 0, :, :, 0].astype(jnp.float32) / 255.0
    return jax.lax.fori_loop(0, n, lambda i, x: jnp.tanh(x @ x * 0.01), x).sum()

  return step


def _time(fn, steps):
  fn(0)  # Compile / warm up.
  start = time.perf_counter()
  for step in range(1, steps + 1):
    fn(step)
  return (time.perf_counter() - start) / steps


def cifar_table(args) -> None:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from selmix_jax.data import augment, pipeline, sources  # pylint: disable=g-import-not-at-top

  if not os.path.exists(args.zip):
    print(f"\n{args.zip} not found: part 'cifar' skipped.")
    return
  cache_dir = args.cache_dir or tempfile.mkdtemp(prefix="selmix_bench_")
  rows = []
  start = time.perf_counter()
  train = sources.load_image_folder(args.zip, "train", cache_dir=cache_dir)
  first = time.perf_counter() - start
  rows.append(
    (
      "load train split, first (decode 50k JPEGs + write cache)",
      "-",
      f"{first:.1f} s",
      f"{len(train) / first:,.0f}",
    )
  )
  start = time.perf_counter()
  train = sources.load_image_folder(args.zip, "train", cache_dir=cache_dir)
  cached = time.perf_counter() - start
  rows.append(
    ("load train split, cached (.npz)", "-", f"{cached:.2f} s", f"{len(train) / cached:,.0f}")
  )

  key = jax.random.PRNGKey(0)
  weak = jax.jit(lambda x, k: augment.weak_batch(augment.to_float(x), k))
  strong = jax.jit(lambda x, k: augment.strong_batch(augment.to_float(x), k))

  def gather(batch, step, salt=0):
    idx = pipeline.uniform_indices(len(train), batch, seed=salt, step=step)
    return pipeline.train_batch(train, idx, num_devices=1), idx

  for batch in (64, 128):
    t = _time(lambda s, b=batch: gather(b, s), args.steps)
    rows.append((f"host gather, batch {batch}", batch, f"{t * 1e3:.2f} ms", f"{batch / t:,.0f}"))

    def weak_step(step, b=batch):
      data, idx = gather(b, step)
      keys = augment.example_keys(key, step, jnp.asarray(idx))
      weak(jnp.asarray(data["images"][0]), keys).block_until_ready()

    t = _time(weak_step, args.steps)
    rows.append(
      (f"gather + weak (jit), batch {batch}", batch, f"{t * 1e3:.1f} ms", f"{batch / t:,.0f}")
    )

  def fixmatch_step(step):
    lab, lab_idx = gather(64, step, salt=1)
    unl, unl_idx = gather(128, step, salt=2)
    lab_keys = augment.example_keys(key, step, jnp.asarray(lab_idx))
    unl_keys = augment.example_keys(jax.random.fold_in(key, 1), step, jnp.asarray(unl_idx))
    strong_keys = augment.example_keys(jax.random.fold_in(key, 2), step, jnp.asarray(unl_idx))
    outs = (
      weak(jnp.asarray(lab["images"][0]), lab_keys),
      weak(jnp.asarray(unl["images"][0]), unl_keys),
      strong(jnp.asarray(unl["images"][0]), strong_keys),
    )
    jax.block_until_ready(outs)

  t = _time(fixmatch_step, args.steps)
  rows.append(
    (
      "FixMatch input: 64 lab weak + 128 unl weak + 128 unl strong",
      320,
      f"{t * 1e3:.1f} ms",
      f"{320 / t:,.0f}",
    )
  )
  print()
  print("| stage | images/step | time | images/s |")
  print("|---|---|---|---|")
  for row in rows:
    print("| " + " | ".join(str(c) for c in row) + " |")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--parts", default="stream,cifar")
  parser.add_argument("--images", type=int, default=2000)
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--workers", default="1,2")
  parser.add_argument("--width", type=int, default=1, help="cnn_small width of the loop's step")
  parser.add_argument(
    "--augment", default="random_resized_crop", help="the step's crop, or 'none' (normalise only)"
  )
  parser.add_argument("--zip", default=str(_REPO.parent / "shared" / "data" / "cifar10-jpeg.zip"))
  parser.add_argument("--cache_dir", default=None, help="default: a fresh temporary directory")
  args = parser.parse_args()
  args.workers = [int(w) for w in args.workers.split(",")]
  parts = args.parts.split(",")
  if "stream" in parts:
    # The device of the loop measurement is one core, like an accelerator beside the host's
    # cores; the workers get the others. (Set before JAX starts; it also applies to `cifar`.)
    os.environ["XLA_FLAGS"] = (
      os.environ.get("XLA_FLAGS", "")
      + " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
    )
  import jax  # pylint: disable=g-import-not-at-top

  print(f"jax {jax.__version__}, {jax.device_count()} x {jax.devices()[0].platform}")
  if "stream" in parts:
    stream_tables(args)
  if "cifar" in parts:
    cifar_table(args)


if __name__ == "__main__":
  main()
