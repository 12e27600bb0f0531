"""Tests for selmix_jax.convert: the release's PyTorch checkpoints -> our Flax models.

The PyTorch models below are written for these tests with the module and parameter names of the
release (`models/nets/wrn.py`'s `build_WideResNet`; torchvision's/timm's ResNet-50) and of MiSLAS
(`models/resnet_cifar.py`'s `resnet32_fe`, `Classifier`, `methods.py`'s `LearnableWeightScaling`),
and are saved in their checkpoint layouts. Their BatchNorm running statistics are those of a random
batch, perturbed, so that evaluation mode differs from training mode everywhere.
"""

import copy
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch  # The test extra installs it (the [torch] extra); a missing torch is a failure.
import torch.nn.functional as F

from selmix_jax import checkpointing
from selmix_jax import convert
from selmix_jax import models

nn = torch.nn

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_TOL = 1e-4  # max abs difference allowed in float32 (issue #14)


# ------------------------------------------------------------------------------------------
# PyTorch models with the release's names.


class _WRNBlock(nn.Module):
  def __init__(self, cin, cout, stride):
    super().__init__()
    self.bn1 = nn.BatchNorm2d(cin, momentum=0.001)
    self.relu1 = nn.LeakyReLU(0.1)
    self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
    self.bn2 = nn.BatchNorm2d(cout, momentum=0.001)
    self.relu2 = nn.LeakyReLU(0.1)
    self.conv2 = nn.Conv2d(cout, cout, 3, stride=1, padding=1, bias=False)
    self.convShortcut = None
    if cin != cout:
      self.convShortcut = nn.Conv2d(cin, cout, 1, stride=stride, padding=0, bias=False)

  def forward(self, x):
    pre = self.relu1(self.bn1(x))
    out = self.conv2(self.relu2(self.bn2(self.conv1(pre))))
    # The release projects the pre-activated input wherever the width changes.
    return out + (x if self.convShortcut is None else self.convShortcut(pre))


class _WRNGroup(nn.Module):
  def __init__(self, n, cin, cout, stride):
    super().__init__()
    self.layer = nn.Sequential(
      *[_WRNBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1) for i in range(n)]
    )

  def forward(self, x):
    return self.layer(x)


class _TorchWRN(nn.Module):
  def __init__(self, num_classes, depth=28, widen=2):
    super().__init__()
    n = (depth - 4) // 6
    widths = [16, 16 * widen, 32 * widen, 64 * widen]
    self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
    self.block1 = _WRNGroup(n, widths[0], widths[1], 1)
    self.block2 = _WRNGroup(n, widths[1], widths[2], 2)
    self.block3 = _WRNGroup(n, widths[2], widths[3], 2)
    self.bn1 = nn.BatchNorm2d(widths[3], momentum=0.001)
    self.relu = nn.LeakyReLU(0.1)
    self.fc = nn.Linear(widths[3], num_classes)

  def forward_features(self, x):
    x = self.block3(self.block2(self.block1(self.conv1(x))))
    return self.relu(self.bn1(x)).mean(dim=(2, 3))


class _Bottleneck(nn.Module):
  def __init__(self, cin, width, stride):
    super().__init__()
    self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(width)
    self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
    self.bn2 = nn.BatchNorm2d(width)
    self.conv3 = nn.Conv2d(width, 4 * width, 1, bias=False)
    self.bn3 = nn.BatchNorm2d(4 * width)
    self.relu = nn.ReLU()
    self.downsample = None
    if stride != 1 or cin != 4 * width:
      self.downsample = nn.Sequential(
        nn.Conv2d(cin, 4 * width, 1, stride=stride, bias=False), nn.BatchNorm2d(4 * width)
      )

  def forward(self, x):
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.relu(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class _TorchResNet50(nn.Module):
  def __init__(self, num_classes):
    super().__init__()
    self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
    self.bn1 = nn.BatchNorm2d(64)
    self.relu = nn.ReLU()
    self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
    cin = 64
    for stage, blocks in enumerate((3, 4, 6, 3)):
      width = 64 * 2**stage
      layer = []
      for block in range(blocks):
        layer.append(_Bottleneck(cin, width, 2 if stage > 0 and block == 0 else 1))
        cin = 4 * width
      setattr(self, f"layer{stage + 1}", nn.Sequential(*layer))
    self.fc = nn.Linear(2048, num_classes)

  def forward_features(self, x):
    x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
    for stage in range(1, 5):
      x = getattr(self, f"layer{stage}")(x)
    return x.mean(dim=(2, 3))


class _CifarBlock(nn.Module):
  """MiSLAS's `BasicBlock` names; option A: subsample, then planes // 4 zero channels each side."""

  def __init__(self, cin, cout, stride):
    super().__init__()
    self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
    self.bn1 = nn.BatchNorm2d(cout)
    self.conv2 = nn.Conv2d(cout, cout, 3, stride=1, padding=1, bias=False)
    self.bn2 = nn.BatchNorm2d(cout)
    self.shortcut = nn.Sequential()  # parameter-free, as theirs
    self.option_a = stride != 1 or cin != cout

  def forward(self, x):
    out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
    if self.option_a:
      quarter = self.conv1.out_channels // 4
      x = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, quarter, quarter))
    return F.relu(out + x)


