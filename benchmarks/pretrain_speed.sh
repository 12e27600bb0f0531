#!/usr/bin/env bash
# Steady-state pre-training speed of the CIFAR-10 CPU protocol (ResNet-20, batch 128, the JPEG
# copy): completed steps/s between steps 50 and 300 from the log's timestamps, with a checkpoint
# every 100 steps and with none, on all cores, on one core, and with two runs sharing the CPU.
#   bash benchmarks/pretrain_speed.sh
set -u
cd "$(dirname "$0")/.."
out=$(mktemp -d)
rate() {  # <log> <label>
  python3 - "$1" "$2" <<'PY'
import re, sys
t = {}
for line in open(sys.argv[1]):
  m = re.match(r"I\d+ (\d+):(\d+):(\d+\.\d+) .*\] \[(\d+)\] train/", line)
  if m:
    t[int(m.group(4))] = int(m.group(1)) * 3600 + int(m.group(2)) * 60 + float(m.group(3))
print(f"| {sys.argv[2]} | {250 / (t[300] - t[50]):.2f} |")
PY
}
cmd() {  # <name> [flags...]
  local name=$1; shift
  echo python launch/main.py --config=configs/cifar10_lt_cpu.py:pretrain --workdir="$out/$name" \
    --config.pretrain.num_steps=300 --config.pretrain.log_every=50 \
    --config.pretrain.eval_every=100000 "$@"
}
echo "| pre-training, steps 50-300 | steps/s |"
echo "|---|---:|"
$(cmd ckpt --config.pretrain.checkpoint_every=100) > "$out/a.log" 2>&1
rate "$out/a.log" "all cores, a checkpoint every 100 steps"
$(cmd none --config.pretrain.checkpoint_every=0) > "$out/b.log" 2>&1
rate "$out/b.log" "all cores, no checkpoint until the end"
taskset -c 0 $(cmd one --config.pretrain.checkpoint_every=100) > "$out/c.log" 2>&1
rate "$out/c.log" "one core (taskset -c 0)"
$(cmd x --config.pretrain.checkpoint_every=100) > "$out/d.log" 2>&1 &
$(cmd y --config.pretrain.checkpoint_every=100) > "$out/e.log" 2>&1
wait
rate "$out/d.log" "two runs at once, each"
echo "CPU steal during these runs: see /proc/stat (steal column) before and after."
rm -rf "$out"
