r"""How level SelMix left a group of classes, on validation and test, from run summaries.

For each `summary.json` (a fine-tuning run): min and mean recall, the mean of a class group and
the spread (std) of its recalls, before and after, on both splits. With CIFAR-10 the default
group is bird, cat, deer, dog and horse: SelMix(min_recall) levels them on validation, and they
keep ~85 % of their errors among themselves, so leveling the whole label set cannot lift them
above their group mean. `group mean` bounds min recall; `group std` says how far below that
bound the minimum sits.

  python benchmarks/recall_spread.py runs/c10cpu/seed*/min_recall/summary.json [--group=2,3,4,5,7]
"""

import argparse
import json

import numpy as np


def row(name: str, recall, group) -> str:
  r = 100 * np.asarray(recall, np.float64)
  g = r[group]
  return (f"| {name} | {r.min():.1f} | {r.mean():.1f} | {g.mean():.1f} | {g.std():.1f} | "
          f"{' '.join(f'{x:.1f}' for x in r)} |")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("summaries", nargs="+", help="summary.json files of fine-tuning runs")
  parser.add_argument("--group", default="2,3,4,5,7", help="class indices of the group")
  args = parser.parse_args()
  group = [int(i) for i in args.group.split(",")]
  print("| run, split | min recall | mean recall | group mean | group std | per-class recall |")
  print("|---|---:|---:|---:|---:|---|")
  for path in args.summaries:
    with open(path, encoding="utf-8") as f:
      summary = json.load(f)
    for when in ("before", "after"):
      for split in ("val", "test"):
        print(row(f"{path} {when} {split}", summary[when][split]["recall"], group))


if __name__ == "__main__":
  main()
