#!/usr/bin/env bash
# Everything one device session measures, as one prepared command per call (the device tool's
# calls are short and few: see benchmarks/README.md, "One device session").
#
#   bash benchmarks/device_session.sh table   [SECONDS]  # MiSLAS pre-training + the 3-seed table
#   bash benchmarks/device_session.sh benches [SECONDS]  # step vs release, loop, OOM message
#   bash benchmarks/device_session.sh smoke              # both, at smoke size, on any CPU
#
# Expects, in the repository root (ignored by git, named in the call's `carry`): `.whl/` (the
# wheels the GPU image lacks), `.data/cifar10-jpeg.zip`, `.release/SelMix` (the authors' release,
# for the step comparison) and, from an earlier call, `.device/runs.tgz` (the runs folder to go
# on from). Writes under $OUT: `<part>.log`, `runs.tgz` (summaries, logs, plots, TensorBoard
# events and the pre-training checkpoints; no fine-tuning checkpoints) and the tables.
set -uo pipefail
cd "$(dirname "$0")/.."
part=${1:-table}
budget=${2:-540}
OUT=${OUT:-/tmp/device_out}
mkdir -p "$OUT"
start=$SECONDS
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2 XLA_PYTHON_CLIENT_PREALLOCATE=false
if [[ -z ${NO_WHEELS:-} ]] && compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="$PWD:/tmp/site"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
runs=${RUNS:-runs/gpu_c10_mislas}
if [[ -f .device/runs.tgz && ! -d $runs ]]; then
  mkdir -p "$runs" && tar -xzf .device/runs.tgz -C "$runs"
fi
export JAX_COMPILATION_CACHE_DIR=$runs/.jax_cache JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0
smoke=()
if [[ $part == smoke ]]; then smoke=(--smoke); fi
left() { echo $((budget - (SECONDS - start))); }

pack() {
  # The runs folder without fine-tuning checkpoints or the compilation cache (small: the
  # pre-training checkpoints of a ResNet-32 are a few MB), so a later call can go on from it.
  tar -czf "$OUT/runs.tgz" -C "$runs" --exclude=.jax_cache --exclude='seed*/*/checkpoints' \
    --exclude=smoke_data.zip . 2>/dev/null
  ls -la "$OUT"
}
trap pack EXIT

table() {
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
  python3 -c "import jax; print('jax', jax.__version__, jax.devices())"
  # 3 seeds x (5 objectives + 2 controls): JOBS processes at a time on the one GPU, each one run
  # (or, with TOGETHER=1, a group of runs in one program: finetune.run_many).
  python3 benchmarks/gpu_cifar10_lt.py "$runs" --data .data/cifar10-jpeg.zip --pretrain "${PRETRAIN:-mislas}" \
    --seeds 0 1 2 --jobs "${JOBS:-3}" ${TOGETHER:+--together} --deadline "$(( $(left) - ${RUN_MARGIN:-150} ))" \
    --report_every 45 "${smoke[@]}"
  python3 benchmarks/cifar10_lt_table.py "$runs" | tee "$OUT/table_test.md"
  python3 benchmarks/cifar10_lt_table.py --split=val "$runs" > "$OUT/table_val.md"
  cp "$runs/wall_times.txt" "$OUT/" 2>/dev/null
}

benches() {
  if [[ -f benchmarks/gpu_step_vs_release.py ]]; then
    release=()
    if [[ -d .release/SelMix ]]; then release=(--release .release/SelMix); fi
    timeout "$(( $(left) / 2 ))" python3 benchmarks/gpu_step_vs_release.py "${release[@]}" \
      "${smoke[@]}" | tee "$OUT/step_vs_release.md"
  fi
  if [[ -f benchmarks/loop_bench.py ]]; then
    timeout "$(( $(left) - 20 ))" python3 benchmarks/loop_bench.py "${smoke[@]}" \
      | tee "$OUT/loop_bench.md"
  fi
}

case $part in
  table) table 2>&1 | tee "$OUT/table.log" ;;
  benches) benches 2>&1 | tee "$OUT/benches.log" ;;
  smoke) { table; benches; } 2>&1 | tee "$OUT/smoke.log" ;;
  *) echo "unknown part $part (table, benches, smoke)"; exit 2 ;;
esac
echo "device_session $part: $((SECONDS - start)) s"
