"""The bad-input catalogue (issue 16): every case fails loudly, names what is wrong, keeps data.

Each case is a wrong input a user can give, through `launch/main.py` or the library API, with the
message it must produce. Every user's mistake raises an `errors.UserError` whose message is one
line naming the file or field (what `launch/main.py` prints, exit status 2, no traceback): the
in-process cases check the exception and that line, a few command-line cases the real CLI.
Config cases also check that they fail before compute (no data loaded, nothing written to the
workdir) and that the finished pre-training run in that workdir keeps every checkpoint file byte
for byte. Divergence cases check the exception or exit status, the message,
that no summary claiming success is written, and that the last good checkpoint is still there
and finite. `benchmarks/README.md` lists the catalogue (input -> message); a test below keeps
that list complete.
"""

import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import PIL.Image
import pytest

from selmix_jax import checkpointing
from selmix_jax import confusion
from selmix_jax import data
from selmix_jax import errors
from selmix_jax import evaluation
from selmix_jax import finetune
from selmix_jax import gains
from selmix_jax import loop
from selmix_jax import metrics
from selmix_jax import models
from selmix_jax import objectives
from selmix_jax import pretrain
from selmix_jax import sampling
from selmix_jax import train
from selmix_jax import workdir as workdir_lib
from selmix_jax.configs import default
from selmix_jax.data import pipeline

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_NO_SUMMARY = ("summary.json", "run.json", "results.md")


def _config(variant="tiny", **fields):
  """`configs/default.py:<variant>` with `fields` ('selmix.temperature': 0.0) set or added."""
  config = default.get_config(variant)
  with config.unlocked():
    for path, value in fields.items():
      *parents, name = path.split(".")
      node = config
      for parent in parents:
        node = node[parent]
      node[name] = value
  return config


def _digest(directory):
  """{relative path: sha1} of every file under `directory`, except the evaluation cache a
  fine-tuning run may add beside a checkpoint (`checkpoints.eval_cache/`: new files, never a
  changed one)."""
  out = {}
  for root, _, files in os.walk(directory):
    if ".eval_cache" in root:
      continue
    for name in files:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, directory)] = hashlib.sha1(f.read()).hexdigest()
  return out


def _summaries(directory):
  return [
      os.path.join(root, name)
      for root, _, files in os.walk(directory)
      for name in files
      if name in _NO_SUMMARY
  ]


def _checkpoint_tree(directory, step=None):
  manager = ocp.CheckpointManager(os.path.abspath(directory))
  step = manager.latest_step() if step is None else step
  tree = manager.restore(step, args=ocp.args.StandardRestore())
  manager.close()
  return tree


def _one_line(error, pattern):
  """Asserts `error` is a user's mistake whose CLI line (one line) matches `pattern`."""
  assert isinstance(error, errors.UserError), type(error)
  line = errors.one_line(error)
  assert "\n" not in line and line == line.strip(), line
  assert re.search(pattern, line), line
  return line


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
  """A finished tiny pre-training run (checkpoints at steps 6 and 12) and its files' digests."""
  workdir = str(tmp_path_factory.mktemp("pretrained"))
  train.train_and_evaluate(_config(mode="pretrain"), workdir)
  return workdir, _digest(workdir)


@pytest.fixture
def no_data(monkeypatch):
  """Fails the test if any data set is loaded (config errors must come before that)."""

  def build(config):
    raise AssertionError(f"data.build was called for {config.name}")

  monkeypatch.setattr(data, "build", build)


# ------------------------------------------------------------- config errors (train.validate)

