"""Metrics of a confusion matrix (SPEC §2), as pure `jax.numpy` functions.

Every function takes `confusion` of shape `[..., K, K]` (rows = true class, columns =
predicted class), counts or fractions alike: all metrics are invariant to the scale of
the matrix. Leading axes are batch axes, so a stack of matrices works with or without
`vmap`. All functions work under `jit`, `vmap` and `grad`, and their gradients are
finite everywhere (divisions use the double-`where` pattern, so an undefined branch
contributes neither a NaN value nor a NaN gradient).

Edge-case policy:

* **Absent class** (a row of zeros: no evaluated example has that true class). Its
  recall is undefined: `recalls` reports NaN for it, and it is *excluded* from every
  aggregate of recalls — `mean_recall`, `min_recall`, `gmean_recall`, `hmean_recall`
  and the head/tail means of `min_head_tail_recall` are taken over the present classes
  only (H-mean is `n / sum 1/r_i` with `n` the number of present classes, G-mean is
  `(prod r_i)^(1/n)`). `summary` reports `num_absent_classes`. Coverage and precision
  of an absent class are still defined (its column may be non-empty).
* **Zero recall** of a present class makes `gmean_recall` and `hmean_recall` exactly 0.
  Their gradient is then 0 (the true gradient is infinite or undefined there).
* **Never-predicted class** (an all-zero column): precision 0, as scikit-learn's
  `zero_division=0`.
* **No class present** (an all-zero matrix): every aggregate is NaN (gradient 0).
* If one of the head/tail groups has no present class, `min_head_tail_recall` is NaN.

The head mask defaults to the first `int(0.9 K)` classes (datasets are ordered from
most to least frequent); any boolean `[K]` mask may be passed.
"""

import jax
import jax.numpy as jnp
import numpy as np


def _as_float(confusion: jax.Array) -> jax.Array:
  """Casts integer counts to float (float32 unless the input is already wider)."""
  confusion = jnp.asarray(confusion)
  return confusion.astype(jnp.result_type(confusion.dtype, jnp.float32))


def safe_div(num: jax.Array, den: jax.Array, fill: float) -> jax.Array:
  """`num / den` where `den > 0`, else `fill`; NaN-free in value and gradient."""
  ok = den > 0
  return jnp.where(ok, num / jnp.where(ok, den, 1), fill)


def _masked_mean(values: jax.Array, where: jax.Array) -> jax.Array:
  """Mean of `values[..., k]` over `where[..., k]`; NaN if nothing is selected."""
  values = jnp.where(where, values, 0)
  return safe_div(values.sum(-1), where.sum(-1).astype(values.dtype), jnp.nan)


def present_classes(confusion: jax.Array) -> jax.Array:
  """Classes with at least one example.

  Args:
    confusion: `[..., K, K]` counts or fractions.

  Returns:
    `[..., K]` bool, True where the row sum is positive.
  """
  return _as_float(confusion).sum(-1) > 0


def default_head_mask(num_classes: int) -> np.ndarray:
  """The default head classes: the first `int(0.9 K)` in class order.

  Args:
    num_classes: K.

  Returns:
    `[K]` NumPy bool array (a constant, so it is static under `jit`).
  """
  mask = np.zeros((num_classes,), dtype=bool)
  mask[: int(0.9 * num_classes)] = True
  return mask


def resolve_head_mask(num_classes: int, head_mask=None) -> jax.Array:
  """`head_mask` as a bool array, or `default_head_mask(num_classes)` if it is None."""
  if head_mask is None:
    return default_head_mask(num_classes)
  return jnp.asarray(head_mask, dtype=bool)


def recalls(confusion: jax.Array, *, absent_value: float = jnp.nan) -> jax.Array:
  """Per-class recall `r_i = C_ii / sum_j C_ij`.

  Args:
    confusion: `[..., K, K]` counts or fractions.
    absent_value: value reported for a class with no examples (default NaN).

  Returns:
    `[..., K]` recalls.
  """
  confusion = _as_float(confusion)
  diag = jnp.diagonal(confusion, axis1=-2, axis2=-1)
  return safe_div(diag, confusion.sum(-1), absent_value)


def precisions(confusion: jax.Array) -> jax.Array:
  """Per-class precision `p_j = C_jj / sum_i C_ij`; 0 for a never-predicted class.

  Args:
    confusion: `[..., K, K]` counts or fractions.

  Returns:
    `[..., K]` precisions.
  """
  confusion = _as_float(confusion)
  diag = jnp.diagonal(confusion, axis1=-2, axis2=-1)
  return safe_div(diag, confusion.sum(-2), 0.0)


def coverages(confusion: jax.Array) -> jax.Array:
  """Per-class coverage `cov_j = sum_i C_ij / sum C` (share of predictions).

  Args:
    confusion: `[..., K, K]` counts or fractions.

  Returns:
    `[..., K]` coverages (sum to 1; NaN for an all-zero matrix).
  """
  confusion = _as_float(confusion)
  total = confusion.sum((-2, -1))
  return safe_div(confusion.sum(-2), total[..., None], jnp.nan)


