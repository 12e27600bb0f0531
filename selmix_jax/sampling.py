"""Host-side SelMix pair sampler (SPEC §5).

Given the pair distribution `pair_probs` `[K, K]` (row = class of x1, whose label is
kept; column = class of x2), a batch is drawn as

  (y1, y2) ~ (1 - floor) · P + floor · uniform over the K² pairs,
  x1 ~ uniform over pool-1 examples of class y1, x2 ~ uniform over pool-2 examples of y2.

Drawing the pair `(y1, y2)` jointly from the flattened `K²` table is the same as the
SPEC's `y1 ~ Σ_j P_ij` followed by `y2 ~ P_{y1, ·}`. Pool 1 is the labeled set; pool 2
(the partner pool) is the labeled set too when supervised, or the unlabeled set keyed by
pseudo-labels when semi-supervised (`with_partner_labels` at every refresh). A pair
involving a class with no examples in the relevant pool gets probability 0 and the rest
is renormalised; this is logged when the set of such classes changes, not every batch.

Cost: `O(N)` setup (bincount + a stable argsort of the labels) and, per batch, `O(B)`
given a prepared table (`prepare`), or `O(K²)` more if a raw `[K, K]` array is passed.
Deterministic in `(seed, step)`: a resumed run draws the same batches. Imports only
numpy (and the standard `logging` module).

  sampler = sampling.PairSampler(labeled_labels, num_classes=K)           # supervised
  sampler = sampling.PairSampler(labeled_labels, pseudo_labels, num_classes=K)  # SSL
  table = sampler.prepare(pair_probs)                         # once per refresh
  idx1, idx2, y1, y2 = sampler.sample(table, 64, seed=0, step=step)

`concentration(pair_probs)` summarises how peaked P is (effective number of pairs,
support, top-1/top-10 mass, whether it is essentially uniform) for the refresh log.
"""

import copy
import dataclasses
import logging
from typing import Optional, Union

import numpy as np

# The standard library logger (absl's handler picks it up in an absl app), so the sampler
# imports with numpy alone.
_LOG = logging.getLogger(__name__)

# Mixed into the RNG seed so these draws are independent of other [seed, step] streams.
_STREAM = 0x5E1A1C


@dataclasses.dataclass(frozen=True)
class _ClassIndex:
  """Example indices of one pool grouped by class."""

  order: np.ndarray  # [N_valid] example indices sorted by class
  offsets: np.ndarray  # [K] start of each class in `order`
  counts: np.ndarray  # [K] examples per class

  @classmethod
  def build(cls, labels, num_classes: int) -> "_ClassIndex":
    labels = np.asarray(labels).reshape(-1)
    if labels.size and not np.issubdtype(labels.dtype, np.integer):
      raise ValueError(f"labels must be integers, got {labels.dtype}")
    labels = labels.astype(np.int64)
    if np.any(labels >= num_classes):
      raise ValueError(f"labels must be < num_classes={num_classes}")
    valid = np.flatnonzero(labels >= 0)  # Negative labels (no pseudo-label) are skipped.
    valid_labels = labels[valid]
    counts = np.bincount(valid_labels, minlength=num_classes).astype(np.int64)
    order = valid[np.argsort(valid_labels, kind="stable")]
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    return cls(order=order, offsets=offsets, counts=counts)

  @property
  def absent(self) -> tuple[int, ...]:
    """Classes without examples."""
    return tuple(np.flatnonzero(self.counts == 0).tolist())

  def draw(self, classes: np.ndarray, uniforms: np.ndarray) -> np.ndarray:
    """Uniform example of each class; `classes` must all have examples."""
    counts = self.counts[classes]
    within = np.minimum((uniforms * counts).astype(np.int64), counts - 1)
    return self.order[self.offsets[classes] + within]


