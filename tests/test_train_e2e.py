"""End to end on the tiny digits config: train, checkpoint, resume, evaluate, outputs."""

import glob
import json
import logging
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from selmix_jax.configs import default
from selmix_jax import data
from selmix_jax import finetune
from selmix_jax import metrics
from selmix_jax import objectives
from selmix_jax import pretrain
from selmix_jax import reporting
from selmix_jax import sampling
from selmix_jax import train

import launch_helpers  # tests/launch_helpers.py


class _Preempted(Exception):
  pass


def _final_params(workdir):
  manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"))
  tree = manager.restore(manager.latest_step(), args=ocp.args.StandardRestore())
  step = manager.latest_step()
  manager.close()
  return step, tree["state"]["params"], tree["selmix"]


def _finetune_config(pretrain_workdir, **overrides):
  """The tiny config's SelMix stage alone, from `<pretrain_workdir>/pretrain/checkpoints`;
  `overrides` are `'section.field': value` (e.g. `**{'model.dtype': 'bfloat16'}`)."""
  config = default.get_config("tiny")
  with config.unlocked():
    config.mode = "selmix"
    config.selmix.init_checkpoint = os.path.join(pretrain_workdir, "pretrain", "checkpoints")
    for field, value in overrides.items():
      section, name = field.split(".")
      setattr(config[section], name, value)
  return config


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("full"))
  result = train.train_and_evaluate(default.get_config("tiny"), workdir)
  return workdir, result


def test_default_tiny_runs_on_four_devices_and_writes_outputs(uninterrupted):
  assert jax.local_device_count() == 4, "the test must exercise several devices"
  workdir, result = uninterrupted
  for name in (
    "results.md",
    "selmix/summary.json",
    "pretrain/summary.json",
    "selmix/recalls.png",
    "selmix/pair_probs.png",
    "selmix/refresh_curves.png",
    "selmix/val_recalls.png",
  ):
    assert os.path.isfile(os.path.join(workdir, name)), name
  assert glob.glob(os.path.join(workdir, "selmix", "events.out.tfevents.*"))
  assert glob.glob(os.path.join(workdir, "pretrain", "events.out.tfevents.*"))
  summary = json.load(open(os.path.join(workdir, "selmix", "summary.json")))
  assert summary["config"]["objective"]["name"] == "min_recall"
  assert summary["steps"] == 12
  # Refreshes at steps 0, 4, 8, each with a distribution over the K x K pairs.
  history = sorted(glob.glob(os.path.join(workdir, "selmix", "selmix_history", "*.npz")))
  assert len(history) == 3
  probs = np.load(history[-1])["pair_probs"]
  assert probs.shape == (10, 10) and np.isclose(probs.sum(), 1.0, atol=1e-5)
  # The test split is evaluated exactly: confusion counts sum to its size.
  confusion = np.asarray(result["after"]["test"]["confusion"])
  assert confusion.sum() == np.asarray(result["before"]["test"]["confusion"]).sum() > 0
  table = open(os.path.join(workdir, "results.md")).read()
  for metric in ("mean_recall", "min_recall", "hmean_recall", "min_coverage"):
    assert metric in table


def _crash_at(monkeypatch, run_class, step):
  """Makes `run_class.train_step` raise `_Preempted` at `step` (as a killed process)."""
  original = run_class.train_step

  def crashing(self, s):
    if s == step:
      raise _Preempted()
    return original(self, s)

  monkeypatch.setattr(run_class, "train_step", crashing)
  return lambda: monkeypatch.setattr(run_class, "train_step", original)


def _assert_same_checkpoints(dir_a, dir_b, step):
  """The checkpoints at `step` (train state, EMA, optimiser, SelMix state) are bit-identical."""
  trees = []
  for directory in (dir_a, dir_b):
    manager = ocp.CheckpointManager(os.path.join(directory, "checkpoints"))
    assert manager.latest_step() == step, directory
    trees.append(manager.restore(step, args=ocp.args.StandardRestore()))
    manager.close()
  assert jax.tree.structure(trees[0]) == jax.tree.structure(trees[1])
  jax.tree.map(np.testing.assert_array_equal, *trees)


