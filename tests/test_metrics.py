"""Tests for selmix_jax.metrics against hand-checked numbers, scikit-learn and scipy."""

import re
import warnings

import hypothesis
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
import jax
import jax.numpy as jnp
from jax import test_util as jtu
import numpy as np
import pytest
from scipy import stats
from sklearn import metrics as sk_metrics

from selmix_jax import metrics

SCALARS = (
  "accuracy",
  "mean_recall",
  "min_recall",
  "min_head_tail_recall",
  "gmean_recall",
  "hmean_recall",
  "min_coverage",
)

_summary = jax.jit(metrics.summary)  # One compilation per shape, shared by the tests.

# Rows = true class. Row sums 6, 6, 8; column sums 7, 5, 8; total 20.
LITERAL = np.array([[5, 1, 0], [2, 3, 1], [0, 1, 7]], np.int32)


def test_hand_checked_literal():
  s = _summary(LITERAL)
  np.testing.assert_allclose(s["recall"], [5 / 6, 1 / 2, 7 / 8], rtol=1e-6)
  np.testing.assert_allclose(s["precision"], [5 / 7, 3 / 5, 7 / 8], rtol=1e-6)
  np.testing.assert_allclose(s["coverage"], [7 / 20, 5 / 20, 8 / 20], rtol=1e-6)
  expected = {
    "accuracy": 15 / 20,
    "mean_recall": 53 / 72,
    "min_recall": 1 / 2,
    "min_head_tail_recall": 2 / 3,  # Head {0, 1} (int(0.9 * 3) = 2): (5/6 + 1/2) / 2.
    "gmean_recall": (35 / 96) ** (1 / 3),
    "hmean_recall": 105 / 152,  # 3 / (6/5 + 2 + 8/7).
    "min_coverage": 1 / 4,
  }
  for name, value in expected.items():
    np.testing.assert_allclose(s[name], value, rtol=1e-6, err_msg=name)
  assert int(s["num_absent_classes"]) == 0
  # Fractions give the same numbers (scale invariance).
  s_frac = _summary(LITERAL / 20.0)
  for name in SCALARS:
    np.testing.assert_allclose(s_frac[name], s[name], rtol=1e-6, err_msg=name)


def test_scalar_metrics_are_the_scalar_entries_of_summary():
  assert metrics.SCALAR_METRICS == SCALARS
  s = _summary(LITERAL)
  assert {k for k, v in s.items() if np.ndim(v) == 0} == set(SCALARS) | {"num_absent_classes"}


def test_default_head_mask():
  np.testing.assert_array_equal(metrics.default_head_mask(10), [True] * 9 + [False])
  assert metrics.default_head_mask(100).sum() == 90
  assert metrics.default_head_mask(1000).sum() == 900
  assert metrics.default_head_mask(3).sum() == 2


def test_custom_head_mask():
  head = np.array([False, True, True])
  got = metrics.min_head_tail_recall(LITERAL, head_mask=head)
  np.testing.assert_allclose(got, min((1 / 2 + 7 / 8) / 2, 5 / 6), rtol=1e-6)
  head_recall, tail_recall = metrics.head_tail_recalls(LITERAL, head_mask=head)
  np.testing.assert_allclose([head_recall, tail_recall], [11 / 16, 5 / 6], rtol=1e-6)


def _random_predictions(rng, num_classes, n=2000):
  prior = 0.8 ** np.arange(num_classes)
  labels = rng.choice(num_classes, size=n, p=prior / prior.sum())
  preds = np.where(rng.random(n) < 0.5, labels, rng.integers(0, num_classes, n))
  return labels, preds