@dataclasses.dataclass(frozen=True)
class PairTable:
  """A prepared pair distribution: final probabilities and their flat CDF.

  Attributes:
    probs: `[K, K]` float64 probabilities actually sampled (floor mixed in, pairs with an
      empty class zeroed, renormalised).
    cdf: `[K * K]` cumulative sum of `probs.ravel()`.
    last: index of the last pair with positive probability.
  """

  probs: np.ndarray
  cdf: np.ndarray
  last: int


@dataclasses.dataclass(frozen=True)
class ClassPairs:
  """A pair distribution as a device sampler draws it (`selmix_jax.data.device.pair_table`):
  a class pair from `probs`, then an example uniformly within each class of its pool.

  Attributes:
    probs: `[K, K]` float64 probabilities of the class pairs (sums to 1; 0 where a class has no
      examples in its pool).
    order1, offsets1, counts1: pool 1's example positions sorted by class (`[N1_valid]`), where
      each class starts in `order1` (`[K]`) and how many it has (`[K]`).
    order2, offsets2, counts2: the same for pool 2 (the partner pool).
  """

  probs: np.ndarray
  order1: np.ndarray
  offsets1: np.ndarray
  counts1: np.ndarray
  order2: np.ndarray
  offsets2: np.ndarray
  counts2: np.ndarray

  @classmethod
  def of(cls, probs, pool1: "_ClassIndex", pool2: "_ClassIndex") -> "ClassPairs":
    return cls(np.asarray(probs, np.float64), pool1.order, pool1.offsets, pool1.counts,
               pool2.order, pool2.offsets, pool2.counts)

  @classmethod
  def instances(cls, labels, partner_labels, num_classes: int) -> "ClassPairs":
    """x1 and x2 uniform over their pools' examples, as class pairs: `P_ij ∝ n1_i · n2_j` then
    uniform within each class draws every example pair with probability `1 / (N1 · N2)`.

    Raises:
      ValueError: a negative label (an example that a class draw would never reach).
    """
    if np.any(np.asarray(labels) < 0) or np.any(np.asarray(partner_labels) < 0):
      raise ValueError("instance pairs as class pairs need every label >= 0")
    pool1 = _ClassIndex.build(labels, num_classes)
    pool2 = _ClassIndex.build(partner_labels, num_classes)
    probs = np.outer(pool1.counts, pool2.counts).astype(np.float64)
    return cls.of(probs / probs.sum(), pool1, pool2)


def _log_absent(pool: str, absent: tuple[int, ...]) -> None:
  if absent:
    _LOG.info("PairSampler: %d classes have no %s examples and are never drawn on that "
              "side: %s%s", len(absent), pool, list(absent[:20]),
              " ..." if len(absent) > 20 else "")


def with_floor(pair_probs, floor: Optional[float] = None) -> np.ndarray:
  """`(1 - floor) · P / ΣP + floor · uniform` over the `K²` pairs, float64 (SPEC §5).

  Args:
    pair_probs: `[K, K]` non-negative pair distribution (normalised here; all zero -> uniform).
    floor: weight of the uniform distribution; None means `1/K`, 0 disables it.
  """
  probs = np.asarray(pair_probs, dtype=np.float64)
  if probs.ndim != 2 or probs.shape[0] != probs.shape[1]:
    raise ValueError(f"pair_probs must be a square [K, K] array, got shape {probs.shape}")
  k = probs.shape[0]
  if not np.all(np.isfinite(probs)) or np.any(probs < 0):
    raise ValueError("pair_probs must be finite and non-negative")
  floor = 1.0 / k if floor is None else float(floor)
  if not 0.0 <= floor <= 1.0:
    raise ValueError(f"floor must be in [0, 1], got {floor}")
  total = probs.sum()
  if total <= 0:
    probs, floor = np.zeros_like(probs), 1.0
  else:
    probs = probs / total
  return (1.0 - floor) * probs + floor / (k * k)


