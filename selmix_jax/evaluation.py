"""Exact evaluation passes: padded, masked batches, each process over its share.

Every example of the evaluated split is counted exactly once, whatever the batch size, device
count and process count: the last batch is padded and carries `mask=False` rows that the
per-device step ignores; each process loads and evaluates only its slice of every batch
(streamed like training batches: `loader.Feed`, worker processes for decode-on-access sources);
confusion counts are `psum`'d across all devices inside the step, and the per-device feature sums
and predictions are combined on the host in a fixed global order (`evaluate`), so a multi-process
run computes exactly what one process computes over the same devices.

A split uploaded to the devices (`data.device.Resident`, the device-resident path) is evaluated
by one compiled program instead (`device_pass`): the same per-device step over the same padded
batches, looped on the device, with the same integer counts; only the counts, per-class feature
sums and predictions come back.
"""

import dataclasses
import functools
import hashlib
import json
import os
import time
from typing import Any, Callable

from absl import logging
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np

from selmix_jax import errors
from selmix_jax import metrics
from selmix_jax import steps
from selmix_jax import train_state
from selmix_jax.data import augment
from selmix_jax.data import device
from selmix_jax.data import loader
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
    head_mask = None if head_mask is None else tuple(bool(h) for h in head_mask)
    out = _summary(self.confusion.astype(np.float64), head_mask=head_mask)
    return {**jax.tree.map(np.asarray, out), "confusion": self.confusion}


# One compiled program for every summary (eagerly, its ~50 small ops compile one by one).
_summary = jax.jit(metrics.summary, static_argnames="head_mask")


