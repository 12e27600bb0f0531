"""Throughput of the training input path on the offline CIFAR-10 JPEG copy.

Measures (1) the first load of the zip (JPEG decode into memory, written to the
cache) and the cached load, (2) images/s of: host gather of a random batch
(`uniform_indices` + `train_batch`), and gather + device transfer + jitted
augmentation for weak batches of 64 and 128 and for a FixMatch step's input
(64 labeled weak + 128 unlabeled weak + 128 unlabeled strong).

  python benchmarks/input_bench.py [--zip ../shared/data/cifar10-jpeg.zip] [--steps 20]

Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import tempfile
import time

import jax
import jax.numpy as jnp

from selmix_jax.data import augment, pipeline, sources

_REPO = pathlib.Path(__file__).resolve().parents[1]


def _time(fn, steps):
  fn(0)  # Compile / warm up.
  start = time.perf_counter()
  for step in range(1, steps + 1):
    fn(step)
  return (time.perf_counter() - start) / steps


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--zip", default=str(_REPO.parent / "shared" / "data" / "cifar10-jpeg.zip"))
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--cache_dir", default=None, help="default: a fresh temporary directory")
  args = parser.parse_args()

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

  print(
    f"jax {jax.__version__}, {jax.device_count()} x {jax.devices()[0].platform}, "
    f"{os.cpu_count()} CPUs visible, {args.steps} timed steps after one warm-up"
  )
  print()
  print("| stage | images/step | time | images/s |")
  print("|---|---|---|---|")
  for row in rows:
    print("| " + " | ".join(str(c) for c in row) + " |")


if __name__ == "__main__":
  main()
