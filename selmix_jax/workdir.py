"""What a workdir knows about the runs in it: who holds it, what its checkpoints belong to, and
whether its run has finished.

- `create(workdir)`: makes the workdir, or says why it cannot be used (a file, not writable).
- `lock(workdir)`: one run per workdir. A second run on it fails at once, naming the PID and
  host that hold it; a lock left by a dead process on this host (a killed run) is taken over with
  a warning. In a multi-process run, process 0 holds the lock for all of them.
- `fingerprint(stage, config, datasets)` / `check_stage(stage_dir, fingerprint)`: each stage's
  checkpoints carry a fingerprint of what determines them (every config field that changes the
  numbers, the data: split sizes, class names and counts, a digest of labels, indices and sample
  pixels, and for fine-tuning the starting weights), written to `<stage dir>/fingerprint.json`
  before its first checkpoint. Resuming with another fingerprint raises `WorkdirMismatchError`
  naming the first difference (old and new value) before any checkpoint is read. Checkpoints
  from before fingerprints resume with a warning.
- `finished(workdir, config)` / `mark_finished(...)`: a run that ended writes `run.json` (its
  config, result and results table); the same command run again gets the stored result back
  without compiling or evaluating anything, and another config on that workdir is refused with the
  first differing field.
- `clear(workdir)`: what `--restart` does: deletes the files this project writes in a workdir
  (a run's checkpoints, summaries, tables, plots and TensorBoard files) and nothing else.
- `StageClock`: a stage's wall time across restarts (what a preempted and resumed stage reports).

Every refusal offers only ways out that cannot mix two runs: a new `--workdir`, or `--restart`.
"""

import contextlib
import glob
import hashlib
import json
import os
import shutil
import socket
import time
from typing import Any

from absl import logging
import jax
from jax.experimental import multihost_utils
import numpy as np

from selmix_jax import errors
from selmix_jax import reporting

LOCK_FILE = ".lock"
DONE_FILE = "run.json"
WALL_TIME_FILE = "wall_time.json"
FINGERPRINT_FILE = "fingerprint.json"

# The one list of config fields that do not change a run's numbers. Only logging, evaluation and
# checkpoint cadence (evaluations and checkpoints read the state, never change it; a resumed run
# is bit-identical to an uninterrupted one) and the input pipeline's parallelism (batches are
# functions of (seed, step) whatever loads them). A finished run (`run.json`) and a stage's
# fingerprint both ignore them; every other field counts.
CADENCE_FIELDS = (
    "pretrain.log_every", "pretrain.eval_every", "pretrain.checkpoint_every",
    "selmix.log_every", "selmix.eval_every", "selmix.checkpoint_every",
    "data.num_workers", "data.prefetch",
)  # fmt: skip
# Paths: a stage's fingerprint holds what they lead to instead (the data's digest, the starting
# weights'), so moved data or checkpoints still resume; `run.json` compares them as written.
PATH_FIELDS = (
    "data.root", "data.path", "data.data_dir", "data.cache_dir", "selmix.init_checkpoint",
)  # fmt: skip
# Config sections a stage does not read for what it checkpoints. Pre-training: not the
# fine-tuning fields, the objective (its head_mask only labels reports) or the evaluation batch
# size (its evaluations feed nothing back); fine-tuning: not the pre-training fields (the
# starting weights are fingerprinted instead). `mode` only picks the stages.
STAGE_IGNORES = {
    "pretrain": ("mode", "selmix", "objective", "eval_batch_size"),
    "selmix": ("mode", "pretrain"),
}
_SAMPLE_IMAGES = 32  # Images per split whose pixels enter the data digest.


class WorkdirError(errors.UserError):
  """The workdir cannot be used: a file, not writable, in use, or holding another config's run."""


class WorkdirInUseError(WorkdirError, RuntimeError):
  """Another live run holds the workdir."""


class WorkdirMismatchError(WorkdirError, ValueError):
  """The workdir holds another run: a finished one of another config, or a stage's checkpoints
  of another config, data set or start (`check_stage`). The message names the first difference,
  its value there and here, and the two ways out that cannot mix two runs (`advice`)."""