def make_p_eval_step(model, *, num_classes: int, preprocess_fn: Callable[..., Any]):
  """The pmapped evaluation step (per-device body in `steps.eval_step`), feature sums per device.

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
          psum_features=False,
      ),
      axis_name="batch",
  )


_add = jax.jit(lambda a, b: jax.tree.map(jax.numpy.add, a, b))


def evaluate(
    p_eval_step,
    variables_repl,
    source,
    indices,
    *,
    batch_size: int,
    options: loader.Options | None = None,
    name: str = "",
    announce: bool = True,
) -> EvalResult:
  """Runs one exact pass over `source[indices]`, each process over its share of every batch.

  Counts stay on the devices until the pass ends: integer counts are psum'd over all devices
  of all processes by the step (exact); per-class feature sums are accumulated per device and
  added up on the host in float64 in global device order, and predictions are gathered from
  every process in example order, so every process gets the same result, and the same as a
  single-process run over the same devices.

  Args:
    p_eval_step: from `make_p_eval_step`.
    variables_repl: replicated `{'params', 'batch_stats'}` (leading device axis).
    source: a data source (see `selmix_jax.data.sources`).
    indices: `[N]` example indices into `source`.
    batch_size: global evaluation batch size (divisible by the number of devices).
    options: how batches are loaded (workers for a decode-on-access source, prefetch depth);
      None = `loader.Options()`.
    name: what is evaluated, for the progress log ('' logs nothing).
    announce: with a `name`, also log the end of the pass (progress is logged every 30 s).
  """
  layout = pipeline.Layout.local()
  index, mask = pipeline.eval_plan(indices, batch_size, layout)
  batches = pipeline.EvalBatches(source, index, mask, layout.num_devices)
  totals, preds, max_prob = None, [], []
  start = last_log = time.monotonic()
  with loader.Feed(batches, 0, len(batches), options=options, decodes=batches.decodes) as feed:
    for batch in feed:
      out = p_eval_step(variables_repl, batch)
      counts = {k: out[k] for k in ("confusion", "feature_sums", "class_counts")}
      totals = counts if totals is None else _add(totals, counts)
      preds.append(train_state.local_replicas(out["preds"]).reshape(-1))
      max_prob.append(train_state.local_replicas(out["max_prob"]).reshape(-1))
      if name and time.monotonic() - last_log > 30:
        last_log = time.monotonic()
        logging.info("Evaluating %s: batch %d/%d.", name, len(preds), len(batches))
  if totals is None:
    raise ValueError("Cannot evaluate an empty split.")
  # Per device [n_local, K, D] -> every device of every process, in global order.
  feature_sums = _gather_processes(
      train_state.local_replicas(totals["feature_sums"]).astype(np.float64)
  )
  in_order = lambda x: _gather_processes(np.stack(x)).transpose(1, 0, 2).reshape(-1)
  mask = in_order(mask)  # The plan's [num_batches, b] masks, already on the host.
  result = EvalResult(
      confusion=train_state.local_replicas(totals["confusion"])[0].astype(np.int64),
      feature_sums=feature_sums.reshape(-1, *feature_sums.shape[-2:]).sum(axis=0),
      class_counts=train_state.local_replicas(totals["class_counts"])[0].astype(np.int64),
      preds=in_order(preds)[mask],
      max_prob=in_order(max_prob)[mask],
  )
  if len(result.preds) != len(indices) or result.confusion.sum() != len(indices):
    raise RuntimeError(
        f"Evaluation counted {result.confusion.sum()} examples and {len(result.preds)} "
        f"predictions, expected {len(indices)}."
    )
  # The invalid-matrix rule of `metrics`: counts are checked here, before anything reports them.
  metrics.check_counts(result.confusion, where=f"Evaluation pass over {len(indices)} examples")
  if name and announce:
    logging.info(
        "Evaluated %s: %d examples in %.1f s.", name, len(indices), time.monotonic() - start
    )
  return result


def device_pass(
    variables,
    data: device.DeviceSplit,
    *,
    batch_size: int,
    num_devices: int,
    num_classes: int,
    preprocess_fn: Callable[..., Any],
    apply_fn: Callable[..., Any],
    axis_name: str = "batch",
) -> dict[str, jax.Array]:
  """Per-device body of an exact pass over a device-resident split (call it inside `pmap`).

  The batches are those of the host path (`pipeline.eval_plan`): global batch `t` holds
  examples `t * batch_size ...` in order, device `d` its `d`-th block of `batch_size /
  num_devices`, the last batch padded with masked rows; each goes through `steps.eval_step`
  inside one `lax.scan`.

  Args:
    variables: `{'params', 'batch_stats'}` (this device's replica).
    data: this device's copy of the split (`DeviceSplit` without the device axis).
    batch_size: global evaluation batch size (divisible by `num_devices`).
    num_devices: devices on `axis_name`.
    num_classes: K.
    preprocess_fn: `(uint8 images, keys) -> float32`; no keys are passed.
    apply_fn: `model.apply`.
    axis_name: the device axis.

  Returns:
    `confusion` `[K, K]` int32, `class_counts` `[K]` int32 and `feature_sums` `[K, D]` float32,
    all summed over the devices; `preds` `[T, b]` int32 and `max_prob` `[T, b]` of this
    device's rows of every batch.
  """
  n = data.images.shape[0]
  local = batch_size // num_devices
  first = jax.lax.axis_index(axis_name) * local + jnp.arange(local)

  def one(totals, t):
    position = t * batch_size + first
    take = jnp.minimum(position, n - 1)
    batch = {"images": data.images[take], "labels": data.labels[take], "mask": position < n}
    out = steps.eval_step(
        variables, batch, num_classes=num_classes, apply_fn=apply_fn,
        preprocess_fn=lambda images: preprocess_fn(images, None), axis_name=axis_name,
        psum_features=False,
    )
    totals = {k: totals[k] + out[k] for k in totals}
    return totals, {"preds": out["preds"], "max_prob": out["max_prob"]}

  k = num_classes
  dim = jax.eval_shape(
      lambda x: apply_fn(variables, x, train=False, method="features"),
      jax.ShapeDtypeStruct((1, *data.images.shape[1:]), jnp.float32),
  ).shape[-1]
  zeros = {
      "confusion": jnp.zeros((k, k), jnp.int32),
      "class_counts": jnp.zeros((k,), jnp.int32),
      "feature_sums": jnp.zeros((k, dim), jnp.float32),
  }
  totals, rows = jax.lax.scan(one, zeros, jnp.arange(-(-n // batch_size)))
  totals["feature_sums"] = jax.lax.psum(totals["feature_sums"], axis_name)
  return {**totals, **rows}


def device_result(out: dict[str, jax.Array], num_examples: int, *, name: str = "") -> EvalResult:
  """The `EvalResult` of a pmapped `device_pass`'s outputs (leading device axis), checked as
  `evaluate` checks its own."""
  first = lambda x: train_state.local_replicas(x)[0]
  in_order = lambda x: train_state.local_replicas(x).transpose(1, 0, 2).reshape(-1)[:num_examples]
  result = EvalResult(
      confusion=first(out["confusion"]).astype(np.int64),
      feature_sums=first(out["feature_sums"]).astype(np.float64),
      class_counts=first(out["class_counts"]).astype(np.int64),
      preds=in_order(out["preds"]),
      max_prob=in_order(out["max_prob"]),
  )
  if result.confusion.sum() != num_examples:
    raise RuntimeError(
        f"Evaluation on the device counted {result.confusion.sum()} examples, expected "
        f"{num_examples}."
    )
  metrics.check_counts(
      result.confusion, where=f"Evaluation pass {name} over {num_examples} examples".strip()
  )
  return result


def _gather_processes(x: np.ndarray) -> np.ndarray:
  """`[P, ...]`: this process's array stacked with every other process's (P = 1 alone)."""
  if jax.process_count() == 1:
    return x[None]
  return np.asarray(multihost_utils.process_allgather(x))


def evaluate_split(
    p_eval_step,
    variables_repl,
    split,
    *,
    batch_size: int,
    options: loader.Options | None = None,
    name: str = "",
    announce: bool = True,
) -> EvalResult:
  """`evaluate` over a `data.pipeline.Split` (its source and indices)."""
  return evaluate(
      p_eval_step, variables_repl, split.source, split.indices, batch_size=batch_size,
      options=options, name=name, announce=announce,
  )


class Evaluator:
  """Exact passes over the splits of one data set with one model (the loops' evaluator).

  `evaluator(state_repl, split)` evaluates a replicated TrainState (its EMA copy when
  `use_ema`) on a `data.Split` and returns the `EvalResult`; `evaluator.summary(result)` gives
  its metrics with the run's head/tail split (`head_mask`, default the first 90 % of classes).
  A pass that runs out of device memory raises `errors.OutOfMemoryError` naming
  `batch_size_field` (the config field of `batch_size`).
  """

  def __init__(
      self,
      model,
      datasets,
      *,
      batch_size: int,
      use_ema: bool = False,
      options: loader.Options | None = None,
      head_mask=None,
      batch_size_field: str = "config.eval_batch_size",
      resident: device.Resident | None = None,
  ):
    """Args (besides the model and `data.Datasets`):
    batch_size: global evaluation batch size.
    use_ema: evaluate a TrainState's EMA copy.
    options: how host batches are loaded.
    head_mask: the head/tail split of the summaries.
    batch_size_field: the config field of `batch_size` (named when a pass runs out of memory).
    resident: splits uploaded to the devices; a pass over one of them is one compiled program
      (`device_pass`), any other split takes the host path.
    """
    self.options = options
    self.batch_size_field = batch_size_field
    self.head_mask = head_mask
    preprocess = augment.make_preprocess("none", mean=datasets.mean, std=datasets.std)
    self.p_eval_step = make_p_eval_step(
        model, num_classes=datasets.num_classes, preprocess_fn=preprocess
    )
    self.batch_size = batch_size
    self.use_ema = use_ema
    self.resident = resident
    # The per-device pass over a device-resident split, for programs that embed it (SelMix's
    # refresh) and for `__call__` (`p_device_pass`).
    self.pass_body = functools.partial(
        device_pass, batch_size=batch_size, num_devices=jax.local_device_count(),
        num_classes=datasets.num_classes, preprocess_fn=preprocess, apply_fn=model.apply,
        axis_name="batch",
    )
    self.p_device_pass = jax.pmap(self.pass_body, axis_name="batch")

  def summary(self, result: EvalResult) -> dict[str, Any]:
    """Every SPEC §2 metric of `result`, with this run's head mask."""
    return result.summary(head_mask=self.head_mask)

  def __call__(self, state_repl, split, *, name: str = "", announce: bool = True) -> EvalResult:
    """Evaluates `split`; with a `name`, logs progress every 30 s and (if `announce`) the
    start and end of the pass."""
    if name and announce:
      logging.info("Evaluating %s (%d examples).", name, len(split))
    variables = state_repl.eval_variables(use_ema=self.use_ema)
    on_device = self.resident.get(split) if self.resident is not None else None
    with errors.out_of_memory("An evaluation pass", self.batch_size_field, self.batch_size):
      if on_device is None:
        return evaluate_split(
            self.p_eval_step, variables, split, batch_size=self.batch_size,
            options=self.options, name=name, announce=announce,
        )
      start = time.monotonic()
      result = device_result(self.p_device_pass(variables, on_device), len(split), name=name)
    if name and announce:
      logging.info(
          "Evaluated %s on the device: %d examples in %.2f s.", name, len(split),
          time.monotonic() - start,
      )
    return result


class EvalCache:
  """Evaluation passes of one starting checkpoint, stored beside it and shared by every run.

  Every fine-tuning run from a checkpoint starts with the same passes (the "before" validation
  and test metrics, the first refresh's validation counts and pseudo-labels). They are exact
  functions of the checkpoint step, the weights used (EMA or raw), the model and the data
  split, which form the key; a run finds them in `<checkpoint dir>.eval_cache/` and skips them.
  A directory that cannot be written (a read-only checkpoint) only disables the cache.
  """

  def __init__(self, checkpoint_dir: str, key: Any):
    digest = hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()
    self.directory = f"{os.path.abspath(checkpoint_dir).rstrip(os.sep)}.eval_cache"
    self.prefix = os.path.join(self.directory, digest[:16])

  def _path(self, split_name: str) -> str:
    return f"{self.prefix}-{split_name}.npz"

  def load(self, split_name: str) -> EvalResult | None:
    """The stored pass over `split_name`, or None (the same answer on every process)."""
    path = self._path(split_name)
    hit = os.path.exists(path)
    if jax.process_count() > 1:  # Every process must run the same passes (collectives).
      hit = bool(multihost_utils.broadcast_one_to_all(np.int32(hit)))
    if not hit:
      return None
    with np.load(path) as stored:
      result = EvalResult(**{f.name: stored[f.name] for f in dataclasses.fields(EvalResult)})
    logging.info("Evaluation of %s at the starting checkpoint read from %s.", split_name, path)
    return result

  def save(self, split_name: str, result: EvalResult) -> None:
    if jax.process_index() != 0:
      return
    try:
      os.makedirs(self.directory, exist_ok=True)
      tmp = f"{self._path(split_name)}.tmp{os.getpid()}.npz"
      np.savez(tmp, **dataclasses.asdict(result))
      os.replace(tmp, self._path(split_name))
    except OSError as e:
      logging.warning("Cannot cache evaluations in %s (%s); continuing without.", self.directory, e)

  def evaluate(self, evaluator: Evaluator, state_repl, split, split_name: str) -> EvalResult:
    """The stored pass over `split`, or a new one (then stored)."""
    result = self.load(split_name)
    if result is None:
      result = evaluator(state_repl, split, name=f"{split_name} (starting checkpoint)")
      self.save(split_name, result)
    return result