class _TorchResNet32FE(nn.Module):
  """MiSLAS's `resnet32_fe()`: the backbone alone, 64 pooled features."""

  def __init__(self):
    super().__init__()
    self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
    self.bn1 = nn.BatchNorm2d(16)
    cin = 16
    for stage, width in enumerate((16, 32, 64)):
      blocks = [_CifarBlock(cin if b == 0 else width, width, 2 if stage and not b else 1)
                for b in range(5)]
      setattr(self, f"layer{stage + 1}", nn.Sequential(*blocks))
      cin = width

  def forward(self, x):
    x = F.relu(self.bn1(self.conv1(x)))
    x = self.layer3(self.layer2(self.layer1(x)))
    return F.avg_pool2d(x, x.shape[3]).flatten(1)


class _MislasClassifier(nn.Module):
  def __init__(self, num_classes):
    super().__init__()
    self.fc = nn.Linear(64, num_classes)


class _MislasLWS(nn.Module):
  def __init__(self, num_classes):
    super().__init__()
    self.learned_norm = nn.Parameter(torch.ones(1, num_classes))


class _ScaledHead(nn.Module):
  """MiSLAS's stage-2 logits: `lws(classifier(features))`."""

  def __init__(self, classifier, lws):
    super().__init__()
    self.classifier, self.lws = classifier, lws
    self.out_features = classifier.fc.out_features

  def forward(self, feats):
    return self.lws.learned_norm * self.classifier.fc(feats)


class _MislasNet(nn.Module):
  """The three modules MiSLAS keeps apart, as one net for `_check_agreement`."""

  def __init__(self, num_classes):
    super().__init__()
    self.model = _TorchResNet32FE()
    self.fc = _ScaledHead(_MislasClassifier(num_classes), _MislasLWS(num_classes))

  def forward_features(self, x):
    return self.model(x)


class _Wrapper(nn.Module):
  """State-dict layout of the release's TimmModelWrapper: `model.*` plus `classifier.*`."""

  def __init__(self, model):
    super().__init__()
    self.model = model
    self.classifier = model.fc


def _randomise(net, image_size, seed):
  """Random weights; BatchNorm statistics of a random batch, then perturbed."""
  torch.manual_seed(seed)
  bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
  momenta = [m.momentum for m in bns]
  with torch.no_grad():
    for name, m in net.named_modules():
      if isinstance(m, nn.BatchNorm2d):
        m.weight.uniform_(0.6, 1.4)
        m.bias.normal_(0.0, 0.2)
        m.momentum = 1.0  # running statistics := those of the next batch
      if name.endswith(".bn3"):
        # Small scales end each bottleneck branch, as in trained ResNets; with scales near 1
        # the 16 blocks add up to features ~12, where float32 rounding alone reaches 1.5e-4.
        m.weight.uniform_(0.1, 0.4)
    for m in net.modules():
      if isinstance(m, nn.Linear):
        m.bias.normal_(0.0, 0.5)
    net.train()
    net.forward_features(torch.randn(8, 3, image_size, image_size))
    for m, momentum in zip(bns, momenta):
      m.momentum = momentum
      m.running_mean.add_(0.1 * torch.randn_like(m.running_mean))
      m.running_var.mul_(torch.empty_like(m.running_var).uniform_(0.7, 1.4))
  net.eval()
  return net


