"""SelMix refresh history: <= 1 MB per refresh at K = 1000, decoded to float32 within the stated
tolerances (exact where the record fits)."""

import os

import numpy as np

from selmix_jax import gains, reporting

F16_RTOL = 2.0**-11  # float16 of x / max|x|, for |x| >= 6.1e-5 max|x|


def _record(pair_probs, gain, k):
  rng = np.random.default_rng(5)
  return {
    "step": np.asarray(40),
    "pair_probs": pair_probs.astype(np.float32),
    "gain": gain.astype(np.float32),
    "multipliers": rng.dirichlet(np.ones(k)).astype(np.float32),
    "val_recalls": rng.random(k).astype(np.float32),
    "val_target": np.asarray(0.5),
  }


def _peaked_pair_probs(gain):
  """SelMix's P of a gain: softmax(G / 0.1) over positive gains (peaked at gains of unit
  spread: ~5 effective pairs at K = 1000)."""
  return np.asarray(gains.pair_distribution(np.asarray(gain, np.float32), temperature=0.1))


def _check_common(loaded, record):
  for name in ("step", "multipliers", "val_recalls", "val_target"):
    np.testing.assert_array_equal(loaded[name], record[name])
  for name in ("pair_probs", "gain"):
    assert loaded[name].dtype == np.float32 and loaded[name].shape == record[name].shape


def _assert_f16_close(got, want):
  peak = np.abs(want).max()
  large = np.abs(want) >= 6.1e-5 * peak
  np.testing.assert_allclose(got[large], want[large], rtol=F16_RTOL, atol=0)
  np.testing.assert_allclose(got[~large], want[~large], rtol=0, atol=3e-8 * peak)


def test_small_records_are_exact(tmp_path):
  k = 100
  gain = np.random.default_rng(2).normal(size=(k, k))
  record = _record(_peaked_pair_probs(gain), gain, k)
  reporting.save_refresh(str(tmp_path), 40, record)
  (loaded,) = reporting.load_history(str(tmp_path))
  assert set(loaded) == set(record)
  for name, value in record.items():
    np.testing.assert_array_equal(loaded[name], value)


def test_k1000_peaked_p_and_random_g_fit_in_1_mb(tmp_path):
  k = 1000
  gain = np.random.default_rng(3).normal(size=(k, k))  # incompressible
  record = _record(_peaked_pair_probs(gain), gain, k)
  size = reporting.save_refresh(str(tmp_path), 40, record)
  path = tmp_path / "selmix_history" / "refresh_0000040.npz"
  assert size == os.path.getsize(path) <= 1_000_000
  (loaded,) = reporting.load_history(str(tmp_path))
  _check_common(loaded, record)
  _assert_f16_close(loaded["pair_probs"], record["pair_probs"])
  np.testing.assert_allclose(loaded["pair_probs"].sum(), 1.0, atol=1e-3)
  peak = np.abs(record["gain"]).max()
  np.testing.assert_allclose(loaded["gain"], record["gain"], rtol=0, atol=peak / 254 * 1.0001)
  # What the history is read for: P's expected gain (benchmarks/gain_vs_realised.py).
  expected = np.sum(record["pair_probs"] * record["gain"])
  np.testing.assert_allclose(np.sum(loaded["pair_probs"] * loaded["gain"]), expected, rtol=5e-3)


def test_k1000_compressible_gain_keeps_float16_precision(tmp_path):
  k = 1000
  rng = np.random.default_rng(4)
  gain = rng.normal(size=(k, k)) * (rng.random((k, k)) < 0.2)  # mostly exact zeros
  record = _record(_peaked_pair_probs(gain), gain, k)
  assert reporting.save_refresh(str(tmp_path), 40, record) <= 1_000_000
  (loaded,) = reporting.load_history(str(tmp_path))
  _check_common(loaded, record)
  _assert_f16_close(loaded["gain"], record["gain"])
  _assert_f16_close(loaded["pair_probs"], record["pair_probs"])


def test_k1000_spread_p_is_written_over_the_limit_and_read_back(tmp_path):
  k = 1000
  rng = np.random.default_rng(6)
  pair_probs = rng.random((k, k))
  record = _record(pair_probs / pair_probs.sum(), rng.normal(size=(k, k)), k)
  assert reporting.save_refresh(str(tmp_path), 40, record) > 1_000_000  # logged as a warning
  (loaded,) = reporting.load_history(str(tmp_path))
  _assert_f16_close(loaded["pair_probs"], record["pair_probs"])
