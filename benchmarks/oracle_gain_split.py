r"""Diagnostic upper bound: SelMix with its gains computed on the *test* split (not a result).

SelMix levels the recalls it sees at each refresh. With 500 validation images a class, each
recall estimate has a standard error of ~2 points, so the test recalls after leveling on
validation scatter around the group level and the test minimum falls below it. This run swaps
the validation split for the test split in every refresh (and in the `val` rows of the summary),
so it measures what SelMix reaches on test when its estimates carry no validation noise. It tunes
nothing and reports nothing as a result: it answers whether a target missed on test is out of
reach of the backbone (the oracle misses it too) or lost to validation noise (the oracle meets it).

  python benchmarks/oracle_gain_split.py --config=configs/cifar10_lt_cpu.py:min_recall \
    --config.selmix.init_checkpoint=runs/c10cpu/pre/checkpoints --workdir=runs/oracle/min_recall
"""

import dataclasses
import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_CONFIG = config_flags.DEFINE_config_file("config", None, "A SelMix config (`file.py:variant`).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory.", required=True)


def main(argv):
  del argv
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  tf.config.set_visible_devices([], "GPU")
  from selmix_jax import data  # pylint: disable=g-import-not-at-top
  from selmix_jax import finetune  # pylint: disable=g-import-not-at-top
  from selmix_jax import train  # pylint: disable=g-import-not-at-top

  config = _CONFIG.value
  if config.mode != "selmix":
    raise app.UsageError(f"--config must be a SelMix variant (mode 'selmix'), not {config.mode!r}.")
  train.validate(config)
  datasets = data.build(config.data)
  oracle = dataclasses.replace(datasets, val=datasets.test)
  logging.warning("Oracle diagnostic: SelMix refreshes read the TEST split (%d images).",
                  len(datasets.test))
  result = finetune.run(config, _WORKDIR.value, oracle)
  for when in ("before", "after"):
    test = result[when]["test"]
    print(f"{when}: test mean recall {100 * test['mean_recall']:.2f}, "
          f"min recall {100 * test['min_recall']:.2f}", flush=True)


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  app.run(main)