def create(workdir: str) -> None:
  """Makes `workdir` (and its parents) if needed.

  Raises:
    WorkdirError: `workdir` (or a folder above it) is a file, or it cannot be created or
      written by this user; the message says which.
  """
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise WorkdirError(
        f"Workdir {workdir} is a file, not a directory: use another --workdir (a directory, "
        "or a path that does not exist yet)."
    )
  try:
    os.makedirs(workdir, exist_ok=True)
  except (FileExistsError, NotADirectoryError) as e:
    raise WorkdirError(
        f"Workdir {workdir} cannot be created: {_first_file_above(workdir)} is a file, not a "
        "directory. Use another --workdir."
    ) from e
  except OSError as e:
    raise WorkdirError(
        f"Workdir {workdir} cannot be created ({e.strerror}: {e.filename}): use a --workdir "
        f"this user (uid {os.getuid()}) can write."
    ) from e
  if not os.access(workdir, os.W_OK | os.X_OK):
    raise WorkdirError(
        f"Workdir {workdir} is not writable by this user (uid {os.getuid()}): make it "
        "writable, or use another --workdir."
    )


def _first_file_above(path: str) -> str:
  """The nearest existing folder above (or at) `path` that is not a directory."""
  path = os.path.abspath(path)
  while not os.path.exists(path):
    path = os.path.dirname(path)
  return path


def advice(workdir: str) -> str:
  """The ways out of a workdir holding another run; neither can mix two runs' results."""
  return (
      f"Use a new --workdir, or pass --restart to delete the run in {workdir} (its "
      "checkpoints, summaries and tables) and start this one afresh."
  )


@contextlib.contextmanager
def lock(workdir: str):
  """Holds `<workdir>/.lock` for the duration of the block (process 0 for all processes)."""
  path = os.path.join(workdir, LOCK_FILE)
  error = _acquire(path, workdir) if jax.process_index() == 0 else None
  if jax.process_count() > 1:
    failed = int(multihost_utils.broadcast_one_to_all(np.int32(error is not None)))
    if failed and error is None:
      error = f"Process 0 could not lock {workdir} (see its log)."
  if error is not None:
    raise WorkdirInUseError(error)
  try:
    yield
  finally:
    if jax.process_index() == 0:
      with contextlib.suppress(FileNotFoundError):
        os.remove(path)


def _acquire(path: str, workdir: str) -> str | None:
  """Creates the lock file; returns None on success, else the error message."""
  me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
  for _ in range(3):
    try:
      fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      holder = _read(path)
      if holder is None:
        continue  # Released (or half-written) meanwhile: try again.
      if holder.get("host") == me["host"] and not _alive(int(holder.get("pid", -1))):
        stale = f"{path}.stale-{holder.get('pid')}"
        try:
          os.rename(path, stale)  # Atomic: of two runs taking over, one wins.
        except FileNotFoundError:
          continue
        logging.warning(
            "Workdir %s was locked by PID %s, which is no longer running (a killed run); "
            "taking it over (the old lock is kept as %s).", workdir, holder.get("pid"), stale,
        )
        continue
      started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
      return (
          f"Workdir {workdir} is in use by PID {holder.get('pid')} on host {holder.get('host')} "
          f"(since {started}). Wait for that run, or use a new --workdir. Only if that process no "
          f"longer runs (its host died), remove {path}: the same command then resumes its run."
      )
    with os.fdopen(fd, "w", encoding="utf-8") as f:
      json.dump(me, f)
    return None
  return f"Could not lock workdir {workdir} ({path} keeps changing)."


