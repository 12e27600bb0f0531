"""Results tables of fine-tuning runs: test metrics (mean ± std over seeds) and each objective's
own target against the controls.

  python benchmarks/cifar10_lt_table.py [--split=val] RUN [RUN ...]

Each RUN is a run directory (a fine-tuning workdir with `summary.json`, or a `pretrain_and_selmix`
workdir with `selmix/summary.json`), or any folder above such directories, searched recursively.
Runs are grouped by their starting checkpoint and what they are (SelMix for an objective, or a
control); seeds of one group are aggregated. Runs of one group whose settings differ in more than
the seed (e.g. `selmix.temperature_scale`) get a row per setting, named by the fields that differ.
Every objective is covered, and every metric of `metrics.SCALAR_METRICS` (min head-tail recall
included). `--split=val` reports the validation split instead of the test split (default).
"""

import collections
import glob
import json
import os
import sys

import numpy as np

from selmix_jax import metrics as metrics_lib
from selmix_jax import objectives

# The test metric each objective's target is (constrained objectives: their base metric).
_TARGET_METRIC = {
    "mean_recall": "mean_recall",
    "min_recall": "min_recall",
    "min_head_tail_recall": "min_head_tail_recall",
    "gmean_recall": "gmean_recall",
    "hmean_recall": "hmean_recall",
    "mean_recall_min_coverage": "mean_recall",
    "hmean_min_coverage": "hmean_recall",
    "mean_recall_head_tail_coverage": "mean_recall",
    "hmean_head_tail_coverage": "hmean_recall",
}


def _cell(values, signed=False):
  values = 100.0 * np.asarray(values, np.float64)
  fmt = "+.1f" if signed else ".1f"
  if len(values) == 1:
    return f"{values[0]:{fmt}}"
  return f"{values.mean():{fmt}} ± {values.std(ddof=1):.1f}"


def find_summaries(paths):
  """Fine-tuning `summary.json` files under `paths` (run dirs or folders above them)."""
  found = []
  for path in paths:
    if os.path.isfile(path):
      if not path.endswith(".json"):
        raise SystemExit(f"{path}: expected a run directory or a summary.json file.")
      found.append(path)
      continue
    found += glob.glob(os.path.join(path, "**", "summary.json"), recursive=True)
  summaries = []
  for name in sorted(set(found)):
    summary = json.load(open(name))
    if "after" in summary:  # Pre-training summaries have no before/after.
      summary["_path"] = name
      summaries.append(summary)
  return summaries


def method(summary) -> str:
  """What a run is: its recorded method, or (older runs) derived from its config."""
  if "method" in summary:
    name = summary["method"]
  else:
    selmix = summary["config"]["selmix"]
    pairs = selmix.get("pairs", "gain")
    if pairs == "uniform":
      name = "uniform mixup"
    elif pairs == "instance":
      name = "CE fine-tuning" if selmix.get("mix_weight_min", 0.6) >= 1 else "instance mixup"
    else:
      name = f"SelMix ({objectives.canonical_name(summary['objective'])})"
  if summary["config"]["selmix"].get("partner_pool") == "unlabeled":
    name += ", pseudo-labelled partners"
  return name


def _objective(summary) -> str | None:
  if summary.get("objective", "none") == "none" or not method(summary).startswith("SelMix"):
    return None
  return objectives.canonical_name(summary["objective"])


# Config fields that do not change what a fine-tuning run computes (or that seeds vary): not a
# variant. Runs of one group start from one checkpoint, so how it was pre-trained is not either.
_NOT_A_VARIANT = ("seed", "mode", "pretrain.", "selmix.log_every", "selmix.checkpoint_every",
                  "selmix.eval_every", "selmix.gain_chunk_size", "data.num_workers",
                  "data.prefetch", "data.cache_dir", "data.data_dir")  # fmt: skip


