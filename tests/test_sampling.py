"""Tests for `selmix_jax.sampling.PairSampler`."""

import logging
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from scipy import stats

from selmix_jax import sampling

K = 4
LABELS = np.repeat(np.arange(K), [50, 20, 7, 3])[np.random.default_rng(0).permutation(80)]
PAIR_PROBS = np.array(
  [
    [0.10, 0.20, 0.00, 0.05],
    [0.00, 0.15, 0.10, 0.00],
    [0.05, 0.00, 0.20, 0.05],
    [0.00, 0.10, 0.00, 0.00],
  ]
)


def _draw(sampler, table, num_batches, batch_size=500, seed=0):
  batches = [sampler.sample(table, batch_size, seed=seed, step=step) for step in range(num_batches)]
  return [np.concatenate(parts) for parts in zip(*batches)]


def _pair_counts(y1, y2):
  return np.bincount(y1 * K + y2, minlength=K * K).reshape(K, K)


def _assert_chisquare(observed, expected_probs):
  expected_probs = np.asarray(expected_probs, np.float64)
  support = expected_probs > 0
  np.testing.assert_array_equal(observed[~support], 0)
  total = observed.sum()
  result = stats.chisquare(
    observed[support], total * expected_probs[support] / expected_probs[support].sum()
  )
  assert result.pvalue > 1e-3, result


@pytest.mark.parametrize("floor", [None, 0.0, 0.3])
def test_pair_frequencies_match_distribution_with_floor(floor):
  sampler = sampling.PairSampler(LABELS, num_classes=K)
  table = sampler.prepare(PAIR_PROBS, floor=floor)
  weight = 1 / K if floor is None else floor
  want = (1 - weight) * PAIR_PROBS / PAIR_PROBS.sum() + weight / K**2
  np.testing.assert_allclose(table.probs, want, rtol=1e-12)
  _, _, y1, y2 = _draw(sampler, table, num_batches=40)
  _assert_chisquare(_pair_counts(y1, y2), want)


def test_indices_belong_to_drawn_classes_and_are_uniform_within_class():
  partner = np.random.default_rng(1).integers(-1, K, size=300)  # -1: no pseudo-label
  sampler = sampling.PairSampler(LABELS, partner, num_classes=K)
  idx1, idx2, y1, y2 = _draw(sampler, sampler.prepare(PAIR_PROBS), num_batches=20)
  np.testing.assert_array_equal(LABELS[idx1], y1)
  np.testing.assert_array_equal(partner[idx2], y2)
  assert np.all(partner[idx2] >= 0)
  for cls in range(K):
    members = np.flatnonzero(LABELS == cls)
    hits = np.bincount(idx1[y1 == cls], minlength=len(LABELS))
    np.testing.assert_array_equal(hits[np.setdiff1d(np.arange(len(LABELS)), members)], 0)
    _assert_chisquare(hits[members], np.ones(len(members)))


def test_deterministic_in_seed_and_step():
  sampler = sampling.PairSampler(LABELS, num_classes=K)
  table = sampler.prepare(PAIR_PROBS)
  first = sampler.sample(table, 64, seed=3, step=7)
  again = sampling.PairSampler(LABELS.copy(), num_classes=K).sample(
    PAIR_PROBS, 64, seed=3, step=7
  )  # a fresh sampler and a raw array: same batch
  for a, b in zip(first, again):
    np.testing.assert_array_equal(a, b)
  for other in (
    sampler.sample(table, 64, seed=3, step=8),
    sampler.sample(table, 64, seed=4, step=7),
  ):
    assert not all(np.array_equal(a, b) for a, b in zip(first, other))


def test_shards_tile_the_global_batch():
  sampler = sampling.PairSampler(LABELS, num_classes=K)
  table = sampler.prepare(PAIR_PROBS)
  full = sampler.sample(table, 64, seed=0, step=5)
  shards = [
    sampler.sample(table, 64, seed=0, step=5, num_shards=4, shard_index=i) for i in range(4)
  ]
  for a, parts in zip(full, zip(*shards)):
    np.testing.assert_array_equal(a, np.concatenate(parts))
  with pytest.raises(ValueError, match=r"cannot take shard 0 of 4 from a batch of 63"):
    sampler.sample(table, 63, seed=0, step=5, num_shards=4)


