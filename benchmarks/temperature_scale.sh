#!/usr/bin/env bash
# Does `selmix.temperature_scale` change results? SelMix for the H-mean and the coverage-
# constrained mean recall on the CIFAR-10 CPU protocol, with the temperature absolute (the
# SPEC's) and relative to the largest positive gain, from one pre-trained checkpoint. Prints the
# validation-split table (the test split is not looked at to choose a setting).
#   bash benchmarks/temperature_scale.sh <pre-training workdir>/checkpoints OUT_DIR [FLAGS...]
# FLAGS go to every run (e.g. --config.seed=1 for another fine-tuning seed).
set -eu
ckpt=$(cd "$1" && pwd)
out=$2
shift 2
here=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$out"
for objective in hmean_recall mean_recall_min_coverage; do
  for scale in absolute max_gain; do
    w="$out/$objective-$scale"
    python "$here/launch/main.py" --config="$here/configs/cifar10_lt_cpu.py:$objective" \
      --workdir="$w" --config.selmix.init_checkpoint="$ckpt" \
      --config.selmix.temperature_scale="$scale" "$@" > "$w.log" 2>&1 \
      || { echo "failed: $w.log"; exit 1; }
    grep -E "Refresh at step (0|100|290):" "$w.log" | sed "s/^.*\] /$objective $scale: /"
  done
done
python "$here/benchmarks/cifar10_lt_table.py" --split=val "$out"/*/
