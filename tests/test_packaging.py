"""What a user installs and runs: the light core, the README's library example, a TensorFlow-free
training run, and user extensions loaded with `launch/main.py --imports`."""

import glob
import json
import os
import re
import subprocess
import sys
import zipfile

import numpy as np
import PIL.Image
import pytest

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_TESTS = os.path.join(_REPO, "tests")


def _library_examples():
  readme = open(os.path.join(_REPO, "README.md"), encoding="utf-8").read()
  start = readme.index("## Using the library")
  section = readme[start : readme.index("\n## ", start)]
  return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_readme_library_examples_each_run_on_their_own():
  """Each block runs in a fresh namespace: none relies on a name another one defined."""
  from selmix_jax import confusion, metrics  # pylint: disable=g-import-not-at-top

  blocks = _library_examples()
  assert len(blocks) == 3, "core example, a user objective, the clu metric"
  core, user_objective, clu_metric = ({}, {}, {})
  for block, namespace in zip(blocks, (core, user_objective, clu_metric)):
    exec(compile(block, "README.md", "exec"), namespace)  # pylint: disable=exec-used
  assert core["gain"].shape == (10, 10) and np.isfinite(core["gain"]).all()
  assert core["idx1"].shape == (64,)
  gain = np.asarray(user_objective["gain"])
  assert gain.shape == (5, 5) and np.isfinite(gain).all() and (gain > 0).any()
  # The clu metric counts what confusion.confusion_matrix counts.
  ns = clu_metric
  counts = confusion.confusion_matrix(
      ns["labels"], np.argmax(ns["logits"], -1), ns["num_classes"], mask=ns["valid"]
  )
  assert float(ns["state"].compute()["confusion"]["min_recall"]) == pytest.approx(
      float(metrics.summary(counts)["min_recall"])
  )


def _run(cmd, **kwargs):
  return subprocess.run(cmd, capture_output=True, text=True, check=False, **kwargs)


def test_core_wheel_installs_alone_in_a_fresh_venv(tmp_path):
  """`pip install selmix_jax` without extras: jax + numpy and what jax needs, nothing else."""
  # Build from a copy of the tracked files, so the checkout gets no build/ folder.
  files = _run(["git", "ls-files"], cwd=_REPO).stdout.split()
  src = tmp_path / "src"
  for name in files:
    target = src / name
    target.parent.mkdir(parents=True, exist_ok=True)
    if os.path.isfile(os.path.join(_REPO, name)):
      target.write_bytes(open(os.path.join(_REPO, name), "rb").read())
  built = _run(
      [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(tmp_path)],
      cwd=src,
  )
  assert built.returncode == 0, built.stderr[-2000:]
  (wheel,) = glob.glob(str(tmp_path / "selmix_jax-*.whl"))
  with zipfile.ZipFile(wheel) as z:
    metadata = z.read(next(n for n in z.namelist() if n.endswith("METADATA"))).decode()
    assert "selmix_jax/configs/default.py" in z.namelist()
  unconditional = [
      line.split(":", 1)[1].strip()
      for line in metadata.splitlines()
      if line.startswith("Requires-Dist:") and "extra ==" not in line
  ]
  assert sorted(re.split(r"[<>=!~ ;]", r)[0] for r in unconditional) == ["jax", "numpy"]
  for extra in ("train", "tfds", "torch", "test"):
    assert f"Provides-Extra: {extra}" in metadata
  # The launcher's compilation cache locks with filelock: `[train]` must bring it.
  assert re.search(r"Requires-Dist: filelock.*extra == .train.", metadata), metadata

  venv = tmp_path / "venv"
  assert _run([sys.executable, "-m", "venv", str(venv)]).returncode == 0
  python = str(venv / "bin" / "python")
  installed = _run([python, "-m", "pip", "install", "-q", wheel])
  assert installed.returncode == 0, installed.stderr[-2000:]
  script = tmp_path / "example.py"
  script.write_text(
      _library_examples()[0]
      + "\nimport importlib.util\n"
      + "print('HEAVY', [m for m in ('tensorflow', 'flax', 'orbax', 'optax', 'absl', 'clu')"
      + " if importlib.util.find_spec(m) is not None])\n"
  )
  ran = _run([python, str(script)], cwd=tmp_path)  # Not the checkout: the installed package.
  assert ran.returncode == 0, ran.stderr[-3000:]
  assert "HEAVY []" in ran.stdout, ran.stdout
  assert "'effective_pairs'" in ran.stdout