class StageClock:
  """The wall time of a stage, across the processes that worked on it.

  Each checkpoint records the seconds the stage had run when it was written
  (`<stage dir>/wall_time.json`, `{step: seconds}`, process 0). A stage resumed from step S starts
  from what was recorded for S, so `elapsed()` at the end counts every process that brought the
  stage there, start-ups included (the steps a killed process made after its last checkpoint are
  lost work and not counted).
  """

  def __init__(self, stage_dir: str, resumed_at: int | None, started: float):
    """`started`: `time.time()` when this process began the stage."""
    self._path = os.path.join(stage_dir, WALL_TIME_FILE)
    self._started = started
    # `{step: seconds}` of this stage's checkpoints so far (a fresh stage starts a new record).
    self._recorded = (_read(self._path) or {}) if resumed_at is not None else {}
    self.before = float(self._recorded.get(str(int(resumed_at or 0)), 0.0))

  def elapsed(self) -> float:
    """Seconds of the stage so far: before this process's restart, and since."""
    return self.before + time.time() - self._started

  def checkpointed(self, step: int) -> None:
    """Records the time at the checkpoint of `step` (call after saving it)."""
    if jax.process_index() != 0:
      return
    self._recorded[str(int(step))] = self.elapsed()
    reporting.write_json(self._path, self._recorded)


def _read(path: str) -> dict[str, Any] | None:
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (FileNotFoundError, json.JSONDecodeError):
    return None


def _alive(pid: int) -> bool:
  if pid <= 0:
    return False
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True  # It exists (another user's process).
  return True


def finished(workdir: str, config_dict: dict[str, Any]) -> dict[str, Any] | None:
  """The stored `{'config', 'result', 'text'}` of a finished run of this config, else None.

  Fields of `CADENCE_FIELDS` are not compared (they do not change the stored numbers).

  Raises:
    WorkdirMismatchError: (a ValueError) the workdir holds a finished run of another config
      (names the first field that differs).
  """
  stored = _read(os.path.join(workdir, DONE_FILE))
  if stored is None:
    return None
  there = _without(stored.get("config"), CADENCE_FIELDS)
  here = _without(_jsonable(config_dict), CADENCE_FIELDS)
  difference = _first_difference(there, here, "config")
  if difference is not None:
    field, there, here = difference
    raise WorkdirMismatchError(
        f"Workdir {workdir} holds a finished run of another config: {field} is {_short(there)} "
        f"there and {_short(here)} here. {advice(workdir)}"
    )
  return stored


def mark_finished(workdir: str, config_dict: dict[str, Any], result: Any, text: str) -> None:
  """Process 0 writes `run.json`: the run's config, result and results table."""
  reporting.save_json(workdir, DONE_FILE, {"config": config_dict, "result": result, "text": text})


def _first_difference(a: Any, b: Any, prefix: str, order=None):
  if isinstance(a, dict) and isinstance(b, dict):
    keys = set(a) | set(b)
    first = [k for k in (*(order or ()), "name") if k in keys]  # A section's name first.
    ordered = first + sorted(keys - set(first))
    for key in ordered:
      found = _first_difference(a.get(key), b.get(key), f"{prefix}.{key}")
      if found is not None:
        return found
    return None
  return None if a == b else (prefix, a, b)


# ------------------------------------------------------------------ stage fingerprints


def _jsonable(tree: Any) -> Any:
  """`tree` as it reads back from JSON (tuples become lists, NaN None), for comparisons."""
  return json.loads(json.dumps(reporting.to_python(tree), sort_keys=True))


def _without(tree: Any, fields) -> Any:
  """A copy of a nested dict without the dotted `fields` (`'selmix.log_every'`)."""
  if not isinstance(tree, dict):
    return tree
  out = dict(tree)
  for field in fields:
    head, _, rest = field.partition(".")
    if head not in out:
      continue
    if rest:
      out[head] = _without(out[head], [rest])
    else:
      del out[head]
  return out


def _short(value: Any) -> str:
  text = repr(value)
  return text if len(text) <= 80 else text[:77] + "..."


def tree_digest(tree: Any) -> str:
  """SHA-256 of a pytree's leaf paths, dtypes, shapes and bytes (host or device arrays)."""
  h = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    array = np.ascontiguousarray(jax.device_get(leaf))
    h.update(f"{jax.tree_util.keystr(path)}:{array.dtype}:{array.shape};".encode())
    h.update(array.tobytes())
  return h.hexdigest()


