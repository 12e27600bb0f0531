"""Confusion matrices and per-class feature sums, accumulated exactly from (padded) batches.

`confusion[i, j]` counts examples of true class `i` predicted as class `j` (rows = true
class). Counts are accumulated as `int32`, so a single call, a sum of per-batch matrices
and a `jax.lax.psum` across devices are all exact as long as no cell (and, if you sum
the matrix, no total) exceeds `2**31 - 1` examples. Float32 accumulation would silently
stop counting at `2**24` (16.7M) examples per cell; `tests/test_confusion.py` checks a
cell past that point. Normalise to fractions only once, at the end (the metrics in
`selmix_jax.metrics` accept counts or fractions alike).

Padding: evaluation batches are padded to a fixed size; pass `mask=False` for the padded
rows and they are not counted. Labels or predictions outside `[0, num_classes)` are not
counted either, silently: the functions are jitted, and compiled code cannot raise on a value.
So a `-1` label is another way to mark padding, but a label `>= K` (a data set with more
classes than the model, labels numbered from 1) simply disappears from the counts. Check
labels on the host first with `check_labels(labels, num_classes)`, which raises naming the
bad values (the training pipeline does so for every split it loads).

Implementation note: `confusion_matrix` is a scatter-add into the flattened `[K * K]`
matrix at `label * K + pred`. On a 2-core CPU with N = 10**6 it takes ~0.6 ms (K = 10,
100) to ~3 ms (K = 1000); a 2-D scatter `.at[labels, preds]` was 1.2-12x slower (it
serialises on the few hot cells when K is small) and a one-hot matmul costs O(N K^2)
(55 ms at K = 10, 330 ms at K = 100, and is inexact in float32 past 2**24).

`num_classes` is static: it fixes the output shape. `confusion_matrix` and
`class_feature_sums` are jitted with `num_classes` as a static argument, so a direct call
compiles once per (input shape, K) and a call inside a user's `jit`/`pmap` just inlines. A
user who jits them directly must mark `num_classes` static too
(`jax.jit(confusion_matrix, static_argnames="num_classes")`, or bind it with
`functools.partial`); a traced `num_classes` raises a `TypeError` that says so.

Prototypes (SPEC §4): `class_feature_sums` returns per-class sums of features and
per-class counts of one batch; like the confusion matrix they add across batches and
`psum` across devices, and `prototypes(sums, counts)` divides once at the end.
"""

import functools
import operator

import jax
import jax.numpy as jnp
import numpy as np


def _flat_valid(labels, mask, num_classes):
  """Flattens labels (and an optional mask) and returns the per-example validity."""
  labels = jnp.asarray(labels).reshape(-1)
  valid = (labels >= 0) & (labels < num_classes)
  if mask is not None:
    valid &= jnp.asarray(mask, dtype=bool).reshape(-1)
  return labels, valid


def _static_num_classes(num_classes) -> int:
  """`num_classes` as a Python int; a clear error if it is traced or not an integer."""
  if isinstance(num_classes, jax.core.Tracer):
    raise TypeError(
      "num_classes must be a static Python int (it fixes the output shape [K, K]), but it "
      "is a traced value. Under jax.jit mark it static, e.g. "
      "jax.jit(confusion.confusion_matrix, static_argnames='num_classes'), or bind it with "
      "functools.partial(..., num_classes=K); under jax.pmap use static_broadcasted_argnums."
    )
  try:
    num_classes = operator.index(num_classes)
  except TypeError:
    raise TypeError(f"num_classes must be an int, got {num_classes!r}.") from None
  if num_classes < 1:
    raise ValueError(f"num_classes must be positive, got {num_classes}.")
  return num_classes


def _jit_static_num_classes(fn):
  """Jits `fn(labels, x, num_classes, *, mask=None)` with `num_classes` checked and static."""
  jitted = jax.jit(fn, static_argnames=("num_classes",))

  @functools.wraps(fn)
  def wrapper(labels, x, num_classes, *, mask=None):
    return jitted(labels, x, _static_num_classes(num_classes), mask=mask)

  return wrapper


