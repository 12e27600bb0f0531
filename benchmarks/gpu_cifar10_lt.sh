#!/usr/bin/env bash
# CIFAR-10-LT supervised on one GPU at the paper's budget: the protocol of
# configs/cifar10_lt_cpu.py with ResNet-32 pre-trained for 200 epochs (17,500 steps of 128), then
# 10,000 SelMix steps for each of 5 objectives and for both controls (CE fine-tuning, uniform
# mixup), from the offline JPEG copy; prints the results table (benchmarks/cifar10_lt_table.py).
# Sized for about 12 minutes on one H100/H200-class GPU: an estimate from this project's CPU step
# costs and public GPU throughput, not a measurement (benchmarks/README.md, gpu_cifar10_lt).
#
#   bash benchmarks/gpu_cifar10_lt.sh [--smoke] [RUNS_DIR] [SEEDS...] [--pretrain=mislas|lace]
#       [--stage=all|pretrain|finetune] [--jobs=N] [--deadline=SECONDS] [--variants ...]
#
# Pieces: `--stage=pretrain` in one call, then `--stage=finetune` seed after seed (the runs folder
# carries over: finished runs are skipped, interrupted ones resume). `--jobs=7` trains 7
# fine-tuning runs at a time, each its own process on the one GPU (which a ResNet-32 step of 128
# images leaves mostly idle); `--deadline` starts no run after that many seconds.
#
# --smoke: generated 32 px data and a few steps of a small CNN per run (seconds, any CPU).
# DATA=<zip> points at cifar10-jpeg.zip (default ../shared/data/, else shared/data/ in here);
# PYTHON=<interpreter> (default python3).
# Resumable: finished runs are skipped, interrupted ones resume from their checkpoints.
# Needs jax, flax, optax, orbax-checkpoint and chex plus the `train` extra's small pure-Python
# packages (ml-collections, tensorboardX, dm-pix, grain, absl, Pillow, matplotlib,
# scikit-learn); never TensorFlow. On an image that lacks some, WHEELS=<folder of wheels> installs
# them offline (pip --no-index --no-deps) into RUNS_DIR/.site first. This checkout's selmix_jax
# is used whether or not the package is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
smoke=()
if [[ ${1:-} == --smoke ]]; then
  smoke=(--smoke)
  shift
fi
runs=${1:-runs/gpu_cifar10_lt}
shift || true
# Bare numbers after RUNS_DIR are seeds (`... RUNS 0 1 2`); anything else passes through.
args=()
seeds=()
for a in "$@"; do
  if [[ $a =~ ^[0-9]+$ && ${#args[@]} -eq 0 ]]; then seeds+=("$a"); else args+=("$a"); fi
done
if [[ ${#seeds[@]} -gt 0 ]]; then args=(--seeds "${seeds[@]}" "${args[@]}"); fi
mkdir -p "$runs"
data=${DATA:-../shared/data/cifar10-jpeg.zip}
if [[ ! -f $data && -f shared/data/cifar10-jpeg.zip ]]; then data=shared/data/cifar10-jpeg.zip; fi

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [[ -n ${WHEELS:-} ]]; then
  site="$(cd "$runs" && pwd)/.site"
  "${PYTHON:-python3}" -m pip install -q --no-index --no-deps --no-compile --target "$site" \
    "$WHEELS"/*.whl
  export PYTHONPATH="$PYTHONPATH:$site"
fi
# Compiled steps are kept across runs and invocations (every objective uses the same ResNet-32).
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$runs/.jax_cache}
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=${JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS:-0}
export TF_CPP_MIN_LOG_LEVEL=2
start=$SECONDS
"${PYTHON:-python3}" benchmarks/gpu_cifar10_lt.py "$runs" --data "$data" "${smoke[@]}" "${args[@]}"
"${PYTHON:-python3}" benchmarks/cifar10_lt_table.py "$runs" | tee "$runs/results.md"
echo "wall time: $((SECONDS - start)) s"
