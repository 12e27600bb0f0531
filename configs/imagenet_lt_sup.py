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

MiSLAS pre-training, the release's imagenet_resnet50 yamls (stage 1: 180 epochs of mixup with
alpha 0.2, batch 256, lr 0.1 per-epoch cosine, weight decay 5e-4; stage 2: 10 epochs, smoothing
0.3 head -> 0.0 tail, `shift_bn` on, head learning rate 0.05 x 0.1):

  python launch/main.py --config=configs/imagenet_lt_sup.py:pretrain,mislas \
    --workdir=runs/inlt_mislas/pre

Stage 1: 180 x ceil(115,846 / 256) = 81,540 steps; stage 2: 4,530 steps. Expected (MiSLAS README,
top-1 x100 on test): stage 1 45.5, stage 2 52.7.
"""

import ml_collections

from selmix_jax.configs import base
from selmix_jax.configs import cifar10_lt_sup


def get_config(arg: str = "pretrain") -> ml_collections.ConfigDict:
  arg, use_mislas = cifar10_lt_sup.split_variant(arg)
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
  if use_mislas:
    config.pretrain.method = "mislas"
    config.pretrain.learning_rate = 0.1
    config.pretrain.weight_decay = 5e-4
    m = config.pretrain.mislas
    m.stage1_epochs, m.alpha, m.schedule = 180, 0.2, "cosine"
    m.smooth_head, m.smooth_tail, m.shift_bn, m.head_lr_factor = 0.3, 0.0, True, 0.05
  return base.selmix_variant(config, arg)
