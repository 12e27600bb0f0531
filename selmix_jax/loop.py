"""The loop skeleton that pre-training and fine-tuning share, and what it reports.

Both stages are the same loop: for each step, run the `before_step` actions that are due (SelMix's
refresh), run the step, then the `after_step` actions that are due (log, evaluate, checkpoint).
Actions are `Periodic(every, fn)` — the shape of clu's `periodic_actions`, which cannot be used
here because importing it imports TensorFlow (through `clu.metric_writers`), and a training run
must work without TensorFlow installed. An action returns `STOP` to end the loop early (SelMix's
early stop); actions marked `at_end` also run once after the last step, early stop or not, so the
final checkpoint is always written.

`Writer` sends scalars to TensorBoard event files (with tensorboardX, which needs no TensorFlow)
and to the log; `Progress` logs steps/s and ETA of *completed* steps: it blocks on the step's
outputs before it reads the clock, so the rate is right from the first report (the host otherwise
runs ahead of the device and reports how fast it enqueues work).

`DivergenceGuard` is the rule against silent wrong answers: the stages call it at every log step
and before every checkpoint, and it raises `Diverged` when the training loss or any array of the
train state is no longer finite. A non-finite state is therefore never checkpointed (the last
good checkpoint stays the newest one) and the stage never reaches its summary.

Progress shows at INFO, which absl prints only under `absl.app.run` (`launch/main.py`). A script
with its own `main` calls `show_progress()` first to see the same lines on stderr.
"""

import dataclasses
import logging as std_logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from absl import logging
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np

STOP = "stop"


class Preempted(Exception):
  """The run was asked to stop (SIGTERM/SIGINT); a checkpoint at `step` holds its work."""

  def __init__(self, step: int, signum: int):
    self.step, self.signum = step, signum
    super().__init__(
        f"Stopped by {signal.Signals(signum).name} after step {step}; a checkpoint at step "
        f"{step} holds the work. Run the same command again to resume."
    )


class Preemption:
  """Turns SIGTERM (the preemption signal of cloud TPUs/GPUs) and SIGINT into a request to stop
  at the next step boundary, after a checkpoint.

  One process: Python handlers set a flag that `reached(step)` reads. Several processes: every
  process must stop after the same step, so `reached` asks JAX's preemption sync service
  (`multihost_utils.reached_preemption_sync_point`), which listens for SIGTERM itself; SIGINT is
  forwarded to it as SIGTERM.
  """

  def __init__(self):
    self.signum = None
    self._previous = {}
    self._multi = jax.process_count() > 1

  def __enter__(self):
    if threading.current_thread() is not threading.main_thread():
      return self  # Signal handlers can only be installed from the main thread.
    signums = (signal.SIGINT,) if self._multi else (signal.SIGTERM, signal.SIGINT)
    for signum in signums:
      self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def __exit__(self, *exc):
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    self._previous.clear()

  def _handle(self, signum, frame):
    del frame
    if self._multi:
      os.kill(os.getpid(), signal.SIGTERM)  # JAX's preemption service handles SIGTERM.
      self.signum = signal.SIGTERM
      return
    if self.signum is None:
      logging.warning(
          "Received %s: stopping after the current step with a checkpoint.",
          signal.Signals(signum).name,
      )
    self.signum = signum

  def reached(self, step: int) -> bool:
    """Whether to stop after `step` (the same answer on every process)."""
    if not self._multi:
      return self.signum is not None
    try:
      reached = multihost_utils.reached_preemption_sync_point(step)
    except RuntimeError:  # The preemption service is off (jax_enable_preemption_service).
      return False
    if reached and self.signum is None:
      self.signum = signal.SIGTERM
    return reached


class Diverged(Exception):
  """Training stopped being finite at `step`; checkpoints up to `last_good_step` are kept."""

  def __init__(
      self,
      *,
      stage: str,
      step: int,
      what: str,
      learning_rate: float,
      lr_field: str,
      checkpoint_dir: str,
      last_good_step: int | None,
  ):
    self.stage, self.step, self.last_good_step = stage, step, last_good_step
    if last_good_step is None:
      kept = f"No checkpoint had been written to {checkpoint_dir}."
    else:
      kept = (
          f"The last good checkpoint, step {last_good_step} in {checkpoint_dir}, is kept "
          "(a run on this workdir resumes from it)."
      )
    super().__init__(
        f"{stage} diverged at step {step}: {what} (learning rate {learning_rate:.4g} at that "
        f"step; {lr_field}). Nothing non-finite was saved and no summary was written. {kept} "
        f"Lower {lr_field.split('=')[0]} and run again."
    )


@jax.jit
def _finite(leaves: list[jax.Array]) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def _first_replica(x: Any) -> Any:
  """This process's first slice of a pmap-replicated array (no collective); else `x`."""
  if isinstance(x, jax.Array) and len(x.sharding.device_set) > 1:
    first = lambda shard: (shard.index[0].start or 0) if shard.index else 0
    return min(x.addressable_shards, key=first).data
  return x