# (case id, config variant, fields set, error class, message pattern).
_E = re.escape
CONFIG_CASES = [
    ("pretrain lr negative", "tiny", {"pretrain.learning_rate": -0.1},
     train.ConfigValueError, _E("config.pretrain.learning_rate=-0.1: must be > 0")),
    ("pretrain lr zero", "tiny", {"pretrain.learning_rate": 0.0},
     train.ConfigValueError, _E("config.pretrain.learning_rate=0.0: must be > 0")),
    ("selmix lr negative", "tiny", {"selmix.learning_rate": -3e-4},
     train.ConfigValueError, _E("config.selmix.learning_rate=-0.0003: must be > 0")),
    ("selmix lr nan", "tiny", {"selmix.learning_rate": float("nan")},
     train.ConfigValueError, _E("config.selmix.learning_rate=nan: must be > 0")),
    ("pretrain num_steps 0", "tiny", {"pretrain.num_steps": 0},
     train.ConfigValueError, _E("config.pretrain.num_steps=0: must be a positive integer")),
    ("selmix num_steps -5", "tiny", {"selmix.num_steps": -5},
     train.ConfigValueError, _E("config.selmix.num_steps=-5: must be a positive integer")),
    ("selmix temperature 0", "tiny", {"selmix.temperature": 0.0},
     train.ConfigValueError, _E("config.selmix.temperature=0.0: must be > 0")),
    ("selmix temperature inf", "tiny", {"selmix.temperature": float("inf")},
     train.ConfigValueError, _E("config.selmix.temperature=inf: must be > 0")),
    ("refresh_every 0", "tiny", {"selmix.refresh_every": 0},
     train.ConfigValueError, _E("config.selmix.refresh_every=0: must be a positive integer")),
    ("pretrain log_every 0", "tiny", {"pretrain.log_every": 0},
     train.ConfigValueError, _E("config.pretrain.log_every=0: must be a positive integer")),
    ("selmix checkpoint_every -1", "tiny", {"selmix.checkpoint_every": -1},
     train.ConfigValueError, _E("config.selmix.checkpoint_every=-1: must be an integer >= 0")),
    ("pretrain eval_every -100", "tiny", {"pretrain.eval_every": -100},
     train.ConfigValueError, _E("config.pretrain.eval_every=-100: must be an integer >= 0")),
    ("mix_weight_min 1.5", "tiny", {"selmix.mix_weight_min": 1.5},
     train.ConfigValueError, _E("config.selmix.mix_weight_min=1.5: must be in [0, 1]")),
    ("backbone_lr_mult negative", "tiny", {"selmix.backbone_lr_mult": -0.1},
     train.ConfigValueError, _E("config.selmix.backbone_lr_mult=-0.1: must be >= 0")),
    ("selmix weight_decay negative", "tiny", {"selmix.weight_decay": -5e-4},
     train.ConfigValueError, _E("config.selmix.weight_decay=-0.0005: must be >= 0")),
    ("pretrain momentum 1", "tiny", {"pretrain.momentum": 1.0},
     train.ConfigValueError, _E("config.pretrain.momentum=1.0: must be in [0, 1)")),
    ("selmix floor 2", "tiny", {"selmix.floor": 2.0},
     train.ConfigValueError, _E("config.selmix.floor=2.0: must be None (1/K) or in [0, 1]")),
    ("early_stop_window 0", "tiny", {"selmix.early_stop_window": 0},
     train.ConfigValueError, _E("config.selmix.early_stop_window=0: must be a positive integer")),
    ("gain_form unknown", "tiny", {"selmix.gain_form": "exactly"},
     train.ConfigValueError, _E("config.selmix.gain_form='exactly'; expected one of")),
    ("pairs unknown", "tiny", {"selmix.pairs": "gains"},
     train.ConfigValueError, _E("config.selmix.pairs='gains' is not a known pair strategy")),
    ("partner_pool unknown", "tiny", {"selmix.partner_pool": "unlabelled"},
     train.ConfigValueError, _E("config.selmix.partner_pool='unlabelled'; expected 'labeled'")),
    ("pretrain batch 30 on 4 devices", "tiny", {"pretrain.batch_size": 30},
     train.ConfigValueError, _E("config.pretrain.batch_size=30 must be a positive multiple")),
    ("eval batch 0", "tiny", {"eval_batch_size": 0},
     train.ConfigValueError, _E("config.eval_batch_size=0 must be a positive multiple")),
    ("pretrain schedule unknown", "tiny", {"pretrain.schedule": "linear"},
     train.ConfigValueError, _E("config.pretrain.schedule='linear'; expected one of")),
    ("mode unknown", "tiny", {"mode": "train"},
     train.ConfigValueError, _E("config.mode='train'; expected one of")),
    ("model unknown", "tiny", {"model.name": "resnet33"},
     train.ConfigValueError, _E("config.model.name='resnet33' is not a known model")),
    ("model kwarg unknown", "tiny", {"model.kwargs.depth": 3},
     train.ConfigValueError,
     _E("config.model.kwargs.depth=3: model 'cnn_small' has no option 'depth'; it accepts "
        "width, bn_momentum, bn_axis_name")),
    ("objective unknown", "tiny", {"objective.name": "min_recal"},
     train.ConfigValueError, _E("config.objective.name='min_recal' is not a known objective")),
    ("objective omega -1", "tiny", {"objective.hparams.omega": -1.0},
     train.ConfigValueError, _E("config.objective.hparams.omega=-1.0: must be >= 0")),
    ("objective alpha 0", "tiny", {"objective.hparams.alpha": 0.0},
     train.ConfigValueError, _E("config.objective.hparams.alpha=0.0: must be in (0, 1]")),
    ("objective tau 0", "tiny", {"objective.hparams.tau": 0.0},
     train.ConfigValueError, _E("config.objective.hparams.tau=0.0: must be > 0")),
    ("objective multiplier_max -1", "tiny", {"objective.hparams.multiplier_max": -1.0},
     train.ConfigValueError, _E("config.objective.hparams.multiplier_max=-1.0: must be >= 0")),
    ("objective recall_smoothing -1e-3", "tiny", {"objective.hparams.recall_smoothing": -1e-3},
     train.ConfigValueError, _E("config.objective.hparams.recall_smoothing=-0.001: must be >= 0")),
    ("objective hparam unknown", "tiny", {"objective.hparams.gamma": 1.0},
     train.ConfigValueError,
     _E("config.objective.hparams: Unknown hyperparameters ['gamma'] for objective 'min_recall'")),
    ("data field unknown", "tiny", {"data.labelled_max": 3},
     train.ConfigValueError, _E("config.data.labelled_max is not a data field; known:")),
    ("data labeled_imbalance 0.5", "tiny", {"data.labeled_imbalance": 0.5},
     train.ConfigValueError, _E("config.data.labeled_imbalance=0.5: must be >= 1 (rho_l)")),
    ("data val_per_class -1", "tiny", {"data.val_per_class": -1},
     train.ConfigValueError, _E("config.data.val_per_class=-1: must be an integer >= 0")),
    ("data unlabeled_imbalance 0", "tiny", {"data.unlabeled_imbalance": 0.0},
     train.ConfigValueError, _E("config.data.unlabeled_imbalance=0.0: must be > 0")),
    ("data name unknown", "tiny", {"data.name": "cifar11"},
     train.ConfigValueError, _E("config.data.name='cifar11' is not a known data set")),
    ("image_folder root missing", "tiny", {"data.name": "image_folder", "data.root": "/no/such"},
     train.ConfigPathError, _E("config.data.root='/no/such' does not exist")),
    ("fixmatch unlabeled_ratio 0", "tiny_ssl", {"pretrain.unlabeled_ratio": 0},
     train.ConfigValueError, _E("config.pretrain.unlabeled_ratio=0: must be a positive integer")),
    ("fixmatch threshold 1.5", "tiny_ssl", {"pretrain.threshold": 1.5},
     train.ConfigValueError, _E("config.pretrain.threshold=1.5: must be in [0, 1]")),
    ("fixmatch ema_decay 1", "tiny_ssl", {"pretrain.ema_decay": 1.0},
     train.ConfigValueError, _E("config.pretrain.ema_decay=1.0: must be in [0, 1)")),
    ("fixmatch without unlabeled pool", "tiny_ssl", {"data.unlabeled_max": 0},
     train.ConfigValueError, _E("config.pretrain.method='fixmatch' needs an unlabeled pool")),
    ("selmix init_checkpoint missing", "tiny",
     {"mode": "selmix", "selmix.init_checkpoint": "/no/such/checkpoints"},
     train.ConfigPathError, _E("config.selmix.init_checkpoint='/no/such/checkpoints' is not a")),
]


