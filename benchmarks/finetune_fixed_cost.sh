#!/usr/bin/env bash
# The fixed cost of a fine-tuning run on the CIFAR-10 CPU protocol: wall time of 10-step runs
# from one pre-trained checkpoint (everything a run pays besides its training steps: start-up,
# compiles, evaluation passes, reports), for SelMix and the uniform-mixup control; optionally the
# same runs with another checkout (e.g. an older commit) for comparison. Prints a Markdown table.
#   bash benchmarks/finetune_fixed_cost.sh <pre-training workdir>/checkpoints [OTHER_CHECKOUT]
# The first run from a checkpoint also fills its evaluation cache (<checkpoints>.eval_cache).
set -u
ckpt=$(cd "$1" && pwd); other=${2:-}
here=$(cd "$(dirname "$0")/.." && pwd)
out=$(mktemp -d)
echo "| code | run | wall time |"
echo "|---|---|---:|"
run() {  # <label> <checkout> <variant> <name> [flags...]
  local label=$1 dir=$2 variant=$3 name=$4; shift 4
  local t0=$(date +%s.%N)
  (cd "$dir" && python launch/main.py --config="configs/cifar10_lt_cpu.py:$variant" \
     --workdir="$out/$label-$name" --config.selmix.num_steps=10 \
     --config.selmix.init_checkpoint="$ckpt" "$@" > "$out/$label-$name.log" 2>&1) \
     || { echo "failed: $out/$label-$name.log"; exit 1; }
  printf "| %s | %s | %.1f s |\n" "$label" "$name" "$(echo "$(date +%s.%N) - $t0" | bc)"
}
if [[ -n $other ]]; then
  run other "$other" min_recall "SelMix min_recall"
  run other "$other" uniform_mixup "uniform mixup"
fi
rm -rf "$ckpt.eval_cache"
run this "$here" min_recall "SelMix min_recall, first run from the checkpoint"
run this "$here" min_recall "SelMix min_recall, later runs" --config.seed=1
run this "$here" uniform_mixup "uniform mixup, later runs"
rm -rf "$out"