def accuracy(confusion: jax.Array) -> jax.Array:
  """Fraction of correct predictions, `trace C / sum C`; `[..., K, K] -> [...]`."""
  confusion = _as_float(confusion)
  trace = jnp.trace(confusion, axis1=-2, axis2=-1)
  return safe_div(trace, confusion.sum((-2, -1)), jnp.nan)


def mean_recall(confusion: jax.Array) -> jax.Array:
  """Mean recall over present classes (balanced accuracy); `[..., K, K] -> [...]`."""
  return _masked_mean(recalls(confusion, absent_value=0.0), present_classes(confusion))


def min_recall(confusion: jax.Array) -> jax.Array:
  """Minimum recall over present classes; `[..., K, K] -> [...]`."""
  present = present_classes(confusion)
  r = jnp.where(present, recalls(confusion, absent_value=0.0), jnp.inf)
  return jnp.where(present.any(-1), r.min(-1), jnp.nan)


def head_tail_recalls(confusion: jax.Array, *, head_mask=None) -> tuple[jax.Array, jax.Array]:
  """Mean recall of the head and of the tail classes (present classes only).

  Args:
    confusion: `[..., K, K]` counts or fractions.
    head_mask: `[K]` bool, True for head classes; default `default_head_mask(K)`.

  Returns:
    `(mean_head_recall, mean_tail_recall)`, each `[...]` (NaN for a group with no
    present class).
  """
  head = resolve_head_mask(confusion.shape[-1], head_mask)
  r = recalls(confusion, absent_value=0.0)
  present = present_classes(confusion)
  return _masked_mean(r, present & head), _masked_mean(r, present & ~head)


def min_head_tail_recall(confusion: jax.Array, *, head_mask=None) -> jax.Array:
  """`min(mean_H r, mean_T r)`; `[..., K, K] -> [...]`. See `head_tail_recalls`."""
  head_recall, tail_recall = head_tail_recalls(confusion, head_mask=head_mask)
  return jnp.minimum(head_recall, tail_recall)


def gmean_recall(confusion: jax.Array) -> jax.Array:
  """Geometric mean of recalls over present classes, computed in log space.

  `(prod_i r_i)^(1/n)` over the n present classes; exactly 0 (with zero gradient) if a
  present class has zero recall.

  Args:
    confusion: `[..., K, K]` counts or fractions.

  Returns:
    `[...]` G-mean.
  """
  present = present_classes(confusion)
  r = recalls(confusion, absent_value=1.0)
  positive = present & (r > 0)
  mean_log = _masked_mean(jnp.log(jnp.where(positive, r, 1.0)), present)
  any_zero = (present & (r <= 0)).any(-1)
  return jnp.where(any_zero, 0.0, jnp.exp(jnp.where(any_zero, 0.0, mean_log)))


def hmean_recall(confusion: jax.Array) -> jax.Array:
  """Harmonic mean of recalls over present classes, `n / sum_i 1/r_i`.

  Exactly 0 (with zero gradient) if a present class has zero recall.

  Args:
    confusion: `[..., K, K]` counts or fractions.

  Returns:
    `[...]` H-mean.
  """
  present = present_classes(confusion)
  r = recalls(confusion, absent_value=1.0)
  positive = present & (r > 0)
  inv_sum = jnp.where(positive, 1.0 / jnp.where(positive, r, 1.0), 0.0).sum(-1)
  num_present = present.sum(-1).astype(inv_sum.dtype)
  any_zero = (present & (r <= 0)).any(-1)
  value = safe_div(num_present, jnp.where(any_zero, 1.0, inv_sum), jnp.nan)
  return jnp.where(any_zero, 0.0, value)


def min_coverage(confusion: jax.Array) -> jax.Array:
  """Smallest coverage over all classes; `[..., K, K] -> [...]`."""
  return coverages(confusion).min(-1)


# The scalar entries of `summary`, in the order tables show them.
SCALAR_METRICS = (
    "accuracy",
    "mean_recall",
    "min_recall",
    "min_head_tail_recall",
    "gmean_recall",
    "hmean_recall",
    "min_coverage",
)


def summary(confusion: jax.Array, *, head_mask=None) -> dict[str, jax.Array]:
  """All reported metrics of SPEC §2 (in [0, 1]).

  Args:
    confusion: `[..., K, K]` counts or fractions.
    head_mask: `[K]` bool head classes; default `default_head_mask(K)`.

  Returns:
    A dict with `[...]` scalars `accuracy`, `mean_recall`, `min_recall`,
    `min_head_tail_recall`, `gmean_recall`, `hmean_recall`, `min_coverage`,
    `num_absent_classes` (int32), and `[..., K]` arrays `recall` (NaN for absent
    classes), `precision` and `coverage`.
  """
  return {
    "accuracy": accuracy(confusion),
    "mean_recall": mean_recall(confusion),
    "min_recall": min_recall(confusion),
    "min_head_tail_recall": min_head_tail_recall(confusion, head_mask=head_mask),
    "gmean_recall": gmean_recall(confusion),
    "hmean_recall": hmean_recall(confusion),
    "min_coverage": min_coverage(confusion),
    "num_absent_classes": (~present_classes(confusion)).sum(-1).astype(jnp.int32),
    "recall": recalls(confusion),
    "precision": precisions(confusion),
    "coverage": coverages(confusion),
  }