def _release_checkpoint(net, path, seed):
  """The release's pre-training layout; `train_model` differs from `eval_model` (EMA)."""
  train = copy.deepcopy(net)
  torch.manual_seed(seed)
  with torch.no_grad():
    for p in train.parameters():
      p.add_(0.05 * torch.randn_like(p))
  torch.save(
    {
      "train_model": _Wrapper(train).state_dict(),
      "eval_model": _Wrapper(net).state_dict(),
      "optimizer": {"state": {}, "param_groups": [{"lr": 0.03}]},
      "scheduler": {"last_epoch": 7},
      "it": 7,
    },
    path,
  )
  return train


@pytest.fixture(scope="module")
def wrn(tmp_path_factory):
  net = _randomise(_TorchWRN(10), 32, seed=0)
  path = str(tmp_path_factory.mktemp("wrn") / "model_best.pth")
  train = _release_checkpoint(net, path, seed=1)
  return net, train, path


def _check_agreement(net, path, model_name, x):
  """Converts `path` and compares our model with `net` on `x` [B, 3, H, W], eval and train mode.

  Returns:
    {'eval' | 'train': (max abs feature difference, max abs logit difference)}, each <= _TOL.
  """
  model = models.get(model_name, num_classes=net.fc.out_features)
  variables = convert.from_torch(path, model_name, net.fc.out_features)

  @jax.jit
  def run(variables, x):
    out = {}
    for train in (False, True):
      kwargs = {"train": train, "method": "features"}
      feats = (
        model.apply(variables, x, mutable=["batch_stats"], **kwargs)[0]
        if train
        else model.apply(variables, x, **kwargs)
      )
      out[train] = feats, model.apply(variables, feats, method="classify")
    return out

  ours = run(variables, jnp.asarray(x.numpy().transpose(0, 2, 3, 1)))
  diffs = {}
  for train in (False, True):
    net = copy.deepcopy(net).train(train)  # a train-mode pass updates running statistics
    with torch.no_grad():
      feats = net.forward_features(x)
      logits = net.fc(feats)
    f, l = (np.asarray(a) for a in ours[train])
    assert np.abs(logits.numpy()).max() > 0.5  # a non-degenerate scale
    diffs["train" if train else "eval"] = (
      np.abs(f - feats.numpy()).max(),
      np.abs(l - logits.numpy()).max(),
    )
  for mode, (feats, logits) in diffs.items():
    assert feats <= _TOL and logits <= _TOL, (model_name, mode, feats, logits)
  return diffs


# ------------------------------------------------------------------------------------------
# Layout conversions.


def test_conv_and_dense_layouts():
  w = np.arange(2 * 3 * 4 * 5, dtype=np.float32).reshape(2, 3, 4, 5)  # [O, I, H, W]
  k = convert.conv_kernel(w)
  assert k.shape == (4, 5, 3, 2)  # [H, W, I, O]
  assert k[3, 1, 2, 0] == w[0, 2, 3, 1]
  d = np.arange(6, dtype=np.float32).reshape(2, 3)  # Linear [K, D]
  np.testing.assert_array_equal(convert.dense_kernel(d), d.T)


def test_names_and_values_land_where_expected(wrn):
  net, _, path = wrn
  variables = convert.from_torch(path, "wrn28_2", 10)
  params, stats = variables["params"], variables["batch_stats"]
  sd = {k: v.numpy() for k, v in net.state_dict().items()}
  # block2.layer.0 is the 5th block (4 blocks per group): it has the projection shortcut.
  block = params["backbone"]["_WRNBlock_4"]
  np.testing.assert_array_equal(block["BatchNorm_1"]["scale"], sd["block2.layer.0.bn2.weight"])
  np.testing.assert_array_equal(block["BatchNorm_1"]["bias"], sd["block2.layer.0.bn2.bias"])
  bn = stats["backbone"]["_WRNBlock_4"]["BatchNorm_1"]
  np.testing.assert_array_equal(bn["mean"], sd["block2.layer.0.bn2.running_mean"])
  np.testing.assert_array_equal(bn["var"], sd["block2.layer.0.bn2.running_var"])
  np.testing.assert_array_equal(
    block["Conv_2"]["kernel"], sd["block2.layer.0.convShortcut.weight"].transpose(2, 3, 1, 0)
  )
  assert "Conv_2" not in params["backbone"]["_WRNBlock_5"]
  np.testing.assert_array_equal(params["head"]["kernel"], sd["fc.weight"].T)
  np.testing.assert_array_equal(stats["backbone"]["BatchNorm_0"]["var"], sd["bn1.running_var"])


# ------------------------------------------------------------------------------------------
# Numerical agreement.


