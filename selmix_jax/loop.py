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
"""

import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from absl import logging
import jax
import numpy as np

STOP = "stop"


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


def run(
    *,
    start_step: int,
    num_steps: int,
    train_step: Callable[[int], Any],
    before_step: Sequence[Periodic] = (),
    after_step: Sequence[Periodic] = (),
    progress: Progress | None = None,
) -> tuple[int, bool]:
  """Runs steps `start_step .. num_steps - 1` with the periodic actions.

  Args:
    start_step: first step to run (the restored step when resuming).
    num_steps: the step count at which the loop ends.
    train_step: `train_step(step) -> outputs` runs one step (outputs are what progress and
      actions may block on, e.g. the step's metrics).
    before_step: actions due at `step` run before the step (a `STOP` return ends the loop
      there, without running the step).
    after_step: actions due at `step + 1` run after the step, with the count of completed steps.
    progress: optional `Progress`, called after every step.

  Returns:
    `(steps_completed, stopped_early)`.
  """
  step, stopped = start_step, False
  ran_at = set()
  while step < num_steps:
    if any(a.fn(step) == STOP for a in before_step if a.due(step)):
      stopped = True
      break
    outputs = train_step(step)
    step += 1
    if progress is not None:
      progress(step, outputs)
    for action in after_step:
      if action.due(step) or (action.at_end and step == num_steps):
        action.fn(step)
        ran_at.add((id(action), step))
  for action in (*before_step, *after_step):
    if stopped and action.at_end and (id(action), step) not in ran_at:
      action.fn(step)
  return step, stopped