@pytest.mark.parametrize("num_classes", [2, 10, 40])
def test_matches_sklearn_and_scipy(num_classes):
  rng = np.random.default_rng(num_classes)
  labels, preds = _random_predictions(rng, num_classes)
  ks = np.arange(num_classes)
  cm = sk_metrics.confusion_matrix(labels, preds, labels=ks)
  present = cm.sum(1) > 0
  s = _summary(cm)
  r_sk = sk_metrics.recall_score(labels, preds, labels=ks, average=None, zero_division=0)
  np.testing.assert_allclose(s["recall"][present], r_sk[present], rtol=1e-5)
  assert np.isnan(s["recall"][~present]).all()
  p_sk = sk_metrics.precision_score(labels, preds, labels=ks, average=None, zero_division=0)
  np.testing.assert_allclose(s["precision"], p_sk, rtol=1e-5)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # sklearn warns when a predicted class is absent.
    balanced = sk_metrics.balanced_accuracy_score(labels, preds)
  np.testing.assert_allclose(s["mean_recall"], balanced, rtol=1e-5)
  np.testing.assert_allclose(s["accuracy"], sk_metrics.accuracy_score(labels, preds), rtol=1e-5)
  np.testing.assert_allclose(s["min_recall"], r_sk[present].min(), rtol=1e-5)
  np.testing.assert_allclose(s["gmean_recall"], stats.gmean(r_sk[present]), rtol=1e-5)
  np.testing.assert_allclose(s["hmean_recall"], stats.hmean(r_sk[present]), rtol=1e-5)
  np.testing.assert_allclose(s["coverage"], np.bincount(preds, minlength=num_classes) / len(preds))


def _numpy_summary(cm, head):
  """Independent float64 reference of the documented rule (absent classes excluded)."""
  cm = np.asarray(cm, np.float64)
  rows, cols, total = cm.sum(1), cm.sum(0), cm.sum()
  present = rows > 0
  r = np.array([cm[i, i] / rows[i] if rows[i] > 0 else np.nan for i in range(len(cm))])
  rp = r[present]
  out = {
    "accuracy": np.trace(cm) / total,
    "mean_recall": rp.mean(),
    "min_recall": rp.min(),
    "gmean_recall": 0.0 if (rp == 0).any() else stats.gmean(rp),
    "hmean_recall": 0.0 if (rp == 0).any() else stats.hmean(rp),
    "min_coverage": (cols / total).min(),
  }
  head_r, tail_r = r[present & head], r[present & ~head]
  if head_r.size and tail_r.size:
    out["min_head_tail_recall"] = min(head_r.mean(), tail_r.mean())
  else:
    out["min_head_tail_recall"] = np.nan
  return out, int((~present).sum())


@hypothesis.settings(max_examples=30, deadline=None, derandomize=True)
@hypothesis.given(
  hnp.arrays(np.int32, st.sampled_from([(2, 2), (3, 3), (5, 5)]), elements=st.integers(0, 4))
)
def test_adversarial_small_matrices(cm):
  """Sparse integer matrices: absent classes, zero recalls, never-predicted classes."""
  hypothesis.assume(cm.sum() > 0)
  head = metrics.default_head_mask(cm.shape[0])
  expected, num_absent = _numpy_summary(cm, head)
  got = _summary(cm)
  for name, value in expected.items():
    np.testing.assert_allclose(got[name], value, rtol=1e-5, atol=1e-7, err_msg=name)
  assert int(got["num_absent_classes"]) == num_absent
  cols = cm.sum(0)
  expected_precision = np.where(cols > 0, np.diag(cm) / np.maximum(cols, 1), 0.0)
  np.testing.assert_allclose(got["precision"], expected_precision, rtol=1e-5)


def test_absent_class_rule():
  # Class 2 has no examples (row of zeros) but is predicted once.
  cm = np.array([[4, 0, 1], [1, 2, 1], [0, 0, 0]])
  s = _summary(cm)
  assert int(s["num_absent_classes"]) == 1
  assert np.isnan(s["recall"][2])
  np.testing.assert_allclose(s["mean_recall"], (4 / 5 + 2 / 4) / 2, rtol=1e-6)
  np.testing.assert_allclose(s["min_recall"], 2 / 4, rtol=1e-6)
  np.testing.assert_allclose(s["gmean_recall"], np.sqrt(4 / 5 * 2 / 4), rtol=1e-6)
  np.testing.assert_allclose(s["hmean_recall"], 2 / (5 / 4 + 4 / 2), rtol=1e-6)
  np.testing.assert_allclose(s["precision"][2], 0.0)  # Predicted, never right.
  np.testing.assert_allclose(s["coverage"][2], 2 / 9, rtol=1e-6)
  # Default head mask for K=3 is {0, 1}; the only tail class is absent -> NaN.
  assert np.isnan(s["min_head_tail_recall"])


