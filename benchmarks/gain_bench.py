r"""Benchmark of the gain matrix, the pair distribution and the pair sampler.

  python benchmarks/gain_bench.py --rss      # full table (a few minutes on 2 CPU cores)
  python benchmarks/gain_bench.py --quick    # K <= 100 only

(from a checkout without `pip install -e .`, prefix `PYTHONPATH=.`)

For each K (d = 128; also d = 2048 at K = 1000) it times, jitted and warm (median of
repeats), `gains.make_gain_fn(...)` = `gain_matrix` (exact form, `hmean_recall` objective)
+ `pair_distribution`, one row per algorithm of `gain_matrix` (`factorised`, `softmax`),
next to a straightforward K⁴ implementation that builds the full `L_ijql` tensor with
`jnp.einsum` (skipped where that tensor exceeds 2 GB). The `vs softmax` column is the
softmax time over the row's time, both measured in the same run.

Memory, three measures:
  * `xla`: XLA's compiled memory analysis of the jitted function,
    argument + output + temporary buffers (`compiled.memory_analysis()`), i.e. the
    buffers XLA allocates for one call; `temp`: the temporary buffers alone;
  * `rss` (with `--rss`): peak resident set (`VmHWM` in `/proc/self/status`) of a fresh
    subprocess per configuration minus its peak just before compiling, so it includes
    compilation. (`ru_maxrss` is not used: Linux carries it over from the parent across
    fork + exec, so a child of a process that peaked at 1 GB reports >= 1 GB.)

The sampler is timed at ImageNet-LT scale: K = 1000, N = 115,846 long-tailed labels
(1280 down to 5 per class), batch 256.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from selmix_jax import gains
from selmix_jax import objectives
from selmix_jax import sampling

CONFIGS = ((10, 128), (30, 128), (100, 128), (300, 128), (1000, 128), (1000, 2048))
NAIVE_LIMIT_BYTES = 2 * 1024**3
MIX_WEIGHT = 0.8


def _inputs(num_classes, dim, seed=0):
  rng = np.random.default_rng(seed)
  prototypes = rng.normal(size=(num_classes, dim)).astype(np.float32)
  kernel = (rng.normal(size=(dim, num_classes)) / np.sqrt(dim)).astype(np.float32)
  bias = (0.1 * rng.normal(size=num_classes)).astype(np.float32)
  logits = 4.0 * rng.normal(size=(num_classes, num_classes)) + 6.0 * np.eye(num_classes)
  probs = np.exp(logits - logits.max(1, keepdims=True))
  probs /= probs.sum(1, keepdims=True)
  priors = np.full(num_classes, 1.0 / num_classes)
  confusion = (priors[:, None] * probs).astype(np.float32)
  return tuple(jnp.asarray(x) for x in (confusion, prototypes, kernel, bias))


def _naive_k4(value_fn, *, mix_weight):
  """The SPEC formulas verbatim: the full K⁴ tensor L_ijql, then G = Σ_ql D_ql L_ijql."""

  def fn(confusion, prototypes, kernel, bias, multipliers):
    num_classes = confusion.shape[0]
    sens = jax.grad(value_fn)(confusion, multipliers)  # M
    priors = confusion.sum(1, keepdims=True)
    rate = sens * confusion - confusion / priors * jnp.sum(sens * confusion, 1,
                                                           keepdims=True)
    mixed = (mix_weight * prototypes[:, None, :]
             + (1 - mix_weight) * prototypes[None, :, :])  # [K, K, d]
    probs = jax.nn.softmax(mixed @ kernel + bias, axis=-1)  # [K(i), K(j), K(l)]
    inner = jnp.einsum("ijd,qd->ijq", mixed, prototypes)
    eye = jnp.eye(num_classes)
    tensor = jnp.einsum("ijq,ijql->ijql", inner,
                        eye[:, None, None, :] - probs[:, :, None, :])
    gain = jnp.einsum("ijql,ql->ij", tensor, rate)
    return gain, gains.pair_distribution(gain, temperature=0.1)

  return jax.jit(fn)


def _time(fn, args, repeats):
  jax.block_until_ready(fn(*args))  # compile + warm
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def _xla_bytes(fn, args):
  """`(argument + output + temp bytes, temp bytes)` of the compiled function."""
  stats = fn.lower(*args).compile().memory_analysis()
  if stats is None:
    return float("nan"), float("nan")
  total = stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes
  return total, stats.temp_size_in_bytes


def _make(impl, num_classes):
  """`impl`: an algorithm of `gains.gain_matrix`, or `naive` (the K⁴ einsum)."""
  obj = objectives.get("hmean_recall")
  multipliers = obj.init_multipliers(num_classes)
  if impl in gains.ALGORITHMS:
    fn = gains.make_gain_fn(obj.value, mix_weight=MIX_WEIGHT, temperature=0.1, algorithm=impl)
  else:
    fn = _naive_k4(obj.value, mix_weight=MIX_WEIGHT)
  return fn, multipliers


def _measure(impl, num_classes, dim, repeats):
  fn, multipliers = _make(impl, num_classes)
  args = (*_inputs(num_classes, dim), multipliers)
  xla, temp = _xla_bytes(fn, args)
  return {"seconds": _time(fn, args, repeats), "xla_bytes": xla, "temp_bytes": temp}


def _rss_child(impl, num_classes, dim):
  """Run in a subprocess: peak RSS growth of compiling and running one configuration."""
  fn, multipliers = _make(impl, num_classes)
  args = (*_inputs(num_classes, dim), multipliers)
  jax.block_until_ready(args)
  before = _peak_rss_bytes()
  jax.block_until_ready(fn(*args))
  jax.block_until_ready(fn(*args))
  print(json.dumps({"rss_bytes": _peak_rss_bytes() - before}))


def _peak_rss_bytes():
  """Peak RSS of this process: VmHWM, which (unlike ru_maxrss) is reset by exec."""
  try:
    with open("/proc/self/status", encoding="ascii") as status:
      for line in status:
        if line.startswith("VmHWM:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _rss(impl, num_classes, dim):
  impl = "naive" if impl not in gains.ALGORITHMS else impl
  out = subprocess.run(
      [sys.executable, __file__, "--child", f"{impl},{num_classes},{dim}"],
      check=True, capture_output=True, text=True, env=dict(os.environ))
  return json.loads(out.stdout.strip().splitlines()[-1])["rss_bytes"]


def _naive_tensor_bytes(num_classes):
  return 4 * num_classes**4


def _fmt_time(seconds):
  if seconds < 1e-3:
    return f"{seconds * 1e6:.0f} µs"
  return f"{seconds * 1e3:.2f} ms" if seconds < 1 else f"{seconds:.2f} s"


def _fmt_bytes(num):
  if num != num:  # NaN
    return "n/a"
  return f"{num / 2**20:.1f} MiB" if num < 2**30 else f"{num / 2**30:.2f} GiB"


def _sampler_bench():
  num_classes, total, batch = 1000, 115_846, 256
  profile = 1280.0 * (5 / 1280) ** (np.arange(num_classes) / (num_classes - 1))
  counts = np.maximum(5, np.round(profile * total / profile.sum())).astype(int)
  counts[0] += total - counts.sum()
  labels = np.random.default_rng(0).permutation(np.repeat(np.arange(num_classes), counts))
  gain = np.random.default_rng(1).normal(size=(num_classes, num_classes)) * 0.05
  pair_probs = np.asarray(gains.pair_distribution(jnp.asarray(gain, jnp.float32)))

  def best_of(fn, repeats):
    times = []
    for _ in range(repeats):
      start = time.perf_counter()
      fn()
      times.append(time.perf_counter() - start)
    return statistics.median(times)

  setup = best_of(lambda: sampling.PairSampler(labels, num_classes=num_classes), 5)
  sampler = sampling.PairSampler(labels, num_classes=num_classes)
  prepare = best_of(lambda: sampler.prepare(pair_probs), 5)
  table = sampler.prepare(pair_probs)
  steps = iter(range(10**6))
  per_batch = best_of(lambda: sampler.sample(table, batch, seed=0, step=next(steps)), 200)
  raw = best_of(lambda: sampler.sample(pair_probs, batch, seed=0, step=next(steps)), 20)
  return [
      ("setup `PairSampler(labels)` (N = 115,846)", setup),
      ("`prepare(pair_probs)` (once per refresh, K² = 10⁶)", prepare),
      ("`sample(table, 256)` per batch", per_batch),
      ("`sample(raw [K, K] array, 256)` per batch (prepares each time)", raw),
  ]


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--rss", action="store_true", help="also measure subprocess RSS")
  parser.add_argument("--child", help=argparse.SUPPRESS)
  flags = parser.parse_args()
  if flags.child:
    impl, num_classes, dim = flags.child.split(",")
    _rss_child(impl, int(num_classes), int(dim))
    return

  configs = [c for c in CONFIGS if not flags.quick or c[0] <= 100]
  print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}, "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
  header = "| K | d | algorithm | time | vs softmax | xla mem | temp |"
  header += " rss |" if flags.rss else ""
  print(header)
  print("|" + "|".join(["---"] * (header.count("|") - 1)) + "|")

  def row(num_classes, dim, impl, result, softmax_seconds):
    cells = [str(num_classes), str(dim), impl]
    if result is None:
      note = f"skipped (L is {_fmt_bytes(_naive_tensor_bytes(num_classes))})"
      cells += [note] + ["—"] * (3 + flags.rss)
    else:
      ratio = softmax_seconds / result["seconds"]
      cells += [_fmt_time(result["seconds"]), f"{ratio:.2g}x",
                _fmt_bytes(result["xla_bytes"]), _fmt_bytes(result["temp_bytes"])]
      if flags.rss:
        cells.append(_fmt_bytes(_rss(impl, num_classes, dim)))
    print("| " + " | ".join(cells) + " |", flush=True)

  for num_classes, dim in configs:
    repeats = 20 if num_classes <= 100 else 5 if num_classes <= 300 else 3
    results = {impl: _measure(impl, num_classes, dim, repeats) for impl in gains.ALGORITHMS}
    if _naive_tensor_bytes(num_classes) <= NAIVE_LIMIT_BYTES:
      results["K⁴ einsum"] = _measure("naive", num_classes, dim, max(3, repeats // 4))
    else:
      results["K⁴ einsum"] = None
    for impl, result in results.items():
      row(num_classes, dim, impl, result, results["softmax"]["seconds"])

  print()
  print("| sampler, K = 1000, ImageNet-LT labels | median time |")
  print("|---|---|")
  for name, seconds in _sampler_bench():
    print(f"| {name} | {_fmt_time(seconds)} |", flush=True)


if __name__ == "__main__":
  main()