@pytest.mark.parametrize(
    "variant, fields, error, pattern",
    [c[1:] for c in CONFIG_CASES],
    ids=[c[0] for c in CONFIG_CASES],
)
def test_config_error_names_the_field_before_compute_and_keeps_the_checkpoints(
    variant, fields, error, pattern, pretrained, no_data
):
  del no_data
  workdir, before = pretrained
  with pytest.raises(error, match=pattern) as caught:
    train.train_and_evaluate(_config(variant, **fields), workdir)
  assert _one_line(caught.value, pattern).startswith("Invalid config: config.")
  assert _digest(workdir) == before, "a config error must not touch the workdir"


def test_user_errors_are_also_the_builtin_exception_classes():
  for error, builtin in [
      (train.ConfigValueError, ValueError), (train.ConfigPathError, FileNotFoundError),
      (errors.DataError, ValueError), (errors.DataPathError, FileNotFoundError),
      (checkpointing.CheckpointMismatchError, ValueError),
      (checkpointing.CheckpointNotFoundError, FileNotFoundError),
      (checkpointing.NonFiniteCheckpointError, ValueError),
      (workdir_lib.WorkdirInUseError, RuntimeError), (workdir_lib.WorkdirMismatchError, ValueError),
  ]:
    assert issubclass(error, errors.UserError) and issubclass(error, builtin), error


def test_refresh_every_beyond_num_steps_warns(caplog):
  train.validate(_config(**{"selmix.refresh_every": 50}))
  assert any(
      "config.selmix.refresh_every=50 exceeds config.selmix.num_steps=12" in r.getMessage()
      for r in caplog.records
  )


# ------------------------------------------------- workdir, checkpoint and data-time errors


def test_finished_workdir_with_another_config_is_refused(pretrained):
  workdir, before = pretrained
  config = _config(mode="pretrain", **{"pretrain.learning_rate": 0.1})
  pattern = _E("config.pretrain.learning_rate is 0.05 there and 0.1 here. Use a new --workdir")
  with pytest.raises(workdir_lib.WorkdirMismatchError, match=pattern) as caught:
    train.train_and_evaluate(config, workdir)
  _one_line(caught.value, r"^Workdir .* holds a finished run of another config: ")
  assert _digest(workdir) == before


def test_workdir_in_use_is_refused(pretrained):
  workdir, before = pretrained
  lock = os.path.join(workdir, workdir_lib.LOCK_FILE)
  with open(lock, "w", encoding="utf-8") as f:
    json.dump({"pid": os.getpid(), "host": socket.gethostname(), "started": 0}, f)
  try:
    with pytest.raises(workdir_lib.WorkdirInUseError) as caught:
      train.train_and_evaluate(_config(mode="pretrain"), workdir)
    _one_line(caught.value, f"^Workdir {workdir} is in use by PID {os.getpid()}")
  finally:
    os.remove(lock)
  assert _digest(workdir) == before


def test_checkpoint_of_another_model_is_refused(pretrained, tmp_path):
  workdir, before = pretrained
  config = _config(mode="selmix", **{
      "model.kwargs.width": 16, "selmix.init_checkpoint": os.path.join(workdir, "checkpoints")
  })
  with pytest.raises(checkpointing.CheckpointMismatchError) as caught:
    train.train_and_evaluate(config, str(tmp_path))
  _one_line(caught.value, r"\(raw weights\) does not match this run: .* has shape")
  assert _digest(workdir) == before


def test_init_checkpoint_without_a_finished_step_is_refused(tmp_path):
  empty = tmp_path / "empty_checkpoints"
  empty.mkdir()
  config = _config(mode="selmix", **{"selmix.init_checkpoint": str(empty)})
  with pytest.raises(checkpointing.CheckpointNotFoundError) as caught:
    train.train_and_evaluate(config, str(tmp_path / "run"))
  _one_line(caught.value, f"^No finished checkpoint in '{empty}'")