def test_resume_after_crashes_in_both_stages_is_bit_identical(uninterrupted, tmp_path, monkeypatch,
                                                              caplog):
  """Killed in pre-training after its step-6 checkpoint, then in fine-tuning after its step-6
  checkpoint: each stage resumes from step 6 and ends bit-identical to an uninterrupted run."""
  full_dir, full_result = uninterrupted
  workdir = str(tmp_path)
  restore = _crash_at(monkeypatch, pretrain._Run, 8)
  with pytest.raises(_Preempted):
    train.train_and_evaluate(default.get_config("tiny"), workdir)
  restore()
  restore = _crash_at(monkeypatch, finetune._HostSteps, 8)
  with caplog.at_level(logging.INFO), pytest.raises(_Preempted):
    train.train_and_evaluate(default.get_config("tiny"), workdir)
  restore()
  with caplog.at_level(logging.INFO):
    result = train.train_and_evaluate(default.get_config("tiny"), workdir)
  messages = [r.getMessage() for r in caplog.records]
  assert "Resumed pre-training from step 6." in messages
  assert "Resumed SelMix fine-tuning from step 6." in messages
  for stage in ("pretrain", "selmix"):
    _assert_same_checkpoints(os.path.join(full_dir, stage), os.path.join(workdir, stage), 12)
    assert launch_helpers.summary(full_dir, stage) == launch_helpers.summary(workdir, stage)
  np.testing.assert_array_equal(
    full_result["after"]["test"]["confusion"], result["after"]["test"]["confusion"]
  )


def _assert_summary_matches_counts(summary):
  """Every reported metric of a `summary.json` entry equals the metric of its stored counts:
  `metrics.summary` of them, and a numpy computation of accuracy and mean/min recall."""
  counts = np.asarray(summary["confusion"], np.float64)
  assert counts.sum() > 0 and np.array_equal(counts, np.round(counts))
  recomputed = metrics.summary(counts)
  for name in (*metrics.SCALAR_METRICS, "recall", "precision"):
    np.testing.assert_allclose(
      np.asarray(summary[name], np.float64), np.asarray(recomputed[name], np.float64),
      rtol=1e-6, err_msg=name,
    )
  recall = np.diag(counts) / counts.sum(1)
  np.testing.assert_allclose(summary["accuracy"], np.trace(counts) / counts.sum(), rtol=1e-6)
  np.testing.assert_allclose(summary["mean_recall"], recall.mean(), rtol=1e-6)
  np.testing.assert_allclose(summary["min_recall"], recall.min(), rtol=1e-6)


def test_summaries_and_table_equal_the_metrics_of_the_stored_counts(uninterrupted):
  workdir, _ = uninterrupted
  pre = json.load(open(os.path.join(workdir, "pretrain", "summary.json")))
  sel = json.load(open(os.path.join(workdir, "selmix", "summary.json")))
  for entry in (pre["val"], pre["test"], *sel["before"].values(), *sel["after"].values()):
    _assert_summary_matches_counts(entry)
  # The fine-tuning stage started from the model the pre-training stage reported.
  assert pre["test"]["confusion"] == sel["before"]["test"]["confusion"]
  objective = objectives.from_config(default.get_config("tiny").objective)
  for when in ("before", "after"):
    target = objective.target(np.asarray(sel[when]["test"]["confusion"], np.float32))
    np.testing.assert_allclose(sel[f"target_{when}"]["target"], float(target["target"]),
                               rtol=1e-6)
  # results.md: each cell is 100 x the metric of the stored test counts, to 2 decimals.
  rows = {}
  for line in open(os.path.join(workdir, "results.md")):
    cells = [c.strip() for c in line.strip().strip("|").split("|")]
    if cells[0] in metrics.SCALAR_METRICS:
      rows[cells[0]] = cells[1:]
  assert sorted(rows) == sorted(metrics.SCALAR_METRICS)
  for name, cells in rows.items():
    expected = [
      f"{100 * float(metrics.summary(np.asarray(c, np.float64))[name]):.2f}"
      for c in (sel["before"]["test"]["confusion"], sel["after"]["test"]["confusion"])
    ]
    assert cells == expected, name


def test_early_stop_ends_the_run_at_a_refresh_and_says_so(uninterrupted, tmp_path):
  """early_stop with a window of 2 refreshes and a 100 % tolerance: the max gain of the second
  refresh (step 4) is within it of the mean of the last two, so the run stops there."""
  full_dir, _ = uninterrupted
  result, workdir = _selmix_from(full_dir, tmp_path, "early", early_stop=True,
                                 early_stop_window=2, early_stop_tol=1.0)
  summary = json.load(open(os.path.join(workdir, "summary.json")))
  assert result["stopped_early"] is True and summary["stopped_early"] is True
  assert summary["steps"] == 4 < summary["config"]["selmix"]["num_steps"] == 12
  manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"))
  assert manager.latest_step() == 4  # The final checkpoint is where it stopped.
  manager.close()
  assert len(glob.glob(os.path.join(workdir, "selmix_history", "*.npz"))) == 2
  assert "(4 fine-tuning steps" in open(os.path.join(workdir, "results.md")).read()
  _assert_summary_matches_counts(summary["after"]["test"])


