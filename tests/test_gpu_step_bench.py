"""benchmarks/gpu_step_vs_release.py at its --smoke size, without the authors' release."""

import importlib.util
import math
import os
import re
import sys

import pytest

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _script():
  path = os.path.join(_REPO, "benchmarks", "gpu_step_vs_release.py")
  spec = importlib.util.spec_from_file_location("gpu_step_vs_release", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_smoke_prints_our_rows_and_skips_only_the_release_rows(capsys):
  # float32 only: each dtype is two more compilations, and bf16 on a CPU says nothing.
  rows = _script().main(["--smoke", "--dtypes=f32"])
  out = capsys.readouterr().out
  assert [r["step"] for r in rows] == ["ours, SelMix 2 passes, f32", "ours, SelMix fused, f32"]
  for label in ("ours, SelMix 2 passes, f32", "ours, SelMix fused, f32"):
    match = re.search(rf"^\| {re.escape(label)} \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|$", out, re.M)
    assert match, out
    synced, pipelined, first = map(float, match.groups())
    assert all(math.isfinite(v) and v > 0 for v in (synced, pipelined, first)), match.group(0)
  assert "authors'" not in "".join(line for line in out.splitlines() if line.startswith("|"))
  assert "authors' rows: skipped (no --release)" in out
  refresh = re.search(r"^ours, validation pass of a refresh \(64 images.*: ([\d.]+) ms$", out, re.M)
  assert refresh and float(refresh.group(1)) > 0, out


def test_release_path_is_checked_before_any_timing(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"no models/nets/wrn.py; expected a checkout"):
    _script().main(["--smoke", f"--release={tmp_path}"])


def test_missing_import_only_packages_get_stand_ins():
  module = _script()
  name = "selmix_test_absent_pkg.sub"
  assert module._stand_in_if_missing(name)  # pylint: disable=protected-access
  try:
    stand_in = sys.modules[name]
    assert sys.modules["selmix_test_absent_pkg"].sub is stand_in
    with pytest.raises(RuntimeError, match="not installed was called"):
      stand_in.SummaryWriter()
    assert not module._stand_in_if_missing("math")  # pylint: disable=protected-access
  finally:
    for key in ("selmix_test_absent_pkg.sub", "selmix_test_absent_pkg"):
      sys.modules.pop(key, None)


_FAKE_RELEASE = {
  # The release's module names and the signatures the benchmark calls, on a tiny network;
  # module-level imports of packages that are not installed, as the release has.
  "models/__init__.py": "",
  "models/nets/__init__.py": "",
  "models/nets/wrn.py": """
import torch.nn as nn
class _Net(nn.Module):
  def __init__(self, num_classes, bn_momentum):
    super().__init__()
    self.conv = nn.Conv2d(3, 4, 3)
    self.bn = nn.BatchNorm2d(4, momentum=bn_momentum)
    self.fc = nn.Linear(4, num_classes)
  def features(self, x):
    return self.bn(self.conv(x)).mean(dim=(2, 3))
class build_WideResNet:
  def __init__(self, depth, widen_factor, bn_momentum, leaky_slope, dropRate):
    self.bn_momentum = bn_momentum
  def build(self, num_classes):
    return _Net(num_classes, self.bn_momentum)
""",
  "models/wrapper.py": """
import torch
import selmix_test_absent_timm
class TimmModelWrapper(torch.nn.Module):
  def __init__(self, model, mixup_factor):
    super().__init__()
    self.model = model
  def forward(self, x1, x2):
    w = torch.rand(x1.shape[0], 1).cuda()
    return self.model.fc(w * self.model.features(x1) + (1 - w) * self.model.features(x2))
""",
  "train_utils.py": """
import torch
from selmix_test_absent_tb.writer import SummaryWriter
def get_finetune_SGD(net, opt, lr, weight_decay, freeze_backbone):
  return torch.optim.SGD(net.parameters(), lr=lr, weight_decay=weight_decay)
""",
}


def test_release_rows_from_a_checkout_path(tmp_path, monkeypatch):
  for name, text in _FAKE_RELEASE.items():
    (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / name).write_text(text)
  module = _script()
  monkeypatch.setattr(
    module, "_IMPORT_ONLY", ("selmix_test_absent_timm", "selmix_test_absent_tb.writer")
  )
  try:
    release, stubbed = module.import_release(str(tmp_path))
    assert stubbed == ["selmix_test_absent_timm", "selmix_test_absent_tb.writer"]
    rows = module.time_release(
      release,
      ["eager", "bf16"],
      depth=10,
      widen_factor=1,
      batch=4,
      num_steps=2,
      warmup=1,
      device="cpu",
    )
  finally:
    for key in list(sys.modules):
      if key.split(".")[0] in ("models", "train_utils") or key.startswith("selmix_test_absent"):
        del sys.modules[key]
  assert [r["step"] for r in rows] == [
    "authors', eager f32 (as released)",
    "authors', eager bf16 autocast",
  ]
  for r in rows:
    assert all(math.isfinite(r[k]) and r[k] > 0 for k in ("synced_ms", "pipelined_ms"))
