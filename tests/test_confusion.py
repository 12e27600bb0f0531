"""Tests for selmix_jax.confusion: exact counts, masking, soft counts, psum across devices."""

import functools
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn import metrics as sk_metrics

from selmix_jax import confusion


def test_hand_checked_literal():
  labels = jnp.array([0, 0, 1, 2, 2, 2, 1])
  preds = jnp.array([0, 1, 1, 2, 0, 2, 1])
  expected = np.array([[1, 1, 0], [0, 2, 0], [1, 0, 2]])
  got = confusion.confusion_matrix(labels, preds, 3)
  assert got.dtype == jnp.int32
  np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("num_classes", [2, 7, 50])
def test_matches_sklearn(num_classes):
  rng = np.random.default_rng(num_classes)
  # Long-tailed labels, noisy predictions; some classes may be absent.
  prior = 0.7 ** np.arange(num_classes)
  labels = rng.choice(num_classes, size=3000, p=prior / prior.sum())
  preds = np.where(rng.random(3000) < 0.6, labels, rng.integers(0, num_classes, 3000))
  mask = rng.random(3000) < 0.8
  got = confusion.confusion_matrix(labels, preds, num_classes, mask=mask)
  expected = sk_metrics.confusion_matrix(labels[mask], preds[mask], labels=np.arange(num_classes))
  np.testing.assert_array_equal(got, expected)


def test_padding_and_out_of_range_are_not_counted():
  labels = jnp.array([[0, 1], [1, -1], [3, 2]])  # 2-D batch; -1 and 3 are out of range.
  preds = jnp.array([[0, 1], [0, 1], [0, 5]])
  mask = jnp.array([[True, False], [True, True], [True, True]])
  got = confusion.confusion_matrix(labels, preds, 3, mask=mask)
  expected = np.zeros((3, 3), np.int32)
  expected[0, 0] = 1
  expected[1, 0] = 1
  np.testing.assert_array_equal(got, expected)


def test_jit_does_not_retrace():
  @jax.jit
  @chex.assert_max_traces(n=1)
  def count(labels, preds, mask):
    return confusion.confusion_matrix(labels, preds, 4, mask=mask)

  rng = np.random.default_rng(0)
  for _ in range(3):
    labels, preds = rng.integers(0, 4, (2, 64))
    mask = rng.random(64) < 0.5
    np.testing.assert_array_equal(
      count(labels, preds, mask),
      sk_metrics.confusion_matrix(labels[mask], preds[mask], labels=np.arange(4)),
    )


def test_num_classes_is_static_under_jit_and_pmap():
  rng = np.random.default_rng(4)
  labels, preds = rng.integers(0, 5, (2, 4, 16))
  want = sk_metrics.confusion_matrix(labels.ravel(), preds.ravel(), labels=np.arange(5))
  # Direct call: jitted inside, num_classes static (a NumPy integer is fine).
  np.testing.assert_array_equal(confusion.confusion_matrix(labels, preds, np.int64(5)), want)
  # A user's jit marking num_classes static, by name or position.
  by_name = jax.jit(confusion.confusion_matrix, static_argnames="num_classes")
  np.testing.assert_array_equal(by_name(labels, preds, num_classes=5), want)
  np.testing.assert_array_equal(by_name(labels, preds, 5), want)
  # pmap with num_classes bound by functools.partial; psum gives the global matrix.
  assert jax.local_device_count() == 4
  p_count = jax.pmap(
    lambda y, p: jax.lax.psum(confusion.confusion_matrix(y, p, num_classes=5), "d"),
    axis_name="d",
  )
  np.testing.assert_array_equal(p_count(labels, preds)[3], want)
  p_partial = jax.pmap(functools.partial(confusion.confusion_matrix, num_classes=5))
  np.testing.assert_array_equal(p_partial(labels, preds).sum(0), want)


def test_traced_num_classes_is_a_clear_error():
  labels = preds = jnp.arange(4) % 3
  with pytest.raises(TypeError, match=r"num_classes must be a static.*static_argnames"):
    jax.jit(confusion.confusion_matrix)(labels, preds, 3)
  with pytest.raises(TypeError, match="num_classes must be a static"):
    jax.jit(confusion.class_feature_sums)(labels, jnp.ones((4, 2)), 3)
  with pytest.raises(TypeError, match="num_classes must be an int"):
    confusion.confusion_matrix(labels, preds, 3.5)
  with pytest.raises(ValueError, match="positive"):
    confusion.confusion_matrix(labels, preds, 0)


