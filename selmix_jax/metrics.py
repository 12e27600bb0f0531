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
* **Invalid matrix**: a matrix with any negative, NaN or infinite entry is not a
  confusion matrix (a corrupted count, an overflow, a bad normalisation). *Every* metric
  of it is NaN — each scalar and each entry of the per-class arrays — never a plausible
  number (a NaN cell would otherwise look like an absent class, an inf one give H-mean
  > 1, a negative one mean recall > 1); `summary` reports `num_absent_classes = -1`.
  `is_valid` tells which matrices of a stack are valid. Under `jit`/`vmap`/`grad` the
  rule is a `where` on the whole matrix: gradients are those of the rules above where
  the matrix is valid and 0 (finite) where it is not. Host code that reports numbers
  should call `check_counts(confusion, where=...)` first, which raises a `ValueError`
  naming the first bad cell.
* **Wrong shape**: a matrix that is not `[..., K, K]` with K >= 1 (1-D, non-square, empty)
  raises a `ValueError` naming the shape, at the call; under `jit` when the function is traced
  (shapes are static), so before anything runs.

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


# ------------------------------------------------------------------ validity rule


def is_valid(confusion: jax.Array) -> jax.Array:
  """Whether each matrix is a valid confusion matrix (all entries finite and >= 0).

  Args:
    confusion: `[..., K, K]` counts or fractions.

  Returns:
    `[...]` bool.
  """
  confusion = _as_float(confusion)
  return jnp.all(jnp.isfinite(confusion) & (confusion >= 0), axis=(-2, -1))


def mask_invalid(outputs, valid: jax.Array):
  """Applies the validity rule to computed outputs.

  Args:
    outputs: a pytree of arrays computed from `[..., K, K]` matrices; each leaf has the
      batch shape `[...]` of `valid` as its leading axes.
    valid: `[...]` bool, e.g. `is_valid(confusion)`.

  Returns:
    `outputs` with every entry of an invalid matrix replaced: NaN for floats, -1 for
    integers, False for booleans.
  """

  def mask(value):
    value = jnp.asarray(value)
    where = valid.reshape(valid.shape + (1,) * (value.ndim - valid.ndim))
    if value.dtype == jnp.bool_:
      fill = False
    elif jnp.issubdtype(value.dtype, jnp.integer):
      fill = -1
    else:
      fill = jnp.nan
    return jnp.where(where, value, fill)

  return jax.tree.map(mask, outputs)


def zero_if_invalid(confusion: jax.Array) -> tuple[jax.Array, jax.Array]:
  """`(float matrix with invalid matrices replaced by zeros, is_valid)`.

  Compute on the first output and pass the result through `mask_invalid`: nothing
  non-finite then flows through the computation, in value or in gradient.
  """
  confusion = _as_float(confusion)
  valid = is_valid(confusion)
  return jnp.where(valid[..., None, None], confusion, 0.0), valid


def check_shape(confusion, *, where: str = "confusion") -> tuple[int, ...]:
  """Raises a `ValueError` unless `confusion` has shape `[..., K, K]` with K >= 1.

  Works on concrete arrays and on tracers alike (shapes are static under `jit`), so a metric
  of a wrongly shaped matrix fails at the call (or at trace time) with the shape, not deep
  inside `jax.numpy`.

  Returns:
    The shape.
  """
  shape = tuple(np.shape(confusion))
  if len(shape) < 2 or shape[-1] != shape[-2] or shape[-1] < 1:
    raise ValueError(
      f"{where}: a confusion matrix must have shape [..., K, K] with K >= 1 (rows = true "
      f"class), got shape {shape}."
    )
  return shape


def _checked(fn, confusion, **kwargs):
  """`fn(confusion, **kwargs)` under the shape check and the validity rule (module docstring)."""
  check_shape(confusion)
  confusion, valid = zero_if_invalid(confusion)
  return mask_invalid(fn(confusion, **kwargs), valid)


