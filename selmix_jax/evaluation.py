"""Exact evaluation passes: padded, masked batches and psum'd confusion counts.

Every example of the evaluated split is counted exactly once, whatever the batch size and device
count: the last batch is padded and carries `mask=False` rows that the per-device step ignores,
and confusion counts and per-class feature sums are `psum`'d across devices inside the step.
"""

import dataclasses
import functools
from typing import Any, Callable

from absl import logging
import jax
import numpy as np

from selmix_jax import metrics
from selmix_jax import steps
from selmix_jax import train_state
from selmix_jax.data import augment
from selmix_jax.data import pipeline


@dataclasses.dataclass(frozen=True)
class EvalResult:
  """Counts of one pass over a split.

  Attributes:
    confusion: `[K, K]` int64 counts, rows = true class.
    feature_sums: `[K, D]` per-class sums of backbone features.
    class_counts: `[K]` examples per true class.
    preds: `[N]` predicted class of every example, in the order of the evaluated indices.
    max_prob: `[N]` confidence of that prediction.
  """

  confusion: np.ndarray
  feature_sums: np.ndarray
  class_counts: np.ndarray
  preds: np.ndarray
  max_prob: np.ndarray

  @property
  def prototypes(self) -> np.ndarray:
    """`[K, D]` class-mean features; zero for a class with no examples."""
    counts = np.maximum(self.class_counts, 1)[:, None]
    return self.feature_sums / counts

  def summary(self, *, head_mask=None) -> dict[str, Any]:
    """All SPEC §2 metrics of the confusion counts, plus the counts (`confusion`), as NumPy."""
    out = metrics.summary(self.confusion.astype(np.float64), head_mask=head_mask)
    return {**jax.tree.map(np.asarray, out), "confusion": self.confusion}


def make_p_eval_step(model, *, num_classes: int, preprocess_fn: Callable[..., Any]):
  """The pmapped evaluation step (per-device body in `steps.eval_step`).

  Args:
    model: the Flax model (its `apply` is bound).
    num_classes: K.
    preprocess_fn: `(uint8 images, keys) -> float32`; evaluation passes no keys.
  """
  return jax.pmap(
      functools.partial(
          steps.eval_step,
          num_classes=num_classes,
          preprocess_fn=lambda images: preprocess_fn(images, None),
          apply_fn=model.apply,
          axis_name="batch",
      ),
      axis_name="batch",
  )


def evaluate(p_eval_step, variables_repl, source, indices, *, batch_size: int) -> EvalResult:
  """Runs one exact pass over `source[indices]`.

  Args:
    p_eval_step: from `make_p_eval_step`.
    variables_repl: replicated `{'params', 'batch_stats'}` (leading device axis).
    source: a data source (see `selmix_jax.data.sources`).
    indices: `[N]` example indices into `source`.
    batch_size: global evaluation batch size (divisible by the local device count).
  """
  num = len(indices)
  preds = np.zeros((num,), np.int32)
  max_prob = np.zeros((num,), np.float32)
  totals = None
  position = 0
  for batch in pipeline.eval_batches(
      source, indices, batch_size, num_devices=jax.local_device_count()
  ):
    out = p_eval_step(variables_repl, batch)
    counts = train_state.unreplicate(
        {k: out[k] for k in ("confusion", "feature_sums", "class_counts")}
    )
    counts = jax.tree.map(lambda x: np.asarray(x, np.float64), counts)
    totals = counts if totals is None else jax.tree.map(np.add, totals, counts)
    mask = np.asarray(batch["mask"]).reshape(-1)
    valid = int(mask.sum())
    preds[position : position + valid] = np.asarray(out["preds"]).reshape(-1)[mask]
    max_prob[position : position + valid] = np.asarray(out["max_prob"]).reshape(-1)[mask]
    position += valid
  if position != num:
    raise RuntimeError(f"Evaluation saw {position} examples, expected {num}.")
  return EvalResult(
      confusion=totals["confusion"].astype(np.int64),
      feature_sums=totals["feature_sums"],
      class_counts=totals["class_counts"].astype(np.int64),
      preds=preds,
      max_prob=max_prob,
  )


def evaluate_split(p_eval_step, variables_repl, split, *, batch_size: int) -> EvalResult:
  """`evaluate` over a `data.pipeline.Split` (its source and indices)."""
  return evaluate(p_eval_step, variables_repl, split.source, split.indices, batch_size=batch_size)


class Evaluator:
  """Exact passes over the splits of one data set with one model (the loops' evaluator).

  `evaluator(state_repl, split)` evaluates a replicated TrainState (its EMA copy when
  `use_ema`) on a `data.Split` and returns the `EvalResult`.
  """

  def __init__(self, model, datasets, *, batch_size: int, use_ema: bool = False):
    self.p_eval_step = make_p_eval_step(
        model,
        num_classes=datasets.num_classes,
        preprocess_fn=augment.make_preprocess("none", mean=datasets.mean, std=datasets.std),
    )
    self.batch_size = batch_size
    self.use_ema = use_ema

  def __call__(self, state_repl, split, *, name: str = "") -> EvalResult:
    if name:
      logging.info("Evaluating %s (%d examples).", name, len(split))
    variables = state_repl.eval_variables(use_ema=self.use_ema)
    return evaluate_split(self.p_eval_step, variables, split, batch_size=self.batch_size)
