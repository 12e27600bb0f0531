"""Long-tailed per-class counts and deterministic train/val/labeled/unlabeled splits.

Counts follow SPEC §8 (class k = 0..K-1 in dataset order):

  labeled    N_k = max(int(N1 * rho_l^(-k/(K-1))), int(N1 / rho_l))
  unlabeled  M_k = max(int(M1 * rho_u^(-k/(K-1))), int(M1 / rho_u))   rho_u >= 1
             M_k = min(int(M1 * rho_u^(-k/(K-1))), int(M1 / rho_u))   rho_u <  1

`int` truncates. The power is evaluated in float64 and a product within 1e-9
(relative) of an integer is snapped to it before truncation, so that e.g.
`30 * 100^(9/9)` gives 3000 and not 2999 because of rounding.

Splits: a balanced validation set is held out from the training split first, then
labeled and unlabeled pools are drawn per class from the remainder without overlap.
Everything is a pure function of `(labels, counts, seed)`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

_SNAP_RTOL = 1e-9


def _trunc(x: np.ndarray) -> np.ndarray:
  """`int()` of non-negative floats, robust to float rounding just below an integer."""
  x = np.asarray(x, dtype=np.float64)
  nearest = np.round(x)
  snapped = np.where(np.abs(x - nearest) <= _SNAP_RTOL * np.maximum(1.0, np.abs(x)), nearest, x)
  return np.floor(snapped).astype(np.int64)


def _profile(n_max: int, imbalance: float, num_classes: int) -> np.ndarray:
  if num_classes < 1:
    raise ValueError(f"num_classes must be >= 1, got {num_classes}.")
  if n_max < 0:
    raise ValueError(f"The head-class count must be >= 0, got {n_max}.")
  if not imbalance > 0:
    raise ValueError(f"The imbalance ratio must be > 0, got {imbalance}.")
  k = np.arange(num_classes, dtype=np.float64)
  exponent = -k / max(num_classes - 1, 1)
  return _trunc(np.float64(n_max) * np.power(np.float64(imbalance), exponent))


def labeled_counts(n_max: int, imbalance: float, num_classes: int) -> np.ndarray:
  """Per-class labeled counts `N_k` of SPEC §8.

  Args:
    n_max: head-class count N1.
    imbalance: imbalance ratio rho_l >= 1 (head / tail).
    num_classes: K.

  Returns:
    int64 array [K] with `N_0 = N1` decreasing to `int(N1 / rho_l)`.
  """
  if imbalance < 1:
    raise ValueError(f"The labeled imbalance ratio must be >= 1, got {imbalance}.")
  floor = _trunc(np.float64(n_max) / np.float64(imbalance))
  return np.maximum(_profile(n_max, imbalance, num_classes), floor)


def unlabeled_counts(m_max: int, imbalance: float, num_classes: int) -> np.ndarray:
  """Per-class unlabeled counts `M_k` of SPEC §8.

  Args:
    m_max: count of class 0, M1 (0 gives all zeros: supervised).
    imbalance: rho_u. `>= 1` gives a profile decreasing like the labeled one; `< 1`
      an inverted profile increasing from M1 to `int(M1 / rho_u)`; `1` is uniform.
    num_classes: K.

  Returns:
    int64 array [K].
  """
  profile = _profile(m_max, imbalance, num_classes)
  bound = _trunc(np.float64(m_max) / np.float64(imbalance))
  if imbalance >= 1:
    return np.maximum(profile, bound)
  return np.minimum(profile, bound)


def split_indices(
  labels: np.ndarray,
  *,
  val_per_class: int,
  labeled_counts: Sequence[int],
  unlabeled_counts: Sequence[int] | None = None,
  seed: int,
) -> dict[str, np.ndarray]:
  """Draws validation, labeled and unlabeled index sets from one training split.

  For every class, the class's indices are permuted with a generator seeded by
  `(seed, class)`; the first `val_per_class` form the validation set, the next
  `labeled_counts[k]` the labeled set and the next `unlabeled_counts[k]` the
  unlabeled set. The sets are therefore disjoint, balanced on validation, and
  a class's draw does not depend on the counts requested for other classes.

  Args:
    labels: int array [N] of class ids in `[0, K)` with `K = len(labeled_counts)`.
    val_per_class: validation examples per class (0 for none).
    labeled_counts: [K] labeled examples per class.
    unlabeled_counts: [K] unlabeled examples per class, or None for no unlabeled set.
    seed: integer seed.

  Returns:
    dict with int64 arrays `val`, `labeled`, `unlabeled` of indices into `labels`,
    each sorted by class, then in drawn order within the class.

  Raises:
    ValueError: a class has fewer examples than requested, or bad arguments.
  """
  labels = np.asarray(labels)
  if labels.ndim != 1:
    raise ValueError(f"labels must be 1-D, got shape {labels.shape}.")
  labeled_counts = np.asarray(labeled_counts, dtype=np.int64)
  num_classes = len(labeled_counts)
  if unlabeled_counts is None:
    unlabeled_counts = np.zeros(num_classes, np.int64)
  unlabeled_counts = np.asarray(unlabeled_counts, dtype=np.int64)
  if len(unlabeled_counts) != num_classes:
    raise ValueError(
      f"labeled_counts has {num_classes} classes but unlabeled_counts has {len(unlabeled_counts)}."
    )
  if val_per_class < 0 or (labeled_counts < 0).any() or (unlabeled_counts < 0).any():
    raise ValueError("Requested counts must be non-negative.")
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise ValueError(
      f"labels must lie in [0, {num_classes}), found range [{labels.min()}, {labels.max()}]."
    )
  out = {"val": [], "labeled": [], "unlabeled": []}
  for k in range(num_classes):
    members = np.flatnonzero(labels == k)
    need = val_per_class + int(labeled_counts[k]) + int(unlabeled_counts[k])
    if need > len(members):
      raise ValueError(
        f"Class {k} has {len(members)} examples, fewer than the {need} requested "
        f"({val_per_class} validation + {labeled_counts[k]} labeled + "
        f"{unlabeled_counts[k]} unlabeled)."
      )
    rng = np.random.default_rng([seed, k])
    members = members[rng.permutation(len(members))]
    stops = np.cumsum([val_per_class, labeled_counts[k], unlabeled_counts[k]])
    out["val"].append(members[: stops[0]])
    out["labeled"].append(members[stops[0] : stops[1]])
    out["unlabeled"].append(members[stops[1] : stops[2]])
  return {
    name: np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)
    for name, parts in out.items()
  }
