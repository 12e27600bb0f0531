r"""ImageNet-1k-LT supervised (SPEC §8): the ImageNet-LT split, ResNet-50, logit-adjusted CE.

  python launch/main.py --config=configs/imagenet_lt_sup.py:pretrain --workdir=runs/inlt/pre
  python launch/main.py --config=configs/imagenet_lt_sup.py:min_head_tail_recall \
    --config.selmix.init_checkpoint=runs/inlt/pre/checkpoints --workdir=runs/inlt/mht

The labeled set is ImageNet-LT's train split as published (`labeled_max = -1`: no further
sub-sampling); validation is its balanced 20-per-class `validation` split, test its 50-per-class
test split. K = 1000: the gain matrix is computed in row chunks (SPEC §4).
Expected (SPEC §9, x100, paper, from MiSLAS): mean recall 52.4 -> 52.8 (SelMix mean_recall),
min head-tail recall 29.7 -> 45.1 (SelMix min_head_tail_recall).
The authors' release has no ImageNet-LT configs or checkpoints; early stopping is on as in
its fine-tuning. Batch 256 is ours (the release fine-tunes its other settings with 64).
Training views are RandomResizedCrop + flip (`data.train_augment`); JPEGs decode in worker
processes (`data.num_workers`).
"""

import ml_collections

from selmix_jax.configs import base


def get_config(arg: str = "pretrain") -> ml_collections.ConfigDict:
  config = base.get_config()
  config.data.name = "imagenet_lt"
  config.data.image_size = 224
  config.data.labeled_max = -1
  config.data.val_per_class = 0
  config.data.train_augment = "random_resized_crop"  # the standard ImageNet recipe (+ flip)
  config.model.name = "resnet50"
  config.pretrain.method = "supervised"
  config.pretrain.num_steps = 100_000
  config.pretrain.batch_size = 256
  config.pretrain.learning_rate = 0.2
  config.pretrain.eval_every = 5000
  config.pretrain.checkpoint_every = 5000
  config.eval_batch_size = 512
  config.selmix.batch_size = 256
  config.selmix.use_ema = False
  config.selmix.early_stop = True  # as every fine-tuning run of the release
  config.selmix.gain_chunk_size = 100
  return base.selmix_variant(config, arg)