def check_counts(confusion, *, where: str) -> np.ndarray:
  """Host-side check that a confusion matrix is valid; call it before reporting.

  Args:
    confusion: `[..., K, K]` counts or fractions (NumPy or JAX array).
    where: what the matrix is (e.g. `"validation confusion at step 500"`), for the
      error message.

  Returns:
    The matrix as a NumPy array, unchanged.

  Raises:
    ValueError: not a `[..., K, K]` matrix with K >= 1, or an entry is negative, NaN or infinite;
      the message names `where`, the first bad cell and its value.
  """
  confusion = np.asarray(confusion)
  check_shape(confusion, where=where)
  values = confusion.astype(np.float64)
  bad = ~(np.isfinite(values) & (values >= 0))
  if bad.any():
    cell = tuple(int(i) for i in np.argwhere(bad)[0])
    raise ValueError(
      f"{where}: invalid confusion matrix: entry {list(cell)} is {confusion[cell].item()!r} "
      f"({int(bad.sum())} of {bad.size} entries invalid); counts must be finite and "
      "non-negative."
    )
  return confusion


# ------------------------------------------------------------------ metrics


def present_classes(confusion: jax.Array) -> jax.Array:
  """Classes with at least one example (a helper, not a metric: no validity rule).

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


# Each metric below is a public function applying the validity rule once (`_checked`)
# around a private implementation that assumes a valid float matrix; the private ones
# call each other, so `summary` checks the matrix once.


def _recalls(c, *, absent_value=jnp.nan):
  diag = jnp.diagonal(c, axis1=-2, axis2=-1)
  return safe_div(diag, c.sum(-1), absent_value)


def recalls(confusion: jax.Array, *, absent_value: float = jnp.nan) -> jax.Array:
  """Per-class recall `r_i = C_ii / sum_j C_ij`.

  Args:
    confusion: `[..., K, K]` counts or fractions.
    absent_value: value reported for a class with no examples (default NaN).

  Returns:
    `[..., K]` recalls (all NaN for an invalid matrix).
  """
  return _checked(_recalls, confusion, absent_value=absent_value)


def _precisions(c):
  return safe_div(jnp.diagonal(c, axis1=-2, axis2=-1), c.sum(-2), 0.0)


def precisions(confusion: jax.Array) -> jax.Array:
  """Per-class precision `p_j = C_jj / sum_i C_ij`; 0 for a never-predicted class.

  Args:
    confusion: `[..., K, K]` counts or fractions.

  Returns:
    `[..., K]` precisions.
  """
  return _checked(_precisions, confusion)


def _coverages(c):
  return safe_div(c.sum(-2), c.sum((-2, -1))[..., None], jnp.nan)


def coverages(confusion: jax.Array) -> jax.Array:
  """Per-class coverage `cov_j = sum_i C_ij / sum C` (share of predictions).

  Args:
    confusion: `[..., K, K]` counts or fractions.

  Returns:
    `[..., K]` coverages (sum to 1; NaN for an all-zero matrix).
  """
  return _checked(_coverages, confusion)


def _accuracy(c):
  return safe_div(jnp.trace(c, axis1=-2, axis2=-1), c.sum((-2, -1)), jnp.nan)


def accuracy(confusion: jax.Array) -> jax.Array:
  """Fraction of correct predictions, `trace C / sum C`; `[..., K, K] -> [...]`."""
  return _checked(_accuracy, confusion)


def _mean_recall(c):
  return _masked_mean(_recalls(c, absent_value=0.0), present_classes(c))


def mean_recall(confusion: jax.Array) -> jax.Array:
  """Mean recall over present classes (balanced accuracy); `[..., K, K] -> [...]`."""
  return _checked(_mean_recall, confusion)


def _min_recall(c):
  present = present_classes(c)
  r = jnp.where(present, _recalls(c, absent_value=0.0), jnp.inf)
  return jnp.where(present.any(-1), r.min(-1), jnp.nan)


def min_recall(confusion: jax.Array) -> jax.Array:
  """Minimum recall over present classes; `[..., K, K] -> [...]`."""
  return _checked(_min_recall, confusion)


def _head_tail_recalls(c, *, head_mask=None):
  head = resolve_head_mask(c.shape[-1], head_mask)
  r = _recalls(c, absent_value=0.0)
  present = present_classes(c)
  return _masked_mean(r, present & head), _masked_mean(r, present & ~head)


def head_tail_recalls(confusion: jax.Array, *, head_mask=None) -> tuple[jax.Array, jax.Array]:
  """Mean recall of the head and of the tail classes (present classes only).

  Args:
    confusion: `[..., K, K]` counts or fractions.
    head_mask: `[K]` bool, True for head classes; default `default_head_mask(K)`.

  Returns:
    `(mean_head_recall, mean_tail_recall)`, each `[...]` (NaN for a group with no
    present class).
  """
  return _checked(_head_tail_recalls, confusion, head_mask=head_mask)


def _min_head_tail_recall(c, *, head_mask=None):
  return jnp.minimum(*_head_tail_recalls(c, head_mask=head_mask))


def min_head_tail_recall(confusion: jax.Array, *, head_mask=None) -> jax.Array:
  """`min(mean_H r, mean_T r)`; `[..., K, K] -> [...]`. See `head_tail_recalls`."""
  return _checked(_min_head_tail_recall, confusion, head_mask=head_mask)


def _gmean_recall(c):
  present = present_classes(c)
  r = _recalls(c, absent_value=1.0)
  positive = present & (r > 0)
  mean_log = _masked_mean(jnp.log(jnp.where(positive, r, 1.0)), present)
  any_zero = (present & (r <= 0)).any(-1)
  return jnp.where(any_zero, 0.0, jnp.exp(jnp.where(any_zero, 0.0, mean_log)))


def gmean_recall(confusion: jax.Array) -> jax.Array:
  """Geometric mean of recalls over present classes, computed in log space.

  `(prod_i r_i)^(1/n)` over the n present classes; exactly 0 (with zero gradient) if a
  present class has zero recall.

  Args:
    confusion: `[..., K, K]` counts or fractions.

  Returns:
    `[...]` G-mean.
  """
  return _checked(_gmean_recall, confusion)


def _hmean_recall(c):
  present = present_classes(c)
  r = _recalls(c, absent_value=1.0)
  positive = present & (r > 0)
  inv_sum = jnp.where(positive, 1.0 / jnp.where(positive, r, 1.0), 0.0).sum(-1)
  num_present = present.sum(-1).astype(inv_sum.dtype)
  any_zero = (present & (r <= 0)).any(-1)
  value = safe_div(num_present, jnp.where(any_zero, 1.0, inv_sum), jnp.nan)
  return jnp.where(any_zero, 0.0, value)


def hmean_recall(confusion: jax.Array) -> jax.Array:
  """Harmonic mean of recalls over present classes, `n / sum_i 1/r_i`.

  Exactly 0 (with zero gradient) if a present class has zero recall.

  Args:
    confusion: `[..., K, K]` counts or fractions.

  Returns:
    `[...]` H-mean.
  """
  return _checked(_hmean_recall, confusion)


def _min_coverage(c):
  return _coverages(c).min(-1)


def min_coverage(confusion: jax.Array) -> jax.Array:
  """Smallest coverage over all classes; `[..., K, K] -> [...]`."""
  return _checked(_min_coverage, confusion)


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


def _summary(c, *, head_mask=None):
  return {
    "accuracy": _accuracy(c),
    "mean_recall": _mean_recall(c),
    "min_recall": _min_recall(c),
    "min_head_tail_recall": _min_head_tail_recall(c, head_mask=head_mask),
    "gmean_recall": _gmean_recall(c),
    "hmean_recall": _hmean_recall(c),
    "min_coverage": _min_coverage(c),
    "num_absent_classes": (~present_classes(c)).sum(-1).astype(jnp.int32),
    "recall": _recalls(c),
    "precision": _precisions(c),
    "coverage": _coverages(c),
  }


def summary(confusion: jax.Array, *, head_mask=None) -> dict[str, jax.Array]:
  """All reported metrics of SPEC §2 (in [0, 1]).

  Args:
    confusion: `[..., K, K]` counts or fractions.
    head_mask: `[K]` bool head classes; default `default_head_mask(K)`.

  Returns:
    A dict with `[...]` scalars `accuracy`, `mean_recall`, `min_recall`,
    `min_head_tail_recall`, `gmean_recall`, `hmean_recall`, `min_coverage`,
    `num_absent_classes` (int32), and `[..., K]` arrays `recall` (NaN for absent
    classes), `precision` and `coverage`. For an invalid matrix (module docstring) every
    float entry is NaN and `num_absent_classes` is -1.

  Raises:
    ValueError: `confusion` is not `[..., K, K]` with K >= 1 (at the call, or when traced).
  """
  return _checked(_summary, confusion, head_mask=head_mask)
