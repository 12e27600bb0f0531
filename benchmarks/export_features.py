r"""Writes a pre-trained image model's features of a run's splits as a features `.npz`.

  python benchmarks/export_features.py --config=configs/cifar10_lt_cpu.py:pretrain \
    --checkpoint=runs/c10cpu/pre/checkpoints --out=runs/c10cpu/features.npz

The splits are those `--config`'s `data` section draws (CIFAR-10-LT: the long-tailed labeled set
as 'train', the balanced validation set with its flipped copies as 'val', the 10,000 test images
as 'test'), with the class names; features come from the backbone with BatchNorm on its running
statistics and no augmentation (`frozen.export`; the EMA weights when the checkpoint has them and
`config.selmix.use_ema`). `benchmarks/features_table.sh` runs head-only SelMix and the controls
on the file; `configs/features.py` (`--config.data.path=`) and `selmix_jax.head.fit` read it.
"""

import json

from absl import app
from absl import flags
from ml_collections import config_flags

from selmix_jax import frozen

_CONFIG = config_flags.DEFINE_config_file("config", None, "The pre-training run's config.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Its `<workdir>/checkpoints` folder.")
_OUT = flags.DEFINE_string("out", None, "The .npz to write.")


def main(argv):
  del argv
  info = frozen.export(_CONFIG.value, _CHECKPOINT.value, _OUT.value)
  print(f"{_OUT.value}: step {info['step']} ({info['weights']} weights), "
        f"{json.dumps(info['shapes'])}")


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "checkpoint", "out"])
  app.run(main)