def test_zero_recall_and_never_predicted():
  cm = np.array([[3, 1, 0], [2, 2, 0], [1, 1, 0]])  # Class 2: zero recall, never predicted.
  s = _summary(cm)
  assert float(s["gmean_recall"]) == 0.0
  assert float(s["hmean_recall"]) == 0.0
  assert float(s["min_recall"]) == 0.0
  assert float(s["precision"][2]) == 0.0
  assert float(s["min_coverage"]) == 0.0


def test_empty_matrix_is_nan():
  s = _summary(np.zeros((4, 4), np.int32))
  for name in SCALARS:
    assert np.isnan(s[name]), name
  assert int(s["num_absent_classes"]) == 4


def test_jit_and_vmap_over_a_stack():
  rng = np.random.default_rng(5)
  stack = rng.integers(0, 6, (7, 5, 5)).astype(np.int32)
  stack[1, 3] = 0  # An absent class.
  stack[2, 4, 4] = 0  # A zero recall (if the row is non-empty).
  vmapped = jax.jit(jax.vmap(metrics.summary))(stack)
  batched = _summary(stack)  # [..., K, K] without vmap.
  for b in range(len(stack)):
    single = _summary(stack[b])
    for name, value in single.items():
      np.testing.assert_allclose(vmapped[name][b], value, rtol=1e-6, err_msg=name)
      np.testing.assert_allclose(batched[name][b], value, rtol=1e-6, err_msg=name)
  # Two leading axes.
  two = metrics.mean_recall(stack[:6].reshape(2, 3, 5, 5))
  np.testing.assert_allclose(two.reshape(-1), batched["mean_recall"][:6], rtol=1e-6)


_HEAD = np.array([True, False, True])
_GRAD_FNS = {name: getattr(metrics, name) for name in SCALARS if name != "min_head_tail_recall"}
_GRAD_FNS["min_head_tail_recall"] = lambda c: metrics.min_head_tail_recall(c, head_mask=_HEAD)
_GRAD_FNS["recall_sum"] = lambda c: jnp.nansum(metrics.recalls(c))
_GRAD_FNS["precision_sum"] = lambda c: metrics.precisions(c).sum()
_GRAD_FNS["coverage_sum"] = lambda c: jnp.nansum(metrics.coverages(c) ** 2)
# One compilation for every case below (same shape), grads of all metrics at once.
_all_grads = jax.jit(lambda c: {name: jax.grad(fn)(c) for name, fn in _GRAD_FNS.items()})


@pytest.mark.parametrize(
  "cm",
  [
    np.array([[4.0, 1, 0], [1, 2, 1], [0, 0, 0]]),  # Absent class.
    np.array([[3.0, 1, 0], [2, 2, 0], [1, 1, 0]]),  # Zero recall, never predicted.
    np.array([[0.0, 1, 0], [0, 0, 0], [1, 1, 0]]),  # Zero recalls, absent, never predicted.
    np.array([[2.0, 0, 0], [0, 2, 0], [0, 0, 2]]),  # Perfect (ties in min).
    np.zeros((3, 3)),  # Empty.
  ],
  ids=["absent", "zero_recall", "all_degenerate", "perfect", "empty"],
)
def test_gradients_are_finite(cm):
  for name, grad in _all_grads(jnp.asarray(cm, jnp.float32)).items():
    assert np.isfinite(grad).all(), name