def test_selmix_refuses_a_non_finite_init_checkpoint(pretrained, tmp_path):
  workdir, before = pretrained
  tree = _checkpoint_tree(os.path.join(workdir, "checkpoints"))
  kernel = np.array(tree["state"]["params"]["head"]["kernel"])
  kernel[0, 0] = np.nan
  tree["state"]["params"]["head"]["kernel"] = kernel
  bad = str(tmp_path / "nan_checkpoints")
  manager = checkpointing.make_manager(bad)
  checkpointing.save(manager, 12, tree)
  manager.wait_until_finished()
  manager.close()
  config = _config(mode="selmix", **{"selmix.init_checkpoint": bad})
  with pytest.raises(checkpointing.NonFiniteCheckpointError) as caught:
    train.train_and_evaluate(config, str(tmp_path / "run"))
  _one_line(caught.value, _E(f"config.selmix.init_checkpoint={bad!r}: the raw ")
            + r"weights of step 12 hold NaN or inf in 1 array\(s\), e.g. "
            + _E("'params/head/kernel'"))
  assert not _summaries(tmp_path / "run")
  assert _digest(workdir) == before


def _write_image_folder(root, splits):
  for split, classes in splits.items():
    for name in classes:
      folder = root / split / name
      folder.mkdir(parents=True)
      for i in range(40 if split == "train" else 3):
        PIL.Image.new("RGB", (8, 8), (60 * "abcd".index(name), i, 0)).save(folder / f"{i}.png")


def _folder_fields(root, **more):
  return {"data.name": "image_folder", "data.root": str(root), "data.labeled_max": 30,
          "data.val_per_class": 5, "data.cache_dir": "", **more}


def test_image_folder_test_split_with_an_unknown_class_fails_naming_the_folder(tmp_path):
  root = tmp_path / "images"
  _write_image_folder(root, {"train": "abc", "test": "abcd"})
  with pytest.raises(errors.DataError) as caught:
    train.train_and_evaluate(_config(**_folder_fields(root)), str(tmp_path / "run"))
  _one_line(caught.value, _E(f"Class folder {root}/test/d is not a class of the"))
  assert not _summaries(tmp_path / "run")
  # With config.data.class_names the listed classes are the data set: other folders are ignored.
  datasets = data.build(_config(**_folder_fields(root, **{
      "data.class_names": ("a", "b", "c")})).data)  # fmt: skip
  assert datasets.class_names == ("a", "b", "c") and len(datasets.test) == 9


def test_image_folder_test_split_missing_a_class_warns_and_keeps_the_ids(tmp_path, caplog):
  root = tmp_path / "images"
  _write_image_folder(root, {"train": "abc", "test": "ac"})
  datasets = data.build(_config(**_folder_fields(root)).data)
  assert datasets.class_names == ("a", "b", "c")
  assert datasets.test.class_counts(3).tolist() == [3, 0, 3]
  # Test images of c keep c's id (2), not b's (1, their position in the test folder list).
  np.testing.assert_array_equal(datasets.test.labels, [0, 0, 0, 2, 2, 2])
  assert any("test_split='test'" in r.getMessage() and "class 'b'" in r.getMessage()
             for r in caplog.records if r.levelname == "WARNING")
  # A model that is always right (it reads the class off the red value, 60 x its index) gets
  # recall 1 on every class the test split has; the absent class b is left out, not 0.
  images = datasets.test.source.get_images(datasets.test.indices)
  preds = np.round(images[:, 0, 0, 0] / 60).astype(np.int32)
  summary = metrics.summary(np.asarray(
      jnp.zeros((3, 3)).at[datasets.test.labels, preds].add(1.0)))  # fmt: skip
  assert float(summary["min_recall"]) == 1.0 and float(summary["mean_recall"]) == 1.0
  assert int(summary["num_absent_classes"]) == 1


# ------------------------------------------- data and workdir mistakes: one line, no compute


def _jpeg_folder(root, *, side=lambda name, i: 8):
  """`root/{train,test}/{a,b,c}/<i>.jpg`: 12 training and 3 test images a class."""
  for split in ("train", "test"):
    for name in "abc":
      folder = root / split / name
      folder.mkdir(parents=True)
      for i in range(12 if split == "train" else 3):
        size = (side(name, i),) * 2
        PIL.Image.new("RGB", size, (60 * "abc".index(name), 9 * i, 0)).save(folder / f"{i}.jpg")
  return root


def _folder_config(root, **fields):
  return _config(mode="pretrain", **{
      "data.name": "image_folder", "data.root": str(root), "data.labeled_max": 8,
      "data.val_per_class": 2, "data.cache_dir": "", **fields,
  })


def _empty_folder(tmp_path, monkeypatch):
  (tmp_path / "images").mkdir()
  return _folder_config(tmp_path / "images"), tmp_path / "run"


def _no_class_folders(tmp_path, monkeypatch):
  (tmp_path / "images" / "train").mkdir(parents=True)
  return _folder_config(tmp_path / "images"), tmp_path / "run"


def _empty_class(tmp_path, monkeypatch):
  root = _jpeg_folder(tmp_path / "images")
  for image in (root / "train" / "b").iterdir():
    image.unlink()
  return _folder_config(root), tmp_path / "run"


def _damaged_image(content):
  def setup(tmp_path, monkeypatch):
    root = _jpeg_folder(tmp_path / "images")
    image = root / "train" / "a" / "3.jpg"
    image.write_bytes(content(image.read_bytes()))
    return _folder_config(root), tmp_path / "run"
  return setup


def _mixed_sizes(tmp_path, monkeypatch):
  root = _jpeg_folder(tmp_path / "images", side=lambda name, i: 16 if (name, i) == ("b", 2) else 8)
  return _folder_config(root), tmp_path / "run"


