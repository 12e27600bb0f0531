"""Orbax checkpoints of plain dicts of arrays, with automatic resume.

Checkpoints hold only nested dicts of NumPy arrays (no Flax classes), so a checkpoint loads in a
notebook with `orbax.checkpoint.CheckpointManager(path).restore(step)`. Orbax writes each step into
a temporary directory and renames it when complete, so a run killed mid-save leaves the previous
checkpoint intact; `latest_step` only ever sees finished ones.

Orbax refuses zero-size arrays (e.g. the empty multiplier vector of an objective without Lagrange
multipliers); such leaves are left out on save and taken from the restore template.

A damaged checkpoint never takes the older ones with it: `restore_latest` tries the newest step
and, when it cannot be read, moves it aside to `<directory>.damaged/` (never deleting it), warns
naming the step, and falls back to the previous one. A checkpoint written by another model or
config is a different matter: it raises `CheckpointMismatchError` before anything is read.
"""

import os
import shutil
import time
from typing import Any

from absl import logging
import jax
import numpy as np
import orbax.checkpoint as ocp

from selmix_jax import errors

PyTree = Any


class CheckpointMismatchError(errors.UserError, ValueError):
  """A checkpoint does not fit the model/config of this run (names the entry and shapes)."""


class CheckpointNotFoundError(errors.UserError, FileNotFoundError):
  """No checkpoint directory, or no finished checkpoint in it."""


class NonFiniteCheckpointError(errors.UserError, ValueError):
  """A checkpoint to start from holds NaN or inf (names the array)."""


# The ways out of a run directory whose checkpoints another run wrote: neither mixes two runs.
RESUME_ADVICE = (
    "Use a new --workdir, or pass --restart to delete the run in that workdir and start afresh."
)
# The way out of a starting checkpoint (`config.selmix.init_checkpoint`) of another model.
INIT_ADVICE = (
    "Point config.selmix.init_checkpoint at a checkpoint of this model and number of classes, "
    "or use the model config that wrote it."
)


def make_manager(directory: str, *, max_to_keep: int = 2) -> ocp.CheckpointManager:
  """A manager over `directory` (created if missing) that keeps the newest `max_to_keep` steps.

  It reads item metadata (shapes) of existing steps, so a restore can check them first.
  """
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
  return ocp.CheckpointManager(
      os.path.abspath(directory), options=options, item_handlers=ocp.StandardCheckpointHandler()
  )


def _to_numpy(tree: PyTree) -> PyTree:
  """Host arrays; a `jax.ShapeDtypeStruct` (an `eval_shape` template) becomes an empty array of
  its shape, which is all a compatibility check reads."""

  def host(x):
    if isinstance(x, jax.ShapeDtypeStruct):
      return np.empty(x.shape, x.dtype)
    return np.asarray(jax.device_get(x))

  return jax.tree.map(host, tree)


def _drop_empty(tree: PyTree) -> PyTree:
  if isinstance(tree, dict):
    out = {k: _drop_empty(v) for k, v in tree.items()}
    return {k: v for k, v in out.items() if v is not None}
  return None if np.size(tree) == 0 else tree


def _fill_empty(restored: PyTree, template: PyTree) -> PyTree:
  if isinstance(template, dict):
    return {k: _fill_empty(restored.get(k) if restored else None, v) for k, v in template.items()}
  return template if np.size(template) == 0 else restored


def save(manager: ocp.CheckpointManager, step: int, tree: PyTree, *, force: bool = False) -> None:
  """Saves `tree` (nested dict of arrays) at `step`; asynchronous, atomic on completion."""
  tree = _drop_empty(_to_numpy(tree))
  manager.save(int(step), args=ocp.args.StandardSave(tree), force=force)


def restore(manager: ocp.CheckpointManager, template: PyTree, step: int | None = None) -> PyTree:
  """Restores `step` (default: latest) into the structure of `template`.

  Raises:
    CheckpointNotFoundError: (a FileNotFoundError) there is no finished checkpoint.
    CheckpointMismatchError: the checkpoint does not match `template` (names the first
      mismatching entry).
  """
  step = manager.latest_step() if step is None else step
  if step is None:
    raise CheckpointNotFoundError(f"No finished checkpoint in {manager.directory}.")
  template = _to_numpy(template)
  stored = manager.item_metadata(step)
  _check_compatible(
      stored, _drop_empty(template), where=f"{manager.directory}/{step}", advice=RESUME_ADVICE
  )
  restored = manager.restore(step, args=ocp.args.StandardRestore(_drop_empty(template)))
  return _fill_empty(restored, template)


