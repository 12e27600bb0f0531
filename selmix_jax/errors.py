"""One exception type for a user's mistake, and the one line the command line prints for it.

A `UserError` is something the person running selmix-jax can fix: a config value, a data folder,
a workdir, a checkpoint, a batch too large for the device. Its message is one line that names the
file or field, what was found there and what was expected. `launch/main.py` prints exactly that
line (`one_line`) and exits with status 2, without a traceback (`SELMIX_TRACEBACK=1` shows it).

Every module raises a subclass that is also the builtin exception it used to raise, so code
catching `ValueError` or `FileNotFoundError` keeps working:

- `train.ConfigError` (`ConfigValueError`, `ConfigPathError`): a config field, before compute.
- `DataError` (a `ValueError`) and `DataPathError` (a `FileNotFoundError`): the data set's files
  (an empty folder, an unreadable image, mixed image sizes, a class smaller than requested).
- `workdir.WorkdirError`: the workdir is a file, not writable, in use, or holds another run.
- `checkpointing.CheckpointMismatchError`, `checkpointing.CheckpointNotFoundError`: a checkpoint
  of another model, or none finished.
- `OutOfMemoryError`: the device ran out of memory in a step or an evaluation pass; names the
  batch-size field to lower (`out_of_memory`).

Imports only jax (for its runtime error type), like the numerical core.
"""

import contextlib

import jax

ENV_TRACEBACK = "SELMIX_TRACEBACK"


class UserError(Exception):
  """A mistake in what the user gave (config, data, workdir, checkpoint); the message is one line
  naming the file or field, what was found and what was expected."""

  prefix = ""  # What `one_line` puts before the message, e.g. "Invalid config: ".


class DataError(UserError, ValueError):
  """The data set's files cannot give what the config asks for (names the file or field)."""


class DataPathError(UserError, FileNotFoundError):
  """A data folder or split folder that does not exist."""


class OutOfMemoryError(UserError, MemoryError):
  """A step or evaluation pass did not fit in device memory (names the batch size to lower)."""


def one_line(error: BaseException) -> str:
  """`error`'s message as the one line the command line prints (prefix included)."""
  text = " ".join(part.strip() for part in str(error).splitlines() if part.strip())
  return f"{getattr(error, 'prefix', '')}{text}"


def is_out_of_memory(error: BaseException) -> bool:
  """Whether `error` is XLA's out-of-memory error (`RESOURCE_EXHAUSTED`)."""
  return isinstance(error, jax.errors.JaxRuntimeError) and (
      "RESOURCE_EXHAUSTED" in str(error) or "out of memory" in str(error).lower()
  )


@contextlib.contextmanager
def out_of_memory(what: str, field: str, value: int):
  """Re-raises an out-of-memory error of the block as an `OutOfMemoryError` naming `field`.

  Args:
    what: what ran out of memory, e.g. "An evaluation pass".
    field: the config field that sets the batch size, e.g. "config.eval_batch_size".
    value: its value in this run.
  """
  try:
    yield
  except jax.errors.JaxRuntimeError as e:
    if not is_out_of_memory(e):
      raise
    devices = jax.device_count()
    raise OutOfMemoryError(
        f"{what} ran out of device memory with {field}={value} ({value // max(devices, 1)} "
        f"examples per device on {devices} device(s)): lower {field} (keeping it a multiple of "
        f"{devices}). XLA said: {str(e).splitlines()[0][:200]}"
    ) from e
