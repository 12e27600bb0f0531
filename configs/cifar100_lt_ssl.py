r"""CIFAR-100-LT semi-supervised (SPEC §8): N1 = 150, rho_l = 10, M1 = 300, rho_u = 10, WRN-28-2.

  python launch/main.py --config=configs/cifar100_lt_ssl.py:pretrain --workdir=runs/c100ssl/pre
  python launch/main.py --config=configs/cifar100_lt_ssl.py:min_head_tail_recall \
    --config.selmix.init_checkpoint=runs/c100ssl/pre/checkpoints --workdir=runs/c100ssl/mht

Expected (SPEC §9, x100, paper): min head-tail recall 34.6 (FixMatch(LA)) -> 57.8 (SelMix).
"""

import ml_collections

from selmix_jax.configs import base
from selmix_jax.configs import cifar10_lt_ssl


def get_config(arg: str = "pretrain") -> ml_collections.ConfigDict:
  config = cifar10_lt_ssl.get_config("pretrain")
  config.data.name = "cifar100"
  config.data.labeled_max = 150
  config.data.labeled_imbalance = 10.0
  config.data.unlabeled_max = 300
  config.data.unlabeled_imbalance = 10.0
  config.data.val_per_class = 50
  return base.selmix_variant(config, arg)
