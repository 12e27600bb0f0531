"""What a new user meets: `--help`, the class order of a long-tailed folder, honest warnings."""

import numpy as np

from selmix_jax import finetune
from selmix_jax import gains
from selmix_jax import sampling


def _warning(gain, temperature=0.1, temperature_scale="absolute"):
  probs = np.asarray(gains.pair_distribution(
      gain, temperature=temperature, temperature_scale=temperature_scale))
  return finetune.uniform_p_warning(
      gain, sampling.concentration(probs), temperature=temperature,
      temperature_scale=temperature_scale,
  )


def test_no_positive_gain_is_not_blamed_on_the_temperature():
  gain = np.zeros((6, 6), np.float32)
  gain[0, 1] = -0.2
  message = _warning(gain)
  assert message.startswith("No pair has a positive gain (all 36 gains <= 0")
  assert "temperature plays no part" in message and "more fine-tuning steps will not help" in message
  assert "smaller config.selmix.temperature" not in message and "36 positive-gain" not in message


def test_small_positive_gains_blame_the_temperature():
  rng = np.random.default_rng(0)
  gain = np.where(rng.random((6, 6)) < 0.5, 1e-4 * rng.random((6, 6)), -1.0).astype(np.float32)
  positive = int((gain > 0).sum())
  message = _warning(gain, temperature=0.1)
  assert message.startswith(f"P is within 5% of uniform over its {positive} positive-gain pairs")
  assert "temperature is too large" in message
  assert "temperature_scale='max_gain'" in message
  # The same gains with T relative to the largest one: P concentrates, no warning.
  assert _warning(gain, temperature=0.1, temperature_scale="max_gain") is None
