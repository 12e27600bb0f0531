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
from selmix_jax import reporting
from selmix_jax import sampling
from selmix_jax import train


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


def test_resume_after_preemption_matches_uninterrupted_run(uninterrupted, tmp_path, monkeypatch):
  full_dir, full_result = uninterrupted
  workdir = str(tmp_path)
  original_step = finetune._HostSteps.train_step

  def preempting_step(self, step):
    # Kill the fine-tuning stage before step 8 (its checkpoint at step 6 is the last one).
    if step == 8:
      raise _Preempted()
    return original_step(self, step)

  monkeypatch.setattr(finetune._HostSteps, "train_step", preempting_step)
  with pytest.raises(_Preempted):
    train.train_and_evaluate(default.get_config("tiny"), workdir)
  monkeypatch.setattr(finetune._HostSteps, "train_step", original_step)
  result = train.train_and_evaluate(default.get_config("tiny"), workdir)

  step_a, params_a, selmix_a = _final_params(os.path.join(full_dir, "selmix"))
  step_b, params_b, selmix_b = _final_params(os.path.join(workdir, "selmix"))
  assert step_a == step_b == 12
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), params_a, params_b
  )
  np.testing.assert_allclose(selmix_a["pair_probs"], selmix_b["pair_probs"], rtol=1e-5)
  np.testing.assert_array_equal(
    full_result["after"]["test"]["confusion"], result["after"]["test"]["confusion"]
  )


def test_checkpoint_of_another_model_is_rejected_clearly(uninterrupted, tmp_path):
  full_dir, _ = uninterrupted
  config = _finetune_config(full_dir)
  with config.unlocked():
    config.model.kwargs.width = 16  # the checkpoint holds width 8
  with pytest.raises(ValueError, match="shape"):
    train.train_and_evaluate(config, str(tmp_path))


@pytest.mark.parametrize(
  "field, value, error, match",
  [
    ("objective.name", "min_recal", ValueError, "known objective"),
    ("model.name", "resnet33", ValueError, "known model"),
    ("data.name", "cifar11", ValueError, "known data set"),
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


def test_missing_pretraining_checkpoint_is_reported(tmp_path):
  config = default.get_config("tiny")
  with config.unlocked():
    config.mode = "selmix"
    config.selmix.init_checkpoint = str(tmp_path / "nowhere")
  with pytest.raises(FileNotFoundError, match="init_checkpoint"):
    train.train_and_evaluate(config, str(tmp_path / "run"))


def test_semi_supervised_path_uses_pseudo_labelled_partners(tmp_path):
  result = train.train_and_evaluate(default.get_config("tiny_ssl"), str(tmp_path))
  pre = json.load(open(os.path.join(tmp_path, "pretrain", "summary.json")))
  assert pre["config"]["pretrain"]["method"] == "fixmatch"
  _, _, selmix_state = _final_params(os.path.join(tmp_path, "selmix"))
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
    config.selmix.init_checkpoint = os.path.join(tmp_path, "pretrain", "checkpoints")
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
