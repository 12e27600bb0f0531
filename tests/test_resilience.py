"""Surviving pods: SIGTERM then resume equals an uninterrupted run, damaged and mismatched
checkpoints, one run per workdir, finished runs (multi-host equality: test_multihost.py)."""
import dataclasses
import glob
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import types

import jax
import numpy as np
import PIL.Image
import pytest

from selmix_jax import checkpointing
from selmix_jax import data
from selmix_jax import finetune
from selmix_jax import reporting
from selmix_jax import train
from selmix_jax import workdir as workdir_lib
from selmix_jax.configs import default

import launch_helpers  # tests/launch_helpers.py

_REPO, _MAIN = launch_helpers.REPO, launch_helpers.MAIN


# ------------------------------------------------------------------- SIGTERM and resume


def _tiny_long(**overrides):
  config = default.get_config("tiny")
  with config.unlocked():
    config.selmix.num_steps = 150
    config.selmix.checkpoint_every = 100
    config.selmix.log_every = 1
    for key, value in overrides.items():
      section, name = key.split(".")
      setattr(config[section], name, value)
  return config


def test_sigterm_checkpoints_and_the_resumed_run_ends_bit_identical(tmp_path):
  workdir = tmp_path / "preempted"
  args = [
      sys.executable, _MAIN, f"--config={_REPO}/configs/default.py:tiny", f"--workdir={workdir}",
      "--config.selmix.num_steps=150", "--config.selmix.checkpoint_every=100",
      "--config.selmix.log_every=1",
  ]  # fmt: skip
  proc = subprocess.Popen(
      args, env=launch_helpers.env_with_devices(4), stderr=subprocess.PIPE, text=True)
  reader = launch_helpers.LineReader(proc.stderr)
  # Wait (with a real deadline) until fine-tuning is well into its first 100 steps.
  if not reader.wait_for("[13] train/", timeout=240):
    proc.kill()
    pytest.fail("no '[13] train/' line within 240 s:\n" + reader.text()[-3000:])
  proc.send_signal(signal.SIGTERM)
  proc.wait(timeout=120)
  text = reader.text()
  assert proc.returncode == 128 + signal.SIGTERM, text[-3000:]
  assert "Stopped by SIGTERM after step" in text
  stopped_at = int(text.split("Stopped by SIGTERM after step ")[1].split(";")[0])
  assert 13 <= stopped_at < 150 and stopped_at % 100
  step, _ = launch_helpers.checkpoint(workdir / "selmix")
  assert step == stopped_at, "the work since the last periodic checkpoint was not saved"
  assert not os.path.exists(workdir / "run.json")  # Nothing claims the run finished.

  resumed = subprocess.run(
      args, env=launch_helpers.env_with_devices(4), capture_output=True, text=True, check=False)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f"Resumed SelMix fine-tuning from step {stopped_at}" in resumed.stderr
  # The stage's wall time counts the preempted process up to its last checkpoint as well.
  recorded = json.load(open(workdir / "selmix" / workdir_lib.WALL_TIME_FILE))
  wall_time = json.load(open(workdir / "selmix" / "summary.json"))["wall_time_s"]
  assert recorded[str(stopped_at)] > 0 and wall_time > recorded[str(stopped_at)]

  full = tmp_path / "full"
  train.train_and_evaluate(_tiny_long(), str(full))
  assert launch_helpers.summary(workdir) == launch_helpers.summary(full)
  _, a = launch_helpers.checkpoint(workdir / "selmix")
  _, b = launch_helpers.checkpoint(full / "selmix")
  jax.tree.map(np.testing.assert_array_equal, a, b)


def test_stage_clock_counts_the_processes_before_a_restart(tmp_path, monkeypatch):
  now = [100.0]
  monkeypatch.setattr(workdir_lib, "time", types.SimpleNamespace(time=lambda: now[0]))
  clock = workdir_lib.StageClock(str(tmp_path), None, started=100.0)
  now[0] = 130.0
  clock.checkpointed(10)
  now[0] = 150.0
  clock.checkpointed(20)
  # Killed at 170: its last 20 s are lost work. Resumed from step 20 by a process started at 200.
  now[0] = 260.0
  assert workdir_lib.StageClock(str(tmp_path), 20, started=200.0).elapsed() == 50.0 + 60.0
  # Restored from the older checkpoint (the newest was damaged): the time up to step 10.
  assert workdir_lib.StageClock(str(tmp_path), 10, started=250.0).elapsed() == 30.0 + 10.0
  # A stage that starts afresh ignores what is recorded.
  assert workdir_lib.StageClock(str(tmp_path), None, started=255.0).elapsed() == 5.0


# ------------------------------------------------------------ damaged and other checkpoints