def concentration(
    pair_probs, *, top: tuple[int, ...] = (1, 10), tolerance: float = 0.05
) -> dict[str, Union[float, int, bool]]:
  """How concentrated a pair distribution is: statistics to log at each refresh.

  Args:
    pair_probs: `[K, K]` (or any shape) non-negative probabilities; normalised here.
    top: the `k` of the `top{k}_mass` entries.
    tolerance: `near_uniform` holds when `effective_pairs >= (1 - tolerance) * support`.

  Returns:
    A dict with
      * `effective_pairs`: `exp(entropy)` (natural log), the number of equally likely
        pairs with the same entropy: 1 when all mass is on one pair, `support` when P is
        uniform over its support;
      * `support`: number of pairs with `P > 0`;
      * `top{k}_mass` for each `k` in `top`: total probability of the `k` likeliest pairs;
      * `near_uniform`: P is essentially uniform over its support (see `tolerance`).

  Raises:
    ValueError: a negative or non-finite entry (e.g. the all-NaN P of a non-finite gain),
      or no mass at all.
  """
  probs = np.asarray(pair_probs, dtype=np.float64).reshape(-1)
  if not np.all(np.isfinite(probs)) or np.any(probs < 0):
    raise ValueError("pair_probs must be finite and non-negative")
  total = probs.sum()
  if total <= 0:
    raise ValueError("pair_probs has no mass")
  probs = probs / total
  positive = probs[probs > 0]
  effective = float(np.exp(-np.sum(positive * np.log(positive))))
  out = {"effective_pairs": effective, "support": int(positive.size)}
  for k in top:
    num = min(int(k), probs.size)  # Fewer pairs than k: all of them.
    out[f"top{k}_mass"] = float(np.partition(probs, probs.size - num)[-num:].sum())
  out["near_uniform"] = bool(effective >= (1.0 - tolerance) * positive.size)
  return out