def _split_fingerprint(split, num_classes: int) -> dict[str, Any] | None:
  """Size, per-class counts and a digest of a split's labels, indices and sample pixels."""
  if split is None:
    return None
  indices = np.asarray(split.indices, np.int64)
  labels = np.asarray(split.labels, np.int32)
  h = hashlib.sha256(indices.tobytes())
  h.update(labels.tobytes())
  # Evenly spaced examples' pixels (every source kind reads them; a decode-on-access source
  # decodes only these), so the same indices into other images differ too.
  sample = indices[np.linspace(0, len(indices) - 1, min(len(indices), _SAMPLE_IMAGES)).astype(int)]
  if len(sample):
    h.update(np.ascontiguousarray(split.source.get_images(sample)).tobytes())
  return {
      "size": int(len(indices)),
      "class_counts": split.class_counts(num_classes).tolist(),
      "digest": h.hexdigest()[:32],
  }


def data_fingerprint(datasets) -> dict[str, Any]:
  """What a `pipeline.Datasets` holds: classes, image shape, normalisation, and per split
  (labeled, unlabeled, val, test) its size, class counts and a digest (`_split_fingerprint`)."""
  k = datasets.num_classes
  return {
      "class_names": list(datasets.class_names),
      "image_shape": list(datasets.image_shape),
      "mean": np.asarray(datasets.mean, np.float64).round(6).tolist(),
      "std": np.asarray(datasets.std, np.float64).round(6).tolist(),
      **{
          f"{name}_split": _split_fingerprint(getattr(datasets, name), k)
          for name in ("labeled", "unlabeled", "val", "test")
      },
  }


def fingerprint(stage: str, config, datasets, *, init: Any = None) -> dict[str, Any]:
  """What determines a stage's checkpoints (compared in `check_stage`).

  Args:
    stage: 'pretrain' or 'selmix'.
    config: the run's config (ConfigDict or dict): every field but `CADENCE_FIELDS`,
      `PATH_FIELDS` and the stage's `STAGE_IGNORES`.
    datasets: the run's `pipeline.Datasets` (`data_fingerprint`).
    init: fine-tuning: `(step, TrainState)` it starts from (the weights' `tree_digest`).
  """
  config_dict = config.to_dict() if hasattr(config, "to_dict") else dict(config)
  ignored = (*CADENCE_FIELDS, *PATH_FIELDS, *STAGE_IGNORES.get(stage, ()))
  out = {
      "stage": stage,
      "config": _without(_jsonable(config_dict), ignored),
      "data": _jsonable(data_fingerprint(datasets)),
  }
  if init is not None:
    step, tree = init
    out["init"] = {"step": int(step), "digest": tree_digest(tree)}
  return out


def _has_checkpoints(stage_dir: str) -> bool:
  directory = os.path.join(stage_dir, "checkpoints")
  return os.path.isdir(directory) and any(n.isdigit() for n in os.listdir(directory))


def check_stage(stage_dir: str, fp: dict[str, Any]) -> None:
  """Refuses a stage directory that holds another run; records `fp` there otherwise.

  Call at the start of a stage, before its checkpoints are read or written. A directory without
  `fingerprint.json` gets it (atomically, process 0); one whose checkpoints predate
  fingerprints resumes with a warning (they cannot be checked).

  Raises:
    WorkdirMismatchError: `<stage_dir>/fingerprint.json` differs from `fp`; the message names
      the first difference (its value there and here) and the ways out (`advice`).
  """
  path = os.path.join(stage_dir, FINGERPRINT_FILE)
  error = None
  if jax.process_index() == 0:
    stored = _read(path)
    if stored is None:
      if _has_checkpoints(stage_dir):
        logging.warning(
            "%s has checkpoints but no %s (written before selmix-jax fingerprinted its "
            "checkpoints): resuming them unchecked. If another config or data set wrote them, "
            "stop and %s", stage_dir, FINGERPRINT_FILE, advice(_run_dir(stage_dir)),
        )
      os.makedirs(stage_dir, exist_ok=True)
      reporting.write_json(path, fp)
    else:
      difference = _first_difference(
          stored, _jsonable(fp), "fingerprint", order=("stage", "config", "data", "init")
      )
      if difference is not None:
        field, there, here = difference
        field = field.removeprefix("fingerprint.")
        error = (
            f"Workdir {stage_dir} holds checkpoints of another run: {field} is {_short(there)} "
            f"there and {_short(here)} here. {advice(_run_dir(stage_dir))}"
        )
  if jax.process_count() > 1:
    failed = int(multihost_utils.broadcast_one_to_all(np.int32(error is not None)))
    if failed and error is None:
      error = f"Process 0 refused {stage_dir}: it holds checkpoints of another run (see its log)."
  if error is not None:
    raise WorkdirMismatchError(error)


