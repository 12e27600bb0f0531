"""Exact multi-host evaluation: 2 processes x 2 devices (jax.distributed on 127.0.0.1) give the
same results as 1 process x 4 devices."""

import shutil
import socket
import subprocess
import sys

import jax
import numpy as np

from selmix_jax import data
from selmix_jax import reporting
from selmix_jax.configs import default

import launch_helpers  # tests/launch_helpers.py

_REPO, _MAIN = launch_helpers.REPO, launch_helpers.MAIN


_SSL_ARGS = ("--config.pretrain.num_steps=24", "--config.selmix.num_steps=8")

# What process 0 logs when its coordinator cannot bind the port (another program took it
# between `free_port` and the bind): the attempt is repeated on a new port.
_PORT_TAKEN = "Failed to add port to server"


def _two_processes(args, workdir, attempts=3):
  """Runs `launch/main.py *args` as processes 0 and 1 of a 2-process job on 127.0.0.1.

  The coordinator's port is picked free just before the launch; if something else binds it
  first, process 0 fails with `_PORT_TAKEN`, process 1 (which would wait for a coordinator) is
  stopped, and the job is launched again on a new port (the workdir is still empty then).
  Returns the processes and their `(stdout, stderr)`.
  """
  for _ in range(attempts):
    port = launch_helpers.free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, _MAIN, *args, f"--coordinator_address=127.0.0.1:{port}",
             "--num_processes=2", f"--process_id={i}"],
            env=launch_helpers.env_with_devices(2), stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        for i in range(2)
    ]
    first = procs[0].communicate(timeout=240)
    if procs[0].returncode != 0 and _PORT_TAKEN in first[1]:
      procs[1].kill()
      procs[1].communicate()
      shutil.rmtree(workdir, ignore_errors=True)
      continue
    return procs, [first, procs[1].communicate(timeout=240)]
  raise AssertionError(f"the coordinator could not bind a free port in {attempts} attempts")


def test_two_processes_of_two_devices_equal_one_process_of_four(tmp_path, monkeypatch):
  """Semi-supervised tiny run: metrics, raw confusion counts, pseudo-labels and every P (which
  depends on the validation prototypes) are identical; only process 0 writes and prints.

  The first port offered is one another program listens on, so the launch also shows that a
  taken port costs a retry, not the test."""
  assert jax.local_device_count() == 4
  config = f"--config={_REPO}/configs/default.py:tiny_ssl"
  with socket.socket() as taken:
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    ports = [taken.getsockname()[1]]
    free_port = launch_helpers.free_port
    monkeypatch.setattr(launch_helpers, "free_port",
                        lambda: ports.pop() if ports else free_port())
    procs, outputs = _two_processes(
        [config, f"--workdir={tmp_path / 'two'}", *_SSL_ARGS], tmp_path / "two")
  assert not ports, "the taken port was offered first"
  for p, (out, err) in zip(procs, outputs):
    assert p.returncode == 0, err[-3000:]
  one = subprocess.run(
      [sys.executable, _MAIN, config, f"--workdir={tmp_path / 'one'}", *_SSL_ARGS],
      env=launch_helpers.env_with_devices(4), capture_output=True, text=True, check=False,
      timeout=240,
  )  # fmt: skip
  assert one.returncode == 0, one.stderr[-3000:]

  for stage in ("pretrain", "selmix"):
    two = launch_helpers.summary(tmp_path / "two", stage)
    assert two == launch_helpers.summary(tmp_path / "one", stage), stage
  two_selmix = launch_helpers.summary(tmp_path / "two")
  assert np.asarray(two_selmix["after"]["test"]["confusion"]).sum() == len(
      data.build(default.get_config("tiny_ssl").data).test
  )
  _, state_two = launch_helpers.checkpoint(tmp_path / "two" / "selmix")
  _, state_one = launch_helpers.checkpoint(tmp_path / "one" / "selmix")
  np.testing.assert_array_equal(
      state_two["selmix"]["partner_labels"], state_one["selmix"]["partner_labels"]
  )
  history_two = reporting.load_history(tmp_path / "two" / "selmix")
  history_one = reporting.load_history(tmp_path / "one" / "selmix")
  assert len(history_two) == len(history_one) == 2
  for a, b in zip(history_two, history_one):
    np.testing.assert_array_equal(a["pair_probs"], b["pair_probs"])
    np.testing.assert_array_equal(a["gain"], b["gain"])
  # Only process 0 prints the results table.
  assert "| min_recall |" in outputs[0][0] and "| min_recall |" not in outputs[1][0]


