#!/usr/bin/env bash
# Head-only SelMix on frozen features (issue 24): from a features .npz (e.g. written by
# benchmarks/export_features.py from a CIFAR-10-LT backbone), pre-train the linear head once
# (logit-adjusted CE), then per seed fine-tune it with SelMix for min recall and H-mean and the two
# controls (CE fine-tuning of the head, uniform mixup), and print the table (test split; the
# validation split chose nothing here beyond the config's defaults).
# Usage: bash benchmarks/features_table.sh FEATURES.npz [RUNS_DIR] [SEEDS...]
#   EXTRA="--config.pretrain.num_steps=20 ..." adds flags to every run (smoke tests).
# Resumable: finished runs are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
npz=$1
runs=${2:-runs/features_table}
shift 2 || shift $#
seeds=${*:-0 1 2}
export TF_CPP_MIN_LOG_LEVEL=2
mkdir -p "$runs"
read -r -a extra <<< "${EXTRA:-}"

run() {  # run <config variant> <workdir> [flags...]
  local variant=$1 workdir=$2
  shift 2
  if [[ -f $workdir/summary.json ]]; then echo "done already: $workdir"; return; fi
  local t0=$SECONDS
  python launch/main.py --config="configs/features.py:$variant" --config.data.path="$npz" \
    --workdir="$workdir" "${extra[@]}" "$@" > "$workdir.log" 2>&1 \
    || { echo "FAILED: $workdir (see $workdir.log)"; tail -5 "$workdir.log"; exit 1; }
  echo "$workdir: $((SECONDS - t0)) s"
}

run pretrain "$runs/pretrain"
for seed in $seeds; do
  mkdir -p "$runs/seed$seed"
  for variant in min_recall hmean_recall plain_ft uniform_mixup; do
    run "$variant" "$runs/seed$seed/$variant" --config.seed="$seed" \
      --config.selmix.init_checkpoint="$runs/pretrain/checkpoints"
  done
done
python benchmarks/cifar10_lt_table.py "$runs"
