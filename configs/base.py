"""Shared defaults of every config (SPEC §6, §7); settings override a few fields.

Not a runnable config itself: `get_config()` here returns the defaults, which the setting files
(`cifar10_lt_ssl.py`, ...) import and change.
"""

import ml_collections

from selmix_jax import data
from selmix_jax import mislas
from selmix_jax import objectives
from selmix_jax.data import pipeline


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
        f"Config variant {arg!r}: expected 'pretrain' or one of {tuple(objectives.names())} "
        f"(or an alias: {', '.join(sorted(objectives.aliases()))})."
    )
  config.mode = "selmix"
  config.objective.name = arg
  return config


# One line per field of `get_config()` outside `data` (whose fields `pipeline.build`'s docstring
# documents): what `python launch/main.py --help` prints beside each default. A test keeps it
# complete (every field has a line, every line a field).
FIELD_DOCS = {
    "mode": "'pretrain_and_selmix' (both stages in one run), 'pretrain', or 'selmix' (from "
            "selmix.init_checkpoint)",
    "seed": "seed of initialisation, augmentation and batch order (data.seed draws the splits)",
    "eval_batch_size": "global batch of every evaluation pass (validation, test, refreshes)",
    "model.name": "backbone + linear head (the models listed below)",
    "model.kwargs": "backbone options, e.g. {'width': 8} for cnn_small (set in a config file)",
    "model.dtype": "backbone compute dtype, 'float32' or 'bfloat16' (parameters, logits, losses "
                   "and gains stay float32)",
    "pretrain.method": "'supervised' (logit-adjusted cross-entropy), 'fixmatch' (FixMatch(LA), "
                       "semi-supervised) or 'mislas' (MiSLAS: mixup, then a re-trained "
                       "label-aware classifier; its fields below)",
    "pretrain.num_steps": "pre-training steps",
    "pretrain.batch_size": "global labeled batch per step",
    "pretrain.unlabeled_ratio": "FixMatch mu: unlabeled images per labeled one in a batch",
    "pretrain.learning_rate": "peak SGD learning rate",
    "pretrain.schedule": "'cosine' (to 0 over num_steps) or 'fixmatch_cosine' (FixMatch's "
                         "7/16-period cosine)",
    "pretrain.momentum": "SGD momentum",
    "pretrain.nesterov": "Nesterov momentum",
    "pretrain.weight_decay": "L2 weight decay",
    "pretrain.logit_adjust_tau": "logit adjustment tau of the loss; 0 = plain cross-entropy",
    "pretrain.threshold": "FixMatch confidence threshold of a pseudo-label",
    "pretrain.unlabeled_weight": "FixMatch weight of the unlabeled loss",
    "pretrain.ema_decay": "decay of the EMA of the weights (evaluated, and fine-tuned if "
                          "selmix.use_ema)",
    "pretrain.log_every": "steps between training-metric logs",
    "pretrain.eval_every": "steps between validation passes",
    "pretrain.checkpoint_every": "steps between checkpoints (a stopped run resumes from the last)",
    "pretrain.mislas.stage1_epochs": "MiSLAS stage 1 (mixup, whole model): epochs "
                                     "(pretrain.num_steps is not used)",
    "pretrain.mislas.alpha": "MiSLAS stage 1 mixup weight ~ Beta(alpha, alpha)",
    "pretrain.mislas.schedule": "MiSLAS stage 1 per-epoch schedule: 'step' (warm-up, then x "
                                "decay_factor at decay_epochs) or 'cosine'",
    "pretrain.mislas.warmup_epochs": "MiSLAS stage 1 linear warm-up epochs ('step' schedule)",
    "pretrain.mislas.decay_epochs": "MiSLAS stage 1 epochs where the 'step' schedule decays",
    "pretrain.mislas.decay_factor": "MiSLAS stage 1 learning-rate factor at each decay epoch",
    "pretrain.mislas.stage2_epochs": "MiSLAS stage 2 (frozen backbone, class-balanced batches, "
                                     "label-aware smoothing): epochs",
    "pretrain.mislas.stage2_learning_rate": "MiSLAS stage 2 learning rate of the per-class "
                                            "logit scales (LWS)",
    "pretrain.mislas.head_lr_factor": "MiSLAS stage 2 classifier learning rate / "
                                      "stage2_learning_rate",
    "pretrain.mislas.smooth_head": "MiSLAS label smoothing of the most frequent class",
    "pretrain.mislas.smooth_tail": "MiSLAS label smoothing of the least frequent class",
    "pretrain.mislas.smooth_shape": "MiSLAS smoothing from head to tail: 'concave', 'linear' "
                                    "or 'convex'",
    "pretrain.mislas.shift_bn": "MiSLAS stage 2 runs the backbone with batch statistics "
                                "(re-estimating its running statistics)",
    "pretrain.mislas.samples_per_class": "MiSLAS stage 2: consecutive examples of one class in "
                                         "the class-balanced stream",
    "selmix.init_checkpoint": "the pre-trained model: <pretrain workdir>/checkpoints, or a "
                              "converted release checkpoint (set by pretrain_and_selmix)",
    "selmix.use_ema": "fine-tune the checkpoint's EMA weights (when it has them)",
    "selmix.num_steps": "fine-tuning steps",
    "selmix.batch_size": "global batch of mixup pairs per step",
    "selmix.learning_rate": "head learning rate (cosine); the backbone's is this x "
                            "backbone_lr_mult",
    "selmix.backbone_lr_mult": "backbone learning rate / head learning rate",
    "selmix.weight_decay": "L2 weight decay",
    "selmix.mix_weight_min": "the mix weight of x1 is drawn from U[mix_weight_min, 1] (1 = no "
                             "mixup)",
    "selmix.bn_stats": "BatchNorm in the step: 'batch' (each pass's own statistics, SPEC) or "
                       "'running'",
    "selmix.refresh_every": "steps between refreshes of the gains G and the pair distribution P",
    "selmix.temperature": "T of P ∝ exp(G / T) over the positive-gain pairs; smaller "
                          "concentrates P",
    "selmix.temperature_scale": "'absolute' (P ∝ exp(G / T), SPEC) or 'max_gain' (T relative "
                                "to the largest gain: the same T at any gain scale)",
    "selmix.floor": "weight of the uniform floor mixed into P (None = 1/K)",
    "selmix.gain_form": "'exact' gain (SPEC) or 'reference' (the authors' release)",
    "selmix.train_bias": "the gain's SGD step also moves the head bias",
    "selmix.train_backbone": "False = fine-tune the head only (the backbone and its BatchNorm "
                             "statistics stay frozen; with train_augment='none' on features "
                             "computed once)",
    "selmix.gain_chunk_size": "rows of the gain matrix computed at once (None = automatic; "
                              "set for large K)",
    "selmix.pairs": "pair strategy (listed below): 'gain' (SelMix), controls 'uniform', "
                    "'instance'",
    "selmix.partner_pool": "where the partner x2 comes from: 'labeled', or 'unlabeled' "
                           "(semi-supervised, pseudo-labelled)",
    "selmix.partner_labels": "classes of unlabeled partners: 'pseudo' (SPEC) or 'true' (the "
                             "release's oracle)",
    "selmix.early_stop": "stop when the max gain has plateaued (SPEC §6)",
    "selmix.early_stop_window": "refreshes the plateau is measured over",
    "selmix.early_stop_tol": "relative change of the max gain counted as a plateau",
    "selmix.log_every": "steps between training-metric logs",
    "selmix.eval_every": "steps between test passes (validation runs at every refresh)",
    "selmix.checkpoint_every": "steps between checkpoints",
    "objective.name": "what SelMix fine-tunes for (the objectives listed below; aliases work)",
    "objective.hparams.omega": "sharpness omega of the min_recall / min_head_tail_recall "
                               "multipliers (softmin of the recalls)",
    "objective.hparams.beta": "exponent beta of the min_recall multiplier update "
                              "(lambda ∝ lambda^beta exp(-omega r))",
    "objective.hparams.alpha": "coverage constraints: coverage >= alpha / K",
    "objective.hparams.tau": "temperature tau of the coverage multiplier rule",
    "objective.hparams.multiplier_max": "cap lambda_max of the coverage multipliers",
    "objective.hparams.recall_smoothing": "the G-/H-mean gains use recalls r + this",
    "objective.hparams.head_mask": "[K] bools, True = head class (None = the first int(0.9 K) "
                                   "classes in class order)",
}


def field_docs() -> dict[str, str]:
  """`{dotted field: one-line meaning}` of every leaf field of `get_config()`, in the order
  `--help` prints them: top-level, data (from `pipeline.build`'s docstring), then the rest."""
  docs = {k: v for k, v in FIELD_DOCS.items() if "." not in k}
  docs.update({f"data.{k}": v for k, v in pipeline.field_docs().items()})
  docs.update({k: v for k, v in FIELD_DOCS.items() if "." in k})
  return docs
