"""The bad-input catalogue (issue 16): every case fails loudly, names what is wrong, keeps data.

Each case is a wrong input a user can give, through `launch/main.py` or the library API, with the
message it must produce. Config cases also check that they fail before compute (no data loaded,
nothing written to the workdir) and that the finished pre-training run in that workdir keeps every
checkpoint file byte for byte. Divergence cases check the exception or exit status, the message,
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

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import PIL.Image
import pytest

from selmix_jax import checkpointing
from selmix_jax import data
from selmix_jax import gains
from selmix_jax import loop
from selmix_jax import metrics
from selmix_jax import models
from selmix_jax import objectives
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
  with pytest.raises(error, match=pattern):
    train.train_and_evaluate(_config(variant, **fields), workdir)
  assert _digest(workdir) == before, "a config error must not touch the workdir"


def test_config_errors_are_also_the_builtin_exception_classes():
  assert issubclass(train.ConfigValueError, ValueError)
  assert issubclass(train.ConfigPathError, FileNotFoundError)


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
  with pytest.raises(ValueError, match=_E("config.pretrain.learning_rate is 0.05 there and 0.1")):
    train.train_and_evaluate(config, workdir)
  assert _digest(workdir) == before


def test_workdir_in_use_is_refused(pretrained):
  workdir, before = pretrained
  lock = os.path.join(workdir, workdir_lib.LOCK_FILE)
  with open(lock, "w", encoding="utf-8") as f:
    json.dump({"pid": os.getpid(), "host": socket.gethostname(), "started": 0}, f)
  try:
    with pytest.raises(workdir_lib.WorkdirInUseError, match=f"in use by PID {os.getpid()}"):
      train.train_and_evaluate(_config(mode="pretrain"), workdir)
  finally:
    os.remove(lock)
  assert _digest(workdir) == before


def test_checkpoint_of_another_model_is_refused(pretrained, tmp_path):
  workdir, before = pretrained
  config = _config(mode="selmix", **{
      "model.kwargs.width": 16, "selmix.init_checkpoint": os.path.join(workdir, "checkpoints")
  })
  with pytest.raises(checkpointing.CheckpointMismatchError,
                     match=r"\(raw weights\) does not match this run: .* has shape"):
    train.train_and_evaluate(config, str(tmp_path))
  assert _digest(workdir) == before


def test_init_checkpoint_without_a_finished_step_is_refused(tmp_path):
  empty = tmp_path / "empty_checkpoints"
  empty.mkdir()
  config = _config(mode="selmix", **{"selmix.init_checkpoint": str(empty)})
  with pytest.raises(FileNotFoundError, match=f"No finished checkpoint in '{empty}'"):
    train.train_and_evaluate(config, str(tmp_path / "run"))


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
  with pytest.raises(ValueError, match=_E(f"config.selmix.init_checkpoint={bad!r}: the raw ")
                     + r"weights of step 12 hold NaN or inf in 1 array\(s\), e.g. "
                     + _E("'params/head/kernel'")):
    train.train_and_evaluate(config, str(tmp_path / "run"))
  assert not _summaries(tmp_path / "run")
  assert _digest(workdir) == before


def _write_image_folder(root, splits):
  for split, classes in splits.items():
    for name in classes:
      folder = root / split / name
      folder.mkdir(parents=True)
      for i in range(40 if split == "train" else 3):
        PIL.Image.new("RGB", (8, 8), (60 * "abcd".index(name), i, 0)).save(folder / f"{i}.png")


def test_image_folder_test_split_with_an_unknown_class_fails_naming_the_folder(tmp_path):
  root = tmp_path / "images"
  _write_image_folder(root, {"train": "abc", "test": "abcd"})
  config = _config(**{
      "data.name": "image_folder", "data.root": str(root), "data.labeled_max": 30,
      "data.val_per_class": 5, "data.cache_dir": "",
  })
  with pytest.raises(ValueError, match=_E(f"Class folder {root}/test/d is not a class of the")):
    train.train_and_evaluate(config, str(tmp_path / "run"))
  assert not _summaries(tmp_path / "run")


def test_image_folder_test_split_missing_a_class_warns_and_keeps_the_ids(tmp_path, caplog):
  root = tmp_path / "images"
  _write_image_folder(root, {"train": "abc", "test": "ac"})
  datasets = data.build(_config(**{
      "data.name": "image_folder", "data.root": str(root), "data.labeled_max": 30,
      "data.val_per_class": 5, "data.cache_dir": "",
  }).data)
  assert datasets.test.class_counts(3).tolist() == [3, 0, 3]
  assert any("test_split='test'" in r.getMessage() and "class 'b'" in r.getMessage()
             for r in caplog.records)


# ---------------------------------------------------------------------------- divergence


def test_pretraining_divergence_keeps_the_last_good_checkpoint(pretrained, tmp_path):
  source, _ = pretrained
  workdir = str(tmp_path / "resumed")
  shutil.copytree(source, workdir)
  for name in _NO_SUMMARY:  # A run killed after step 12, resumed with a 1e8 learning rate.
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


CLI_CASES = [
    ("unknown flag", ["--foo=1"], 1, "Unknown command line flag 'foo'"),
    ("bad --config variant", ["--config=configs/default.py:huge"], 1,
     "configs/default.py variant 'huge': expected '', 'tiny' or 'tiny_ssl'"),
    ("config file missing", ["--config=configs/nope.py"], 2,
     "Invalid config: --config=configs/nope.py:"),
    ("unknown --config.data field", ["--config=configs/default.py:tiny", "--config.data.foo=1"], 2,
     "Invalid config: --config.data.foo=1: the config has no field 'config.data.foo'."),
    ("misspelt --config field", ["--config.selmix.temprature=1"], 2,
     "the config has no field 'config.selmix.temprature'. Did you mean 'temperature'?"),
    ("--imports of a missing module", ["--imports=no_such_module"], 1,
     "--imports=no_such_module: cannot import it"),
    ("value of the wrong type", ["--config.selmix.temperature=abc"], 1,
     "flag --config.selmix.temperature=abc: could not convert string to float: 'abc'"),
    ("validate error from the CLI", ["--config=configs/default.py:tiny",
                                     "--config.selmix.temperature=0"], 2,
     "Invalid config: config.selmix.temperature=0.0: must be > 0."),
    ("pre-training diverges (lr 1e8)", [
        "--config=configs/default.py:tiny", "--config.mode=pretrain",
        "--config.pretrain.num_steps=24", "--config.pretrain.learning_rate=1e8"], 3,
     "Pre-training diverged at step "),
]


@pytest.fixture(scope="module")
def cli_results(tmp_path_factory):
  """Runs every CLI case at once (separate processes), each in its own workdir."""
  env = {**os.environ, "PYTHONPATH": _REPO}
  running = {}
  for case_id, args, _, _ in CLI_CASES:
    workdir = str(tmp_path_factory.mktemp("cli"))
    command = [sys.executable, "launch/main.py", *args, f"--workdir={workdir}"]
    running[case_id] = (workdir, subprocess.Popen(
        command, cwd=_REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ))
  results = {}
  for case_id, (workdir, process) in running.items():
    _, stderr = process.communicate(timeout=300)
    results[case_id] = (process.returncode, stderr, workdir)
  return results


@pytest.mark.parametrize(
    "case_id, status, expected", [(c[0], c[2], c[3]) for c in CLI_CASES],
    ids=[c[0] for c in CLI_CASES],
)
def test_command_line_error_exits_naming_the_problem(case_id, status, expected, cli_results):
  returncode, stderr, workdir = cli_results[case_id]
  assert returncode == status, stderr[-3000:]
  assert expected in stderr, stderr[-3000:]
  # At most the config file's own frames (absl shows them for an error inside get_config).
  assert stderr.count('File "') <= 2, stderr[-3000:]
  assert not _summaries(workdir)
  assert not os.path.isdir(os.path.join(workdir, "checkpoints")) or not os.listdir(
      os.path.join(workdir, "checkpoints")
  ), "nothing non-finite may be checkpointed"


# ----------------------------------------------------------------------------- the list


def test_catalogue_is_listed_in_the_benchmarks_readme():
  with open(os.path.join(_REPO, "benchmarks", "README.md"), encoding="utf-8") as f:
    text = f.read()
  ids = [c[0] for c in CONFIG_CASES + LIBRARY_CASES + CLI_CASES]
  assert len(ids) >= 40
  missing = [case_id for case_id in ids if f"| {case_id} |" not in text]
  assert not missing, f"benchmarks/README.md lacks catalogue rows for {missing}"
