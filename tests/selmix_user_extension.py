"""A user's own extension module, as `launch/main.py --imports=selmix_user_extension` loads it.

It registers an objective, a pair strategy and a data set without editing the library; the
packaging tests run the tiny config with all three. (Not a test module: no `test_` prefix.)
"""

import jax.numpy as jnp
import numpy as np

from selmix_jax import metrics
from selmix_jax import objectives
from selmix_jax import pairs
from selmix_jax import sampling
from selmix_jax.data import datasets
from selmix_jax.data import sources


def tail_weighted_recall(confusion):
  """Recall weighted towards the later (rarer) classes."""
  recalls = metrics.recalls(confusion, absent_value=0.0)
  weights = jnp.linspace(1.0, 2.0, recalls.shape[-1])
  return (weights * recalls).sum(-1) / weights.sum()


class SameClassPairs(pairs.PairStrategy):
  """Partners of the same class as x1, classes drawn by P's row sums."""

  def refreshed(self, pair_probs, partner_labels):
    self._sampler = sampling.PairSampler(self.labels, partner_labels, num_classes=self.num_classes)
    self._table = self._sampler.prepare(np.diag(np.asarray(pair_probs).sum(1)), floor=0.0)
    return self

  def sample(self, batch_size, *, seed, step):
    idx1, idx2, _, _ = self._sampler.sample(self._table, batch_size, seed=seed, step=step)
    return idx1, idx2


def load_blobs(config, split):
  """10 classes of 8x8 grayscale blobs whose brightness encodes the class."""
  del config
  rng = np.random.default_rng(0 if split == "train" else 1)
  per_class = 150 if split == "train" else 30
  labels = np.repeat(np.arange(10), per_class)
  images = rng.normal(25.0 * labels[:, None, None, None], 20.0, (len(labels), 8, 8, 1))
  images = np.clip(images, 0, 255).astype(np.uint8)
  return sources.ArraySource(images, labels, tuple(f"blob{k}" for k in range(10)))


objectives.register("test_user_objective", tail_weighted_recall, overwrite=True)
pairs.register("test_user_pairs", SameClassPairs, overwrite=True)
datasets.register(datasets.DatasetSpec("test_user_blobs", load_blobs), overwrite=True)