def all_finite(tree: Any) -> bool:
  """Whether every float array of `tree` is finite (one jitted reduction on one device).

  Device replicas (a leading device axis, as `pmap` gives) are read from this process's
  first local replica only: the replicas are identical, and reading other processes' shards
  would be a collective.
  """
  leaves = [
      _first_replica(x)
      for x in jax.tree.leaves(tree)
      if jnp.issubdtype(jnp.result_type(x), jnp.inexact)
  ]
  return not leaves or bool(_finite(leaves))


class DivergenceGuard:
  """Raises `Diverged` when the training loss or the train state is no longer finite.

  Call it at every log step and before every checkpoint (and before anything else reads the
  model, e.g. SelMix's refresh), with the replicated train state and the last step's replicated
  metrics; its `loss` entry is checked. Costs one jitted `isfinite` reduction over one replica.
  """

  def __init__(self, stage: str, *, schedule: Callable[[int], Any], lr_field: str, manager):
    """Args:
    stage: the stage's name in the message ('Pre-training', 'SelMix fine-tuning').
    schedule: the optax learning-rate schedule (the message gives its value at the step).
    lr_field: the config field that sets it, with its value
      (e.g. `config.pretrain.learning_rate=0.1`).
    manager: the stage's checkpoint manager (the message names its newest step).
    """
    self.stage, self.schedule, self.lr_field, self.manager = stage, schedule, lr_field, manager

  def __call__(self, step: int, state_repl: Any, metrics_repl: Any = None) -> None:
    loss = None
    if metrics_repl is not None and "loss" in metrics_repl:
      loss = float(np.asarray(_first_replica(metrics_repl["loss"])).reshape(-1)[0])
    if loss is not None and not np.isfinite(loss):
      self.fail(step, f"the training loss is {loss}")
    if not all_finite(state_repl):
      at_loss = "" if loss is None else f", at training loss {loss:.4g}"
      self.fail(step, f"the train state holds NaN or inf values{at_loss}")

  def fail(self, step: int, what: str) -> None:
    """Raises `Diverged` for `step` with the reason `what`."""
    self.manager.wait_until_finished()  # An in-flight save of an earlier (finite) step counts.
    raise Diverged(
        stage=self.stage,
        step=step,
        what=what,
        learning_rate=float(self.schedule(max(step - 1, 0))),
        lr_field=self.lr_field,
        checkpoint_dir=str(self.manager.directory),
        last_good_step=self.manager.latest_step(),
    )


@dataclasses.dataclass(frozen=True)
class Periodic:
  """`fn(step)` every `every` steps (and once after the last step if `at_end`).

  Attributes:
    every: period in steps (an action with `every <= 0` never runs periodically).
    fn: `fn(step)`; may return `STOP` to end the loop (before-step actions only).
    at_end: also run after the last step of the loop (early stop included), once.
  """

  every: int
  fn: Callable[[int], Any]
  at_end: bool = False

  def due(self, step: int) -> bool:
    return self.every > 0 and step % self.every == 0


class Writer:
  """Scalars to TensorBoard (process 0 writes the event files) and to the log."""

  def __init__(self, logdir: str, *, write_files: bool | None = None):
    self.write_files = jax.process_index() == 0 if write_files is None else write_files
    self._tb = None
    if self.write_files:
      import tensorboardX  # pylint: disable=g-import-not-at-top  (only the writing process)

      self._tb = tensorboardX.SummaryWriter(logdir, flush_secs=30)

  def scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    """Writes the scalar (0-d) entries of `scalars` at `step`; other entries are skipped."""
    flat = {k: float(v) for k, v in scalars.items() if np.ndim(v) == 0}
    if not flat or jax.process_index() != 0:
      return
    logging.info("[%d] %s", step, ", ".join(f"{k}={v:.6g}" for k, v in flat.items()))
    if self._tb is not None:
      for name, value in flat.items():
        self._tb.add_scalar(name, value, global_step=step)

  def text(self, name: str, text: str, step: int = 0) -> None:
    if self._tb is not None:
      self._tb.add_text(name, text, global_step=step)

  def close(self) -> None:
    if self._tb is not None:
      self._tb.flush()
      self._tb.close()
      self._tb = None


