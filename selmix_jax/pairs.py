"""Pair strategies: how a fine-tuning step picks its (x1, x2) mixup pairs, behind one registry.

The loop never chooses pairs itself; it asks the run's strategy:

  strategy = pairs.get("gain")(labels, partner_labels, num_classes=K, floor=None)
  strategy = strategy.refreshed(pair_probs, partner_labels)   # after every SelMix refresh
  idx1, idx2 = strategy.sample(batch_size, seed=seed, step=step)

`idx1` indexes the labeled pool (x1, whose label is kept), `idx2` the partner pool (the labeled
pool when supervised, the unlabeled pool when semi-supervised). Every draw is a pure function of
`(seed, step)` and the strategy's refreshed inputs, so a resumed run draws the same batches.

Built-ins:
  gain      SelMix (SPEC §5): classes from the gain distribution P with a uniform floor, then
            examples uniformly within each class (`sampling.PairSampler`).
  uniform   control: classes uniform over the K² pairs, examples uniform within each class.
  instance  control: x1 and x2 uniform over examples (with `mix_weight_min = 1` this is plain
            cross-entropy fine-tuning).

A user strategy is a subclass of `PairStrategy` registered with `pairs.register(name, cls)`; a
config then selects it with `config.selmix.pairs = name` (import the module that registers it with
`launch/main.py --imports=...`). NumPy only.
"""

import abc
import copy
from collections.abc import Callable
from typing import ClassVar

import numpy as np

from selmix_jax import sampling


class PairStrategy(abc.ABC):
  """Chooses the index pairs of each SelMix batch.

  Subclasses set `uses_pair_probs` (whether P influences the draws: a control that ignores P
  needs no gains and reports no P) and implement `refreshed` and `sample`.
  """

  uses_pair_probs: ClassVar[bool] = True

  def __init__(self, labels, partner_labels, *, num_classes: int, floor: float | None = None):
    """Args:
    labels: `[N1]` labels of the labeled pool (x1).
    partner_labels: `[N2]` labels of the partner pool (x2); pseudo-labels when semi-supervised.
    num_classes: K.
    floor: weight of the uniform floor mixed into P (None = 1/K, SPEC §5).
    """
    self.labels = np.asarray(labels)
    self.partner_labels = np.asarray(partner_labels)
    self.num_classes = int(num_classes)
    self.floor = floor

  @abc.abstractmethod
  def refreshed(self, pair_probs: np.ndarray, partner_labels: np.ndarray) -> "PairStrategy":
    """The strategy for the next refresh interval (new P, new partner labels)."""

  @abc.abstractmethod
  def sample(self, batch_size: int, *, seed: int, step: int) -> tuple[np.ndarray, np.ndarray]:
    """`(idx1 [B], idx2 [B])`: global batch of positions in the labeled and partner pools."""

  def class_pairs(self) -> sampling.ClassPairs | None:
    """The current draws as class pairs with uniform examples within each class, for the
    device-resident path (`selmix_jax.data.device`), or None when the strategy cannot be said
    that way (then fine-tuning draws on the host with `sample`)."""
    return None


class GainPairs(PairStrategy):
  """SelMix: pairs of classes from P (with the uniform floor), examples uniform per class."""

  def __init__(self, labels, partner_labels, *, num_classes, floor=None):
    super().__init__(labels, partner_labels, num_classes=num_classes, floor=floor)
    self._sampler = sampling.PairSampler(self.labels, self.partner_labels, num_classes=num_classes)
    self._table = None

  def _pair_weights(self, pair_probs: np.ndarray) -> np.ndarray:
    return np.asarray(pair_probs)

  def refreshed(self, pair_probs, partner_labels):
    new = copy.copy(self)
    partner_labels = np.asarray(partner_labels)
    if not np.array_equal(partner_labels, self.partner_labels):
      new.partner_labels = partner_labels
      new._sampler = self._sampler.with_partner_labels(partner_labels)
    new._table = new._sampler.prepare(self._pair_weights(pair_probs), floor=self.floor)
    return new

  def sample(self, batch_size, *, seed, step):
    if self._table is None:
      raise RuntimeError(f"{type(self).__name__}.sample before the first refreshed().")
    idx1, idx2, _, _ = self._sampler.sample(self._table, batch_size, seed=seed, step=step)
    return idx1, idx2

  def class_pairs(self):
    if self._table is None:
      raise RuntimeError(f"{type(self).__name__}.class_pairs before the first refreshed().")
    return self._sampler.class_pairs(self._table)


class UniformPairs(GainPairs):
  """Control: class pairs uniform over all K², examples uniform within each class."""

  uses_pair_probs = False

  def _pair_weights(self, pair_probs):
    k = self.num_classes
    return np.full((k, k), 1.0 / k**2)


class InstancePairs(PairStrategy):
  """Control: x1 and x2 uniform over examples, whatever their classes."""

  uses_pair_probs = False

  def refreshed(self, pair_probs, partner_labels):
    del pair_probs
    new = copy.copy(self)
    new.partner_labels = np.asarray(partner_labels)
    return new

  def sample(self, batch_size, *, seed, step):
    rng = np.random.default_rng([seed, step])
    idx1 = rng.integers(0, len(self.labels), batch_size)
    idx2 = rng.integers(0, len(self.partner_labels), batch_size)
    return idx1, idx2

  def class_pairs(self):
    if (self.labels < 0).any() or (self.partner_labels < 0).any():
      return None  # Examples without a class: only the host's uniform draw reaches them.
    return sampling.ClassPairs.instances(self.labels, self.partner_labels, self.num_classes)


_REGISTRY: dict[str, Callable[..., PairStrategy]] = {
    "gain": GainPairs,
    "uniform": UniformPairs,
    "instance": InstancePairs,
}


def names() -> list[str]:
  """Registered strategy names."""
  return list(_REGISTRY)


def register(name: str, strategy: type[PairStrategy], *, overwrite: bool = False) -> None:
  """Registers a `PairStrategy` subclass under `name` (selectable as `config.selmix.pairs`)."""
  if name in _REGISTRY and not overwrite:
    raise ValueError(f"Pair strategy {name!r} is already registered; pass overwrite=True.")
  if not (isinstance(strategy, type) and issubclass(strategy, PairStrategy)):
    raise TypeError(f"Pair strategy {name!r} must be a PairStrategy subclass, got {strategy!r}.")
  _REGISTRY[name] = strategy


def get(name: str) -> type[PairStrategy]:
  """The strategy class registered as `name`."""
  if name not in _REGISTRY:
    raise ValueError(
        f"config.selmix.pairs={name!r} is not a known pair strategy; known: {', '.join(names())}."
    )
  return _REGISTRY[name]