def check_labels(labels, num_classes: int, *, where: str = "labels", mask=None) -> np.ndarray:
  """Host-side check that labels lie in `[0, num_classes)`; call it before `confusion_matrix`.

  `confusion_matrix` and `class_feature_sums` do not count an example whose label lies outside
  `[0, K)`, silently (under `jit` they cannot raise). Call this on the host, where the labels
  are concrete, to turn such labels into an error.

  Args:
    labels: `[...]` integer labels (NumPy or JAX array, not a tracer).
    num_classes: K.
    where: what the labels are (e.g. `"test split of cifar10"`), for the message.
    mask: optional `[...]` bool; only labels where it is True are checked (e.g. `labels != -1`
      for a pool whose `-1` means "no label").

  Returns:
    The labels as a NumPy array, unchanged.

  Raises:
    ValueError: a label is outside `[0, K)` or not an integer; the message names `where`,
      how many labels are bad and the first bad values.
  """
  labels = np.asarray(labels)
  if labels.size and not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"{where}: labels must be integers, got dtype {labels.dtype}.")
  bad = (labels < 0) | (labels >= num_classes)
  if mask is not None:
    bad &= np.asarray(mask, bool)
  if bad.any():
    values = np.unique(labels[bad])
    shown = ", ".join(str(v) for v in values[:5]) + (", ..." if len(values) > 5 else "")
    raise ValueError(
      f"{where}: {int(bad.sum())} of {labels.size} labels lie outside [0, {num_classes}) "
      f"(values {shown}; first at index {int(np.flatnonzero(bad.reshape(-1))[0])}); expected "
      f"class ids 0..{num_classes - 1}. A confusion matrix would silently not count them."
    )
  return labels


@_jit_static_num_classes
def confusion_matrix(
  labels: jax.Array,
  preds: jax.Array,
  num_classes: int,
  *,
  mask: jax.Array | None = None,
) -> jax.Array:
  """Counts (true class, predicted class) pairs.

  Jitted with `num_classes` static; see the module docstring for use under `jit`/`pmap`.

  Args:
    labels: `[...]` integer true classes.
    preds: `[...]` integer predicted classes, same shape as `labels`.
    num_classes: K, a static Python int (not a traced value).
    mask: optional `[...]` boolean validity (`False` for padding rows, which are not
      counted). Examples whose label or prediction lies outside `[0, K)` are not counted
      either, without an error (compiled code cannot raise on values): check labels on the
      host with `check_labels` first.

  Returns:
    `[K, K]` int32 counts, rows = true class, columns = predicted class. Exact up to
    `2**31 - 1` examples per cell.

  Raises:
    TypeError: `num_classes` is traced (not marked static) or not an integer.
    ValueError: `num_classes < 1`, or `labels` and `preds` differ in size (raised when the
      call is traced, so also under the caller's `jit`).
  """
  labels, valid = _flat_valid(labels, mask, num_classes)
  preds = jnp.asarray(preds).reshape(-1)
  if labels.shape != preds.shape:
    raise ValueError(f"labels {labels.shape} and preds {preds.shape} differ in size.")
  valid &= (preds >= 0) & (preds < num_classes)
  size = num_classes * num_classes
  # Invalid examples point one past the end and are dropped by the scatter; this keeps
  # the update a scalar 1 (faster than scattering a weight per example).
  flat = jnp.where(valid, labels.astype(jnp.int32) * num_classes + preds.astype(jnp.int32), size)
  counts = jnp.zeros((size,), jnp.int32).at[flat].add(1, mode="drop")
  return counts.reshape(num_classes, num_classes)


