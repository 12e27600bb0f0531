"""Test setup: fake four host CPU devices before JAX initialises its backend.

Compiled executables that took at least 0.2 s go to a persistent cache in a temporary directory
for this session (set through the environment, so the subprocesses of multi-process and restart
tests share it): a run that compiles what an earlier test compiled loads it instead. Its size
limit enables JAX's file lock around cache reads and writes, which processes sharing the cache
need.
"""

import atexit
import contextlib
import os
import shutil
import tempfile

_FLAG = "--xla_force_host_platform_device_count=4"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
# Tests compile far more than they compute: skip LLVM's optimisation of the CPU code (about a
# quarter less compile time). Runs compared bit for bit (resume, multi-host) use the same flags.
_FAST_COMPILE = "--xla_backend_optimization_level=0"
if "xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " " + _FAST_COMPILE
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _CACHE = tempfile.mkdtemp(prefix="selmix-jax-test-cache-")
  atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
  # Programs that compile in under 0.2 s (eager ops, small jits) are not worth a locked disk
  # round trip: caching every program made the suite ~50 s slower (225 -> 174 s, 2 workers).
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.2"
  os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "-1"
  # A size limit turns on the cache's file lock: test processes running side by side then never
  # read an entry another one is still writing (unlocked, a half-written executable can abort).
  os.environ["JAX_COMPILATION_CACHE_MAX_SIZE"] = str(8 << 30)
# TensorFlow is only used for input pipelines; keep it off any accelerator.
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import jax  # noqa: E402  (must come after XLA_FLAGS is set)
import pytest  # noqa: E402

jax.config.update("jax_enable_x64", False)

# The registries a user extends (`objectives.register`, `pairs.register`, `data.register`,
# `models`): (module, attribute) of each global dict.
_REGISTRIES = (
    ("selmix_jax.objectives", "_FACTORIES"), ("selmix_jax.objectives", "_ALIASES"),
    ("selmix_jax.objectives", "_CACHE"), ("selmix_jax.pairs", "_REGISTRY"),
    ("selmix_jax.data.datasets", "_REGISTRY"), ("selmix_jax.models", "_REGISTRY"),
)  # fmt: skip


@contextlib.contextmanager
def isolated_registries():
  """Registrations made inside the block are undone at its end (each registry's dict is
  replaced by a copy for the block, and the original put back)."""
  import importlib  # pylint: disable=g-import-not-at-top

  saved = []
  for module_name, attr in _REGISTRIES:
    module = importlib.import_module(module_name)
    saved.append((module, attr, getattr(module, attr)))
    setattr(module, attr, dict(getattr(module, attr)))
  try:
    yield
  finally:
    for module, attr, original in saved:
      setattr(module, attr, original)


@pytest.fixture
def registries():
  """A test's registrations (objectives, pair strategies, data sets, models) are undone after."""
  with isolated_registries():
    yield


def pytest_report_header(config):
  del config
  return f"jax {jax.__version__}, devices: {jax.device_count()} x {jax.devices()[0].platform}"


# The longest test files (seconds on the project's 2-core machine, 2026-12-04, one worker each),
# run first: `--dist loadfile` hands files to the workers in collection order, so a long file
# collected last would run alone at the end while the other worker idles.
_LONG_FILES = (
    "test_train_e2e.py", "test_resilience.py", "test_packaging.py", "test_multihost.py",
    "test_bad_inputs.py", "test_gains.py", "test_gpu_script.py", "test_objectives.py",
)  # fmt: skip


def pytest_collection_modifyitems(config, items):
  del config  # unused

  def rank(item):
    name = os.path.basename(str(item.fspath))
    return _LONG_FILES.index(name) if name in _LONG_FILES else len(_LONG_FILES)

  items.sort(key=rank)  # stable: the order within each file is kept