def _labeled_max_40(tmp_path, monkeypatch):
  return _folder_config(_jpeg_folder(tmp_path / "images"), **{"data.labeled_max": 40}), (
      tmp_path / "run")


def _workdir_file(tmp_path, monkeypatch):
  (tmp_path / "run").write_text("notes\n")
  return _config(mode="pretrain"), tmp_path / "run"


def _workdir_under_file(tmp_path, monkeypatch):
  (tmp_path / "notes").write_text("notes\n")
  return _config(mode="pretrain"), tmp_path / "notes" / "run"


def _workdir_read_only(tmp_path, monkeypatch):
  # Root may write anywhere, so the permission answer is faked: the message path is under test.
  (tmp_path / "run").mkdir()
  monkeypatch.setattr(os, "access", lambda path, mode: False)
  return _config(mode="pretrain"), tmp_path / "run"


def _workdir_not_creatable(tmp_path, monkeypatch):
  def makedirs(path, exist_ok=False):
    raise PermissionError(13, "Permission denied", str(tmp_path / "ro"))
  monkeypatch.setattr(os, "makedirs", makedirs)
  return _config(mode="pretrain"), tmp_path / "ro" / "run"


_IMAGE = "Image {root}/train/a/3.jpg "
# (case id, setup(tmp_path, monkeypatch) -> (config, workdir), error class, pattern of the line;
# {root} = the image folder, {workdir} = the workdir).
INPUT_CASES = [
    ("empty data folder", _empty_folder, errors.DataPathError,
     _E("No split folder {root}/train (expected <root>/train/<class>/*.jpg).")),
    ("split folder without class folders", _no_class_folders, errors.DataError,
     _E("Split folder {root}/train has no class folders (expected train/<class>/*.jpg")),
    ("empty class folder", _empty_class, errors.DataError,
     _E("Class folder {root}/train/b holds no images (expected files ending in .jpg, .jpeg")),
    ("truncated JPEG", _damaged_image(lambda b: b[:200]), errors.DataError,
     _E(_IMAGE + "cannot be decoded (200 bytes, PIL says: ") + ".*"
     + _E("; expected a complete JPEG or PNG image): remove it or copy it again.")),
    ("zero-byte JPEG", _damaged_image(lambda b: b""), errors.DataError,
     _E(_IMAGE + "is empty (0 bytes; expected a JPEG or PNG image)")),
    ("text file named .jpg", _damaged_image(lambda b: b"hello world\n"), errors.DataError,
     _E(_IMAGE + "is not an image (12 bytes starting b'hello wo'; expected a JPEG or PNG")),
    ("images of mixed sizes", _mixed_sizes, errors.DataError,
     _E("Image {root}/train/b/2.jpg has shape (16, 16, 3), but {root}/train/a/0.jpg has "
        "(8, 8, 3): images of one data set must have one size; set image_size "
        "(config.data.image_size)")),
    ("labeled_max larger than a class", _labeled_max_40, errors.DataError,
     _E("config.data.labeled_max=40: class 'a' (id 0) of the training split 'train' of "
        "image_folder has 12 examples, fewer than the 42 requested (2 validation + 40 labeled "
        "+ 0 unlabeled; 2 class(es) short). Lower config.data.labeled_max")),
    ("workdir is a file", _workdir_file, workdir_lib.WorkdirError,
     _E("Workdir {workdir} is a file, not a directory: use another --workdir")),
    ("workdir under a file", _workdir_under_file, workdir_lib.WorkdirError,
     _E("Workdir {workdir} cannot be created: {root}/notes is a file, not a directory.")),
    ("workdir not writable", _workdir_read_only, workdir_lib.WorkdirError,
     _E("Workdir {workdir} is not writable by this user (uid ")),
    ("workdir cannot be created", _workdir_not_creatable, workdir_lib.WorkdirError,
     _E("Workdir {workdir} cannot be created (Permission denied: {root}/ro): use a --workdir "
        "this user (uid ")),
]


@pytest.mark.parametrize(
    "setup, error, pattern", [c[1:] for c in INPUT_CASES], ids=[c[0] for c in INPUT_CASES]
)
def test_data_and_workdir_mistakes_end_in_one_line_before_compute(
    setup, error, pattern, tmp_path, monkeypatch
):
  config, workdir = setup(tmp_path, monkeypatch)
  with pytest.raises(error) as caught:
    train.train_and_evaluate(config, str(workdir))
  monkeypatch.undo()
  root = config.data.root if config.data.name == "image_folder" else str(tmp_path)
  pattern = pattern.replace(_E("{root}"), _E(root)).replace(_E("{workdir}"), _E(str(workdir)))
  _one_line(caught.value, "^" + pattern)
  checkpoints = os.path.join(workdir, "checkpoints")
  assert not os.path.isdir(workdir) or not os.path.exists(checkpoints), "nothing may be compiled"


# Out of device memory, faked at each call site (a real one needs an accelerator).
_OOM = jax.errors.JaxRuntimeError(
    "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 4.00GiB."
)


def _raise_oom(*args, **kwargs):
  raise _OOM


def _pretrain_step():
  run = types.SimpleNamespace(
      feed=types.SimpleNamespace(next=lambda step: {}), p_train_step=_raise_oom,
      state_repl=None, key=None, cfg=types.SimpleNamespace(batch_size=32),
  )
  pretrain._Run.train_step(run, 0)  # pylint: disable=protected-access


def _selmix_step():
  steps = types.SimpleNamespace(
      feed=types.SimpleNamespace(next_step=0, stop=4, next=lambda step: {}),
      p_train_step=_raise_oom, state_repl=None, key=None,
      cfg=types.SimpleNamespace(batch_size=64),
  )
  finetune._HostSteps.train_step(steps, 0)  # pylint: disable=protected-access