@pytest.fixture
def no_tensorflow(tmp_path):
  """An environment in which `import tensorflow` fails (and leaves a mark if attempted)."""
  poison = tmp_path / "poison"
  (poison / "tensorflow").mkdir(parents=True)
  mark = tmp_path / "tensorflow_was_imported"
  (poison / "tensorflow" / "__init__.py").write_text(
      f"open({str(mark)!r}, 'w').close()\nraise ImportError('tensorflow is not installed')\n"
  )
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join([str(poison), _TESTS, env.get("PYTHONPATH", "")])
  return env, mark


def test_launcher_without_filelock_warns_and_keeps_its_cache_unlocked(tmp_path):
  """Without `filelock` the launcher says so once instead of letting every cache read fail."""
  poison = tmp_path / "poison"
  (poison / "filelock").mkdir(parents=True)
  (poison / "filelock" / "__init__.py").write_text("raise ImportError('no filelock')\n")
  env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
  env["PYTHONPATH"] = os.pathsep.join([str(poison), env.get("PYTHONPATH", "")])
  result = _main(
      f"--config={_REPO}/configs/default.py:tiny",
      f"--workdir={tmp_path / 'run'}",
      f"--compilation_cache_dir={tmp_path / 'cache'}",
      "--config.selmix.temperature=0",  # Stops in validation, after the cache is set up.
      env=env,
  )
  assert result.returncode == 2, result.stderr[-3000:]
  assert "The filelock package is not installed" in result.stderr
  assert "config.selmix.temperature" in result.stderr


def _main(*args, env):
  return _run([sys.executable, os.path.join(_REPO, "launch", "main.py"), *args], env=env)


def test_user_extensions_and_no_tensorflow(tmp_path, no_tensorflow):
  """--imports registers an objective, a pair strategy and a data set that the config names;
  the run needs no TensorFlow and still writes TensorBoard event files."""
  env, mark = no_tensorflow
  workdir = tmp_path / "run"
  result = _main(
      f"--config={_REPO}/configs/default.py:tiny",
      f"--workdir={workdir}",
      "--imports=selmix_user_extension",
      "--config.objective.name=test_user_objective",
      "--config.selmix.pairs=test_user_pairs",
      "--config.data.name=test_user_blobs",
      env=env,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert not mark.exists(), "the training path imported TensorFlow"
  summary = json.load(open(workdir / "selmix" / "summary.json"))
  assert summary["objective"] == "test_user_objective"
  assert summary["config"]["data"]["name"] == "test_user_blobs"
  assert summary["config"]["selmix"]["pairs"] == "test_user_pairs"
  for stage in ("pretrain", "selmix"):
    assert glob.glob(str(workdir / stage / "events.out.tfevents.*")), stage
  # The run ends by printing its results table.
  assert "SelMix (test_user_objective)" in result.stdout and "| min_recall |" in result.stdout

  missing = _main("--imports=no_such_module_xyz", f"--workdir={tmp_path / 'x'}", env=env)
  assert missing.returncode != 0 and "--imports=no_such_module_xyz" in missing.stderr


def test_image_folder_run_without_tensorflow(tmp_path, no_tensorflow):
  env, mark = no_tensorflow
  rng = np.random.default_rng(0)
  for split, per_class in (("train", 50), ("test", 10)):
    for k, name in enumerate(("ant", "bee", "cat")):
      folder = tmp_path / "images" / split / name
      folder.mkdir(parents=True)
      for i in range(per_class):
        pixels = rng.normal(80 * k, 30, (8, 8, 3)).clip(0, 255).astype(np.uint8)
        PIL.Image.fromarray(pixels).save(folder / f"{i}.png")
  workdir = tmp_path / "run"
  result = _main(
      f"--config={_REPO}/configs/default.py:tiny",
      f"--workdir={workdir}",
      "--config.data.name=image_folder",
      f"--config.data.root={tmp_path / 'images'}",
      "--config.data.cache_dir=",
      "--config.data.labeled_max=30",
      "--config.data.val_per_class=10",
      env=env,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert not mark.exists(), "the image-folder path imported TensorFlow"
  summary = json.load(open(workdir / "selmix" / "summary.json"))
  assert np.asarray(summary["after"]["test"]["confusion"]).sum() == 30
  assert glob.glob(str(workdir / "selmix" / "events.out.tfevents.*"))


def test_a_checkout_without_install_finds_its_configs(tmp_path):
  # `PYTHONPATH=<checkout>` alone (no site-packages, so no editable install): the configs/
  # folder is `selmix_jax.configs`, as the installed package maps it.
  code = (
      "import importlib.util, sys; sys.path.insert(0, sys.argv[1]); "
      "print(importlib.util.find_spec('selmix_jax.configs').origin)"
  )
  out = subprocess.run(
      [sys.executable, "-S", "-c", code, _REPO], cwd=tmp_path, capture_output=True, text=True,
      check=True,
  ).stdout.strip()
  assert out == os.path.join(_REPO, "configs", "__init__.py")
