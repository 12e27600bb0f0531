"""Helpers of the tests that run `launch/main.py` in subprocesses (not a test module)."""

import json
import os
import socket

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