def soft_confusion_matrix(
  labels: jax.Array,
  probs: jax.Array,
  *,
  mask: jax.Array | None = None,
) -> jax.Array:
  """Expected confusion counts `sum_n onehot(y_n)^T probs_n`, differentiable in `probs`.

  Computed as a segment sum of the probability rows by true class, O(N K) rather than
  the O(N K^2) of a one-hot matmul.

  Args:
    labels: `[...]` integer true classes.
    probs: `[..., K]` predicted class probabilities (or any non-negative weights).
    mask: optional `[...]` boolean validity; masked rows (and labels outside `[0, K)`)
      contribute nothing, in value and in gradient.

  Returns:
    `[K, K]` float counts (dtype of `probs`), rows = true class. Row sums are the
    per-class example counts when each `probs` row sums to 1. Accumulation is in the
    float dtype of `probs` (relative rounding error ~ N * 2**-24 in float32); use
    `confusion_matrix` for exact counts.
  """
  probs = jnp.asarray(probs)
  num_classes = probs.shape[-1]
  labels, valid = _flat_valid(labels, mask, num_classes)
  probs = probs.reshape(-1, num_classes)
  if labels.shape[0] != probs.shape[0]:
    raise ValueError(f"{labels.shape[0]} labels but {probs.shape[0]} probability rows.")
  rows = jnp.where(valid[:, None], probs, jnp.zeros_like(probs))
  segment = jnp.where(valid, labels, 0).astype(jnp.int32)
  return jax.ops.segment_sum(rows, segment, num_segments=num_classes)


@_jit_static_num_classes
def class_feature_sums(
  labels: jax.Array,
  features: jax.Array,
  num_classes: int,
  *,
  mask: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
  """Per-class sums of features and per-class example counts (for prototypes).

  Padding rows (`mask=False`) and labels outside `[0, K)` contribute nothing, whatever
  their features hold (NaN included). Both outputs add across batches and can be
  `jax.lax.psum`'d across devices: the counts exactly, the sums up to float32 rounding.
  The sum is a one-hot matmul at `jax.lax.Precision.HIGHEST`, so on accelerators whose
  default matmul precision rounds inputs to bfloat16 the features are not rounded.
  Jitted with `num_classes` static, like `confusion_matrix`.

  Args:
    labels: `[...]` integer true classes.
    features: `[..., D]` features, leading shape that of `labels`.
    num_classes: K, a static Python int.
    mask: optional `[...]` boolean validity.

  Returns:
    `(sums, counts)`: `[K, D]` float32 sums (float64 if `features` are) and `[K]` int32
    counts of the valid examples of each class.

  Raises:
    TypeError: `num_classes` is traced (not marked static) or not an integer.
  """
  labels, valid = _flat_valid(labels, mask, num_classes)
  features = jnp.asarray(features)
  features = features.reshape(-1, features.shape[-1])
  if labels.shape[0] != features.shape[0]:
    raise ValueError(f"{labels.shape[0]} labels but {features.shape[0]} feature rows.")
  features = features.astype(jnp.promote_types(features.dtype, jnp.float32))
  onehot = (labels[:, None] == jnp.arange(num_classes)) & valid[:, None]  # [N, K]
  features = jnp.where(valid[:, None], features, jnp.zeros_like(features))  # 0 * NaN = NaN.
  sums = jnp.einsum(
    "nk,nd->kd", onehot.astype(features.dtype), features, precision=jax.lax.Precision.HIGHEST
  )
  return sums, onehot.sum(axis=0, dtype=jnp.int32)


def prototypes(sums: jax.Array, counts: jax.Array) -> jax.Array:
  """Per-class mean features `sums / counts`; zero for a class without examples.

  Args:
    sums: `[K, D]` per-class feature sums (`class_feature_sums`, summed over batches).
    counts: `[K]` per-class example counts.

  Returns:
    `[K, D]` prototypes (float, dtype of `sums`); NaN-free in value and gradient.
  """
  sums = jnp.asarray(sums)
  counts = jnp.asarray(counts)[:, None]
  present = counts > 0
  return jnp.where(present, sums / jnp.where(present, counts, 1).astype(sums.dtype), 0.0)
