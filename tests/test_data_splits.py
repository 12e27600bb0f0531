"""Tests of long-tailed counts and index splits (SPEC §8)."""

import numpy as np
import pytest

from selmix_jax.data import splits

CIFAR10_LABELED = [1500, 899, 539, 323, 193, 116, 69, 41, 25, 15]


def _naive(n_max, rho, k_classes, op):
  """Independent oracle: the SPEC formula with Python floats and int()."""
  return [
    op(int(n_max * rho ** (-k / (k_classes - 1))), int(n_max / rho)) for k in range(k_classes)
  ]


def test_cifar10_labeled_counts_from_spec():
  np.testing.assert_array_equal(splits.labeled_counts(1500, 100, 10), CIFAR10_LABELED)


def test_cifar10_unlabeled_counts():
  np.testing.assert_array_equal(
    splits.unlabeled_counts(3000, 100, 10), [3000, 1798, 1078, 646, 387, 232, 139, 83, 50, 30]
  )
  np.testing.assert_array_equal(splits.unlabeled_counts(3000, 1, 10), [3000] * 10)


def test_inverted_unlabeled_counts_reach_head_bound_exactly():
  counts = splits.unlabeled_counts(30, 1 / 100, 10)
  np.testing.assert_array_equal(counts, [30, 50, 83, 139, 232, 387, 646, 1078, 1798, 3000])


def test_cifar100_counts():
  labeled = splits.labeled_counts(150, 10, 100)
  assert labeled.sum() == 5835
  assert labeled[0] == 150 and labeled[-1] == 15
  np.testing.assert_array_equal(labeled, _naive(150, 10, 100, max))
  np.testing.assert_array_equal(splits.unlabeled_counts(300, 10, 100), _naive(300, 10, 100, max))


@pytest.mark.parametrize(
  "n_max,rho,k", [(5000, 100, 10), (500, 100, 100), (433, 10, 100), (450, 10, 10)]
)
def test_counts_match_naive_formula(n_max, rho, k):
  np.testing.assert_array_equal(splits.labeled_counts(n_max, rho, k), _naive(n_max, rho, k, max))


def test_bad_ratio_rejected():
  with pytest.raises(ValueError, match="must be >= 1"):
    splits.labeled_counts(100, 0.5, 10)


def _labels(per_class=100, k=5):
  return np.repeat(np.arange(k), per_class)[np.random.default_rng(0).permutation(per_class * k)]


def test_split_is_deterministic_disjoint_and_balanced():
  labels = _labels()
  kw = dict(
    val_per_class=10, labeled_counts=[50, 30, 20, 10, 5], unlabeled_counts=[20, 20, 20, 20, 20]
  )
  a = splits.split_indices(labels, seed=3, **kw)
  b = splits.split_indices(labels, seed=3, **kw)
  c = splits.split_indices(labels, seed=4, **kw)
  for name in ("val", "labeled", "unlabeled"):
    np.testing.assert_array_equal(a[name], b[name])
  assert not np.array_equal(a["labeled"], c["labeled"])
  np.testing.assert_array_equal(np.bincount(labels[a["val"]], minlength=5), [10] * 5)
  np.testing.assert_array_equal(
    np.bincount(labels[a["labeled"]], minlength=5), kw["labeled_counts"]
  )
  np.testing.assert_array_equal(np.bincount(labels[a["unlabeled"]], minlength=5), [20] * 5)
  everything = np.concatenate([a["val"], a["labeled"], a["unlabeled"]])
  assert len(np.unique(everything)) == len(everything)


def test_validation_does_not_depend_on_pool_sizes():
  labels = _labels()
  a = splits.split_indices(labels, val_per_class=10, labeled_counts=[5] * 5, seed=0)
  b = splits.split_indices(
    labels, val_per_class=10, labeled_counts=[50] * 5, unlabeled_counts=[30] * 5, seed=0
  )
  np.testing.assert_array_equal(a["val"], b["val"])
  assert len(a["unlabeled"]) == 0


def test_too_many_requested_names_class_and_numbers():
  labels = _labels(per_class=20)
  expected = (
    r"Class 0 has 20 examples, fewer than the 25 requested "
    r"\(5 validation \+ 20 labeled \+ 0 unlabeled\)"
  )
  with pytest.raises(ValueError, match=expected):
    splits.split_indices(labels, val_per_class=5, labeled_counts=[20, 1, 1, 1, 1], seed=0)