@pytest.mark.parametrize(
  "field, value, error, match",
  [
    ("selmix.batch_size", 30, ValueError, "multiple of the number of devices"),
    ("selmix.bn_stats", "frozen", ValueError, "bn_stats='frozen'.*'batch'"),
    ("data.train_augment", "crop", ValueError, "train_augment='crop'.*random_resized_crop"),
    ("model.dtype", "float16", ValueError, "dtype='float16'.*bfloat16"),
  ],
)
def test_config_errors_fail_before_compute(field, value, error, match, tmp_path):
  config = default.get_config("tiny")
  section, name = field.split(".")
  with config.unlocked():
    setattr(config[section], name, value)
  with pytest.raises(error, match=match):
    train.train_and_evaluate(config, str(tmp_path))
  assert not os.listdir(tmp_path), "nothing may be written before the config is validated"


@pytest.fixture(scope="module")
def ssl_run(tmp_path_factory):
  """A finished `default.py:tiny_ssl` run: FixMatch(LA) pre-training with EMA, then SelMix."""
  workdir = tmp_path_factory.mktemp("ssl")
  return workdir, train.train_and_evaluate(default.get_config("tiny_ssl"), str(workdir))


def test_fixmatch_pretraining_resume_is_bit_identical_ema_included(ssl_run, tmp_path,
                                                                   monkeypatch):
  full_dir, _ = ssl_run
  config = default.get_config("tiny_ssl")
  with config.unlocked():
    config.mode = "pretrain"
  restore = _crash_at(monkeypatch, pretrain._Run, 8)  # After the step-6 checkpoint.
  with pytest.raises(_Preempted):
    train.train_and_evaluate(config, str(tmp_path))
  restore()
  train.train_and_evaluate(config, str(tmp_path))
  _assert_same_checkpoints(os.path.join(full_dir, "pretrain"), str(tmp_path), 12)
  _, tree = launch_helpers.checkpoint(tmp_path)
  assert tree["state"]["ema_params"] and tree["state"]["ema_batch_stats"]
  resumed = json.load(open(os.path.join(tmp_path, "summary.json")))
  full = launch_helpers.summary(full_dir, "pretrain")
  assert resumed["val"] == full["val"] and resumed["test"] == full["test"]


def test_semi_supervised_path_uses_pseudo_labelled_partners(ssl_run, tmp_path):
  workdir, result = ssl_run
  pre = json.load(open(os.path.join(workdir, "pretrain", "summary.json")))
  assert pre["config"]["pretrain"]["method"] == "fixmatch"
  _, _, selmix_state = _final_params(os.path.join(workdir, "selmix"))
  partner_labels = np.asarray(selmix_state["partner_labels"])
  # One pseudo-label per unlabeled example: 50 * 10^(-k/9) per class, summed.
  assert partner_labels.shape == (sum(max(int(50 * 10 ** (-k / 9)), 5) for k in range(10)),)
  assert partner_labels.min() >= 0 and partner_labels.max() < 10
  assert result["steps"] == 12
  # The oracle of the authors' release: partners keyed by the pool's true labels, never refreshed.
  config = default.get_config("tiny_ssl")
  with config.unlocked():
    config.mode = "selmix"
    config.selmix.partner_labels = "true"
    config.selmix.num_steps = 4
    config.selmix.init_checkpoint = os.path.join(workdir, "pretrain", "checkpoints")
  train.train_and_evaluate(config, str(tmp_path / "true_labels"))
  _, _, oracle_state = _final_params(str(tmp_path / "true_labels"))
  true_labels = data.build(config.data).unlabeled.labels
  np.testing.assert_array_equal(oracle_state["partner_labels"], true_labels)
  assert not np.array_equal(partner_labels, true_labels)  # the pseudo-labels differ somewhere