class Progress:
  """Logs (and writes) steps/s and ETA every `every_secs`, from completed steps only.

  The first call blocks on its step's outputs and starts the clock there, so compilation is not
  counted; every report blocks on the outputs of the step it reports.
  """

  def __init__(self, num_steps: int, writer: Writer | None = None, *, every_secs: float = 30.0):
    self.num_steps = num_steps
    self.writer = writer
    self.every_secs = every_secs
    self._t0 = self._step0 = None
    self._last_report = None

  def __call__(self, step: int, outputs: Any = None) -> None:
    """Call after step `step` (1-based count of completed steps) with that step's outputs."""
    now = time.monotonic()
    if self._t0 is None:
      jax.block_until_ready(outputs)
      self._t0, self._step0, self._last_report = time.monotonic(), step, time.monotonic()
      return
    if now - self._last_report < self.every_secs and step < self.num_steps:
      return
    jax.block_until_ready(outputs)
    now = time.monotonic()
    self._last_report = now
    rate = (step - self._step0) / max(now - self._t0, 1e-9)
    eta = (self.num_steps - step) / rate if rate > 0 else float("inf")
    logging.info(
        "Step %d/%d: %.3g steps/s, ETA %s.", step, self.num_steps, rate, _duration(eta)
    )
    if self.writer is not None:
      self.writer.scalars(step, {"steps_per_sec": rate})


def _duration(seconds: float) -> str:
  if not np.isfinite(seconds):
    return "unknown"
  seconds = int(round(seconds))
  hours, rest = divmod(seconds, 3600)
  minutes, secs = divmod(rest, 60)
  return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def _not_orbax_info(record: std_logging.LogRecord) -> bool:
  """Drops Orbax's per-save INFO chatter; its warnings and errors still show."""
  return record.levelno >= std_logging.WARNING or f"{os.sep}orbax{os.sep}" not in record.pathname


def show_progress(stream=None) -> None:
  """Shows INFO logs (stage progress: compiling, steps/s, ETA, refreshes) in a script that does
  not run under `absl.app.run`, which is what otherwise sets absl to INFO and adds its handler.

  Sets absl's verbosity to INFO and, unless the root logger already has absl's handler (under
  `app.run`) or one of an earlier call, gives it a handler that writes to `stream` (default
  stderr) in absl's format, without Orbax's per-save INFO chatter. On the root logger, as absl's
  own, so that no library's implicit `logging.basicConfig` adds a second one (each line twice).
  Call it once, at the start of `main`.

  Args:
    stream: a text stream; None = `sys.stderr`.
  """
  logging.set_verbosity(logging.INFO)
  root = std_logging.getLogger()
  if any(isinstance(h, logging.ABSLHandler) or getattr(h, "selmix_progress", False)
         for h in root.handlers):
    return
  handler = std_logging.StreamHandler(stream or sys.stderr)
  handler.setFormatter(logging.PythonFormatter())
  handler.addFilter(_not_orbax_info)
  handler.selmix_progress = True
  root.addHandler(handler)


def run(
    *,
    start_step: int,
    num_steps: int,
    train_step: Callable[[int], Any],
    before_step: Sequence[Periodic] = (),
    after_step: Sequence[Periodic] = (),
    checkpoint: Periodic | None = None,
    progress: Progress | None = None,
) -> tuple[int, bool]:
  """Runs steps `start_step .. num_steps - 1` with the periodic actions.

  SIGTERM or SIGINT during the loop (`Preemption`) ends it after the current step: the
  `checkpoint` action runs at that step (unless it just did) and `Preempted` is raised; the
  caller waits for the asynchronous save in its `finally`.

  Args:
    start_step: first step to run (the restored step when resuming).
    num_steps: the step count at which the loop ends.
    train_step: `train_step(step) -> outputs` runs one step (outputs are what progress and
      actions may block on, e.g. the step's metrics).
    before_step: actions due at `step` run before the step (a `STOP` return ends the loop
      there, without running the step).
    after_step: actions due at `step + 1` run after the step, with the count of completed steps.
    checkpoint: the checkpoint action (runs after the other after-step actions, and on a stop).
    progress: optional `Progress`, called after every step.

  Returns:
    `(steps_completed, stopped_early)`.
  """
  after_step = (*after_step, checkpoint) if checkpoint is not None else tuple(after_step)
  step, stopped = start_step, False
  ran_at = set()
  with Preemption() as preemption:
    while step < num_steps:
      if step == start_step:
        logging.info(
            "Step %d/%d: compiling the step functions before the first step (a minute or more "
            "for a large model; a later run with the same shapes reads them from the "
            "compilation cache); steps/s and ETA follow.", step, num_steps,
        )
        t_first = time.monotonic()
      if any(a.fn(step) == STOP for a in before_step if a.due(step)):
        stopped = True
        break
      outputs = train_step(step)
      step += 1
      if progress is not None:
        progress(step, outputs)  # Blocks on the first step's outputs.
        if step == start_step + 1:
          logging.info(
              "Step %d/%d done, %s after the start (compilation included).", step, num_steps,
              _duration(time.monotonic() - t_first),
          )
      for action in after_step:
        if action.due(step) or (action.at_end and step == num_steps):
          action.fn(step)
          ran_at.add((id(action), step))
      if step < num_steps and preemption.reached(step):
        if checkpoint is not None and (id(checkpoint), step) not in ran_at:
          checkpoint.fn(step)
        raise Preempted(step, preemption.signum)
  for action in (*before_step, *after_step):
    if stopped and action.at_end and (id(action), step) not in ran_at:
      action.fn(step)
  return step, stopped
