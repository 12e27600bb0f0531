r"""ImageNet-100-LT semi-supervised (SPEC §8): N1 = 433, rho_l = 10, M1 = 866, rho_u = 10, ResNet-50.

  python launch/main.py --config=configs/imagenet100_lt_ssl.py:pretrain --workdir=runs/in100/pre
  python launch/main.py --config=configs/imagenet100_lt_ssl.py:min_recall \
    --config.selmix.init_checkpoint=runs/in100/pre/checkpoints --workdir=runs/in100/min_recall

Images stream from TFDS `imagenet2012` (manual download), resized to 112 px as in the
long-tailed SSL literature; the 100 classes are the list shipped in `selmix_jax/data`.
ImageNet has at most 1300 training images per class and 433 + 866 of them are drawn, which leaves
no room for a held-out validation set: validation is a balanced 10-per-class subset of the official
validation split, which is also the test split, so test numbers are not independent of the gain
estimate here (the long-tailed SSL literature evaluates on that split too).
Expected: no SPEC §9 number; compare pre-trained vs SelMix on the same run.
"""

import ml_collections

from selmix_jax.configs import base
from selmix_jax.configs import cifar10_lt_ssl


def get_config(arg: str = "pretrain") -> ml_collections.ConfigDict:
  config = cifar10_lt_ssl.get_config("pretrain")
  config.data.name = "imagenet100"
  config.data.image_size = 112
  config.data.labeled_max = 433
  config.data.labeled_imbalance = 10.0
  config.data.unlabeled_max = 866
  config.data.unlabeled_imbalance = 10.0
  config.data.val_split = "validation"
  config.data.val_per_class = 10
  config.data.val_flip = False
  config.model.name = "resnet50"
  config.eval_batch_size = 512
  return base.selmix_variant(config, arg)