def _selmix_from(full_dir, tmp_path, name, **selmix_fields):
  config = default.get_config("tiny")
  with config.unlocked():
    config.mode = "selmix"
    config.selmix.init_checkpoint = os.path.join(full_dir, "pretrain", "checkpoints")
    for key, value in selmix_fields.items():
      setattr(config.selmix, key, value)
  workdir = str(tmp_path / name)
  return train.train_and_evaluate(config, workdir), workdir


def test_controls_are_reported_as_controls_and_skip_refreshes(uninterrupted, tmp_path, caplog):
  full_dir, _ = uninterrupted
  with caplog.at_level(logging.INFO):
    result, workdir = _selmix_from(full_dir, tmp_path, "uniform", pairs="uniform")
  assert result["objective"] == "none" and result["method"] == "uniform mixup"
  summary = json.load(open(os.path.join(workdir, "summary.json")))
  assert summary["objective"] == "none" and summary["method"] == "uniform mixup"
  assert not any("Refresh at step" in r.getMessage() for r in caplog.records)
  assert not os.path.exists(os.path.join(workdir, "pair_probs.png"))
  assert not glob.glob(os.path.join(workdir, "selmix_history", "*"))
  assert os.path.isfile(os.path.join(workdir, "recalls.png"))
  assert "uniform mixup (test)" in open(os.path.join(workdir, "results.md")).read()
  # The starting model's passes came from the cache the first run left beside the checkpoint.
  assert any("read from" in r.getMessage() and "eval_cache" in r.getMessage()
             for r in caplog.records)
  ce, _ = _selmix_from(full_dir, tmp_path, "ce", pairs="instance", mix_weight_min=1.0)
  assert ce["method"] == "CE fine-tuning"


def test_a_near_uniform_p_is_reported_and_max_gain_temperature_concentrates_it(
    uninterrupted, tmp_path, caplog
):
  full_dir, _ = uninterrupted
  with caplog.at_level(logging.WARNING):
    _, hot = _selmix_from(full_dir, tmp_path, "hot", temperature=1e4)
  warnings = [r.getMessage() for r in caplog.records if "within 5% of uniform" in r.getMessage()]
  assert len(warnings) == 1 and "temperature_scale='max_gain'" in warnings[0]
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    _, scaled = _selmix_from(full_dir, tmp_path, "scaled", temperature=0.1,
                             temperature_scale="max_gain")
  assert not any("within 5% of uniform" in r.getMessage() for r in caplog.records)
  flat = sampling.concentration(reporting.load_history(hot)[0]["pair_probs"])
  sharp = sampling.concentration(reporting.load_history(scaled)[0]["pair_probs"])
  assert flat["near_uniform"] and not sharp["near_uniform"]
  assert sharp["effective_pairs"] < 0.5 * flat["effective_pairs"]


def test_selmix_feeds_end_at_refreshes(uninterrupted, tmp_path, monkeypatch):
  """Each SelMix feed streams one refresh interval: none reads a batch past the next refresh."""
  from selmix_jax.data import loader  # pylint: disable=g-import-not-at-top

  full_dir, _ = uninterrupted
  spans, feed_cls = [], loader.Feed

  def recording_feed(load, start, stop, **kwargs):
    if type(load).__name__ == "PairBatches":
      spans.append((start, stop))
    return feed_cls(load, start, stop, **kwargs)

  monkeypatch.setattr(loader, "Feed", recording_feed)
  # Refreshes at 0, 5, 10: the last interval is cut by num_steps = 12.
  train.train_and_evaluate(_finetune_config(full_dir, **{"selmix.refresh_every": 5}), str(tmp_path))
  assert spans == [(0, 5), (5, 10), (10, 12)]


def test_selmix_in_bfloat16_keeps_float32_parameters_and_gains(uninterrupted, tmp_path):
  full_dir, _ = uninterrupted
  config = _finetune_config(full_dir, **{"model.dtype": "bfloat16", "selmix.num_steps": 4})
  result = train.train_and_evaluate(config, str(tmp_path))
  _, params, selmix_state = _final_params(str(tmp_path))
  assert {np.asarray(x).dtype for x in jax.tree.leaves(params)} == {np.dtype(np.float32)}
  assert np.asarray(selmix_state["gain"]).dtype == np.float32
  assert np.isfinite(np.asarray(selmix_state["gain"])).all()
  assert np.asarray(result["after"]["test"]["confusion"]).sum() > 0


def _device_configs(full_dir):
  """Two runs for one program: SelMix(min_recall) seed 0 and the instance control seed 1."""
  gain = _finetune_config(full_dir, **{"data.device_resident": True})
  control = _finetune_config(
    full_dir, **{"data.device_resident": True, "selmix.pairs": "instance",
                 "selmix.mix_weight_min": 0.8}
  )
  with control.unlocked():
    control.seed = 1
  return [gain, control]