def test_exact_past_float32_limit():
  """A cell with 2**24 + 1 examples: float32 counting would stop at 2**24."""
  big = 2**24
  assert np.float32(big) + np.float32(1) == np.float32(big)  # The failure int32 avoids.
  n = big + 3
  labels = jnp.zeros((n,), jnp.int32)
  preds = jnp.zeros((n,), jnp.int32).at[-2:].set(jnp.array([1, 2]))
  mask = jnp.ones((n,), bool).at[-3].set(False)  # One real example masked out.
  cm = jax.jit(lambda y, p, m: confusion.confusion_matrix(y, p, 3, mask=m))(labels, preds, mask)
  assert int(cm[0, 0]) == big  # n - 2 off-diagonal - 1 masked.
  assert int(cm[0, 1]) == 1 and int(cm[0, 2]) == 1
  # Summing batch matrices (as an evaluation loop does) stays exact past 2**24.
  total = cm + confusion.confusion_matrix(jnp.array([0]), jnp.array([0]), 3)
  assert int(total[0, 0]) == big + 1
  assert int(total.sum()) == big + 3


def test_soft_confusion_matrix():
  rng = np.random.default_rng(1)
  labels = rng.integers(0, 5, 40)
  logits = rng.normal(size=(40, 5)).astype(np.float32)
  probs = jax.nn.softmax(logits)
  mask = rng.random(40) < 0.7
  got = confusion.soft_confusion_matrix(labels, probs, mask=mask)
  expected = (np.eye(5)[labels] * mask[:, None]).T @ np.asarray(probs)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
  # Rows sum to the per-class counts of valid examples.
  np.testing.assert_allclose(got.sum(1), np.bincount(labels[mask], minlength=5), rtol=1e-5)
  # One-hot probabilities reproduce the hard confusion matrix.
  hard = confusion.soft_confusion_matrix(labels, jax.nn.one_hot(probs.argmax(-1), 5), mask=mask)
  np.testing.assert_array_equal(
    hard, confusion.confusion_matrix(labels, probs.argmax(-1), 5, mask=mask)
  )


def test_soft_confusion_matrix_gradient():
  rng = np.random.default_rng(2)
  labels = rng.integers(0, 4, 10)
  probs = jnp.asarray(rng.random((10, 4)), jnp.float32)
  mask = jnp.arange(10) < 8
  weights = jnp.asarray(rng.normal(size=(4, 4)), jnp.float32)
  grad = jax.grad(
    lambda p: (weights * confusion.soft_confusion_matrix(labels, p, mask=mask)).sum()
  )(probs)
  expected = np.asarray(weights)[labels] * np.asarray(mask)[:, None]
  np.testing.assert_allclose(grad, expected, rtol=1e-6)


def test_psum_across_four_devices_equals_single_device():
  assert jax.local_device_count() == 4
  num_devices, per_device, num_classes = 4, 33, 6
  rng = np.random.default_rng(3)
  labels = rng.integers(0, num_classes, (num_devices, per_device))
  preds = rng.integers(0, num_classes, (num_devices, per_device))
  probs = jax.nn.softmax(rng.normal(size=(num_devices, per_device, num_classes)))
  mask = rng.random((num_devices, per_device)) < 0.9  # Padding on every device.

  def per_device_counts(labels, preds, probs, mask):
    hard = confusion.confusion_matrix(labels, preds, num_classes, mask=mask)
    soft = confusion.soft_confusion_matrix(labels, probs, mask=mask)
    return jax.lax.psum(hard, "batch"), jax.lax.psum(soft, "batch")

  p_counts = jax.pmap(per_device_counts, axis_name="batch")
  hard, soft = p_counts(labels, preds, probs, mask)

  def flat(x):
    return x.reshape(num_devices * per_device, *x.shape[2:])

  expected_hard = confusion.confusion_matrix(
    flat(labels), flat(preds), num_classes, mask=flat(mask)
  )
  expected_soft = confusion.soft_confusion_matrix(flat(labels), flat(probs), mask=flat(mask))
  for d in range(num_devices):  # psum leaves the same total on every device.
    np.testing.assert_array_equal(hard[d], expected_hard)
    np.testing.assert_allclose(soft[d], expected_soft, rtol=1e-5, atol=1e-6)
  assert int(expected_hard.sum()) == int(mask.sum())


def _loop_feature_sums(labels, features, mask, num_classes):
  """NumPy loop oracle: float64 sums and counts of the valid examples of each class."""
  sums = np.zeros((num_classes, features.shape[-1]))
  counts = np.zeros(num_classes, np.int64)
  for label, feature, valid in zip(labels, features, mask, strict=True):
    if valid and 0 <= label < num_classes:
      sums[label] += feature
      counts[label] += 1
  return sums, counts


