r"""CIFAR-100-LT supervised (SPEC §8): ResNet-32, logit-adjusted CE.

N1 = 450 (500 minus the 50-per-class validation), rho = 100.

  python launch/main.py --config=configs/cifar100_lt_sup.py:pretrain --workdir=runs/c100sup/pre
  python launch/main.py --config=configs/cifar100_lt_sup.py:min_head_tail_recall \
    --config.selmix.init_checkpoint=runs/c100sup/pre/checkpoints --workdir=runs/c100sup/mht

Expected: no SPEC §9 number for this setting; compare pre-trained vs SelMix on the same run.

MiSLAS pre-training (the release's cifar100_imb001 yamls: smoothing 0.4 head -> 0.1 tail,
`shift_bn` on, head learning rate 0.2 x 0.1), then SelMix from it:

  python launch/main.py --config=configs/cifar100_lt_sup.py:pretrain,mislas \
    --workdir=runs/c100mislas/pre
  python launch/main.py --config=configs/cifar100_lt_sup.py:min_head_tail_recall,mislas \
    --config.selmix.init_checkpoint=runs/c100mislas/pre/checkpoints --workdir=runs/c100mislas/mht

Stage 1: 200 epochs x ceil(9,754 / 128) = 15,400 steps; stage 2: 770 steps. Expected (MiSLAS
README, top-1 x100 on test, their 10,847 training images): stage 1 39.5, stage 2 47.0.
"""

import ml_collections

from selmix_jax.configs import base
from selmix_jax.configs import cifar10_lt_sup


def get_config(arg: str = "pretrain") -> ml_collections.ConfigDict:
  arg, use_mislas = cifar10_lt_sup.split_variant(arg)
  config = cifar10_lt_sup.get_config("pretrain,mislas" if use_mislas else "pretrain")
  config.data.name = "cifar100"
  config.data.labeled_max = 450
  config.data.val_per_class = 50
  if use_mislas:
    m = config.pretrain.mislas
    m.smooth_head, m.smooth_tail, m.shift_bn, m.head_lr_factor = 0.4, 0.1, True, 0.2
  return base.selmix_variant(config, arg)