def _device_selmix_step():
  steps = types.SimpleNamespace(
      tables_on_device={}, p_train_step=_raise_oom, states=None, hyper=None, pools=None,
      batch_size=64,
  )
  finetune._DeviceSteps.train_step(steps, 0)  # pylint: disable=protected-access


def _eval_pass():
  evaluator = types.SimpleNamespace(
      use_ema=False, p_eval_step=None, batch_size=256, options=None,
      batch_size_field="config.eval_batch_size", resident=None,
  )
  state_repl = types.SimpleNamespace(eval_variables=lambda use_ema: {})
  evaluation.Evaluator.__call__(evaluator, state_repl, split=[])


OOM_CASES = [
    ("pre-training step out of memory", _pretrain_step,
     "A pre-training step ran out of device memory with config.pretrain.batch_size=32 "
     "(8 examples per device on 4 device(s)): lower config.pretrain.batch_size (keeping it a "
     "multiple of 4)."),
    ("SelMix step out of memory", _selmix_step,
     "A SelMix fine-tuning step ran out of device memory with config.selmix.batch_size=64 "
     "(16 examples per device on 4 device(s)): lower config.selmix.batch_size"),
    ("device-resident SelMix step out of memory", _device_selmix_step,
     "A SelMix fine-tuning step ran out of device memory with config.selmix.batch_size=64 "
     "(16 examples per device on 4 device(s)): lower config.selmix.batch_size"),
    ("evaluation out of memory", _eval_pass,
     "An evaluation pass ran out of device memory with config.eval_batch_size=256 (64 examples "
     "per device on 4 device(s)): lower config.eval_batch_size (keeping it a multiple of 4)."),
]


@pytest.mark.parametrize(
    "call, expected", [c[1:] for c in OOM_CASES], ids=[c[0] for c in OOM_CASES]
)
def test_out_of_device_memory_names_the_batch_size_field(call, expected, monkeypatch):
  monkeypatch.setattr(evaluation, "evaluate_split", _raise_oom)
  with pytest.raises(errors.OutOfMemoryError) as caught:
    call()
  line = _one_line(caught.value, "^" + _E(expected))
  assert line.endswith("XLA said: RESOURCE_EXHAUSTED: Out of memory while trying to allocate "
                       "4.00GiB.")
  assert caught.value.__cause__ is _OOM


def test_other_runtime_errors_pass_through_unchanged():
  other = jax.errors.JaxRuntimeError("INTERNAL: something else")
  with pytest.raises(jax.errors.JaxRuntimeError) as caught:
    with errors.out_of_memory("A step", "config.selmix.batch_size", 64):
      raise other
  assert caught.value is other


# ---------------------------------------------------------------------------- divergence


def test_pretraining_divergence_keeps_the_last_good_checkpoint(pretrained, tmp_path):
  source, _ = pretrained
  workdir = str(tmp_path / "resumed")
  shutil.copytree(source, workdir)
  # A run killed after step 12, resumed with a 1e8 learning rate. Its checkpoints predate
  # fingerprints (which would refuse the other learning rate): they resume, with a warning.
  for name in (*_NO_SUMMARY, workdir_lib.FINGERPRINT_FILE):
    os.remove(os.path.join(workdir, name))
  kept = _digest(os.path.join(workdir, "checkpoints"))
  config = _config(mode="pretrain", **{
      "pretrain.num_steps": 24, "pretrain.learning_rate": 1e8
  })
  with pytest.raises(loop.Diverged) as caught:
    train.train_and_evaluate(config, workdir)
  message = str(caught.value)
  assert re.search(r"^Pre-training diverged at step 1[5-9]: the (training loss is nan|train state)",
                   message), message
  assert "config.pretrain.learning_rate=100000000.0" in message
  assert f"last good checkpoint, step 12 in {workdir}/checkpoints, is kept" in message
  assert caught.value.last_good_step == 12
  assert _digest(os.path.join(workdir, "checkpoints")) == kept
  assert not checkpointing.non_finite_entries(_checkpoint_tree(f"{workdir}/checkpoints", 12))
  assert not _summaries(workdir), "no summary may claim a finished run"


@pytest.mark.parametrize(
    "learning_rate, pattern",
    [
        (1e8, r"SelMix fine-tuning diverged at step 4: the refresh's gains are not finite"),
        (1e30,
         r"SelMix fine-tuning diverged at step [1-4]: the (training loss is nan|train state)"),
    ],
    ids=["selmix lr 1e8 (gains)", "selmix lr 1e30 (state)"],
)
def test_selmix_divergence_stops_and_keeps_the_pretrained_checkpoint(
    learning_rate, pattern, pretrained, tmp_path
):
  workdir, before = pretrained
  config = _config(mode="selmix", **{
      "selmix.learning_rate": learning_rate,
      "selmix.init_checkpoint": os.path.join(workdir, "checkpoints"),
  })
  with pytest.raises(loop.Diverged, match=pattern) as caught:
    train.train_and_evaluate(config, str(tmp_path))
  assert f"config.selmix.learning_rate={learning_rate}" in str(caught.value)
  assert "No checkpoint had been written" in str(caught.value)
  assert not _summaries(tmp_path)
  assert _digest(workdir) == before


# ------------------------------------------------------------------------- library API


def _raises(error, pattern, fn, *args, **kwargs):
  with pytest.raises(error, match=pattern):
    fn(*args, **kwargs)


