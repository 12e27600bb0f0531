"""What a workdir knows about the runs in it: who holds it, and whether its run has finished.

- `create(workdir)`: makes the workdir, or says why it cannot be used (a file, not writable).
- `lock(workdir)`: one run per workdir. A second run on it fails at once, naming the PID and
  host that hold it; a lock left by a dead process on this host (a killed run) is taken over with
  a warning. In a multi-process run, process 0 holds the lock for all of them.
- `finished(workdir, config)` / `mark_finished(...)`: a run that ended writes `run.json` (its
  config, result and results table); the same command run again gets the stored result back
  without compiling or evaluating anything, and another config on that workdir is refused with the
  first differing field.
- `StageClock`: a stage's wall time across restarts (what a preempted and resumed stage reports).
"""

import contextlib
import json
import os
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


class WorkdirError(errors.UserError):
  """The workdir cannot be used: a file, not writable, in use, or holding another config's run."""


class WorkdirInUseError(WorkdirError, RuntimeError):
  """Another live run holds the workdir."""


class WorkdirMismatchError(WorkdirError, ValueError):
  """The workdir holds a finished run of another config."""


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
          f"(since {started}). Wait for that run, or use another --workdir; if that process is "
          f"gone, remove {path}."
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

  Raises:
    WorkdirMismatchError: (a ValueError) the workdir holds a finished run of another config
      (names the first field that differs).
  """
  stored = _read(os.path.join(workdir, DONE_FILE))
  if stored is None:
    return None
  now = reporting.to_python(config_dict)
  difference = _first_difference(stored.get("config"), now, "config")
  if difference is not None:
    field, there, here = difference
    raise WorkdirMismatchError(
        f"Workdir {workdir} holds a finished run of another config: {field} is {there!r} there "
        f"and {here!r} here. Use another --workdir (or remove {workdir}/{DONE_FILE} to run in "
        "this one again)."
    )
  return stored


def mark_finished(workdir: str, config_dict: dict[str, Any], result: Any, text: str) -> None:
  """Process 0 writes `run.json`: the run's config, result and results table."""
  reporting.save_json(workdir, DONE_FILE, {"config": config_dict, "result": result, "text": text})


def _first_difference(a: Any, b: Any, prefix: str):
  if isinstance(a, dict) and isinstance(b, dict):
    for key in sorted(set(a) | set(b)):
      found = _first_difference(a.get(key), b.get(key), f"{prefix}.{key}")
      if found is not None:
        return found
    return None
  return None if a == b else (prefix, a, b)
