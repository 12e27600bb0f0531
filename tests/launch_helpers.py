"""Helpers of the tests that run `launch/main.py` in subprocesses (not a test module)."""

import json
import os
import queue
import socket
import threading
import time

import orbax.checkpoint as ocp

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAIN = os.path.join(REPO, "launch", "main.py")


def free_port() -> int:
  """A TCP port on 127.0.0.1 that nothing listens on now."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def env_with_devices(devices: int) -> dict[str, str]:
  """This environment (its XLA flags included) with `devices` host devices."""
  env = dict(os.environ)
  flags = [f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f]
  env["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={devices}"])
  return env


def summary(workdir, stage="selmix"):
  """A stage's `summary.json` without what legitimately differs (wall time, the config)."""
  out = json.load(open(os.path.join(workdir, stage, "summary.json")))
  out.pop("wall_time_s")
  out.pop("config")
  return out


def checkpoint(workdir, step=None):
  """`(step, tree)` of a stage's newest (or given) checkpoint, as stored."""
  manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"))
  step = manager.latest_step() if step is None else step
  tree = manager.restore(step, args=ocp.args.StandardRestore())
  manager.close()
  return step, tree


class LineReader:
  """Reads a text stream (a subprocess's stderr) line by line in a thread, so a test can wait
  for a line with a real deadline (a plain `for line in stream` only checks one when a line
  arrives, and hangs when none does)."""

  def __init__(self, stream):
    self._lines = []
    self._queue = queue.Queue()
    self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
    self._thread.start()

  def _read(self, stream):
    for line in stream:
      self._queue.put(line)
    self._queue.put(None)  # End of the stream.

  def wait_for(self, text: str, timeout: float) -> bool:
    """Whether a line containing `text` arrives within `timeout` seconds (False at the end of
    the stream or the deadline)."""
    deadline = time.monotonic() + timeout
    while True:
      remaining = deadline - time.monotonic()
      if remaining <= 0:
        return False
      try:
        line = self._queue.get(timeout=remaining)
      except queue.Empty:
        return False
      if line is None:
        self._queue.put(None)
        return False
      self._lines.append(line)
      if text in line:
        return True

  def text(self, timeout: float = 120) -> str:
    """Everything read, once the stream has ended (waits up to `timeout` seconds for that)."""
    self._thread.join(timeout)
    while not self._queue.empty():
      line = self._queue.get()
      if line is not None:
        self._lines.append(line)
    return "".join(self._lines)
