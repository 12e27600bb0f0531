r"""STL-10-LT semi-supervised (SPEC §8): N1 = 450, rho_l = 10 (or 100), the 100k unlabeled split.

  python launch/main.py --config=configs/stl10_lt_ssl.py:pretrain --workdir=runs/stl/pre
  python launch/main.py --config=configs/stl10_lt_ssl.py:min_recall \
    --config.selmix.init_checkpoint=runs/stl/pre/checkpoints --workdir=runs/stl/min_recall

The unlabeled pool is STL-10's `unlabelled` split as it is (its class distribution is unknown),
so `unlabeled_max = -1` means "the whole split". rho_l = 100: `--config.data.labeled_imbalance=100`.
STL-10 has 500 training images per class, so the validation set is 50 per class here.
Expected: no SPEC §9 number; compare pre-trained vs SelMix on the same run.
"""

import ml_collections

from selmix_jax.configs import base
from selmix_jax.configs import cifar10_lt_ssl


def get_config(arg: str = "pretrain") -> ml_collections.ConfigDict:
  config = cifar10_lt_ssl.get_config("pretrain")
  config.data.name = "stl10"
  config.data.labeled_max = 450
  config.data.labeled_imbalance = 10.0
  config.data.unlabeled_max = -1
  config.data.unlabeled_imbalance = 1.0
  config.data.val_per_class = 50
  return base.selmix_variant(config, arg)
