#!/usr/bin/env bash
# Packages, disk size and install time of the core install vs [train] vs [test] (everything),
# each into a new virtual environment from this checkout. Prints a Markdown table. Install times
# depend on the pip cache: run it twice to see warm-cache times.
#   bash benchmarks/install_size.sh
set -u
cd "$(dirname "$0")/.."
echo "| install | packages | disk (venv) | time | tensorflow importable |"
echo "|---|---:|---:|---:|---|"
for extra in "" "[train]" "[test]"; do
  d=$(mktemp -d)/venv
  python3 -m venv "$d"
  start=$(date +%s.%N)
  "$d/bin/pip" install -q ".$extra" > /dev/null 2>&1
  end=$(date +%s.%N)
  n=$("$d/bin/pip" list 2>/dev/null | tail -n +3 | grep -v -E "^(pip|setuptools) " | wc -l)
  size=$(du -sm "$d" | cut -f1)
  tf=$("$d/bin/python" -c "import importlib.util as u; print(bool(u.find_spec('tensorflow')))")
  rm -rf "$(dirname "$d")"
  printf "| %s | %d | %d MB | %.0f s | %s |\n" "selmix_jax$extra" "$n" "$size" "$(echo "$end - $start" | bc)" "$tf"
done
