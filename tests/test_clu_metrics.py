"""Tests for selmix_jax.clu_metrics: a clu confusion metric in a pmapped Flax eval loop."""

import functools

import clu.metrics
import flax
import flax.jax_utils
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn import metrics as sk_metrics

from selmix_jax import clu_metrics
from selmix_jax import metrics

K = 5
ConfusionK = clu_metrics.ConfusionMatrix.with_num_classes(K)


@flax.struct.dataclass
class EvalMetrics(clu.metrics.Collection):
  confusion: ConfusionK
  accuracy: clu.metrics.Accuracy


def _data(n=103, dim=6, seed=0):
  rng = np.random.default_rng(seed)
  return rng.normal(size=(n, dim)).astype(np.float32), rng.integers(0, K, n).astype(np.int32)


def _batches(x, y, global_batch, num_devices):
  """Padded global batches `[devices, per_device, ...]` with a validity mask."""
  for start in range(0, len(x), global_batch):
    xb, yb = x[start : start + global_batch], y[start : start + global_batch]
    valid = len(xb)
    pad = global_batch - valid
    # Padding rows get label 0 and junk features: only the mask keeps them out.
    xb = np.concatenate([xb, np.full((pad, x.shape[1]), 7.0, np.float32)])
    yb = np.concatenate([yb, np.zeros(pad, np.int32)])
    mask = np.arange(global_batch) < valid
    yield jax.tree.map(
      lambda a: a.reshape(num_devices, -1, *a.shape[1:]), {"x": xb, "y": yb, "mask": mask}
    )


def test_with_num_classes_is_cached_and_static():
  assert clu_metrics.ConfusionMatrix.with_num_classes(K) is ConfusionK
  assert clu_metrics.ConfusionMatrix.with_num_classes(K, head_mask=[1, 1, 1, 0, 0]) is (
    clu_metrics.ConfusionMatrix.with_num_classes(K, head_mask=(True,) * 3 + (False,) * 2)
  )
  assert ConfusionK.num_classes == K
  np.testing.assert_array_equal(ConfusionK.empty().counts, np.zeros((K, K), np.int32))
  assert ConfusionK.empty().counts.dtype == jnp.int32
  with pytest.raises(TypeError, match="with_num_classes"):
    clu_metrics.ConfusionMatrix.empty()
  with pytest.raises(ValueError, match="logits have 3 classes, the metric 5"):
    ConfusionK.from_model_output(logits=jnp.zeros((2, 3)), labels=jnp.zeros(2, jnp.int32))
  with pytest.raises(ValueError, match="head_mask has 2 entries"):
    clu_metrics.ConfusionMatrix.with_num_classes(K, head_mask=[True, False])


def test_flax_eval_loop_on_four_devices_matches_sklearn():
  num_devices = jax.local_device_count()
  assert num_devices == 4
  x, y = _data()
  model = nn.Dense(K)
  params = model.init(jax.random.key(0), x[:1])

  @functools.partial(jax.pmap, axis_name="batch")
  def p_eval_step(params, state, batch):
    logits = model.apply(params, batch["x"])
    update = EvalMetrics.gather_from_model_output(
      logits=logits, labels=batch["y"], mask=batch["mask"]
    )
    return state.merge(update)

  state = flax.jax_utils.replicate(EvalMetrics.empty())
  params_repl = flax.jax_utils.replicate(params)
  num_batches = 0
  for batch in _batches(x, y, global_batch=32, num_devices=num_devices):  # 4 batches, last padded.
    state = p_eval_step(params_repl, state, batch)
    num_batches += 1
  assert num_batches == 4
  # Every device holds the same gathered totals.
  np.testing.assert_array_equal(state.confusion.counts[0], state.confusion.counts[3])
  results = state.unreplicate().compute()

  preds = np.asarray(model.apply(params, x)).argmax(-1)
  want = sk_metrics.confusion_matrix(y, preds, labels=np.arange(K))
  counts = np.asarray(state.unreplicate().confusion.counts)
  np.testing.assert_array_equal(counts, want)
  assert counts.sum() == len(x)
  summary = results["confusion"]
  np.testing.assert_allclose(
    summary["recall"], sk_metrics.recall_score(y, preds, average=None), rtol=1e-6
  )
  np.testing.assert_allclose(
    summary["mean_recall"], sk_metrics.balanced_accuracy_score(y, preds), rtol=1e-6
  )
  np.testing.assert_allclose(results["accuracy"], summary["accuracy"], rtol=1e-6)
  assert set(summary) == set(metrics.summary(want))


def test_under_jit_scan_and_single_device_collection():
  x, y = _data(n=60, seed=1)
  model = nn.Dense(K)
  params = model.init(jax.random.key(1), x[:1])
  mask = np.arange(60) < 55  # The last five are padding.

  @jax.jit
  def evaluate(params, xs, ys, masks):  # Batches of 20 folded with lax.scan.
    def step(state, batch):
      xb, yb, mb = batch
      update = ConfusionK.from_model_output(logits=model.apply(params, xb), labels=yb, mask=mb)
      return state.merge(update), None

    state, _ = jax.lax.scan(step, ConfusionK.empty(), (xs, ys, masks))
    return state, state.compute()

  state, summary = evaluate(params, x.reshape(3, 20, -1), y.reshape(3, 20), mask.reshape(3, 20))
  preds = np.asarray(model.apply(params, x)).argmax(-1)
  want = sk_metrics.confusion_matrix(y[mask], preds[mask], labels=np.arange(K))
  np.testing.assert_array_equal(state.counts, want)
  np.testing.assert_allclose(summary["min_recall"], metrics.min_recall(want), rtol=1e-6)
  # clu's single-device path: one Collection per batch, merged on the host.
  collection = None
  for b in range(3):
    sl = slice(20 * b, 20 * (b + 1))
    update = EvalMetrics.single_from_model_output(
      logits=model.apply(params, x[sl]), labels=y[sl], mask=mask[sl]
    )
    collection = update if collection is None else collection.merge(update)
  np.testing.assert_array_equal(collection.confusion.counts, want)
  np.testing.assert_allclose(
    collection.compute()["accuracy"], np.mean(preds[mask] == y[mask]), rtol=1e-6
  )


def test_head_mask_reaches_compute():
  counts = jnp.asarray([[5, 1, 0], [2, 3, 1], [0, 1, 7]], jnp.int32)
  tail_first = clu_metrics.ConfusionMatrix.with_num_classes(3, head_mask=[False, True, True])
  got = tail_first(counts=counts).compute()["min_head_tail_recall"]
  np.testing.assert_allclose(got, min((1 / 2 + 7 / 8) / 2, 5 / 6), rtol=1e-6)
  with pytest.raises(NotImplementedError, match="compute()"):
    tail_first(counts=counts).compute_value()