def test_absent_class_gets_zero_mass_and_is_logged_once(caplog):
  labels = np.where(LABELS == 2, 0, LABELS)  # class 2 has no labeled examples
  partner = np.array([0, 1, 2, 2, 0, 1])  # class 3 has no partner examples
  with caplog.at_level(logging.INFO):
    sampler = sampling.PairSampler(labels, partner, num_classes=K)
    table = sampler.prepare(PAIR_PROBS)
    sampler.prepare(PAIR_PROBS)
    sampler.sample(PAIR_PROBS, 8, seed=0, step=0)
  np.testing.assert_array_equal(table.probs[2], 0.0)
  np.testing.assert_array_equal(table.probs[:, 3], 0.0)
  np.testing.assert_allclose(table.probs.sum(), 1.0)
  def num_warnings():
    return sum(r.levelno == logging.WARNING for r in caplog.records)

  assert num_warnings() == 1, caplog.text
  # New pseudo-labels with the same absent classes: no new warning; different ones: one.
  with caplog.at_level(logging.INFO):
    same = sampler.with_partner_labels(partner[::-1])
    same.prepare(PAIR_PROBS)
    assert num_warnings() == 1, caplog.text
    changed = same.with_partner_labels(np.array([0, 1, 3]))
    changed.prepare(PAIR_PROBS)
    changed.prepare(PAIR_PROBS)
    assert num_warnings() == 2, caplog.text
  np.testing.assert_array_equal(changed.prepare(PAIR_PROBS).probs[:, 2], 0.0)
  np.testing.assert_array_equal(sampler.class_counts[1], [2, 2, 2, 0])  # unchanged
  _, _, y1, y2 = _draw(sampler, table, num_batches=10)
  assert not np.any(y1 == 2) and not np.any(y2 == 3)
  _assert_chisquare(_pair_counts(y1, y2), table.probs)


def test_with_partner_labels_replaces_pool_two_only():
  sampler = sampling.PairSampler(LABELS, np.zeros(10, np.int64), num_classes=K)
  _, _, _, y2 = sampler.sample(PAIR_PROBS, 200, seed=0, step=0)
  assert np.all(y2 == 0)
  new = sampler.with_partner_labels(np.full(10, 1))
  idx1, idx2, y1, y2 = new.sample(PAIR_PROBS, 200, seed=0, step=0)
  assert np.all(y2 == 1) and np.all(idx2 < 10)
  np.testing.assert_array_equal(LABELS[idx1], y1)
  np.testing.assert_array_equal(new.class_counts[0], sampler.class_counts[0])


def test_no_floor_and_only_impossible_pairs_raises():
  sampler = sampling.PairSampler(np.array([0, 0, 1]), num_classes=3)
  probs = np.zeros((3, 3))
  probs[2, 2] = 1.0
  with pytest.raises(ValueError, match=r"no mass on pairs with examples in both pools; use floor"):
    sampler.prepare(probs, floor=0.0)
  table = sampler.prepare(probs)  # the floor keeps the possible pairs alive
  np.testing.assert_allclose(table.probs[:2, :2], 0.25)
  with pytest.raises(ValueError, match=r"pair_probs must be finite and non-negative"):
    sampler.prepare(-probs)
  with pytest.raises(ValueError, match=r"labels must be < num_classes=3"):
    sampling.PairSampler(np.array([0, 3]), num_classes=3)


def test_with_floor_mixes_normalised_p_with_uniform():
  p = np.arange(9, dtype=np.float64).reshape(3, 3)  # unnormalised, one zero pair
  mixed = sampling.with_floor(p)  # floor defaults to 1/K
  expected = (1 - 1 / 3) * p / p.sum() + (1 / 3) / 9
  np.testing.assert_allclose(mixed, expected)
  np.testing.assert_allclose(sampling.with_floor(np.zeros((3, 3)), 0.0), np.full((3, 3), 1 / 9))
  with pytest.raises(ValueError, match="square"):
    sampling.with_floor(np.ones((2, 3)))
  with pytest.raises(ValueError, match="floor"):
    sampling.with_floor(p, 1.5)


