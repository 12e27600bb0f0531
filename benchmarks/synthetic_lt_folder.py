"""Writes a synthetic long-tailed image folder with many classes, for large-K runs on a CPU.

Class k is a fixed 4x4 colour pattern, upsampled to `size` px, shifted by a random offset and
covered with noise. Patterns are a mix of a pattern shared by every `groups`-th class and one of
the class's own (weight `own`), so classes of one group are easy to confuse and a small CNN
separates the groups better than the classes in them. The training
split is long-tailed (`max` images for class 0 down to `min` for the last, the SPEC §8 profile);
the test split has `test` images of every class.

  python benchmarks/synthetic_lt_folder.py --out /tmp/lt200 --classes 200 --max 120 --min 12
  python launch/main.py --config=configs/default.py --workdir=/tmp/lt200_run \
    --config.data.name=image_folder --config.data.root=/tmp/lt200 --config.data.labeled_max=-1 \
    --config.data.val_per_class=10 --config.objective.name=hmean_recall

(`labeled_max=-1` keeps every training image left after the 10 validation images a class.)
"""

import argparse
import os

import numpy as np
import PIL.Image

from selmix_jax.data import splits


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", required=True)
  parser.add_argument("--classes", type=int, default=200)
  parser.add_argument("--max", type=int, default=120, help="training images of class 0")
  parser.add_argument("--min", type=int, default=12, help="training images of the last class")
  parser.add_argument("--test", type=int, default=10, help="test images per class")
  parser.add_argument("--size", type=int, default=32)
  parser.add_argument("--noise", type=float, default=60.0)
  parser.add_argument("--groups", type=int, default=20,
                      help="classes k, k + groups, ... look alike")
  parser.add_argument("--own", type=float, default=0.35, help="weight of a class's own pattern")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  rng = np.random.default_rng(args.seed)
  shared = rng.integers(0, 256, (args.groups, 4, 4, 3)).astype(np.float64)
  own = rng.integers(0, 256, (args.classes, 4, 4, 3)).astype(np.float64)
  patterns = (1 - args.own) * shared[np.arange(args.classes) % args.groups] + args.own * own
  counts = splits.labeled_counts(args.max, args.max / args.min, args.classes)
  for split, per_class in (("train", counts), ("test", [args.test] * args.classes)):
    for k in range(args.classes):
      folder = os.path.join(args.out, split, f"class_{k:03d}")
      os.makedirs(folder, exist_ok=True)
      base = np.kron(patterns[k], np.ones((args.size // 4, args.size // 4, 1)))
      for i in range(per_class[k]):
        shifted = np.roll(base, rng.integers(-3, 4, 2), axis=(0, 1))
        pixels = np.clip(shifted + rng.normal(0, args.noise, shifted.shape), 0, 255)
        PIL.Image.fromarray(pixels.astype(np.uint8)).save(
            os.path.join(folder, f"{i:04d}.jpg"), quality=90
        )
  print(f"{args.out}: {args.classes} classes, train {counts[0]}..{counts[-1]} a class "
        f"({int(np.sum(counts))} images), test {args.test} a class.")


if __name__ == "__main__":
  main()
