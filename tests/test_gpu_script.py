"""benchmarks/gpu_cifar10_lt.sh runs end to end at its --smoke size, without TensorFlow."""

import os
import subprocess
import sys

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_cifar10_lt_smoke_runs_every_stage_without_tensorflow(tmp_path):
  # A `tensorflow` that cannot be imported stands for an image without TensorFlow.
  blocker = tmp_path / "no_tf" / "tensorflow"
  blocker.mkdir(parents=True)
  (blocker / "__init__.py").write_text("raise ImportError('TensorFlow is not installed here')\n")
  env = dict(os.environ, PYTHON=sys.executable, PYTHONPATH=str(blocker.parent))
  runs = tmp_path / "runs"
  result = subprocess.run(
    ["bash", os.path.join(_REPO, "benchmarks", "gpu_cifar10_lt.sh"), "--smoke", str(runs)],
    cwd=tmp_path,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
    check=False,
  )
  assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
  table = (runs / "results.md").read_text()
  for row in (
    "pre-trained",
    "CE fine-tuning",
    "uniform mixup",
    "SelMix (min_recall)",
    "SelMix (mean_recall)",
    "SelMix (gmean_recall)",
    "SelMix (hmean_recall)",
    "SelMix (mean_recall_min_coverage)",
  ):
    assert f"| {row} |" in table, row
  assert "TensorFlow was imported" not in result.stdout
  assert len((runs / "wall_times.txt").read_text().splitlines()) == 8