def _flat(tree, prefix=""):
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flat(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = json.dumps(value)
  return out


def _split_variants(runs, name):
  """`runs` of one method from one checkpoint -> {row name: runs that differ only by seed}."""
  flats = [_flat(r["config"]) for r in runs]
  keys = sorted(k for k in {k for f in flats for k in f} if not k.startswith(_NOT_A_VARIANT))
  differ = [k for k in keys if len({f.get(k) for f in flats}) > 1]
  if not differ:
    return {name: runs}
  variants = collections.defaultdict(list)
  for run, flat in zip(runs, flats):
    label = ", ".join(f"{k.split('.')[-1]}={json.loads(flat.get(k, 'null'))}" for k in differ)
    variants[f"{name}, {label}"].append(run)
  return dict(variants)


def _target(summary, when: str, split: str, key: str = "target") -> float | None:
  """`key` ('target' or 'constraint_gap', None for an objective without constraints) of a run's
  objective `before`/`after` fine-tuning on `split`: the summary stores the test split's; another
  split's is computed from its confusion counts."""
  if split == "test":
    return summary[f"target_{when}"].get(key)
  objective = objectives.from_config(summary["config"]["objective"])
  value = objective.target(np.asarray(summary[when][split]["confusion"], np.float32)).get(key)
  return None if value is None else float(value)


def tables(summaries, split: str = "test") -> str:
  metrics = metrics_lib.SCALAR_METRICS
  by_method = collections.defaultdict(list)
  for s in summaries:
    by_method[(s["config"]["selmix"]["init_checkpoint"], method(s))].append(s)
  groups = {}
  for (start, name), runs in by_method.items():
    for row, members in _split_variants(runs, name).items():
      groups[(start, row)] = members
  lines = []
  for start in sorted({k[0] for k in groups}):
    members = {m: runs for (c, m), runs in groups.items() if c == start}
    first = next(iter(members.values()))[0]
    lines += [
        f"\nFrom `{start}` (pre-training step {first.get('pretrain_step')}); {split} split, ×100:",
        "",
        "| model | runs | " + " | ".join(metrics) + " | constraints hold |",
        "|---|---:|" + "---:|" * (len(metrics) + 1),
        "| pre-trained | – | " + " | ".join(_cell([first["before"][split][m]]) for m in metrics)
        + " | – |",
    ]
    controls = {m: r for m, r in members.items() if not m.startswith("SelMix")}
    selmix = {m: r for m, r in members.items() if m.startswith("SelMix")}
    for name, runs in sorted(controls.items()) + sorted(selmix.items()):
      gaps = [None]
      if _objective(runs[0]) is not None:  # Controls have no constraints of their own.
        gaps = [_target(r, "after", split, "constraint_gap") for r in runs]
      held = "–" if gaps[0] is None else ", ".join(
          "yes" if g >= 0 else f"no ({100 * g:+.2f})" for g in gaps
      )
      cells = [_cell([r["after"][split][m] for r in runs]) for m in metrics]
      lines.append(f"| {name} | {len(runs)} | " + " | ".join(cells) + f" | {held} |")
    lines += [
        "",
        f"| run | its target on {split} (×100) | pre-trained | SelMix | change |"
        + "".join(f" {c} |" for c in sorted(controls)),
        "|---|---|---:|---:|---:|" + "---:|" * len(controls),
    ]
    for name, runs in sorted(selmix.items()):
      objective = _objective(runs[0])
      metric = _TARGET_METRIC.get(objective, "target")
      before = _target(runs[0], "before", split)
      after = [_target(r, "after", split) for r in runs]
      control_cells = [
          _cell([r["after"][split][metric] for r in c]) if metric in c[0]["after"][split]
          else "–"
          for _, c in sorted(controls.items())
      ]  # fmt: skip
      row = objective if name == f"SelMix ({objective})" else name
      lines.append(
          f"| {row} | {metric} | {100 * before:.1f} | {_cell(after)} | "
          f"{_cell(np.asarray(after) - before, signed=True)} |"
          + "".join(f" {c} |" for c in control_cells)
      )
  return "\n".join(lines)


def main(argv):
  split = "test"
  if argv and argv[0].startswith("--split="):
    split = argv.pop(0).split("=", 1)[1]
    if split not in ("val", "test"):
      raise SystemExit(f"--split={split}: expected val or test.")
  if not argv:
    raise SystemExit(__doc__)
  summaries = find_summaries(argv)
  if not summaries:
    raise SystemExit(f"No fine-tuning summary.json under {argv}.")
  print(tables(summaries, split))


if __name__ == "__main__":
  main(sys.argv[1:])
