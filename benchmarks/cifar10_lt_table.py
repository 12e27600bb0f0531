"""Results table of `benchmarks/cifar10_lt_cpu.sh`: test metrics, mean ± std over seeds.

  python benchmarks/cifar10_lt_table.py runs/cifar10_lt_cpu
"""

import glob
import json
import os
import sys

import numpy as np

from selmix_jax import reporting

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


def _summaries(runs, variant):
  files = sorted(glob.glob(os.path.join(runs, "seed*", variant, "summary.json")))
  return [json.load(open(f)) for f in files]


def _target_table(runs):
  """Each objective's own test target: pre-trained -> SelMix, the change, and both controls."""
  lines = [
      "",
      "| objective | its target on test (×100) | pre-trained | SelMix | change | "
      "CE fine-tuning | mixup, P uniform |",
      "|---|---|---:|---:|---:|---:|---:|",
  ]
  controls = [_summaries(runs, c) for c in ("plain_ft", "uniform_mixup")]
  for variant in list(_ROWS)[2:]:
    results = _summaries(runs, variant)
    if not results:
      continue
    before = results[0]["target_before"]["target"]
    after = [r["target_after"]["target"] for r in results]
    objective = results[0]["objective"]
    # The controls have no objective of their own: score their test confusion with this one.
    control_cells = []
    for control in controls:
      values = [_objective_target(objective, r["after"]["test"]) for r in control]
      control_cells.append(_cell(values) if values and None not in values else "–")
    lines.append(
        f"| {variant} | {_TARGET_NAMES.get(variant, variant)} | {100 * before:.1f} | "
        f"{_cell(after)} | {_cell(np.asarray(after) - before, signed=True)} | " + " | ".join(control_cells)
        + " |"
    )
  return lines


_TARGET_NAMES = {
    "min_recall": "min recall",
    "mean_recall": "mean recall",
    "gmean": "G-mean of recalls",
    "hmean": "H-mean of recalls",
    "mean_recall_min_coverage": "mean recall (s.t. coverage ≥ 0.95/K)",
}
_TARGET_METRIC = {
    "min_recall": "min_recall",
    "mean_recall": "mean_recall",
    "gmean": "gmean_recall",
    "hmean": "hmean_recall",
    "mean_recall_min_coverage": "mean_recall",
}


def _objective_target(objective, test_metrics):
  metric = _TARGET_METRIC.get(objective)
  return None if metric is None else test_metrics[metric]


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
  files = sorted(glob.glob(os.path.join(runs, "ssl", "seed*", "min_recall", "summary.json")))
  if files:
    runs_json = [json.load(open(f)) for f in files]
    cells = [_cell([r["after"]["test"][m] for r in runs_json]) for m in metrics]
    lines.append(
        f"| SelMix min_recall (pseudo-labelled partners) | {len(files)} | "
        + " | ".join(cells) + " |"
    )
  return lines


def main(runs):
  metrics = reporting.SCALAR_METRICS
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
    files = sorted(glob.glob(os.path.join(runs, "seed*", variant, "summary.json")))
    if not files:
      continue
    runs_json = [json.load(open(f)) for f in files]
    cells = [_cell([r["after"]["test"][m] for r in runs_json]) for m in metrics]
    covered = "–"
    if variant.endswith("coverage"):
      gaps = [r["target_after"]["constraint_gap"] for r in runs_json]
      covered = ", ".join("yes" if g >= 0 else f"no ({100 * g:+.2f})" for g in gaps)
    lines.append(f"| {title} | {len(files)} | " + " | ".join(cells) + f" | {covered} |")
  lines += _target_table(runs)
  lines += _ssl_table(runs, metrics)
  print("\n".join(lines))


if __name__ == "__main__":
  main(sys.argv[1] if len(sys.argv) > 1 else "runs/cifar10_lt_cpu")