class PairSampler:
  """Draws `(idx1, idx2, y1, y2)` batches of SelMix mixup pairs; see the module doc."""

  def __init__(self, labels, partner_labels=None, *, num_classes: int):
    """Builds the per-class index of both pools.

    Args:
      labels: `[N1]` integer labels of pool 1 (labeled set; x1 and its kept label).
      partner_labels: `[N2]` integer labels of pool 2, or None to use pool 1
        (supervised). Semi-supervised: pseudo-labels of the unlabeled set; negative
        entries (e.g. below a confidence threshold) are never drawn. Indices returned
        as `idx2` index this array.
      num_classes: K.
    """
    self.num_classes = int(num_classes)
    self._pool1 = _ClassIndex.build(labels, self.num_classes)
    _log_absent("labeled", self._pool1.absent)
    self._pool2 = None
    self._logged_drop = None  # Absent-class sets of the last "mass dropped" warning.
    self._set_partner(partner_labels)

  def _set_partner(self, partner_labels) -> None:
    previous = self._pool2
    if partner_labels is None:
      self._pool2 = self._pool1
    else:
      self._pool2 = _ClassIndex.build(partner_labels, self.num_classes)
      if previous is None or previous.absent != self._pool2.absent:
        _log_absent("partner", self._pool2.absent)
    self._valid_pairs = np.outer(self._pool1.counts > 0, self._pool2.counts > 0)
    if not self._valid_pairs.any():
      raise ValueError("no class has examples in both pools")

  def with_partner_labels(self, partner_labels) -> "PairSampler":
    """A sampler with the same pool 1 and a new partner pool (e.g. new pseudo-labels).

    `O(N2)`; pool 1 is shared, not rebuilt. `self` is left unchanged.
    """
    new = copy.copy(self)
    new._set_partner(partner_labels)  # pylint: disable=protected-access
    return new

  @property
  def class_counts(self) -> tuple[np.ndarray, np.ndarray]:
    """`([K], [K])` examples per class in pool 1 and pool 2."""
    return self._pool1.counts, self._pool2.counts

  @property
  def valid_pairs(self) -> np.ndarray:
    """`[K, K]` bool: both classes of the pair have examples in their pool."""
    return self._valid_pairs

  def prepare(self, pair_probs, *, floor: Optional[float] = None) -> PairTable:
    """Mixes in the uniform floor, drops impossible pairs and builds the CDF.

    Args:
      pair_probs: `[K, K]` non-negative pair distribution (normalised here).
      floor: weight of the uniform distribution over all `K²` pairs in the mixture;
        None means `1/K` (SPEC §5), 0 disables it.

    Returns:
      The `PairTable` to pass to `sample` for every batch until the next refresh.
    """
    k = self.num_classes
    if np.shape(pair_probs) != (k, k):
      raise ValueError(f"pair_probs must be [{k}, {k}], got {np.shape(pair_probs)}")
    mixed = with_floor(pair_probs, floor)
    dropped = mixed[~self._valid_pairs].sum()
    drop_key = (self._pool1.absent, self._pool2.absent)
    if dropped > 0 and drop_key != self._logged_drop:
      self._logged_drop = drop_key  # Log once per change of the absent classes.
      _LOG.warning(
          "PairSampler: %.3g of the pair mass (P with floor) involves classes without "
          "examples in their pool; it is set to 0 and the rest renormalised.", dropped)
    mixed = np.where(self._valid_pairs, mixed, 0.0)
    remaining = mixed.sum()
    if remaining <= 0:
      raise ValueError("pair_probs puts no mass on pairs with examples in both pools; "
                       "use floor > 0")
    mixed /= remaining
    flat = mixed.reshape(-1)
    return PairTable(probs=mixed, cdf=np.cumsum(flat), last=int(np.flatnonzero(flat)[-1]))

  def class_pairs(self, table: PairTable) -> ClassPairs:
    """`table` with both pools' class index, for a device sampler (`ClassPairs`)."""
    return ClassPairs.of(table.probs, self._pool1, self._pool2)

  def sample(
      self,
      pair_probs: Union[PairTable, np.ndarray],
      batch_size: int,
      *,
      seed: int,
      step: int,
      floor: Optional[float] = None,
      num_shards: int = 1,
      shard_index: int = 0,
  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Draws one batch of pairs, deterministically in `(seed, step)`.

    Args:
      pair_probs: a `PairTable` from `prepare` (O(B) per batch) or a `[K, K]` array,
        prepared on the fly with `floor`.
      batch_size: global number of pairs B.
      seed: non-negative run seed.
      step: non-negative training step.
      floor: uniform-floor weight, only with a raw array (see `prepare`).
      num_shards: multi-host: every process draws the same global batch and keeps
        shard `shard_index` of `num_shards` equal contiguous slices.
      shard_index: which slice to return.

    Returns:
      `(idx1, idx2, y1, y2)`, int64 arrays of shape `[B / num_shards]`: indices into
      pool 1 and pool 2 and their classes (`y1` is the kept label).
    """
    if isinstance(pair_probs, PairTable):
      if floor is not None:
        raise ValueError("floor is fixed when the PairTable is prepared")
      table = pair_probs
    else:
      table = self.prepare(pair_probs, floor=floor)
    if batch_size % num_shards or not 0 <= shard_index < num_shards:
      raise ValueError(f"cannot take shard {shard_index} of {num_shards} from a batch "
                       f"of {batch_size}")
    rng = np.random.default_rng([int(seed), int(step), _STREAM])
    uniforms = rng.random((3, batch_size))
    flat = np.searchsorted(table.cdf, uniforms[0] * table.cdf[-1], side="right")
    flat = np.minimum(flat, table.last)
    y1, y2 = np.divmod(flat, self.num_classes)
    idx1 = self._pool1.draw(y1, uniforms[1])
    idx2 = self._pool2.draw(y2, uniforms[2])
    size = batch_size // num_shards
    keep = slice(shard_index * size, (shard_index + 1) * size)
    return idx1[keep], idx2[keep], y1[keep], y2[keep]
