r"""STL-10-LT semi-supervised (SPEC §8): N1 = 450, rho_l = 10 (or 100), the 100k unlabeled split.

  python launch/main.py --config=configs/stl10_lt_ssl.py:pretrain --workdir=runs/stl/pre
  python launch/main.py --config=configs/stl10_lt_ssl.py:min_recall \
    --config.selmix.init_checkpoint=runs/stl/pre/checkpoints --workdir=runs/stl/min_recall

The unlabeled pool is STL-10's `unlabelled` split as it is (its class distribution is unknown),
so `unlabeled_max = -1` means "the whole split". rho_l = 100: `--config.data.labeled_imbalance=100`.
STL-10 has 500 training images per class, so the validation set is 50 per class here.

The authors' published FixMatch(LA) checkpoint (rho_l = 10; link in README.md) converts with
  python -m selmix_jax.convert --torch_checkpoint=fixmatch_la.pth --model=wrn28_2 \
    --num_classes=10 --out=runs/stl/release
The release trains and evaluates STL-10 resized to 32x32 (its `size: 32`); so does this config
(`data.image_size = 32`, antialiased bilinear; `--config.data.image_size=96` keeps the native
size). Pre-training runs 2^20 steps as in the release.
`--config.selmix.partner_labels=true` would draw mixup partners by true labels as the release
does, but STL-10's unlabeled split has no labels.

Expected: no SPEC §9 number (the release publishes none for STL-10); compare pre-trained vs
SelMix on the same run.
"""

import ml_collections

from selmix_jax.configs import base
from selmix_jax.configs import cifar10_lt_ssl


def get_config(arg: str = "pretrain") -> ml_collections.ConfigDict:
  config = cifar10_lt_ssl.get_config("pretrain")
  config.data.name = "stl10"
  config.data.image_size = 32  # The release's size.
  config.data.labeled_max = 450
  config.data.labeled_imbalance = 10.0
  config.data.unlabeled_max = -1
  config.data.unlabeled_imbalance = 1.0
  config.data.val_per_class = 50
  return base.selmix_variant(config, arg)
