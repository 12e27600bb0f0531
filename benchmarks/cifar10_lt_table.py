"""Results table of `benchmarks/cifar10_lt_cpu.sh`: test metrics, mean ± std over seeds.

  python benchmarks/cifar10_lt_table.py runs/cifar10_lt_cpu
"""

import glob
import json
import os
import sys

import numpy as np

from selmix_jax import metrics as metrics_lib

_ROWS = {
    "plain_ft": "control: CE fine-tuning (no mixup)",
    "uniform_mixup": "control: mixup, P uniform",
    "min_recall": "SelMix min_recall",
    "mean_recall": "SelMix mean_recall",
    "gmean": "SelMix gmean",
    "hmean": "SelMix hmean",
    "mean_recall_min_coverage": "SelMix mean_recall_min_coverage",
}


def _cell(values, signed=False):
  values = 100.0 * np.asarray(values, np.float64)
  fmt = "+.1f" if signed else ".1f"
  if len(values) == 1:
    return f"{values[0]:{fmt}}"
  return f"{values.mean():{fmt}} ± {values.std(ddof=1):.1f}"


# Each SelMix objective's own target: its title and the test metric that measures it.
_TARGETS = {
    "min_recall": ("min recall", "min_recall"),
    "mean_recall": ("mean recall", "mean_recall"),
    "gmean": ("G-mean of recalls", "gmean_recall"),
    "hmean": ("H-mean of recalls", "hmean_recall"),
    "mean_recall_min_coverage": ("mean recall (s.t. coverage ≥ 0.95/K)", "mean_recall"),
}


def _summaries(runs, variant):
  """`summary.json` of `<runs>/seed*/<variant>`, one per seed."""
  files = sorted(glob.glob(os.path.join(runs, "seed*", variant, "summary.json")))
  return [json.load(open(f)) for f in files]


def _test_cells(results, metrics):
  """Mean ± std over seeds of each final test metric."""
  return [_cell([r["after"]["test"][m] for r in results]) for m in metrics]


def _target_table(runs):
  """Each objective's own test target: pre-trained -> SelMix, the change, and both controls."""
  lines = [
      "",
      "| objective | its target on test (×100) | pre-trained | SelMix | change | "
      "CE fine-tuning | mixup, P uniform |",
      "|---|---|---:|---:|---:|---:|---:|",
  ]
  controls = [_summaries(runs, c) for c in ("plain_ft", "uniform_mixup")]
  for variant, (title, metric) in _TARGETS.items():
    results = _summaries(runs, variant)
    if not results:
      continue
    before = results[0]["target_before"]["target"]
    after = [r["target_after"]["target"] for r in results]
    # The controls have no objective of their own: the same metric of their test confusion.
    control_cells = [_test_cells(c, [metric])[0] if c else "–" for c in controls]
    lines.append(
        f"| {variant} | {title} | {100 * before:.1f} | {_cell(after)} | "
        f"{_cell(np.asarray(after) - before, signed=True)} | " + " | ".join(control_cells) + " |"
    )
  return lines


def _ssl_table(runs, metrics):
  """Semi-supervised smoke run: FixMatch(LA) (EMA weights) and SelMix(min_recall) per seed."""
  pre_file = os.path.join(runs, "ssl", "pretrain", "summary.json")
  if not os.path.isfile(pre_file):
    return []
  pre = json.load(open(pre_file))
  lines = [
      "",
      f"Semi-supervised smoke run ({pre['steps']} FixMatch(LA) steps, "
      f"{pre['wall_time_s'] / 60:.0f} min):",
      "",
      "| model (test split, ×100) | seeds | " + " | ".join(metrics) + " |",
      "|---|---:|" + "---:|" * len(metrics),
      "| FixMatch(LA) | – | " + " | ".join(_cell([pre["test"][m]]) for m in metrics) + " |",
  ]
  results = _summaries(os.path.join(runs, "ssl"), "min_recall")
  if results:
    lines.append(
        f"| SelMix min_recall (pseudo-labelled partners) | {len(results)} | "
        + " | ".join(_test_cells(results, metrics)) + " |"
    )
  return lines


def main(runs):
  metrics = metrics_lib.SCALAR_METRICS
  lines = [
      "| model (test split, ×100) | seeds | " + " | ".join(metrics) + " | coverage ok |",
      "|---|---:|" + "---:|" * (len(metrics) + 1),
  ]
  pre = json.load(open(os.path.join(runs, "pretrain", "summary.json")))
  lines.append(
      "| pre-trained (LA-CE) | – | " + " | ".join(_cell([pre["test"][m]]) for m in metrics)
      + " | – |"
  )
  for variant, title in _ROWS.items():
    results = _summaries(runs, variant)
    if not results:
      continue
    covered = "–"
    if variant.endswith("coverage"):
      gaps = [r["target_after"]["constraint_gap"] for r in results]
      covered = ", ".join("yes" if g >= 0 else f"no ({100 * g:+.2f})" for g in gaps)
    lines.append(
        f"| {title} | {len(results)} | " + " | ".join(_test_cells(results, metrics))
        + f" | {covered} |"
    )
  lines += _target_table(runs)
  lines += _ssl_table(runs, metrics)
  print("\n".join(lines))


if __name__ == "__main__":
  main(sys.argv[1] if len(sys.argv) > 1 else "runs/cifar10_lt_cpu")
