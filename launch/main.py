"""Runs a selmix-jax job: `python launch/main.py --config=configs/<name>.py --workdir=<dir>`.

Without --config it runs `configs/default.py`: long-tailed digits (bundled with scikit-learn, no
download), pre-training then SelMix fine-tuning for min recall, ending with a before/after table.
For multi-host runs (TPU pods, multi-node GPU) pass --distributed or set SELMIX_DISTRIBUTED=1.
"""

import logging as std_logging
import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _REPO)  # Run from a checkout without installing.

_CONFIG = config_flags.DEFINE_config_file(
    "config",
    os.path.join(_REPO, "configs", "default.py"),
    "ml_collections config file (`path.py` or `path.py:variant`).",
    lock_config=True,
)
_WORKDIR = flags.DEFINE_string("workdir", "workdir/default", "Output and checkpoint directory.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed",
    os.environ.get("SELMIX_DISTRIBUTED", "") == "1",
    "Call jax.distributed.initialize() (multi-host).",
)


def _quiet_library_info(record: std_logging.LogRecord) -> bool:
  """Drops Orbax's per-save INFO chatter from the log; its warnings and errors still show."""
  return record.levelno >= std_logging.WARNING or f"{os.sep}orbax{os.sep}" not in record.pathname


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  std_logging.getLogger("absl").addFilter(_quiet_library_info)
  import jax  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  # TensorFlow only reads data; keep it off accelerators JAX needs.
  tf.config.set_visible_devices([], "GPU")
  if _DISTRIBUTED.value:
    jax.distributed.initialize()
  from selmix_jax import train  # pylint: disable=g-import-not-at-top

  logging.info("Config:\n%s", _CONFIG.value)
  train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  flags.mark_flags_as_required([])
  app.run(main)