@pytest.fixture(scope="module")
def device_runs(uninterrupted, tmp_path_factory):
  """The two runs of `_device_configs` in one `run_many` program, uninterrupted."""
  full_dir, _ = uninterrupted
  root = tmp_path_factory.mktemp("many")
  workdirs = [str(root / "gain"), str(root / "instance")]
  ds = data.build(_device_configs(full_dir)[0].data)
  return workdirs, finetune.run_many(_device_configs(full_dir), workdirs, ds), ds


def test_run_many_writes_each_workdir_like_a_solo_run_and_moves_like_the_host_path(
    uninterrupted, device_runs
):
  _, host = uninterrupted
  workdirs, results, _ = device_runs
  for workdir in workdirs:
    for name in ("summary.json", "before.json", "results.md", "run.json", "recalls.png"):
      assert os.path.isfile(os.path.join(workdir, name)), (workdir, name)
    assert _final_params(workdir)[0] == 12
  assert results[0]["method"] == "SelMix (min_recall)" and results[1]["method"] == "instance mixup"
  assert len(reporting.load_history(workdirs[0])) == 3  # Refreshes at steps 0, 4, 8.
  assert not reporting.load_history(workdirs[1])
  # The same starting point as the host path, and after 12 steps the same place within a few
  # test images (other draws, same distribution).
  np.testing.assert_array_equal(host["before"]["test"]["confusion"],
                                results[0]["before"]["test"]["confusion"])
  for metric in ("accuracy", "mean_recall"):
    assert abs(host["after"]["test"][metric] - results[0]["after"]["test"][metric]) < 0.03


def test_run_many_resumes_bit_for_bit_and_each_run_equals_it_alone(
    uninterrupted, device_runs, tmp_path, monkeypatch
):
  full_dir, _ = uninterrupted
  workdirs, results, ds = device_runs
  resumed = [str(tmp_path / "gain"), str(tmp_path / "instance")]
  original = finetune._DeviceSteps.train_step

  def preempting_step(self, step):
    if step == 8:  # The checkpoint at step 6 is the last one.
      raise _Preempted()
    return original(self, step)

  monkeypatch.setattr(finetune._DeviceSteps, "train_step", preempting_step)
  with pytest.raises(_Preempted):
    finetune.run_many(_device_configs(full_dir), resumed, ds)
  monkeypatch.setattr(finetune._DeviceSteps, "train_step", original)
  again = finetune.run_many(_device_configs(full_dir), resumed, ds)
  for a, b in zip(workdirs, resumed):
    step_a, params_a, selmix_a = _final_params(a)
    step_b, params_b, selmix_b = _final_params(b)
    assert step_a == step_b == 12
    jax.tree.map(np.testing.assert_array_equal, params_a, params_b)
    np.testing.assert_array_equal(selmix_a["pair_probs"], selmix_b["pair_probs"])
  for r, s in zip(results, again):
    np.testing.assert_array_equal(r["after"]["test"]["confusion"], s["after"]["test"]["confusion"])
  # A finished workdir is skipped: its stored result comes back without training.
  skipped = finetune.run_many(_device_configs(full_dir)[:1], resumed[:1], ds)
  assert skipped[0]["after"]["test"]["confusion"] == again[0]["after"]["test"]["confusion"].tolist()
  # The SelMix run alone (device path, through the launcher's entry point) = its slot of the two.
  alone = str(tmp_path / "alone")
  train.train_and_evaluate(_device_configs(full_dir)[0], alone)
  _, params_alone, selmix_alone = _final_params(alone)
  _, params_many, selmix_many = _final_params(workdirs[0])
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), params_alone, params_many
  )
  np.testing.assert_allclose(selmix_alone["pair_probs"], selmix_many["pair_probs"], rtol=1e-3,
                             atol=1e-6)


def test_run_many_refuses_configs_that_differ_in_a_shared_field(uninterrupted, tmp_path):
  full_dir, _ = uninterrupted
  configs = _device_configs(full_dir)
  with configs[1].unlocked():
    configs[1].selmix.learning_rate = 0.1
  with pytest.raises(ValueError, match="config.selmix.learning_rate=0.1"):
    finetune.run_many(configs, [str(tmp_path / "a"), str(tmp_path / "b")], None)