def restore_latest(manager: ocp.CheckpointManager, template: PyTree) -> tuple[PyTree, int | None]:
  """The newest readable checkpoint restored into `template`, and its step (None if none).

  A step that cannot be read (truncated or missing files) is moved aside to
  `<directory>.damaged/<step>` with a warning, and the previous step is tried.

  Raises:
    CheckpointMismatchError: the newest checkpoint belongs to another model/config.
  """
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      return restore(manager, template, step), step
    except CheckpointMismatchError:
      raise
    except Exception as e:  # pylint: disable=broad-except  (Orbax/TensorStore raise many kinds)
      moved = _move_aside(manager.directory, step)
      logging.warning(
          "Checkpoint step %d in %s cannot be read (%s: %s); moved it to %s and trying the "
          "previous step.", step, manager.directory, type(e).__name__, str(e).splitlines()[0][:200],
          moved,
      )
      manager.reload()
  return template, None


def _move_aside(directory, step: int) -> str:
  target_dir = f"{os.fspath(directory).rstrip(os.sep)}.damaged"
  os.makedirs(target_dir, exist_ok=True)
  target = os.path.join(target_dir, f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
  shutil.move(os.path.join(os.fspath(directory), str(step)), target)
  return target


def _metadata_leaves(meta: PyTree) -> dict[str, tuple[int, ...]]:
  """Flattens checkpoint metadata or a template to {'a/b/c': shape}."""
  out = {}

  def visit(node, prefix):
    if isinstance(node, dict) or (hasattr(node, "items") and not hasattr(node, "shape")):
      for k, v in node.items():
        visit(v, f"{prefix}/{k}" if prefix else str(k))
    else:
      out[prefix] = tuple(getattr(node, "shape", ()) or ())

  visit(meta, "")
  return out


def _check_compatible(stored_meta: PyTree, template: PyTree, *, where: str, advice: str) -> None:
  if stored_meta is None:
    return
  if hasattr(stored_meta, "tree"):
    stored_meta = stored_meta.tree
  stored = _metadata_leaves(stored_meta)
  wanted = _metadata_leaves(template)
  missing = sorted(set(wanted) - set(stored))
  if missing:
    raise CheckpointMismatchError(
        f"Checkpoint {where} does not match this run: it has no entry {missing[0]!r} "
        f"({len(missing)} missing). Was it written by a different model or config? {advice}"
    )
  for name, shape in wanted.items():
    if stored[name] != shape:
      raise CheckpointMismatchError(
          f"Checkpoint {where} does not match this run: {name!r} has shape {stored[name]} "
          f"in the checkpoint but {shape} in the model built from the config (different "
          f"model, width or number of classes?). {advice}"
      )


def check_compatible(
    tree: PyTree, template: PyTree, *, where: str, advice: str = INIT_ADVICE
) -> None:
  """Raises a ValueError naming the first entry of `template` that `tree` lacks or shapes
  differently (e.g. a checkpoint of another model or class count), then `advice`."""
  _check_compatible(tree, _drop_empty(_to_numpy(template)), where=where, advice=advice)


def non_finite_entries(tree: PyTree, prefix: str = "") -> list[str]:
  """Paths (`'params/head/kernel'`) of the float arrays of a nested dict holding NaN or inf."""
  if isinstance(tree, dict):
    return [
        path
        for key, value in tree.items()
        for path in non_finite_entries(value, f"{prefix}/{key}" if prefix else str(key))
    ]
  if tree is None:
    return []
  array = np.asarray(tree)
  if np.issubdtype(array.dtype, np.inexact) and not np.isfinite(array).all():
    return [prefix]
  return []


def load_pretrained(directory: str) -> tuple[PyTree, int]:
  """Reads the latest checkpoint of a (pre-training) run as a nested dict of NumPy arrays.

  Args:
    directory: the run's checkpoint directory (`<workdir>/checkpoints`).

  Returns:
    `(tree, step)`; check it against the model with `check_compatible`.

  Raises:
    CheckpointNotFoundError: (a FileNotFoundError) no such directory, or no finished
      checkpoint in it.
  """
  if not os.path.isdir(directory):
    raise CheckpointNotFoundError(
        f"Pre-training checkpoint directory {directory!r} does not exist: set "
        "config.selmix.init_checkpoint to the `checkpoints` folder of a finished pre-training run."
    )
  manager = ocp.CheckpointManager(os.path.abspath(directory))
  step = manager.latest_step()
  if step is None:
    manager.close()
    raise CheckpointNotFoundError(
        f"No finished checkpoint in {directory!r} (is pre-training done?)."
    )
  restored = manager.restore(step, args=ocp.args.StandardRestore())
  manager.close()
  logging.info("Loaded checkpoint %s at step %d.", directory, step)
  return restored, step