def test_vmap_of_grad_is_finite():
  stack = jnp.array([[[4.0, 1, 0], [1, 2, 1], [0, 0, 0]], [[3.0, 1, 0], [2, 2, 0], [1, 1, 0]]])
  for fn in (metrics.gmean_recall, metrics.hmean_recall):
    grads = jax.jit(jax.vmap(jax.grad(fn)))(stack)
    assert np.isfinite(grads).all(), fn.__name__
    # Each vmapped gradient is its matrix's own (jax.grad of it alone).
    for i in range(len(stack)):
      np.testing.assert_allclose(grads[i], jax.grad(fn)(stack[i]), rtol=1e-6, atol=1e-7)
    # At a zero recall the G-/H-mean are pinned at 0 and so is their gradient (documented);
    # elsewhere it is not zero.
    np.testing.assert_array_equal(grads[1], np.zeros((3, 3)), err_msg=fn.__name__)
    assert np.abs(grads[0]).max() > 1e-3, fn.__name__


def test_check_grads_where_smooth():
  # Strictly positive, distinct recalls: every metric here is smooth at this point.
  cm = jnp.array([[9.0, 2.0, 1.0], [1.0, 5.0, 3.0], [2.0, 1.0, 8.0]])
  names = ("accuracy", "mean_recall", "gmean_recall", "hmean_recall", "min_recall")

  def all_metrics(c):  # One check (random cotangents) covers every output.
    return jnp.stack([getattr(metrics, name)(c) for name in names])

  jtu.check_grads(all_metrics, (cm,), order=1, modes=("rev",), eps=1e-2, atol=1e-3, rtol=1e-2)


def test_check_grads_with_absent_class():
  # The absent row stays exactly zero (perturbing it would make the class present, a
  # discontinuity); differentiate with respect to the present rows only.
  def embed(rows):
    return jnp.concatenate([rows, jnp.zeros((1, 3))], axis=0)

  rows = jnp.array([[9.0, 2.0, 1.0], [1.0, 5.0, 3.0]])
  weights = jnp.array([0.3, -1.0, 2.0])

  def per_class(c):
    return (jnp.nan_to_num(metrics.recalls(c)) * weights).sum()

  def all_metrics(r):
    c = embed(r)
    return jnp.stack(
      [
        per_class(c),
        metrics.mean_recall(c),
        metrics.hmean_recall(c),
        metrics.gmean_recall(c),
        (metrics.coverages(c) * weights).sum(),
      ]
    )

  jtu.check_grads(all_metrics, (rows,), order=1, modes=("rev",), eps=1e-2, atol=1e-3, rtol=1e-2)


# ---------------------------------------------------------------- invalid matrices

_PUBLIC_METRICS = {
  "recalls": metrics.recalls,
  "precisions": metrics.precisions,
  "coverages": metrics.coverages,
  "head_tail_recalls": metrics.head_tail_recalls,
  **{name: getattr(metrics, name) for name in SCALARS},
}


def _corrupt(value, cell=(1, 2)):
  cm = LITERAL.astype(np.float32)
  cm[cell] = value
  return cm


@pytest.mark.parametrize(
  "cm",
  [
    _corrupt(np.nan),  # Was: row 1 taken for an absent class, plausible min recall 5/6.
    _corrupt(np.inf),  # Was: H-mean > 1.
    _corrupt(-np.inf),
    _corrupt(-3.0),  # Was: mean recall > 1 (row 1 sums to 3 with a diagonal of 3).
    _corrupt(np.nan, cell=(0, 0)),
    _corrupt(-1e-30),  # Slightly negative is negative too.
  ],
  ids=["nan", "inf", "-inf", "negative", "nan_diagonal", "tiny_negative"],
)
def test_invalid_matrix_gives_nan_for_every_metric(cm):
  assert not bool(metrics.is_valid(cm))
  s = _summary(cm)
  for name, value in s.items():
    if name == "num_absent_classes":
      assert int(value) == -1
    else:
      assert np.isnan(value).all(), name
  for name, fn in _PUBLIC_METRICS.items():
    assert np.isnan(np.asarray(jax.jit(fn)(cm))).all(), name
  grads = _all_grads(jnp.asarray(cm))
  for name, grad in grads.items():
    np.testing.assert_array_equal(grad, 0.0, err_msg=name)


