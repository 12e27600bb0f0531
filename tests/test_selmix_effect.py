"""SelMix moves its target where it must: a seeded synthetic case in feature space.

Five Gaussian classes (means 2·e_k, unit noise); a linear head fitted on long-tailed data
(200, 120, 70, 40, 8 examples) under-predicts the tail class (test recall ~0.36). Fine-tuning
the head with feature mixups for the same 40 SGD steps from the same start, pairs drawn by
SelMix for min recall (gains of `gains.gain_matrix` on validation counts and prototypes, P of
`gains.pair_distribution`, refreshed every 5 steps, sampled by `pairs.GainPairs`) must raise
that worst class and beat uniform mixup (`pairs.UniformPairs`) on it and on min recall, by
margins far above what the seed moves (over data seeds 0-3: SelMix 0.62-0.72 on the worst class,
uniform mixup 0.44-0.53; min recall 0.62-0.71 against 0.44-0.53).
"""

import jax.numpy as jnp
import numpy as np

from selmix_jax import confusion
from selmix_jax import gains
from selmix_jax import objectives
from selmix_jax import pairs

K, D = 5, 5
_LT_COUNTS = (200, 120, 70, 40, 8)
_MIX_WEIGHT_MIN = 0.6  # lambda ~ U[0.6, 1]; the gain uses its mean, 0.8.


def _softmax_grad(x, labels, kernel, bias):
  logits = x @ kernel + bias
  p = np.exp(logits - logits.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  p[np.arange(len(labels)), labels] -= 1.0
  return x.T @ p / len(labels), p.mean(0)


def _recalls(kernel, bias, x, y):
  counts = np.asarray(confusion.confusion_matrix(y, np.argmax(x @ kernel + bias, 1), K))
  return np.diag(counts) / counts.sum(1), counts


def _problem(seed=0):
  rng = np.random.default_rng(seed)
  means = 2.0 * np.eye(K, D)

  def draw(n):
    y = np.repeat(np.arange(K), n)
    return (means[y] + rng.normal(size=(len(y), D))).astype(np.float32), y

  (x_pool, y_pool), val, test = draw(200), draw(100), draw(500)
  keep = np.concatenate([np.flatnonzero(y_pool == k)[:n] for k, n in enumerate(_LT_COUNTS)])
  x, y = x_pool[keep], y_pool[keep]
  kernel, bias = np.zeros((D, K), np.float32), np.zeros(K, np.float32)
  for _ in range(300):  # The "pre-trained" head: plain CE on the long-tailed set.
    g_kernel, g_bias = _softmax_grad(x, y, kernel, bias)
    kernel, bias = kernel - 0.5 * g_kernel, bias - 0.5 * g_bias
  return (x, y), val, test, kernel, bias


def _finetune(strategy_name, problem, *, steps=40, refresh_every=5, lr=0.05, batch=32):
  (x, y), (x_val, y_val), _, kernel, bias = problem
  kernel = kernel.copy()
  objective = objectives.get("min_recall")
  multipliers = objective.init_multipliers(K)
  strategy = pairs.get(strategy_name)(y, y, num_classes=K).refreshed(np.full((K, K), 1 / K**2), y)
  rng = np.random.default_rng(1)
  for step in range(steps):
    if step % refresh_every == 0 and strategy.uses_pair_probs:
      _, counts = _recalls(kernel, bias, x_val, y_val)
      counts = jnp.asarray(counts, jnp.float32)
      prototypes = np.stack([x_val[y_val == k].mean(0) for k in range(K)])
      multipliers = objective.update_multipliers(multipliers, counts)
      gain = gains.gain_matrix(
          counts, jnp.asarray(prototypes), jnp.asarray(kernel), jnp.asarray(bias), multipliers,
          value_fn=objective.value, mix_weight=(1 + _MIX_WEIGHT_MIN) / 2,
      )
      probs = np.asarray(gains.pair_distribution(gain, temperature=0.1,
                                                 temperature_scale="max_gain"), np.float64)
      strategy = strategy.refreshed(probs / probs.sum(), y)
    idx1, idx2 = strategy.sample(batch, seed=0, step=step)
    lam = rng.uniform(_MIX_WEIGHT_MIN, 1.0, (batch, 1)).astype(np.float32)
    g_kernel, _ = _softmax_grad(lam * x[idx1] + (1 - lam) * x[idx2], y[idx1], kernel, bias)
    kernel -= lr * g_kernel  # The head's kernel (selmix.train_bias = False).
  return kernel, bias


def test_selmix_for_min_recall_raises_the_worst_class_and_beats_uniform_mixup():
  problem = _problem()
  *_, (x_test, y_test), kernel0, bias0 = problem
  start, _ = _recalls(kernel0, bias0, x_test, y_test)
  worst = int(np.argmin(start))
  assert worst == K - 1 and start[worst] < 0.45  # The tail class, badly under-predicted.
  selmix, _ = _recalls(*_finetune("gain", problem), x_test, y_test)
  uniform, _ = _recalls(*_finetune("uniform", problem), x_test, y_test)
  assert selmix[worst] > start[worst] + 0.25, (start, selmix)
  assert selmix[worst] > uniform[worst] + 0.1, (selmix, uniform)
  assert selmix.min() > uniform.min() + 0.08, (selmix, uniform)
  assert selmix.min() > start.min() + 0.2