def _run_dir(stage_dir: str) -> str:
  """The workdir `--restart` clears: the parent of a `pretrain`/`selmix` stage directory."""
  stage_dir = os.path.normpath(stage_dir)
  if os.path.basename(stage_dir) in _STAGE_DIRS:
    return os.path.dirname(stage_dir)
  return stage_dir


# ------------------------------------------------------------------------- --restart

# What this project writes in a workdir and in the directories it nests there (the `pretrain` and
# `selmix` stages, MiSLAS's `stage1`/`stage2`, a frozen-backbone run's `features` cache and `model`
# checkpoint): `clear` deletes these and nothing else.
_STAGE_DIRS = ("pretrain", "selmix")
_NESTED_DIRS = (*_STAGE_DIRS, "stage1", "stage2", "features", "model")
_OWN_DIRS = (
    "checkpoints", "checkpoints.damaged", "checkpoints.eval_cache", "selmix_history", "head_init",
)  # fmt: skip
_OWN_FILES = (
    DONE_FILE, "results.md", "summary.json", "before.json", WALL_TIME_FILE, FINGERPRINT_FILE,
    "recalls.png", "pair_probs.png", "refresh_curves.png", "val_recalls.png", "features.npz",
    "key.json",
)  # fmt: skip
_OWN_PATTERNS = ("events.out.tfevents.*", "*.json.tmp", f"{LOCK_FILE}.stale-*")


def clear(workdir: str) -> list[str]:
  """Deletes the run in `workdir` (process 0; hold `lock(workdir)`): what `--restart` does.

  Only files and folders this project writes are removed (`_OWN_*`, also inside the directories
  it nests in a workdir, `_NESTED_DIRS`, which go when left empty); anything else stays, and is
  logged.
  A symbolic link is removed, never what it points to.

  Returns:
    The removed paths (process 0; [] on the others).
  """
  removed = []
  if jax.process_index() == 0 and os.path.isdir(workdir):
    removed = _clear_dir(workdir, depth=2)
    kept = sorted(set(os.listdir(workdir)) - {LOCK_FILE})
    logging.info("--restart: removed %d entries of the earlier run in %s.", len(removed), workdir)
    if kept:
      logging.warning("--restart kept what selmix-jax did not write in %s: %s", workdir, kept)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("selmix_jax.workdir.clear")
  return removed


def _clear_dir(directory: str, *, depth: int) -> list[str]:
  removed = []
  names = set(_OWN_FILES) | set(_OWN_DIRS)
  for pattern in _OWN_PATTERNS:
    names |= {os.path.basename(p) for p in glob.glob(os.path.join(glob.escape(directory), pattern))}
  for name in sorted(names):
    path = os.path.join(directory, name)
    if os.path.islink(path) or os.path.isfile(path):
      os.unlink(path)
    elif os.path.isdir(path):
      shutil.rmtree(path)
    else:
      continue
    removed.append(path)
  if depth > 0:  # <workdir>/pretrain/stage1, <workdir>/selmix/features, ...
    for nested in _NESTED_DIRS:
      path = os.path.join(directory, nested)
      if os.path.isdir(path) and not os.path.islink(path):
        removed += _clear_dir(path, depth=depth - 1)
        if not os.listdir(path):
          os.rmdir(path)
          removed.append(path)
  return removed
