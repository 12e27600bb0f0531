#!/usr/bin/env bash
# Issue-6 protocol on a CPU: CIFAR-10-LT from the offline JPEG copy, one pre-training run, then
# SelMix per objective and two controls from that checkpoint, for each seed; then the
# semi-supervised smoke run (FixMatch(LA) + SelMix min_recall); writes the tables.
# Not part of CI. Usage (from a fresh clone with the package installed, shared/ beside it):
#   [DIAGNOSTICS=1] bash benchmarks/cifar10_lt_cpu.sh [RUNS_DIR] [SEEDS...]
# Resumable: re-running skips finished runs and resumes interrupted ones from their checkpoints.
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-runs/cifar10_lt_cpu}
shift || true
seeds=${*:-0 1 2}
variants=${VARIANTS:-"min_recall mean_recall min_head_tail_recall gmean hmean mean_recall_min_coverage plain_ft uniform_mixup"}
export TF_CPP_MIN_LOG_LEVEL=2
mkdir -p "$runs"

run() {  # [entry=<script>] run <config variant> <workdir> [extra flags...]
  local variant=$1 workdir=$2
  shift 2
  if [[ -f $workdir/summary.json ]]; then echo "done already: $workdir"; return; fi
  local t0=$SECONDS
  python "${entry:-launch/main.py}" --config="configs/cifar10_lt_cpu.py:$variant" \
    --workdir="$workdir" "$@" > "$workdir.log" 2>&1
  echo "$workdir: $((SECONDS - t0)) s" | tee -a "$runs/wall_times.txt"
}

run pretrain "$runs/pretrain"
for seed in $seeds; do
  mkdir -p "$runs/seed$seed"
  for variant in $variants; do
    run "$variant" "$runs/seed$seed/$variant" \
      --config.seed="$seed" --config.selmix.init_checkpoint="$runs/pretrain/checkpoints"
  done
done
# Semi-supervised smoke run: FixMatch(LA) on the SSL split, then SelMix(min_recall) with
# pseudo-labelled partners (seed 0 only; SSL_SEEDS="0 1" for more).
mkdir -p "$runs/ssl"
run ssl_pretrain "$runs/ssl/pretrain"
for seed in ${SSL_SEEDS:-0}; do
  mkdir -p "$runs/ssl/seed$seed"
  run ssl_min_recall "$runs/ssl/seed$seed/min_recall" \
    --config.seed="$seed" --config.selmix.init_checkpoint="$runs/ssl/pretrain/checkpoints"
done
# Diagnostic (DIAGNOSTICS=1; not a result): SelMix(min_recall) with its refreshes on the test
# split, the ceiling of the pre-trained features without validation noise.
if [[ ${DIAGNOSTICS:-0} == 1 ]]; then
  for seed in $seeds; do
    mkdir -p "$runs/oracle/seed$seed"
    entry=benchmarks/oracle_gain_split.py run min_recall "$runs/oracle/seed$seed/min_recall" \
      --config.seed="$seed" --config.selmix.init_checkpoint="$runs/pretrain/checkpoints"
  done
  python benchmarks/recall_spread.py "$runs"/seed*/min_recall/summary.json \
    "$runs"/oracle/seed*/min_recall/summary.json | tee "$runs/recall_spread.md"
fi
python benchmarks/cifar10_lt_table.py "$runs"/seed* "$runs"/ssl | tee "$runs/results.md"