def test_class_feature_sums_and_prototypes_match_numpy_loop():
  rng = np.random.default_rng(5)
  num_classes, n, dim = 6, 200, 7
  labels = rng.integers(-1, num_classes + 1, n)  # -1 and K are out of range: not counted.
  labels[labels == 4] = 0  # Class 4 has no example: its prototype is 0.
  features = rng.normal(size=(n, dim)).astype(np.float32)
  mask = rng.random(n) < 0.8
  features[~mask] = np.nan  # Padding rows may hold anything.
  sums, counts = confusion.class_feature_sums(labels, features, num_classes, mask=mask)
  assert sums.dtype == jnp.float32 and counts.dtype == jnp.int32
  want_sums, want_counts = _loop_feature_sums(labels, features, mask, num_classes)
  np.testing.assert_array_equal(counts, want_counts)
  np.testing.assert_allclose(sums, want_sums, rtol=1e-5, atol=1e-5)
  protos = confusion.prototypes(sums, counts)
  assert np.all(np.isfinite(protos))
  np.testing.assert_array_equal(protos[4], 0.0)
  present = want_counts > 0
  np.testing.assert_allclose(
    protos[present], want_sums[present] / want_counts[present, None], rtol=1e-5, atol=1e-6
  )
  # Gradient of the prototypes is finite for the empty class too.
  grad = jax.grad(lambda s: confusion.prototypes(s, counts).sum())(sums)
  want_grad = np.where(present, 1.0 / np.maximum(want_counts, 1), 0.0)[:, None]
  np.testing.assert_allclose(grad, np.broadcast_to(want_grad, (num_classes, dim)), rtol=1e-6)


def test_class_feature_sums_psum_over_four_devices():
  assert jax.local_device_count() == 4
  num_devices, per_device, num_classes, dim = 4, 25, 5, 3
  rng = np.random.default_rng(6)
  labels = rng.integers(0, num_classes, (num_devices, per_device))
  # Features ~1000: a bfloat16 matmul (an accelerator's default precision) would be off by
  # ~0.4 %; the sums are computed at HIGHEST precision. (On CPU every matmul is float32.)
  features = (1000 + rng.normal(size=(num_devices, per_device, dim))).astype(np.float32)
  mask = np.arange(per_device)[None, :] < np.array([25, 25, 25, 11])[:, None]  # Last: padded.

  def per_device_sums(labels, features, mask):
    sums, counts = confusion.class_feature_sums(labels, features, num_classes, mask=mask)
    return jax.lax.psum((sums, counts), "batch")

  sums, counts = jax.pmap(per_device_sums, axis_name="batch")(labels, features, mask)
  want_sums, want_counts = _loop_feature_sums(
    labels.reshape(-1), features.reshape(-1, dim), mask.reshape(-1), num_classes
  )
  assert int(want_counts.sum()) == 25 * 3 + 11
  for d in range(num_devices):
    np.testing.assert_array_equal(counts[d], want_counts)
    np.testing.assert_allclose(sums[d], want_sums, rtol=1e-6)
  np.testing.assert_allclose(
    confusion.prototypes(sums[0], counts[0]), want_sums / want_counts[:, None], rtol=1e-6
  )


def test_check_labels_names_what_jitted_counts_would_drop():
  labels = np.array([0, 3, 2, -1, 9, 3, 1])
  preds = np.zeros_like(labels)
  # The oracle: examples with labels outside [0, K) are exactly the ones the counts lose.
  inside = ((labels >= 0) & (labels < 3)).sum()
  assert int(confusion.confusion_matrix(labels, preds, 3).sum()) == inside == 3
  with pytest.raises(ValueError, match=re.escape(
      "val: 4 of 7 labels lie outside [0, 3) (values -1, 3, 9; first at index 1); expected "
      "class ids 0..2.")):
    confusion.check_labels(labels, 3, where="val")
  # A pool whose -1 means "no label": only the unmasked labels are checked.
  with pytest.raises(ValueError, match=re.escape("3 of 7 labels lie outside [0, 3) (values 3, 9;")):
    confusion.check_labels(labels, 3, mask=labels != -1)
  ok = np.array([[0, 1], [2, 2]])
  assert confusion.check_labels(ok, 3) is not None
  np.testing.assert_array_equal(confusion.check_labels(ok, 3), ok)
  with pytest.raises(ValueError, match="labels must be integers, got dtype float32"):
    confusion.check_labels(np.array([0.0, 1.0], np.float32), 3)