_CORE_PIPELINE = """
import sys
for name in ("absl", "flax", "tensorflow", "clu", "optax", "orbax", "chex"):
  sys.modules[name] = None  # `import name` now raises ImportError.
import numpy as np
from selmix_jax import confusion, gains, metrics, objectives, sampling

rng = np.random.default_rng(0)
k = 4
labels = rng.integers(0, k, 200)
preds = np.where(rng.random(200) < 0.7, labels, rng.integers(0, k, 200))
counts = confusion.confusion_matrix(labels, preds, k)
summary = metrics.summary(counts)
assert 0 < float(summary["mean_recall"]) < 1
sums, class_counts = confusion.class_feature_sums(labels, rng.normal(size=(200, 3)), k)
obj = objectives.get("min_recall")
multipliers = obj.update_multipliers(obj.init_multipliers(k), counts)
gain, pair_probs = gains.make_gain_fn(obj.value)(
    counts, confusion.prototypes(sums, class_counts), rng.normal(size=(3, k)), np.zeros(k),
    multipliers)
assert np.isfinite(np.asarray(gain)).all()
sampler = sampling.PairSampler(labels, num_classes=k)
idx1, idx2, y1, y2 = sampler.sample(sampler.prepare(np.asarray(pair_probs)), 16, seed=0, step=0)
assert (labels[idx1] == y1).all() and (labels[idx2] == y2).all()
print("core pipeline ok")
"""


def test_core_pipeline_runs_with_training_stack_blocked():
  """confusion -> summary -> gain -> P -> PairSampler with only jax and numpy importable."""
  root = pathlib.Path(__file__).resolve().parents[1]
  out = subprocess.run(
    [sys.executable, "-c", _CORE_PIPELINE],
    check=True, cwd=root, timeout=300, capture_output=True, text=True,
  )  # fmt: skip
  assert "core pipeline ok" in out.stdout


def test_concentration_on_hand_checked_matrices():
  uniform = sampling.concentration(np.full((3, 3), 1 / 9))
  want = {"effective_pairs": 9.0, "support": 9, "top1_mass": 1 / 9, "top10_mass": 1.0}
  assert uniform == pytest.approx({**want, "near_uniform": True})
  # Uniform over half the pairs, unnormalised: uniform over its support.
  half = sampling.concentration(np.array([[2.0, 2.0], [0.0, 0.0]]))
  assert half["effective_pairs"] == pytest.approx(2.0) and half["support"] == 2
  assert half["top1_mass"] == pytest.approx(0.5) and half["near_uniform"]
  # Peaked: H = -(0.97 ln 0.97 + 3 * 0.01 ln 0.01) = 0.16770.
  peaked = sampling.concentration(np.array([[0.97, 0.01], [0.01, 0.01]]), top=(1, 2))
  assert peaked["effective_pairs"] == pytest.approx(np.exp(0.16770), rel=1e-4)
  assert peaked["top1_mass"] == pytest.approx(0.97) and peaked["top2_mass"] == pytest.approx(0.98)
  assert peaked["support"] == 4 and not peaked["near_uniform"]
  one = sampling.concentration(np.eye(1))
  assert one["effective_pairs"] == 1.0 and one["support"] == 1 and one["near_uniform"]


def test_concentration_near_uniform_threshold():
  # Two pairs (a, 1 - a): a = 0.6 gives exp(H) = 1.960 >= 0.95 * 2; a = 0.7 gives 1.842.
  assert sampling.concentration(np.array([0.6, 0.4]))["near_uniform"]
  assert not sampling.concentration(np.array([0.7, 0.3]))["near_uniform"]
  assert sampling.concentration(np.array([0.7, 0.3]), tolerance=0.1)["near_uniform"]
  # A SelMix P at a high temperature is near uniform, at a low one it is not.
  gain = np.random.default_rng(0).normal(size=(10, 10))
  for temperature, expected in ((100.0, True), (0.1, False)):
    weights = np.where(gain > 0, np.exp(gain / temperature), 0.0)
    stats = sampling.concentration(weights)
    assert stats["support"] == int((gain > 0).sum())
    assert stats["near_uniform"] == expected


def test_concentration_rejects_invalid_probabilities():
  for bad in (np.full((2, 2), np.nan), np.array([[0.5, -0.1], [0.3, 0.3]]), np.zeros((2, 2))):
    with pytest.raises(ValueError, match="pair_probs"):
      sampling.concentration(bad)
