"""Exact confusion counts as a `clu.metrics.Metric`, for clu evaluation loops.

The only module of the package that imports clu and flax; the numerical core
(`confusion`, `metrics`, ...) does not need them.

  ConfusionMatrix10 = clu_metrics.ConfusionMatrix.with_num_classes(10)

  @flax.struct.dataclass
  class EvalMetrics(clu.metrics.Collection):
    confusion: ConfusionMatrix10
    accuracy: clu.metrics.Accuracy

  @functools.partial(jax.pmap, axis_name="batch")
  def p_eval_step(params, state, batch):
    logits = model.apply(params, batch["image"])
    return state.merge(EvalMetrics.gather_from_model_output(
        logits=logits, labels=batch["label"], mask=batch["mask"]))

  state = flax.jax_utils.replicate(EvalMetrics.empty())
  for batch in batches:  # Last batch padded, mask False on the padding.
    state = p_eval_step(params_repl, state, batch)
  results = state.unreplicate().compute()["confusion"]  # `metrics.summary` of the counts

Counts are int32 and add exactly across batches and devices (`merge`, and `reduce` over
the axis `all_gather` adds), so every SPEC §2 metric is computed once from the final
counts, not averaged over batches. Padding rows (`mask=False`) and labels outside
`[0, K)` are not counted.

Why K is a class attribute (`with_num_classes(K)`) and not a field: clu builds the
empty state with the argument-less classmethod `empty()` (`Collection.empty()` calls it
for every metric), and that state must already have its final `[K, K]` shape to be
merged under `jit`, carried through `pmap`/`lax.scan` or checkpointed. A field would
need a value before the first batch, and a pytree field of static data would be traced.
`with_num_classes` returns one cached subclass per `(K, head_mask)`, so two calls give the
same type (one compilation, and equal types in a `Collection`).
"""

import functools
from typing import Any, ClassVar

import clu.metrics
import flax
import jax
import jax.numpy as jnp
import numpy as np

from selmix_jax import confusion as confusion_lib
from selmix_jax import metrics


@flax.struct.dataclass
class ConfusionMatrix(clu.metrics.Metric):
  """Confusion counts `[K, K]` (rows = true class), int32; use `with_num_classes(K)`.

  Attributes:
    counts: `[K, K]` int32 counts (a leading device axis after `all_gather`).
    num_classes: K, fixed by `with_num_classes` (class attribute).
    head_mask: head classes for `min_head_tail_recall` as a tuple of bools, or None for
      `metrics.default_head_mask(K)` (class attribute).
  """

  counts: jax.Array

  num_classes: ClassVar[int | None] = None
  head_mask: ClassVar[tuple[bool, ...] | None] = None

  @classmethod
  def with_num_classes(cls, num_classes: int, *, head_mask=None) -> type["ConfusionMatrix"]:
    """The metric class for K classes (cached: equal arguments give the same class).

    Args:
      num_classes: K.
      head_mask: optional `[K]` bool head classes for `compute()`.

    Returns:
      A subclass of `ConfusionMatrix` with `num_classes` (and `head_mask`) fixed.
    """
    if head_mask is not None:
      head_mask = tuple(np.asarray(head_mask, dtype=bool).reshape(-1).tolist())
      if len(head_mask) != num_classes:
        raise ValueError(f"head_mask has {len(head_mask)} entries for {num_classes} classes.")
    return _metric_class(int(num_classes), head_mask)

  @classmethod
  def _static_num_classes(cls) -> int:
    if cls.num_classes is None:
      raise TypeError(
        "ConfusionMatrix needs a number of classes: use "
        "ConfusionMatrix.with_num_classes(K) as the metric class."
      )
    return cls.num_classes

  @classmethod
  def empty(cls) -> "ConfusionMatrix":
    k = cls._static_num_classes()
    return cls(counts=jnp.zeros((k, k), jnp.int32))

  @classmethod
  def from_model_output(
    cls, *, logits: jax.Array, labels: jax.Array, mask: jax.Array | None = None, **_: Any
  ) -> "ConfusionMatrix":
    """Counts of one batch.

    Args:
      logits: `[..., K]` scores; the prediction is their argmax.
      labels: `[...]` integer true classes.
      mask: optional `[...]` bool, False for padding rows (not counted).
      **_: other model outputs of a `Collection`, ignored.

    Returns:
      The metric holding this batch's counts.
    """
    k = cls._static_num_classes()
    if logits.shape[-1] != k:
      raise ValueError(f"logits have {logits.shape[-1]} classes, the metric {k}.")
    preds = jnp.argmax(logits, axis=-1)
    return cls(counts=confusion_lib.confusion_matrix(labels, preds, k, mask=mask))

  def merge(self, other: "ConfusionMatrix") -> "ConfusionMatrix":
    return type(self)(counts=self.counts + other.counts)

  def reduce(self) -> "ConfusionMatrix":
    """Sums the leading (device) axis that `jax.lax.all_gather` added.

    The same result as clu's default (a `lax.scan` of `merge` over that axis), in one op.
    """
    return type(self)(counts=self.counts.sum(axis=0, dtype=jnp.int32))

  def compute(self) -> dict[str, jax.Array]:
    """`metrics.summary` of the counts: every SPEC §2 metric and per-class array."""
    return metrics.summary(self.counts, head_mask=self.head_mask)

  def compute_value(self):
    raise NotImplementedError(
      "ConfusionMatrix computes a dict of metrics, not one clu Value; call compute() and "
      "write its scalar entries (metrics.SCALAR_METRICS)."
    )


@functools.cache
def _metric_class(num_classes: int, head_mask: tuple[bool, ...] | None) -> type:
  name = f"ConfusionMatrix{num_classes}"
  attrs = {"num_classes": num_classes, "head_mask": head_mask, "__module__": __name__}
  return flax.struct.dataclass(type(name, (ConfusionMatrix,), attrs))