def test_invalid_matrix_in_a_stack_leaves_the_others_alone():
  stack = np.stack([LITERAL, LITERAL.T, LITERAL]).astype(np.float32)
  stack[1, 0, 0] = -1.0
  np.testing.assert_array_equal(metrics.is_valid(stack), [True, False, True])
  for got in (_summary(stack), jax.jit(jax.vmap(metrics.summary))(stack)):
    for b in (0, 2):
      for name, value in _summary(LITERAL).items():
        np.testing.assert_allclose(got[name][b], value, rtol=1e-6, err_msg=name)
    assert np.isnan(got["mean_recall"][1]) and np.isnan(got["recall"][1]).all()
    assert int(got["num_absent_classes"][1]) == -1
  # Gradients at the valid matrices are those of the matrices alone.
  grad = jax.grad(lambda c: metrics.hmean_recall(c).sum())(jnp.asarray(stack))
  np.testing.assert_array_equal(grad[1], 0.0)
  np.testing.assert_allclose(
    grad[0], jax.grad(metrics.hmean_recall)(jnp.asarray(stack[0])), rtol=1e-6
  )


def test_integer_counts_with_a_negative_entry_are_invalid():
  cm = LITERAL.copy()
  cm[2, 0] = -1
  assert np.isnan(_summary(cm)["accuracy"]) and not bool(metrics.is_valid(cm))
  assert bool(metrics.is_valid(LITERAL)) and bool(metrics.is_valid(np.zeros((3, 3))))


def test_check_counts():
  out = metrics.check_counts(LITERAL, where="val")
  np.testing.assert_array_equal(out, LITERAL)
  metrics.check_counts(np.zeros((2, 4, 4)), where="empty stack")  # Empty is valid.
  with pytest.raises(ValueError, match=r"validation at step 50: .*entry \[1, 2\] is nan"):
    metrics.check_counts(jnp.asarray(_corrupt(np.nan)), where="validation at step 50")
  with pytest.raises(ValueError, match=r"test: .*\[1, 2\] is -3.0 \(1 of 9 entries invalid\)"):
    metrics.check_counts(_corrupt(-3.0), where="test")
  cm = _corrupt(np.inf)
  cm[0, 1] = np.nan  # The first bad cell in row-major order is named.
  with pytest.raises(ValueError, match=r"entry \[0, 1\] is nan \(2 of 9 entries invalid\)"):
    metrics.check_counts(cm, where="x")
  with pytest.raises(ValueError, match=r"stack: .*entry \[1, 0, 0\] is -5 \(7 of 18"):
    metrics.check_counts(np.stack([LITERAL, -LITERAL]), where="stack")
  with pytest.raises(ValueError, match=r"val: a confusion matrix must have shape \[..., K, K\]"):
    metrics.check_counts(np.ones((3, 4)), where="val")


_SHAPE_CHECKED_METRICS = [
  metrics.recalls, metrics.precisions, metrics.coverages, metrics.accuracy, metrics.mean_recall,
  metrics.min_recall, metrics.min_head_tail_recall, metrics.gmean_recall, metrics.hmean_recall,
  metrics.min_coverage, metrics.summary,
]


@pytest.mark.parametrize("shape", [(4,), (2, 3), (0, 0), (5, 3, 2)], ids=str)
@pytest.mark.parametrize("fn", _SHAPE_CHECKED_METRICS, ids=lambda fn: fn.__name__)
def test_wrong_shape_raises_naming_it_eagerly_and_at_trace_time(fn, shape):
  pattern = r"must have shape \[\.\.\., K, K\] with K >= 1 .*got shape " + re.escape(str(shape))
  with pytest.raises(ValueError, match=pattern):
    fn(np.ones(shape))
  traced = jax.jit(fn)
  with pytest.raises(ValueError, match=pattern):  # Shapes are static: raised while tracing.
    traced.lower(jax.ShapeDtypeStruct(shape, jnp.float32))
  assert metrics.check_shape(np.ones((3, 2, 2))) == (3, 2, 2)  # A stack of 2x2 is fine.
