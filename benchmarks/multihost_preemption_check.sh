#!/usr/bin/env bash
# What tests/test_multihost.py and tests/test_resilience.py assert, printed for a reader:
#  1. tiny_ssl on 2 processes x 2 CPU devices (jax.distributed on 127.0.0.1) against 1 process x
#     4 devices: summary.json (every metric and raw confusion count) compared key by key;
#  2. SIGTERM to a fine-tuning run at step ~40, the same command again, against an uninterrupted
#     run: summaries and every array of the final checkpoints compared.
#   bash benchmarks/multihost_preemption_check.sh [OUT_DIR]     (~1.5 min on 2 cores)
set -u
here=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-$(mktemp -d)}; rm -rf "$out"; mkdir -p "$out"
main() { python "$here/launch/main.py" "$@"; }
devices() { echo "--xla_force_host_platform_device_count=$1"; }
compare() {  # <run dir> <run dir>: summaries of both stages, without wall time and config
  python - "$1" "$2" <<'PY'
import json, os, sys
import numpy as np
ok = True
for stage in ("pretrain", "selmix"):
  a, b = (json.load(open(os.path.join(d, stage, "summary.json"))) for d in sys.argv[1:])
  for s in (a, b):
    s.pop("wall_time_s"); s.pop("config")
  same = a == b
  ok &= same
  line = f"{stage}: summary.json {'identical' if same else 'DIFFERENT'}"
  if "after" in a:
    c = np.asarray(a["after"]["test"]["confusion"])
    line += f" (test confusion counts sum to {c.sum()}, min recall {a['after']['test']['min_recall']:.4f})"
  print(line)
sys.exit(0 if ok else 1)
PY
}
ssl=(--config="$here/configs/default.py:tiny_ssl" --config.pretrain.num_steps=24
     --config.selmix.num_steps=8)
port=$(python -c "import socket; s=socket.socket(); s.bind(('127.0.0.1',0)); print(s.getsockname()[1])")
for i in 0 1; do
  XLA_FLAGS=$(devices 2) python "$here/launch/main.py" "${ssl[@]}" --workdir="$out/two" \
    --coordinator_address=127.0.0.1:$port --num_processes=2 --process_id=$i \
    > "$out/two_$i.log" 2>&1 &
done
wait
XLA_FLAGS=$(devices 4) main "${ssl[@]}" --workdir="$out/one" > "$out/one.log" 2>&1
echo "== 2 processes x 2 devices vs 1 process x 4 devices"
echo "results-table lines printed: process 0 $(grep -c '^|' "$out/two_0.log"), process 1 $(grep -c '^|' "$out/two_1.log")"
compare "$out/one" "$out/two"

echo "== SIGTERM at step ~40 of 300, then the same command again, vs uninterrupted"
args=(--config="$here/configs/default.py:tiny" --config.selmix.num_steps=300
      --config.selmix.checkpoint_every=100 --config.selmix.log_every=1)
# python itself in the background (not a shell function, whose subshell would take the signal).
XLA_FLAGS=$(devices 4) python "$here/launch/main.py" "${args[@]}" --workdir="$out/preempted" \
  > "$out/preempted.log" 2>&1 &
pid=$!
until grep -q "\[40\] train/" "$out/preempted.log" 2>/dev/null; do sleep 0.2; done
kill -TERM $pid; wait $pid; echo "exit status after SIGTERM: $?"
grep -o "Stopped by SIGTERM.*" "$out/preempted.log"
XLA_FLAGS=$(devices 4) main "${args[@]}" --workdir="$out/preempted" > "$out/resumed.log" 2>&1
echo "resumed: exit status $?, $(grep -o 'Resumed SelMix fine-tuning from step [0-9]*' "$out/resumed.log")"
XLA_FLAGS=$(devices 4) main "${args[@]}" --workdir="$out/uninterrupted" > "$out/full.log" 2>&1
compare "$out/uninterrupted" "$out/preempted"
python - "$out" <<'PY'
import sys
import jax
import numpy as np
import orbax.checkpoint as ocp
def newest(d):
  m = ocp.CheckpointManager(f"{sys.argv[1]}/{d}/selmix/checkpoints")
  step = m.latest_step()
  tree = m.restore(step, args=ocp.args.StandardRestore())
  m.close()
  return step, tree
(sa, a), (sb, b) = newest("preempted"), newest("uninterrupted")
same = jax.tree.leaves(jax.tree.map(lambda x, y: bool(np.array_equal(x, y)), a, b))
print(f"final checkpoints (steps {sa}, {sb}): {sum(same)} of {len(same)} arrays bit-identical")
PY
