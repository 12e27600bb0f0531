r"""SelMix on a linear head over precomputed features (any encoder's embeddings), on a CPU.

Data: `config.data.path`, an `.npz` (or a folder of `.npy` files) with `{train,val,test}_features`
[N, D], `{train,val,test}_labels` [N] and optionally `class_names` (`selmix_jax/data/features.py`;
`benchmarks/export_features.py` writes one from a pre-trained image backbone). No 'val' split in
the file: `val_per_class` examples per class are held out of 'train'. With one, all of it is used
(`val_per_class=0` here; set it > 0 to draw a balanced subset). 'train' is used as it is
(`labeled_max=-1`); `--config.data.labeled_max=N1 --config.data.labeled_imbalance=rho` draws a
long-tailed subset of it instead. The model is the 'linear' head (identity backbone).

Pre-train the head (logit-adjusted CE; `--config.pretrain.logit_adjust_tau=0` for plain CE), then
SelMix for min recall, in one invocation:

  python launch/main.py --config=configs/features.py --config.data.path=feats.npz \
    --workdir=runs/feats/min_recall

or fine-tune from one pre-training with each objective and the two controls:

  python launch/main.py --config=configs/features.py:pretrain --config.data.path=feats.npz \
    --workdir=runs/feats/pre
  python launch/main.py --config=configs/features.py:hmean_recall --config.data.path=feats.npz \
    --config.selmix.init_checkpoint=runs/feats/pre/checkpoints --workdir=runs/feats/hmean
  # controls: `:plain_ft` (CE fine-tuning of the head), `:uniform_mixup` (P uniform)
  python benchmarks/cifar10_lt_table.py runs/feats

K = 1,000 classes, D = 2,048, 100k training vectors: pre-training (45 s) plus this SelMix run
(55 s) on the project's 2-core AMD EPYC while other jobs shared it (load average 5-8; 70 s of CPU
time): `python benchmarks/features_k1000.py`, numbers in benchmarks/README.md.
`selmix_jax.head.fit` runs the same schedule in 39 s of CPU time.
"""

import ml_collections

from selmix_jax.configs import base

VARIANTS = ("pretrain", "plain_ft", "uniform_mixup")


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  config = base.get_config()
  config.mode = "pretrain_and_selmix"
  config.eval_batch_size = 1024

  config.data.name = "features"
  config.data.path = ""
  config.data.labeled_max = -1  # the file's training split as it is
  config.data.val_per_class = 0  # all of the file's 'val'; > 0 when it has none (held out)
  config.data.train_augment = "none"

  config.model.name = "linear"

  config.pretrain.method = "supervised"
  config.pretrain.num_steps = 600
  config.pretrain.batch_size = 256
  config.pretrain.learning_rate = 0.1
  config.pretrain.weight_decay = 5e-4
  config.pretrain.logit_adjust_tau = 1.0
  config.pretrain.log_every = 100
  config.pretrain.eval_every = 0
  config.pretrain.checkpoint_every = 0

  config.selmix.use_ema = False
  config.selmix.num_steps = 300
  config.selmix.batch_size = 256
  config.selmix.learning_rate = 1e-2
  # A refresh is a validation pass (N_val x D x K multiply-adds) plus G at K^2 (41 ms at K = 1000,
  # D = 2048, benchmarks/gain_bench.py); 30 steps of 256 cost ~8x that validation pass at
  # N_val = 10 K, so refreshes take ~1/4 of the run at K = 1000 and P is never more than 30
  # small head steps stale. (Images use 10: there a step moves the backbone too.)
  config.selmix.refresh_every = 30
  # Gains scale with K and the feature norm: at K = 1000 the largest was ~5e-4, where T = 0.1
  # absolute leaves P uniform (uniform mixup); T relative to the largest gain concentrates it
  # (~3k effective pairs of 10^6) at any scale.
  config.selmix.temperature_scale = "max_gain"
  config.selmix.log_every = 50
  config.selmix.eval_every = 0
  config.selmix.checkpoint_every = 0

  if arg in ("plain_ft", "uniform_mixup"):
    config.mode = "selmix"
    config.selmix.refresh_every = config.selmix.num_steps  # P unused: refreshes only log.
    config.selmix.pairs = "instance" if arg == "plain_ft" else "uniform"
    if arg == "plain_ft":
      config.selmix.mix_weight_min = 1.0  # mix weight 1: the plain features of x1
    return config
  if not arg:
    return config
  return base.selmix_variant(config, arg)