def test_damaged_newest_checkpoint_is_moved_aside_and_the_previous_one_restored(tmp_path, caplog):
  directory = str(tmp_path / "checkpoints")
  manager = checkpointing.make_manager(directory)
  for step in (5, 10):
    checkpointing.save(manager, step, {"state": {"w": np.full((3, 4), float(step))}})
  manager.wait_until_finished()
  manager.close()
  # Truncate the data files of the newest step.
  data_files = [
      f for f in glob.glob(os.path.join(directory, "10", "**", "*"), recursive=True)
      if os.path.isfile(f) and "/d/" in f
  ]  # fmt: skip
  assert data_files
  for name in data_files:
    with open(name, "r+b") as f:
      f.truncate(3)

  manager = checkpointing.make_manager(directory)
  with caplog.at_level(logging.WARNING):
    tree, step = checkpointing.restore_latest(manager, {"state": {"w": np.zeros((3, 4))}})
  assert step == 5
  assert any("Checkpoint step 10" in r.getMessage() and "cannot be read" in r.getMessage()
             for r in caplog.records)
  np.testing.assert_array_equal(tree["state"]["w"], np.full((3, 4), 5.0))
  (moved,) = glob.glob(os.path.join(f"{directory}.damaged", "10-*"))
  assert os.listdir(moved), "the damaged step is kept, not deleted"
  assert manager.all_steps() == [5]
  manager.close()