_NAN_MATRIX = np.array([[3.0, np.nan], [1.0, 4.0]])
LIBRARY_CASES = [
    ("pair_distribution temperature 0", lambda: _raises(
        ValueError, "temperature must be a positive finite number, got 0",
        gains.pair_distribution, jnp.ones((3, 3)), temperature=0.0)),
    ("pair_distribution temperature -1", lambda: _raises(
        ValueError, "temperature must be a positive finite number, got -1",
        gains.pair_distribution, jnp.ones((3, 3)), temperature=-1.0)),
    ("pair_distribution NaN gain -> NaN P", lambda: np.testing.assert_array_equal(
        np.isnan(gains.pair_distribution(jnp.asarray(_NAN_MATRIX), temperature=0.1)), True)),
    ("summary of a NaN matrix -> NaN", lambda: _assert_all_nan(metrics.summary(_NAN_MATRIX))),
    ("summary of a negative matrix -> NaN", lambda: _assert_all_nan(
        metrics.summary(np.array([[5.0, -1.0], [0.0, 2.0]])))),
    ("summary of an inf matrix -> NaN", lambda: _assert_all_nan(
        metrics.summary(np.array([[np.inf, 0.0], [0.0, 2.0]])))),
    ("check_counts of a NaN matrix", lambda: _raises(
        ValueError, _E("val pass: invalid confusion matrix: entry [0, 1] is nan"),
        metrics.check_counts, _NAN_MATRIX, where="val pass")),
    ("objectives.get omega -1", lambda: _raises(
        ValueError, _E("Objective 'min_recall': omega=-1 must be >= 0"),
        objectives.get, "min_recall", omega=-1)),
    ("objectives.get alpha 2", lambda: _raises(
        ValueError, _E("Objective 'hmean_min_coverage': alpha=2 must be in (0, 1]"),
        objectives.get, "hmean_min_coverage", alpha=2)),
    ("models.get unknown option", lambda: _raises(
        ValueError, _E("Model 'wrn28_2' has no option 'width'; it accepts depth, widen_factor"),
        models.get, "wrn28_2", num_classes=10, width=8)),
    ("with_floor NaN P", lambda: _raises(
        ValueError, "pair_probs must be finite and non-negative",
        sampling.with_floor, _NAN_MATRIX)),
    ("summary of a 1-D array", lambda: _raises(
        ValueError, _E("confusion: a confusion matrix must have shape [..., K, K] with K >= 1 "
                       "(rows = true class), got shape (4,)."),
        metrics.summary, np.ones(4))),
    ("summary of a non-square matrix", lambda: _raises(
        ValueError, _E("got shape (2, 3)."), metrics.summary, np.ones((2, 3)))),
    ("summary of an empty matrix", lambda: _raises(
        ValueError, _E("with K >= 1 (rows = true class), got shape (0, 0)."),
        metrics.summary, np.ones((0, 0)))),
    ("jitted summary of a non-square matrix (trace time)", lambda: _raises(
        ValueError, _E("got shape (3, 2)."), jax.jit(metrics.summary), jnp.ones((3, 2)))),
    ("check_counts of an empty matrix", lambda: _raises(
        ValueError, _E("test pass: a confusion matrix must have shape [..., K, K] with K >= 1"),
        metrics.check_counts, np.zeros((0, 0)), where="test pass")),
    ("confusion_matrix drops labels >= K (documented)", lambda: np.testing.assert_array_equal(
        confusion.confusion_matrix(jnp.array([0, 1, 2, 5]), jnp.array([0, 1, 1, 1]), 3),
        [[1, 0, 0], [0, 1, 0], [0, 1, 0]])),
    ("check_labels of labels >= K", lambda: _raises(
        ValueError, _E("test labels: 2 of 4 labels lie outside [0, 3) (values 5, 7; first at "
                       "index 1); expected class ids 0..2."),
        confusion.check_labels, np.array([0, 5, 2, 7]), 3, where="test labels")),
    ("check_global_batch 6 on 4 devices", lambda: _raises(
        ValueError, _E("config.selmix.batch_size=6 must be a positive multiple"),
        pipeline.check_global_batch, 6, field="config.selmix.batch_size")),
]


def _assert_all_nan(summary):
  for name, value in summary.items():
    if name != "num_absent_classes":
      assert np.isnan(np.asarray(value)).all(), name
  assert int(summary["num_absent_classes"]) == -1


@pytest.mark.parametrize("check", [c[1] for c in LIBRARY_CASES], ids=[c[0] for c in LIBRARY_CASES])
def test_library_rejects_or_marks_bad_input(check):
  check()


# ---------------------------------------------------------------------- launch/main.py


