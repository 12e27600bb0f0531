r"""ImageNet-100-LT semi-supervised (SPEC §8): N1 433, rho_l 10, M1 866, rho_u 10, ResNet-50.

  python launch/main.py --config=configs/imagenet100_lt_ssl.py:pretrain --workdir=runs/in100/pre
  python launch/main.py --config=configs/imagenet100_lt_ssl.py:min_recall \
    --config.selmix.init_checkpoint=runs/in100/pre/checkpoints --workdir=runs/in100/min_recall

Or fine-tune the authors' published FixMatch(LA) checkpoint, downloaded as fixmatch_la.pth
(link: README.md, "Reproduce the paper from the published checkpoints"):
  python -m selmix_jax.convert --torch_checkpoint=fixmatch_la.pth --model=resnet50 \
    --num_classes=100 --out=runs/in100/release
  python launch/main.py --config=configs/imagenet100_lt_ssl.py:min_recall \
    --config.selmix.init_checkpoint=runs/in100/release --workdir=runs/in100/release_min_recall
`--config.selmix.partner_labels=true` draws mixup partners by the unlabeled pool's true labels as
the release does (an oracle, for comparison only; SPEC §5 uses pseudo-labels).

Images stream from TFDS `imagenet2012` (manual download) at 224 px as in the release; the 100
classes are the list shipped in `selmix_jax/data`. Pre-training as the release's
`configs/imagenet100/pretraining/fixmatchLA.yaml`: 2^20 steps, batch 256 (+ 512 unlabeled),
lr 0.4 (cosine 7/16), weight decay 3e-4, confidence threshold 0.7, unlabeled loss weight 10.
The release augments with RandomResizedCrop(224) (+ flip; RandAugment for the strong view) and
evaluates on Resize(256) + CenterCrop(224); ours uses RandomResizedCrop + flip too
(`data.train_augment`, on device, from the stored shorter-side-224 centre square rather than the
original file; strong view: + RandAugment + Cutout) and evaluates on a shorter-side resize to 224
+ centre crop (no switch for Resize(256) exists yet). JPEGs decode in worker processes
(`data.num_workers`, default every CPU but one).
ImageNet has at most 1300 training images per class and 433 + 866 of them are drawn, which leaves
no room for a held-out validation set: validation is a balanced 10-per-class subset of the official
validation split, and the test set is the rest of that split (the two never overlap; the release
validates on a random half of it and tests on the other half).
Expected: no SPEC §9 number (the release publishes none for ImageNet-100); compare pre-trained vs
SelMix on the same run.
"""

import ml_collections

from selmix_jax.configs import base
from selmix_jax.configs import cifar10_lt_ssl


def get_config(arg: str = "pretrain") -> ml_collections.ConfigDict:
  config = cifar10_lt_ssl.get_config("pretrain")
  config.data.name = "imagenet100"
  config.data.image_size = 224  # the release's size (was 112)
  config.data.labeled_max = 433
  config.data.labeled_imbalance = 10.0
  config.data.unlabeled_max = 866
  config.data.unlabeled_imbalance = 10.0
  config.data.val_split = "validation"
  config.data.val_per_class = 10
  config.data.val_flip = False
  config.data.train_augment = "random_resized_crop"  # as the release (was pad-and-crop)
  config.model.name = "resnet50"
  config.eval_batch_size = 512
  # FixMatch(LA) pre-training values of the release (fixmatchLA.yaml).
  config.pretrain.batch_size = 256
  config.pretrain.learning_rate = 0.4
  config.pretrain.weight_decay = 3e-4
  config.pretrain.threshold = 0.7
  config.pretrain.unlabeled_weight = 10.0
  return base.selmix_variant(config, arg)
