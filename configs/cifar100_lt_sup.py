r"""CIFAR-100-LT supervised (SPEC §8): ResNet-32, logit-adjusted CE.

N1 = 450 (500 minus the 50-per-class validation), rho = 100.

  python launch/main.py --config=configs/cifar100_lt_sup.py:pretrain --workdir=runs/c100sup/pre
  python launch/main.py --config=configs/cifar100_lt_sup.py:min_head_tail_recall \
    --config.selmix.init_checkpoint=runs/c100sup/pre/checkpoints --workdir=runs/c100sup/mht

Expected: no SPEC §9 number for this setting; compare pre-trained vs SelMix on the same run.
"""

import ml_collections

from selmix_jax.configs import base
from selmix_jax.configs import cifar10_lt_sup


def get_config(arg: str = "pretrain") -> ml_collections.ConfigDict:
  config = cifar10_lt_sup.get_config("pretrain")
  config.data.name = "cifar100"
  config.data.labeled_max = 450
  config.data.val_per_class = 50
  return base.selmix_variant(config, arg)