# (case id, arguments ({images}: a folder with a text file named .jpg; {file}: a file), exit
# status, the line). Exit 2 cases print exactly that one line besides absl's log records.
CLI_CASES = [
    ("unknown flag", ["--foo=1"], 2,
     "Invalid command line: Unknown command line flag 'foo'."),
    ("bad --config variant", ["--config=configs/default.py:huge"], 2,
     "Invalid config: --config=configs/default.py:huge: configs/default.py variant 'huge': "
     "'huge' is not 'tiny', 'tiny_ssl', 'pretrain' or an objective"),
    ("config file missing", ["--config=configs/nope.py"], 2,
     "Invalid config: --config=configs/nope.py: No such file or directory: 'configs/nope.py'"),
    ("unknown --config.data field", ["--config=configs/default.py:tiny", "--config.data.foo=1"], 2,
     "Invalid config: --config.data.foo=1: the config has no field 'config.data.foo'."),
    ("misspelt --config field", ["--config.selmix.temprature=1"], 2,
     "Invalid config: --config.selmix.temprature=1: the config has no field "
     "'config.selmix.temprature'. Did you mean 'temperature'?"),
    ("--imports of a missing module", ["--imports=no_such_module"], 2,
     "--imports=no_such_module: cannot import it (No module named 'no_such_module')."),
    ("value of the wrong type", ["--config.selmix.temperature=abc"], 2,
     "Invalid config: --config.selmix.temperature=abc: could not convert string to float: 'abc'"),
    ("validate error from the CLI", ["--config=configs/default.py:tiny",
                                     "--config.selmix.temperature=0"], 2,
     "Invalid config: config.selmix.temperature=0.0: must be > 0."),
    ("text file named .jpg from the CLI", [
        "--config=configs/default.py:tiny", "--config.data.name=image_folder",
        "--config.data.root={images}", "--config.data.cache_dir=", "--config.data.labeled_max=8",
        "--config.data.val_per_class=2"], 2,
     "Image {images}/train/a/3.jpg is not an image (12 bytes starting b'hello wo'; expected a "
     "JPEG or PNG image): remove it or copy it again."),
    ("workdir is a file from the CLI", ["--config=configs/default.py:tiny", "--workdir={file}"], 2,
     "Workdir {file} is a file, not a directory: use another --workdir"),
    ("pre-training diverges (lr 1e8)", [
        "--config=configs/default.py:tiny", "--config.mode=pretrain",
        "--config.pretrain.num_steps=24", "--config.pretrain.learning_rate=1e8"], 3,
     "Pre-training diverged at step "),
]
# An absl log record's first line: `I1204 17:24:47.483090 140389992889216 main.py:179] ...`.
_ABSL_RECORD = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ \S+:\d+\] ")


@pytest.fixture(scope="module")
def cli_results(tmp_path_factory):
  """Runs every CLI case at once (separate processes), each in its own workdir."""
  env = {**os.environ, "PYTHONPATH": _REPO}
  env.pop("SELMIX_TRACEBACK", None)
  images = tmp_path_factory.mktemp("cli_images")
  _jpeg_folder(images)
  (images / "train" / "a" / "3.jpg").write_bytes(b"hello world\n")
  file = tmp_path_factory.mktemp("cli_file") / "notes.txt"
  file.write_text("notes\n")
  paths = {"images": str(images), "file": str(file)}
  running = {}
  for case_id, args, _, _ in CLI_CASES:
    workdir = str(tmp_path_factory.mktemp("cli"))
    command = [sys.executable, "launch/main.py", f"--workdir={workdir}"]
    command += [arg.format(**paths) for arg in args]  # A later --workdir wins.
    running[case_id] = (workdir, subprocess.Popen(
        command, cwd=_REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ))
  results = {}
  for case_id, (workdir, process) in running.items():
    _, stderr = process.communicate(timeout=300)
    results[case_id] = (process.returncode, stderr, workdir, paths)
  return results


@pytest.mark.parametrize(
    "case_id, status, expected", [(c[0], c[2], c[3]) for c in CLI_CASES],
    ids=[c[0] for c in CLI_CASES],
)
def test_command_line_error_exits_naming_the_problem(case_id, status, expected, cli_results):
  returncode, stderr, workdir, paths = cli_results[case_id]
  assert returncode == status, stderr[-3000:]
  assert "Traceback" not in stderr and 'File "' not in stderr, stderr[-3000:]
  if status == 2:  # One line besides absl's (single-line) log records, and it is the last one.
    lines = [line for line in stderr.splitlines() if not _ABSL_RECORD.match(line)]
    assert len(lines) == 1, stderr[-3000:]
    assert lines[0] == stderr.splitlines()[-1]
    assert lines[0].startswith(expected.format(**paths)), lines[0]
  else:
    assert expected in stderr, stderr[-3000:]
  assert not _summaries(workdir)
  assert not os.path.isdir(os.path.join(workdir, "checkpoints")) or not os.listdir(
      os.path.join(workdir, "checkpoints")
  ), "nothing non-finite may be checkpointed"


# ----------------------------------------------------------------------------- the list


def test_catalogue_is_listed_in_the_benchmarks_readme():
  with open(os.path.join(_REPO, "benchmarks", "README.md"), encoding="utf-8") as f:
    text = f.read()
  ids = [c[0] for c in CONFIG_CASES + INPUT_CASES + OOM_CASES + LIBRARY_CASES + CLI_CASES]
  assert len(ids) >= 40
  missing = [case_id for case_id in ids if f"| {case_id} |" not in text]
  assert not missing, f"benchmarks/README.md lacks catalogue rows for {missing}"


def test_selmix_traceback_shows_the_traceback_of_a_user_error(tmp_path):
  env = {**os.environ, "PYTHONPATH": _REPO, "SELMIX_TRACEBACK": "1"}
  command = [sys.executable, "launch/main.py", "--config=configs/default.py:tiny",
             "--config.selmix.temperature=0", f"--workdir={tmp_path}"]
  done = subprocess.run(command, cwd=_REPO, env=env, capture_output=True, text=True, timeout=300)
  assert done.returncode == 1, done.stderr[-3000:]
  assert "Traceback (most recent call last)" in done.stderr, done.stderr[-3000:]
  assert "ConfigValueError: config.selmix.temperature=0.0: must be > 0." in done.stderr
