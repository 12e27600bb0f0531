"""Every config file loads and names a known model, data set and objective."""

import glob
import importlib.util
import os
import re

import pytest

from selmix_jax import data
from selmix_jax import models
from selmix_jax import objectives
from selmix_jax import train
from selmix_jax.data import augment

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_CONFIGS = sorted(
  p
  for p in glob.glob(os.path.join(_REPO, "configs", "*.py"))
  if os.path.basename(p) not in ("__init__.py", "base.py")
)


def _load(path):
  spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _variants(path):
  name = os.path.basename(path)
  if name == "default.py":
    return ["", "tiny", "tiny_ssl", "min_recall", "pretrain", "tiny,gmean", "tiny_ssl,hmean"]
  if name.startswith("cifar10_lt_cpu"):
    return None  # validated by its own arg list below
  return ["pretrain", "min_recall", "hmean_min_coverage"]


def test_there_are_configs_for_every_setting():
  names = {os.path.basename(p) for p in _CONFIGS}
  for required in (
    "default.py",
    "cifar10_lt_ssl.py",
    "cifar100_lt_ssl.py",
    "stl10_lt_ssl.py",
    "imagenet100_lt_ssl.py",
    "cifar10_lt_sup.py",
    "cifar100_lt_sup.py",
    "imagenet_lt_sup.py",
  ):
    assert required in names


@pytest.mark.parametrize("path", _CONFIGS, ids=os.path.basename)
def test_config_loads_and_names_known_parts(path):
  module = _load(path)
  assert module.__doc__ and "launch/main.py" in module.__doc__, "docstring must give the command"
  variants = getattr(module, "VARIANTS", None) or _variants(path) or [""]
  for arg in variants:
    config = module.get_config(arg) if arg else module.get_config()
    assert config.model.name in models.names()
    assert config.data.name in data.names()
    assert config.mode in train.MODES
    assert config.data.train_augment in augment.CROPS
    if config.mode != "pretrain":
      assert objectives.is_known(config.objective.name)
      objectives.from_config(config.objective)


def test_unknown_variant_is_rejected():
  module = _load(os.path.join(_REPO, "configs", "cifar10_lt_ssl.py"))
  with pytest.raises(ValueError, match="expected 'pretrain' or one of"):
    module.get_config("min_recal")


def test_every_objective_has_a_variant():
  module = _load(os.path.join(_REPO, "configs", "cifar10_lt_sup.py"))
  for name in objectives.names():
    assert module.get_config(name).objective.name == name


def test_cifar10_ssl_unlabeled_split_option():
  module = _load(os.path.join(_REPO, "configs", "cifar10_lt_ssl.py"))
  inverted = module.get_config("mean_recall_min_coverage,rho_u=0.01")
  assert (inverted.data.unlabeled_max, inverted.data.unlabeled_imbalance) == (30, 0.01)
  # The release's values for that split and objective (MeanRecallMinCoverage.yaml).
  assert inverted.selmix.temperature == 0.01 and inverted.selmix.learning_rate == 1e-4
  assert inverted.objective.hparams.multiplier_max == 1000.0
  default = module.get_config("mean_recall_min_coverage")
  assert default.data.unlabeled_imbalance == 100.0 and default.selmix.temperature == 0.1
  with pytest.raises(ValueError, match="rho_u=<one of 100, 1, 0.01>"):
    module.get_config("min_recall,rho_u=10")


def _documented_fields():
  """Config fields the README and the library's docstrings name (`config.x.y`, `--config.x.y=`,
  and `data.<field>` in the README's data section)."""
  texts = [open(os.path.join(_REPO, "README.md"), encoding="utf-8").read()]
  for path in glob.glob(os.path.join(_REPO, "selmix_jax", "**", "*.py"), recursive=True):
    if os.path.islink(os.path.dirname(path)):  # selmix_jax/configs -> ../configs (a checkout's
      continue  # link): the configs set fields, they do not document them.
    texts.append(open(path, encoding="utf-8").read())
  fields = set()
  for text in texts:
    fields |= set(re.findall(r"--config\.([a-z_][\w.]*[a-z_0-9])=", text))
    # `config.x.y` but not a method call (`config.data.to_dict()`).
    fields |= set(re.findall(r"\bconfig\.([a-z_]+\.[a-z_][\w.]*[a-z_0-9])(?![\w.(])", text))
  modules = {"pipeline", "register", "build", "names", "default_config", "datasets", "sources"}
  fields |= {f"data.{m}" for m in re.findall(r"`data\.([a-z_]+)`?(?!\()", texts[0])} - {
      f"data.{m}" for m in modules
  }
  # The data fields `pipeline.build`'s docstring documents.
  from selmix_jax.data import pipeline  # pylint: disable=g-import-not-at-top

  doc = pipeline.build.__doc__
  block = doc[doc.index("Config fields") : doc.index("SPEC §8 settings")]
  fields |= {f"data.{m}" for m in re.findall(r"^    (\w+): ", block, flags=re.M)}
  return sorted(fields)


def test_every_documented_field_is_declared_and_settable():
  from selmix_jax.configs import base  # pylint: disable=g-import-not-at-top

  config = base.get_config()
  fields = _documented_fields()
  assert len(fields) > 30, fields
  missing = []
  for field in fields:
    node = config
    for part in field.split("."):
      if not hasattr(node, "keys") or part not in node.keys():
        missing.append(field)
        break
      node = node[part]
  assert not missing, f"documented but not declared in configs/base.py: {missing}"


@pytest.mark.parametrize("path", _CONFIGS, ids=os.path.basename)
def test_every_shipped_config_passes_validate(path, tmp_path):
  """`train.validate` accepts every variant we ship, all of its checks included: the path fields
  that name runs and data this machine may not have (`selmix.init_checkpoint`, an image
  folder's `data.root`, a features file's `data.path`) are pointed at an existing folder first,
  so no variant can skip its range checks by failing on a path."""
  module = _load(path)
  variants = getattr(module, "VARIANTS", None) or _variants(path) or [""]
  for arg in variants:
    config = module.get_config(arg) if arg else module.get_config()
    with config.unlocked():
      if config.data.name == "image_folder":
        config.data.root = str(tmp_path)
      if config.data.name == "features":  # An .npz of features, or a folder of .npy files.
        config.data.path = str(tmp_path)
      if config.mode == "selmix":
        config.selmix.init_checkpoint = str(tmp_path)
    train.validate(config)


def test_imagenet_configs_train_on_random_resized_crops():
  for name in ("imagenet100_lt_ssl.py", "imagenet_lt_sup.py"):
    config = _load(os.path.join(_REPO, "configs", name)).get_config("min_recall")
    assert config.data.train_augment == "random_resized_crop", name
  assert _load(os.path.join(_REPO, "configs", "default.py")).get_config().data.train_augment == (
    "pad_crop"
  )