def test_wrn28_2_matches_release_architecture(wrn):
  net, _, path = wrn
  x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
  _check_agreement(net, path, "wrn28_2", x)


def test_resnet50_matches_torchvision_architecture(tmp_path):
  net = _randomise(_TorchResNet50(10), 64, seed=3)
  path = str(tmp_path / "resnet50.pth")
  # A bare state dict saved through DataParallel(wrapper): `module.model.*` keys.
  torch.save({f"module.{k}": v for k, v in _Wrapper(net).state_dict().items()}, path)
  x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
  _check_agreement(net, path, "resnet50", x)


# ------------------------------------------------------------------------------------------
# Checkpoint layouts.


def _same(a, b):
  return all(jax.tree.leaves(jax.tree.map(np.array_equal, a, b)))


def test_layouts_give_the_same_variables(wrn, tmp_path):
  net, train, path = wrn
  expected = convert.from_torch(path, "wrn28_2", 10)  # eval_model by default
  layouts = {
    "bare": net.state_dict(),
    "module": {f"module.{k}": v for k, v in net.state_dict().items()},
    "wrapper": _Wrapper(net).state_dict(),
    "finetuned": {"model": _Wrapper(net).state_dict(), "optimizer": {}, "it": 3},
  }
  for name, obj in layouts.items():
    torch.save(obj, tmp_path / f"{name}.pth")
    assert _same(convert.from_torch(str(tmp_path / f"{name}.pth"), "wrn28_2", 10), expected), name
  from_train = convert.from_torch(path, "wrn28_2", 10, source="train_model")
  torch.save(train.state_dict(), tmp_path / "train.pth")
  assert _same(from_train, convert.from_torch(str(tmp_path / "train.pth"), "wrn28_2", 10))
  assert not _same(from_train, expected)


@pytest.mark.parametrize(
  "edit,message",
  [
    (
      lambda sd: sd.update({"model.block1.layer.0.bn3.weight": sd["model.bn1.weight"]}),
      "unexpected key 'model.block1.layer.0.bn3.weight'",
    ),
    (
      lambda sd: sd.pop("model.block3.layer.2.bn2.running_var"),
      "missing key 'block3.layer.2.bn2.running_var'",
    ),
    (
      lambda sd: sd.update({"model.conv1.weight": sd["model.conv1.weight"][:8]}),
      r"key 'model.conv1.weight' has shape \(8, 3, 3, 3\), but wrn28_2 .* needs \(16, 3, 3, 3\)",
    ),
    (
      lambda sd: sd.update({"classifier.bias": sd["classifier.bias"] + 1}),
      "key 'classifier.bias' .* does not equal 'model.fc.bias'",
    ),
    (
      lambda sd: sd.update({"extra.weight": sd["model.bn1.weight"]}),
      "unexpected key 'extra.weight'",
    ),
  ],
  ids=["unexpected", "missing", "shape", "classifier", "outside_wrapper"],
)
def test_mismatches_fail_naming_the_key(wrn, tmp_path, edit, message):
  net, _, _ = wrn
  sd = dict(_Wrapper(net).state_dict())
  edit(sd)
  path = str(tmp_path / "bad.pth")
  torch.save({"eval_model": sd}, path)
  with pytest.raises(ValueError, match=message) as info:
    convert.from_torch(path, "wrn28_2", 10)
  assert path in str(info.value)


def test_wrong_model_or_classes_or_file(wrn, tmp_path):
  _, _, path = wrn
  with pytest.raises(ValueError, match=r"'model.fc.weight' has shape \(10, 128\).* \(100, 128\)"):
    convert.from_torch(path, "wrn28_2", 100)
  with pytest.raises(
    ValueError, match=r"'model.conv1.weight' has shape \(16, 3, 3, 3\), but resnet50"
  ):
    convert.from_torch(path, "resnet50", 10)
  with pytest.raises(ValueError, match="No PyTorch layout is known for model 'cnn_small'"):
    convert.from_torch(path, "cnn_small", 10)
  torch.save({"weights": {}}, tmp_path / "odd.pth")
  with pytest.raises(ValueError, match=r"no entry 'eval_model' \(top-level keys: \['weights'\]\)"):
    convert.from_torch(str(tmp_path / "odd.pth"), "wrn28_2", 10)
  with pytest.raises(FileNotFoundError, match="missing.pth"):
    convert.from_torch(str(tmp_path / "missing.pth"), "wrn28_2", 10)


# ------------------------------------------------------------------------------------------
# The command line and the checkpoint it writes.