def test_legacy_checkpoints_of_another_model_fail_before_compute_naming_workdir_and_shapes(
    tmp_path, caplog):
  config = default.get_config("tiny")
  with config.unlocked():
    config.mode = "pretrain"
    config.pretrain.num_steps = 6
  train.train_and_evaluate(config, str(tmp_path))
  # As a killed run from before fingerprints: checkpoints, no finished marker, no fingerprint.
  os.remove(tmp_path / "run.json")
  os.remove(tmp_path / workdir_lib.FINGERPRINT_FILE)
  events = set(glob.glob(str(tmp_path / "events.out.tfevents.*")))
  with config.unlocked():
    config.model.kwargs.width = 16
    config.pretrain.num_steps = 12
  with pytest.raises(checkpointing.CheckpointMismatchError) as error:
    train.train_and_evaluate(config, str(tmp_path))
  message = str(error.value)
  assert str(tmp_path / "checkpoints") in message
  assert "'state/" in message and "has shape (8,) in the checkpoint but (16,)" in message
  assert message.endswith(checkpointing.RESUME_ADVICE)
  assert set(glob.glob(str(tmp_path / "events.out.tfevents.*"))) == events
  assert any("resuming them unchecked" in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------- one run per workdir, finished


def test_a_second_run_on_a_locked_workdir_fails_at_once_naming_the_pid(tmp_path):
  # The holder keeps the lock until the test says so (a line on its stdin): no sleep to race.
  holder = subprocess.Popen(
      [sys.executable, "-c",
       "import sys; from selmix_jax import workdir\n"
       "with workdir.lock(sys.argv[1]):\n  print('locked', flush=True); sys.stdin.readline()",
       str(tmp_path)],
      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=_REPO,
  )  # fmt: skip
  try:
    assert holder.stdout.readline().strip() == "locked"
    second = subprocess.run(
        [sys.executable, _MAIN, f"--config={_REPO}/configs/default.py:tiny",
         f"--workdir={tmp_path}"],
        capture_output=True, text=True, check=False, env=launch_helpers.env_with_devices(4),
        timeout=300,
    )  # fmt: skip
    assert holder.poll() is None, "the holder must still hold the lock"
    assert second.returncode == 2, second.stderr[-3000:]
    assert f"in use by PID {holder.pid}" in second.stderr
    assert not os.path.exists(tmp_path / "pretrain")  # Refused before anything was written.
    holder.communicate("release\n", timeout=60)
    assert holder.returncode == 0 and not os.path.exists(tmp_path / workdir_lib.LOCK_FILE)
  finally:
    if holder.poll() is None:
      holder.kill()
      holder.wait()


def test_a_stale_lock_is_taken_over_with_a_warning(tmp_path, caplog):
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  with open(tmp_path / workdir_lib.LOCK_FILE, "w") as f:
    json.dump({"pid": dead.pid, "host": socket.gethostname(), "started": 0}, f)
  with workdir_lib.lock(str(tmp_path)):
    assert json.load(open(tmp_path / workdir_lib.LOCK_FILE))["pid"] == os.getpid()
  assert not os.path.exists(tmp_path / workdir_lib.LOCK_FILE)
  assert glob.glob(str(tmp_path / f"{workdir_lib.LOCK_FILE}.stale-{dead.pid}"))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
  """A finished `default.py:tiny` run (pre-training + SelMix on digits): (workdir, result)."""
  workdir = tmp_path_factory.mktemp("finished")
  return workdir, train.train_and_evaluate(default.get_config("tiny"), str(workdir))


def test_a_finished_run_reports_its_stored_results_without_computing(finished_run, monkeypatch,
                                                                     capsys):
  workdir, result = finished_run

  def no_compute(*args, **kwargs):
    raise AssertionError("a finished run must not load data or train again")

  monkeypatch.setattr(data, "build", no_compute)
  monkeypatch.setattr(finetune, "run", no_compute)
  capsys.readouterr()
  again = default.get_config("tiny")
  with again.unlocked():  # Cadence fields do not change the stored numbers.
    again.selmix.log_every = 5
    again.pretrain.checkpoint_every = 4
  again = train.train_and_evaluate(again, str(workdir))
  assert again["after"]["test"]["confusion"] == reporting.to_python(
      result["after"]["test"]["confusion"]
  )
  assert "| min_recall |" in capsys.readouterr().out
  other = default.get_config("tiny")
  with other.unlocked():
    other.selmix.num_steps = 20
  with pytest.raises(workdir_lib.WorkdirError) as error:
    train.train_and_evaluate(other, str(workdir))
  assert str(error.value) == (
      f"Workdir {workdir} holds a finished run of another config: config.selmix.num_steps is "
      f"12 there and 20 here. {workdir_lib.advice(str(workdir))}"
  )
  assert "--restart" in str(error.value) and "run.json" not in str(error.value)


def _image_folder(root):
  """A second, different data set: 3 classes of noisy 8x8 PNGs (train 40, test 6 a class)."""
  rng = np.random.default_rng(0)
  for split, n in (("train", 40), ("test", 6)):
    for c, name in enumerate("abc"):
      (root / split / name).mkdir(parents=True)
      for i in range(n):
        pixels = np.clip(rng.normal(60 + 60 * c, 40, (8, 8, 3)), 0, 255).astype(np.uint8)
        PIL.Image.fromarray(pixels).save(root / split / name / f"{i}.png")


def test_issue_26_another_data_set_in_a_workdir_is_refused_and_restart_runs_it_clean(
    finished_run, tmp_path):
  """The issue's scenario: a finished run on digits; the user removes run.json (the old advice)
  and runs another data set with fewer steps in the same workdir. Once this printed the old
  data's pre-trained numbers beside the new data's SelMix numbers, with exit 0."""
  source, _ = finished_run
  workdir = tmp_path / "workdir"
  shutil.copytree(source, workdir)
  os.remove(workdir / workdir_lib.DONE_FILE)
  _image_folder(tmp_path / "images")
  user_file = workdir / "notes.txt"  # Not ours: --restart keeps it.
  user_file.write_text("mine")
  args = [
      sys.executable, _MAIN, f"--config={_REPO}/configs/default.py:tiny", f"--workdir={workdir}",
      "--config.data.name=image_folder", f"--config.data.root={tmp_path / 'images'}",
      "--config.data.labeled_max=30", "--config.data.val_per_class=5", "--config.data.cache_dir=",
      "--config.pretrain.num_steps=8", "--config.selmix.num_steps=8",
  ]  # fmt: skip
  before = launch_helpers.checkpoint(workdir / "pretrain")
  refused = subprocess.run(
      args, env=launch_helpers.env_with_devices(4), capture_output=True, text=True, check=False)
  message = (
      f"Workdir {workdir}/pretrain holds checkpoints of another run: config.data.name is "
      f"'digits' there and 'image_folder' here. Use a new --workdir, or pass --restart to delete "
      f"the run in {workdir} (its checkpoints, summaries and tables) and start this one afresh."
  )
  assert refused.returncode == 2, refused.stderr[-3000:]
  assert message in refused.stderr and "Traceback" not in refused.stderr, refused.stderr[-3000:]
  assert "Resumed" not in refused.stderr
  after = launch_helpers.checkpoint(workdir / "pretrain")
  assert after[0] == before[0] == 12
  jax.tree.map(np.testing.assert_array_equal, after[1], before[1])  # Untouched.

  restarted = subprocess.run(
      [*args, "--restart"], env=launch_helpers.env_with_devices(4), capture_output=True,
      text=True, check=False,
  )  # fmt: skip
  assert restarted.returncode == 0, restarted.stderr[-3000:]
  assert "Resumed" not in restarted.stderr
  assert user_file.read_text() == "mine"
  # Every number is the new data's: 3 classes, 18 test images, 8 + 8 steps, fresh history.
  pre = json.load(open(workdir / "pretrain" / "summary.json"))
  sel = json.load(open(workdir / "selmix" / "summary.json"))
  for confusion in (pre["test"]["confusion"], sel["before"]["test"]["confusion"],
                    sel["after"]["test"]["confusion"]):
    assert np.asarray(confusion).shape == (3, 3) and np.sum(confusion) == 18
  assert pre["test"] == sel["before"]["test"]
  assert pre["steps"] == 8 and sel["steps"] == 8
  assert launch_helpers.checkpoint(workdir / "pretrain")[0] == 8
  assert sorted(os.listdir(workdir / "selmix" / "selmix_history")) == [
      "refresh_0000000.npz", "refresh_0000004.npz"]
  table = (workdir / "results.md").read_text()
  assert table.startswith("# image_folder: pre-train -> SelMix")
  assert f"| accuracy | {100 * pre['test']['accuracy']:.2f} |" in table


def test_a_stage_refuses_another_fingerprint_and_ignores_cadence_fields(tmp_path):
  config = default.get_config("tiny")
  datasets = data.build(config.data)
  stage = str(tmp_path / "pretrain")
  workdir_lib.check_stage(stage, workdir_lib.fingerprint("pretrain", config, datasets))
  stored = json.load(open(os.path.join(stage, workdir_lib.FINGERPRINT_FILE)))
  assert stored["data"]["test_split"]["size"] == len(datasets.test)
  assert stored["data"]["labeled_split"]["class_counts"] == datasets.labeled_class_counts.tolist()
  with config.unlocked():  # Cadence, paths and the other stage's fields: the same fingerprint.
    for field in workdir_lib.CADENCE_FIELDS:
      section, name = field.split(".")
      config[section][name] = 7 if name != "init_checkpoint" else "/elsewhere"
    config.data.cache_dir = "/elsewhere"
    config.selmix.temperature = 3.0
    config.objective.name = "gmean_recall"
  workdir_lib.check_stage(stage, workdir_lib.fingerprint("pretrain", config, datasets))
  with config.unlocked():
    config.pretrain.weight_decay = 0.0
  with pytest.raises(workdir_lib.WorkdirError, match=re.escape(
      "config.pretrain.weight_decay is 0.0005 there and 0.0 here. Use a new --workdir")):
    workdir_lib.check_stage(stage, workdir_lib.fingerprint("pretrain", config, datasets))
  # The same config on other data (another draw of the splits): the data differ.
  config = default.get_config("tiny")
  with pytest.raises(workdir_lib.WorkdirError, match=re.escape(
      "data.labeled_split.digest is ")):
    other = dataclasses.replace(datasets, labeled=dataclasses.replace(
        datasets.labeled, indices=datasets.labeled.indices[::-1]))
    workdir_lib.check_stage(stage, workdir_lib.fingerprint("pretrain", config, other))
  with pytest.raises(workdir_lib.WorkdirError, match=re.escape(
      "stage is 'pretrain' there and 'selmix' here")):
    workdir_lib.check_stage(stage, workdir_lib.fingerprint("selmix", config, datasets))


def test_restart_deletes_only_what_the_project_writes(tmp_path):
  outside = tmp_path / "outside"
  outside.mkdir()
  (outside / "keep.txt").write_text("x")
  workdir = tmp_path / "w"
  for stage in ("", "pretrain", "selmix"):
    (workdir / stage / "checkpoints" / "12").mkdir(parents=True)
    (workdir / stage / "summary.json").write_text("{}")
    (workdir / stage / "events.out.tfevents.1.host").write_text("")
  (workdir / "selmix" / "selmix_history").mkdir()
  (workdir / "pretrain" / "stage1" / "checkpoints" / "3").mkdir(parents=True)  # MiSLAS
  (workdir / "selmix" / "features" / "head_init").mkdir(parents=True)  # A frozen backbone.
  (workdir / "selmix" / "features" / "features.npz").write_text("")
  (workdir / "selmix" / "model" / "checkpoints" / "12").mkdir(parents=True)
  (workdir / "run.json").write_text("{}")
  (workdir / "results.md").write_text("")
  (workdir / "mine.txt").write_text("user")
  (workdir / "selmix" / "mine").mkdir()
  (workdir / "pretrain" / "checkpoints.eval_cache").symlink_to(outside)
  removed = workdir_lib.clear(str(workdir))
  assert sorted(os.listdir(workdir)) == ["mine.txt", "selmix"]
  assert os.listdir(workdir / "selmix") == ["mine"]
  assert (outside / "keep.txt").read_text() == "x"  # A link is removed, never its target.
  assert str(workdir / "pretrain") in removed and str(workdir / "run.json") in removed
