"""Shared defaults of every config (SPEC §6, §7); settings override a few fields.

Not a runnable config itself: `get_config()` here returns the defaults, which the setting files
(`cifar10_lt_ssl.py`, ...) import and change.
"""

import ml_collections

from selmix_jax import data
from selmix_jax import mislas
from selmix_jax import objectives


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.mode = "pretrain_and_selmix"
  config.seed = 0
  config.eval_batch_size = 256

  # Every data field `data.build` reads, at the one set of defaults (`pipeline.default_config`);
  # `None` fields take the data set's own default (see its docstring).
  config.data = data.default_config()

  config.model = ml_collections.ConfigDict()
  config.model.name = "cnn_small"
  config.model.kwargs = ml_collections.ConfigDict()
  # Backbone compute dtype: 'float32' or 'bfloat16' (parameters, optimiser state, BatchNorm
  # statistics, logits, losses, metrics and gains stay float32).
  config.model.dtype = "float32"

  # Pre-training (SPEC §7).
  config.pretrain = ml_collections.ConfigDict()
  config.pretrain.method = "supervised"  # or 'fixmatch'
  config.pretrain.num_steps = 1000
  config.pretrain.batch_size = 64
  config.pretrain.unlabeled_ratio = 2  # FixMatch mu (the authors' setting)
  config.pretrain.learning_rate = 0.03
  config.pretrain.schedule = "cosine"  # or 'fixmatch_cosine'
  config.pretrain.momentum = 0.9
  config.pretrain.nesterov = True
  config.pretrain.weight_decay = 5e-4
  config.pretrain.logit_adjust_tau = 1.0  # 0 -> plain cross-entropy
  config.pretrain.threshold = 0.95
  config.pretrain.unlabeled_weight = 1.0
  config.pretrain.ema_decay = 0.999
  config.pretrain.log_every = 50
  config.pretrain.eval_every = 500
  config.pretrain.checkpoint_every = 500
  # MiSLAS (method 'mislas'): its stage fields, at the release's CIFAR-10-LT values.
  config.pretrain.mislas = mislas.default_config()

  # SelMix fine-tuning (SPEC §6).
  config.selmix = ml_collections.ConfigDict()
  config.selmix.init_checkpoint = ""
  config.selmix.use_ema = True
  config.selmix.num_steps = 10_000
  config.selmix.batch_size = 64
  config.selmix.learning_rate = 3e-4
  config.selmix.backbone_lr_mult = 0.1
  # False: the head only (backbone parameters and BatchNorm statistics frozen; features use the
  # running statistics). With config.data.train_augment='none' the features are computed once.
  config.selmix.train_backbone = True
  config.selmix.weight_decay = 5e-4
  config.selmix.mix_weight_min = 0.6
  # BatchNorm in the training step: 'batch' (each pass's own statistics, SPEC §6) or 'running'.
  config.selmix.bn_stats = "batch"
  config.selmix.refresh_every = 50
  config.selmix.temperature = 0.1
  # 'absolute': P ∝ exp(G / T) (SPEC); 'max_gain': T relative to the largest positive gain, so the
  # same T concentrates P the same way at any gain scale (objective, K, feature norm).
  config.selmix.temperature_scale = "absolute"
  config.selmix.floor = ml_collections.FieldReference(None, field_type=float)  # None -> 1/K
  config.selmix.gain_form = "exact"  # or 'reference' (the authors' release)
  config.selmix.train_bias = False
  config.selmix.gain_chunk_size = ml_collections.FieldReference(None, field_type=int)
  config.selmix.pairs = "gain"  # controls: 'uniform' pairs, 'instance' sampling
  config.selmix.partner_pool = "labeled"  # 'unlabeled' for semi-supervised (pseudo-labels)
  # Semi-supervised partners are keyed by 'pseudo' labels (SPEC §5), or by the unlabeled pool's
  # 'true' labels: an oracle that reproduces the authors' release protocol.
  config.selmix.partner_labels = "pseudo"
  config.selmix.early_stop = False
  config.selmix.early_stop_window = 10
  config.selmix.early_stop_tol = 0.05
  config.selmix.log_every = 50
  config.selmix.eval_every = 1000
  config.selmix.checkpoint_every = 500

  config.objective = ml_collections.ConfigDict()
  config.objective.name = "min_recall"
  # Objective hyperparameters (SPEC §3); None = the objective's own default. A user objective
  # receives only the ones set here, as keyword arguments.
  config.objective.hparams = ml_collections.ConfigDict()
  for name, field_type in (
      ("omega", float), ("beta", float), ("alpha", float), ("tau", float),
      ("multiplier_max", float), ("recall_smoothing", float),
      ("head_mask", tuple),  # [K] bools: head classes (default the first 90 %), also in reports
  ):  # fmt: skip
    config.objective.hparams[name] = ml_collections.FieldReference(None, field_type=field_type)
  return config


def selmix_variant(config: ml_collections.ConfigDict, arg: str) -> ml_collections.ConfigDict:
  """Applies a `:pretrain` or `:<objective>` suffix of `--config=file.py:<arg>`."""
  if not arg or arg == "pretrain":
    config.mode = "pretrain"
    return config
  if not objectives.is_known(arg):
    raise ValueError(
        f"Config variant {arg!r}: expected 'pretrain' or one of {tuple(objectives.names())}."
    )
  config.mode = "selmix"
  config.objective.name = arg
  return config