def test_cli_writes_what_finetuning_loads(wrn, tmp_path):
  _, _, path = wrn
  out = str(tmp_path / "converted")
  cmd = [
    sys.executable,
    "-m",
    "selmix_jax.convert",
    f"--torch_checkpoint={path}",
    "--model=wrn28_2",
    "--num_classes=10",
    f"--out={out}",
  ]
  env = dict(os.environ, PYTHONPATH=_REPO, JAX_PLATFORMS="cpu")
  subprocess.run(cmd, check=True, cwd=_REPO, env=env, capture_output=True)
  tree, step = checkpointing.load_pretrained(out)
  assert step == 7  # the release's iteration count
  assert set(tree) == {"state"} and set(tree["state"]) == {"params", "batch_stats"}
  model = models.get("wrn28_2", num_classes=10)
  # The structure and shapes of `model.init(...)` (compiling init itself takes seconds).
  x = jnp.zeros((1, 32, 32, 3))
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
  template = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
  checkpointing.check_compatible(tree["state"], dict(template), where=out)
  assert _same(tree["state"], convert.from_torch(path, "wrn28_2", 10))
  result = subprocess.run(cmd, check=False, cwd=_REPO, env=env, capture_output=True, text=True)
  assert result.returncode != 0 and "already holds a checkpoint" in result.stderr


def test_only_the_converter_imports_torch():
  pattern = re.compile(r"^\s*(import torch|from torch)\b", re.MULTILINE)
  offenders = []
  for root, _, files in os.walk(os.path.join(_REPO, "selmix_jax")):
    for name in files:
      if name.endswith(".py") and name != "convert.py":
        with open(os.path.join(root, name), encoding="utf-8") as f:
          if pattern.search(f.read()):
            offenders.append(name)
  assert not offenders


# ------------------------------------------------------------------------------------------
# MiSLAS checkpoints (the supervised experiments' starting point).


def _mislas_save(path, net, *, stage):
  """Saves `net` as MiSLAS's train_stage{1,2}.py do: DataParallel-wrapped modules (`module.`),
  a CUDA-free `best_acc1` tensor and a NumPy `its_ece`; stage 2 adds the LWS module."""
  ckpt = {
    "epoch": 200 if stage == 1 else 10,
    "state_dict_model": nn.DataParallel(net.model).state_dict(),
    "state_dict_classifier": nn.DataParallel(net.fc.classifier).state_dict(),
    "best_acc1": torch.tensor([82.5]),
    "its_ece": np.float64(3.66),
  }
  if stage == 2:
    ckpt["state_dict_lws_model"] = nn.DataParallel(net.fc.lws).state_dict()
  torch.save(ckpt, path)
  return ckpt


@pytest.fixture(scope="module")
def mislas(tmp_path_factory):
  net = _randomise(_MislasNet(10), 32, seed=5)
  with torch.no_grad():
    net.fc.lws.learned_norm.uniform_(0.5, 2.0)  # their stage 2 learns scales around 1
  folder = tmp_path_factory.mktemp("mislas")
  paths = {stage: str(folder / f"stage{stage}_model_best.pth.tar") for stage in (1, 2)}
  for stage, path in paths.items():
    _mislas_save(path, net, stage=stage)
  return net, paths


def test_mislas_resnet32_matches_their_logits(mislas):
  net, paths = mislas
  x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(6))
  diffs = _check_agreement(net, paths[2], "resnet32", x)
  print("MiSLAS stage 2 -> resnet32, max abs (feature, logit) differences:", diffs)


def test_mislas_lws_folds_into_the_head(mislas):
  net, paths = mislas
  stage1 = convert.from_torch(paths[1], "resnet32", 10)
  stage2 = convert.from_torch(paths[2], "resnet32", 10)
  w = net.fc.classifier.fc.weight.detach().numpy()  # [K, D]
  b = net.fc.classifier.fc.bias.detach().numpy()
  s = net.fc.lws.learned_norm.detach().numpy()[0]  # [K]
  np.testing.assert_array_equal(stage1["params"]["head"]["kernel"], w.T)
  np.testing.assert_array_equal(stage1["params"]["head"]["bias"], b)
  np.testing.assert_allclose(stage2["params"]["head"]["kernel"], w.T * s, rtol=1e-6)
  np.testing.assert_allclose(stage2["params"]["head"]["bias"], b * s, rtol=1e-6)
  for collection in ("batch_stats", "params"):
    assert _same(stage1[collection]["backbone"], stage2[collection]["backbone"])
  block = stage1["params"]["backbone"]["_CifarBasicBlock_5"]  # layer2.0: 16 -> 32, stride 2
  np.testing.assert_array_equal(
    block["Conv_0"]["kernel"],
    net.model.layer2[0].conv1.weight.detach().numpy().transpose(2, 3, 1, 0),
  )


