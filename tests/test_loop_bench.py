"""benchmarks/loop_bench.py at its smoke size: every row is measured and printed."""

import importlib.util
import pathlib

_PATH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "loop_bench.py"


def test_loop_bench_smoke_prints_every_row(capsys):
  spec = importlib.util.spec_from_file_location("loop_bench", _PATH)
  bench = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(bench)
  out = bench.main(["--smoke", "--steps", "4", "--reps", "1"])
  text = capsys.readouterr().out
  for row in ("refresh, K = 10, host path", "refresh, K = 10, device path", "gain + P alone",
              "host path: loop per step", "device path: loop without refreshes", "2 runs per step"):
    assert row in text
  assert all(t > 0 for times in out["paths"].values() for t in times)
  assert out["gain"] > 0 and min(out["many"]) > 0
