"""The device-resident path: the pair draw against P, passes and refreshes against the host's."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from selmix_jax import evaluation
from selmix_jax import finetune
from selmix_jax import models
from selmix_jax import optim
from selmix_jax import pairs
from selmix_jax import selmix_state
from selmix_jax import train_state
from selmix_jax.configs import default
from selmix_jax.data import device
from selmix_jax.data import pipeline


def _draw(table, num_keys, per_key):
  table = jax.tree.map(jnp.asarray, table)
  draw = jax.jit(jax.vmap(lambda k: device.sample_pairs(table, k, per_key)))
  pos1, pos2 = draw(jax.random.split(jax.random.key(0), num_keys))
  return np.asarray(pos1).reshape(-1), np.asarray(pos2).reshape(-1)


def test_device_pair_draw_follows_p_with_floor_and_is_uniform_within_classes():
  rng = np.random.default_rng(0)
  k = 4
  labels = np.repeat(np.arange(k), [40, 20, 7, 3])
  rng.shuffle(labels)
  p = rng.random((k, k)) ** 4
  p[1, 2] = 0.0  # Only the floor reaches it.
  strategy = pairs.get("gain")(labels, labels, num_classes=k, floor=0.05).refreshed(p, labels)
  expected = strategy.class_pairs().probs
  pos1, pos2 = _draw(device.pair_table(strategy.class_pairs(), len(labels), len(labels)), 64, 4096)
  n = len(pos1)
  observed = np.zeros((k, k))
  np.add.at(observed, (labels[pos1], labels[pos2]), 1)
  # Pair frequencies against the prepared P (floor mixed in): a chi-square goodness of fit.
  assert stats.chisquare(observed.ravel(), expected.ravel() * n).pvalue > 1e-4
  assert observed[1, 2] > 0
  for pos in (pos1, pos2):  # Each example of a class equally often.
    for c in range(k):
      hits = np.bincount(pos[labels[pos] == c], minlength=len(labels))[labels == c]
      assert stats.chisquare(hits).pvalue > 1e-4


def test_device_instance_pairs_are_uniform_over_examples_and_absent_classes_never_drawn():
  labels = np.asarray([0] * 30 + [1] * 5 + [3] * 15)  # Class 2 has no examples.
  partner = np.asarray([3] * 10 + [0] * 10)
  strategy = pairs.get("instance")(labels, partner, num_classes=4).refreshed(None, partner)
  pos1, pos2 = _draw(device.pair_table(strategy.class_pairs(), 50, 20), 16, 4096)
  assert stats.chisquare(np.bincount(pos1, minlength=50)).pvalue > 1e-4
  assert stats.chisquare(np.bincount(pos2, minlength=20)).pvalue > 1e-4
  gain = pairs.get("gain")(labels, partner, num_classes=4).refreshed(np.ones((4, 4)), partner)
  pos1, pos2 = _draw(device.pair_table(gain.class_pairs(), 50, 20), 4, 1024)
  assert set(labels[pos1]) == {0, 1, 3} and set(partner[pos2]) == {0, 3}


@pytest.fixture(scope="module")
def tiny():
  config = default.get_config("tiny")
  ds = pipeline.build(config.data)
  model = models.from_config(config.model, ds.num_classes)
  variables = model.init(jax.random.key(3), jnp.zeros((1, *ds.image_shape)), train=False)
  schedule = optim.cosine_schedule(1e-3, 10)
  tx = optim.make_selmix_optimizer(variables["params"], learning_rate=schedule)
  state = train_state.from_variables(model, variables, tx)
  return config, ds, model, state, schedule


def test_device_pass_counts_exactly_what_the_host_pass_counts(tiny):
  config, ds, model, state, _ = tiny
  resident = device.Resident({"val": ds.val, "test": ds.test})
  batch = 64  # 300 validation examples: 5 batches, the last one padded, 16 a device.
  host = evaluation.Evaluator(model, ds, batch_size=batch)
  on_device = evaluation.Evaluator(model, ds, batch_size=batch, resident=resident)
  state_repl = train_state.replicate(state)
  for split in (ds.val, ds.test):
    a, b = host(state_repl, split), on_device(state_repl, split)
    np.testing.assert_array_equal(a.confusion, b.confusion)
    np.testing.assert_array_equal(a.class_counts, b.class_counts)
    np.testing.assert_array_equal(a.preds, b.preds)
    np.testing.assert_allclose(a.max_prob, b.max_prob, rtol=1e-5)
    np.testing.assert_allclose(a.feature_sums, b.feature_sums, rtol=1e-4, atol=1e-4)
  assert on_device.resident.get(ds.labeled) is None


def test_device_refresh_program_matches_the_host_refresh(tiny, tmp_path):
  config, ds, model, state, schedule = tiny
  with config.unlocked():
    config.data.device_resident = True
  run = finetune._Run(config, str(tmp_path), ds, state, schedule, started=0.0)
  resident = finetune._resident(config, ds, [run], many=False)
  evaluate = evaluation.Evaluator(model, ds, batch_size=config.eval_batch_size, resident=resident)
  steps = finetune._DeviceSteps([run], config, ds, resident, evaluate)
  run.attach(0, steps, evaluate)
  labels = run.selmix.partner_labels
  val, sel = steps.validation_refresh(0, labels, "validation")
  state_repl = train_state.replicate(state)
  host_val = evaluation.Evaluator(model, ds, batch_size=config.eval_batch_size)(state_repl, ds.val)
  head = state.params["head"]
  host = selmix_state.to_host(run.refresh_fn(
      run.selmix, jnp.asarray(host_val.confusion, jnp.float32),
      jnp.asarray(host_val.prototypes, jnp.float32), head["kernel"], head["bias"], labels,
  ))
  np.testing.assert_array_equal(val.confusion, host_val.confusion)
  np.testing.assert_allclose(sel.gain, host.gain, rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(sel.pair_probs, host.pair_probs, rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(sel.multipliers, host.multipliers, rtol=1e-5)
  assert int(sel.num_refreshes) == 1
  run.close()


def test_device_resident_setting_and_reasons(tiny):
  _, ds, _, _, _ = tiny
  assert device.setting("auto") == "auto" and device.setting("True") is True
  assert device.setting(False) is False and device.setting("off") is False
  with pytest.raises(ValueError, match="config.data.device_resident='maybe'"):
    device.setting("maybe")
  assert device.why_not({"val": ds.val}, 1e9) is None
  assert "device_memory_gb" in device.why_not({"val": ds.val}, 10.0)