def _mislas_edit(path, edit):
  ckpt = torch.load(path, weights_only=False)
  edit(ckpt)
  return ckpt


@pytest.mark.parametrize(
  "edit,message",
  [
    (
      lambda c: c.pop("state_dict_classifier"),
      r"needs both 'state_dict_model' and 'state_dict_classifier'; top-level keys: \['best_acc1',",
    ),
    (
      lambda c: c.update(eval_model=c["state_dict_model"]),
      r"ambiguous layout: MiSLAS entries .* beside the SelMix release's \['eval_model'\]",
    ),
    (
      lambda c: c.update(state_dict_block={"module.conv1.weight": torch.zeros(1)}),
      "Places-LT layout .* not supported",
    ),
    (
      lambda c: c.update(state_dict_classifier={"module.weight": torch.zeros(64, 10)}),
      r"'state_dict_classifier' has keys \['module.weight'\]; expected MiSLAS's Classifier",
    ),
    (
      lambda c: c.update(state_dict_lws_model={"module.learned_norm": torch.ones(1, 7)}),
      r"state_dict_lws_model\['module.learned_norm'\] has shape \(1, 7\); expected \(1, 10\)",
    ),
    (
      lambda c: c["state_dict_model"].pop("module.layer3.4.bn2.running_mean"),
      "missing key 'layer3.4.bn2.running_mean'",
    ),
    (
      lambda c: c["state_dict_model"].update({"module.fc.bias": torch.zeros(10)}),
      r"state_dict_classifier\['module.fc.bias'\] and state_dict_model\['module.fc.bias'\] both",
    ),
  ],
  ids=["no_classifier", "ambiguous", "places", "classifier_keys", "lws_shape", "missing", "twice"],
)
def test_mislas_bad_files_fail_naming_file_and_keys(mislas, tmp_path, edit, message):
  _, paths = mislas
  path = str(tmp_path / "bad.pth.tar")
  torch.save(_mislas_edit(paths[2], edit), path)
  with pytest.raises(ValueError, match=message) as info:
    convert.from_torch(path, "resnet32", 10)
  assert path in str(info.value)


def test_mislas_wrong_model_or_source(mislas):
  _, paths = mislas
  shape = r"key 'module.fc.weight' has shape \(10, 64\).* \(100, 64\)"
  with pytest.raises(ValueError, match=shape):
    convert.from_torch(paths[2], "resnet32", 100)
  with pytest.raises(ValueError, match=r"unexpected key 'module.layer1.3.* resnet20 has no"):
    convert.from_torch(paths[2], "resnet20", 10)  # 3 blocks a stage, not 5
  with pytest.raises(ValueError, match="holds one model; source='train_model'"):
    convert.from_torch(paths[2], "resnet32", 10, source="train_model")


def test_mislas_checkpoint_is_what_finetuning_loads(mislas, tmp_path):
  _, paths = mislas
  out = convert.write_checkpoint(paths[2], "resnet32", 10, str(tmp_path / "converted"))
  tree, step = checkpointing.load_pretrained(out)
  assert step == 0  # MiSLAS counts epochs, not steps: nothing to resume
  assert _same(tree["state"], convert.from_torch(paths[2], "resnet32", 10))


def test_mislas_file_of_their_era_loads_safely(mislas, tmp_path):
  # MiSLAS ran torch 1.2 (before the zip format) and NumPy 1.x, whose pickles name the scalar
  # constructor of `its_ece` numpy.core.multiarray.scalar (NumPy 2: numpy._core...).
  _, paths = mislas
  path = tmp_path / "legacy.pth.tar"
  ckpt = torch.load(paths[2], weights_only=False)
  torch.save(ckpt, path, _use_new_zipfile_serialization=False)
  name = b"numpy.core.multiarray\nscalar"
  old = path.read_bytes().replace(b"numpy._core.multiarray\nscalar", name)
  assert name in old
  path.write_bytes(old)
  expected = convert.from_torch(paths[2], "resnet32", 10)
  assert _same(convert.from_torch(str(path), "resnet32", 10), expected)
