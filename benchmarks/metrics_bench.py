"""Confusion matrix + metric summary for 10**6 predictions: JAX against scikit-learn.

For each K, times (warm, median of `--repeats`) one jitted call of
`metrics.summary(confusion.confusion_matrix(labels, preds, K))` with every output
blocked on, and scikit-learn's `confusion_matrix` + `recall_score(average=None)` on
the same NumPy data in the same process; checks that both agree.

  python benchmarks/metrics_bench.py [--n 1000000] [--num_classes 10 100 1000] [--repeats 7]

Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import platform
import time

import jax
import numpy as np
from sklearn import metrics as sk_metrics

from selmix_jax import confusion
from selmix_jax import metrics


def _median_ms(fn, repeats):
  fn()  # Compile / warm up.
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return 1e3 * float(np.median(times))


def _bench(labels, preds, num_classes, repeats):
  """Returns (jax ms, sklearn ms) for one K, after checking both agree."""
  labels_dev, preds_dev = jax.device_put(labels), jax.device_put(preds)
  evaluate = jax.jit(lambda y, p: metrics.summary(confusion.confusion_matrix(y, p, num_classes)))
  jax_ms = _median_ms(lambda: jax.block_until_ready(evaluate(labels_dev, preds_dev)), repeats)

  ks = np.arange(num_classes)

  def sklearn_eval():
    cm = sk_metrics.confusion_matrix(labels, preds, labels=ks)
    r = sk_metrics.recall_score(labels, preds, labels=ks, average=None, zero_division=0)
    return cm, r

  sk_ms = _median_ms(sklearn_eval, repeats)

  cm_sk, r_sk = sklearn_eval()
  np.testing.assert_array_equal(
    confusion.confusion_matrix(labels_dev, preds_dev, num_classes), cm_sk
  )
  present = cm_sk.sum(1) > 0
  recall = np.asarray(evaluate(labels_dev, preds_dev)["recall"])
  np.testing.assert_allclose(recall[present], r_sk[present], rtol=1e-5)
  return jax_ms, sk_ms


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--n", type=int, default=10**6)
  parser.add_argument("--num_classes", type=int, nargs="+", default=[10, 100, 1000])
  parser.add_argument("--repeats", type=int, default=7)
  args = parser.parse_args()

  rng = np.random.default_rng(0)
  rows = []
  for num_classes in args.num_classes:
    # Long-tailed labels (imbalance 100), predictions right 60% of the time.
    prior = 100.0 ** (-np.arange(num_classes) / max(num_classes - 1, 1))
    labels = rng.choice(num_classes, size=args.n, p=prior / prior.sum()).astype(np.int32)
    noise = rng.integers(0, num_classes, args.n, dtype=np.int32)
    preds = np.where(rng.random(args.n) < 0.6, labels, noise).astype(np.int32)
    jax_ms, sk_ms = _bench(labels, preds, num_classes, args.repeats)
    rows.append((num_classes, jax_ms, sk_ms, sk_ms / jax_ms))

  print(
    f"N = {args.n:,} predictions; jax {jax.__version__} on {jax.devices()[0].platform} "
    f"({jax.local_device_count()} device(s)); {platform.processor() or platform.machine()}"
  )
  print()
  print(
    "| K | jax confusion + summary (ms) | sklearn confusion_matrix + recall_score (ms) | speedup |"
  )
  print("|---:|---:|---:|---:|")
  for num_classes, jax_ms, sk_ms, ratio in rows:
    print(f"| {num_classes} | {jax_ms:.2f} | {sk_ms:.1f} | {ratio:.0f}x |")


if __name__ == "__main__":
  main()
