"""MiSLAS pre-training (Zhong et al., CVPR 2021): mixup, then a label-aware re-trained classifier.

`config.pretrain.method = 'mislas'` runs the two stages of the MiSLAS release
(github.com/dvlab-research/MiSLAS, `train_stage1.py` / `train_stage2.py`):

- Stage 1 (`<workdir>/stage1/`): the whole model trained with mixup (one mix weight
  `~ Beta(alpha, alpha)` per batch, inputs mixed with a permutation of the batch, loss
  `w CE(y) + (1 - w) CE(y_perm)`), SGD momentum 0.9 (no Nesterov), weight decay on every
  parameter, a per-epoch schedule: linear warm-up over 5 epochs then x0.1 at epochs 160 and 180
  (CIFAR), or per-epoch cosine (ImageNet). It is `pretrain.run` itself (`mixup_step` as the step).
- Stage 2 (`<workdir>/stage2/`): backbone weights frozen; class-balanced batches
  (`ClassBalancedBatches`: their `ClassAwareSampler`); label-aware smoothing
  (`label_aware_smoothing`, `smoothed_cross_entropy`); learnable weight scaling (a per-class
  scale on the logits, initialised to 1) trained with the classifier, which continues from its
  stage-1 weights at `head_lr_factor` times the scale's learning rate; per-epoch cosine schedule.
  With `shift_bn` the backbone runs in training mode (batch statistics; running statistics
  re-estimated on the class-balanced batches), as their `shift_bn: True` does; without it the
  backbone runs on its stage-1 running statistics, which stay unchanged.
- The end: the scales are folded into the head (`fold_lws`: kernel columns and bias times the
  per-class scale, the same logits) and the plain `Classifier` is checkpointed in
  `<workdir>/checkpoints`, where SelMix fine-tuning reads it as any pre-trained model.

Every step is a module-level per-device function with named-axis collectives (see `steps`), and
batches and random draws are functions of `(seed, step)`, so both stages resume exactly.
"""

import dataclasses
import functools
import math
import os
import time
from typing import Any, Callable

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from selmix_jax import checkpointing
from selmix_jax import evaluation
from selmix_jax import loop
from selmix_jax import models
from selmix_jax import reporting
from selmix_jax import train_state
from selmix_jax import workdir as workdir_lib
from selmix_jax.data import augment
from selmix_jax.data import loader
from selmix_jax.data import pipeline

STAGE1_DIR, STAGE2_DIR = "stage1", "stage2"
SCHEDULES = ("step", "cosine")
SMOOTHING_SHAPES = ("concave", "linear", "convex")

# Random streams (after the step fold), distinct from `steps`' 0-5.
_STREAM_WEAK, _STREAM_MIXUP, _STREAM_STAGE2 = 0, 10, 11


def default_config() -> ml_collections.ConfigDict:
  """`config.pretrain.mislas`: the release's CIFAR-10-LT (imb 0.01) yaml values.

  Stage 1 also reads `config.pretrain.{batch_size, learning_rate, momentum, weight_decay}`;
  stage 2 reads the same batch size, momentum and weight decay (their yamls share them).
  """
  c = ml_collections.ConfigDict()
  c.stage1_epochs = 200
  c.alpha = 1.0  # mixup Beta(alpha, alpha)
  c.schedule = "step"  # 'step' (warm-up, then x decay_factor at decay_epochs) or 'cosine'
  c.warmup_epochs = 5
  c.decay_epochs = (160, 180)
  c.decay_factor = 0.1
  c.stage2_epochs = 10
  c.stage2_learning_rate = 0.1  # of the LWS scales; the head's is head_lr_factor times it
  c.head_lr_factor = 0.5
  c.smooth_head = 0.3
  c.smooth_tail = 0.0
  c.smooth_shape = "concave"
  c.shift_bn = False
  c.samples_per_class = 4  # consecutive examples of one class in the balanced stream
  return c


# ------------------------------------------------------------------------ schedules, optimisers


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
  """`ceil(N / B)`: the batches of one epoch."""
  return -(-int(num_examples) // int(batch_size))


def epoch_schedule(
    base_lr: float,
    steps_per_epoch: int,
    num_epochs: int,
    *,
    kind: str = "step",
    warmup_epochs: int = 5,
    decay_epochs=(160, 180),
    decay_factor: float = 0.1,
) -> optax.Schedule:
  """The release's per-epoch learning rate (constant within an epoch), as a step schedule.

  With `e = step // steps_per_epoch` (0-based epoch):
  - 'step': `base_lr (e + 1) / warmup_epochs` for `e < warmup_epochs`, then `base_lr` times
    `decay_factor` per decay epoch `d <= e` (their `epoch > 160` with 1-based epochs);
  - 'cosine': `base_lr (1 + cos(pi e / num_epochs)) / 2` (no warm-up, as theirs).
  """
  if kind not in SCHEDULES:
    raise ValueError(f"Unknown MiSLAS schedule {kind!r}; expected one of {SCHEDULES}.")
  decay_epochs = jnp.asarray(tuple(decay_epochs) or (np.iinfo(np.int32).max,), jnp.int32)

  def schedule(count):
    epoch = jnp.asarray(count, jnp.int32) // steps_per_epoch
    if kind == "cosine":
      return base_lr * 0.5 * (1.0 + jnp.cos(math.pi * epoch / num_epochs))
    decays = jnp.sum(epoch >= decay_epochs)
    lr = base_lr * jnp.power(decay_factor, decays.astype(jnp.float32))
    if warmup_epochs > 0:
      lr = jnp.where(epoch < warmup_epochs, base_lr * (epoch + 1) / warmup_epochs, lr)
    return lr.astype(jnp.float32)

  return schedule


def stage1_schedule(cfg: ml_collections.ConfigDict) -> optax.Schedule:
  """Stage 1's schedule from `config.pretrain` (`num_steps` = epochs x steps per epoch)."""
  m = cfg.mislas
  return epoch_schedule(
      cfg.learning_rate, cfg.num_steps // m.stage1_epochs, m.stage1_epochs, kind=m.schedule,
      warmup_epochs=m.warmup_epochs, decay_epochs=m.decay_epochs, decay_factor=m.decay_factor,
  )


def stage2_optimizer(
    schedule: optax.Schedule, *, head_lr_factor: float, momentum: float, weight_decay: float
) -> optax.GradientTransformation:
  """Their stage-2 SGD: weight decay on every trained leaf (head kernel, bias, LWS scales),
  added to the gradient before momentum; the head at `head_lr_factor` x the scales' rate."""
  return optax.chain(
      optax.add_decayed_weights(weight_decay),
      optax.multi_transform(
          {
              "head": optax.sgd(lambda c: head_lr_factor * schedule(c), momentum=momentum),
              "lws": optax.sgd(schedule, momentum=momentum),
          },
          {"head": "head", "lws_scale": "lws"},
      ),
  )


# ------------------------------------------------------------------------ loss pieces


def label_aware_smoothing(
    class_counts, *, smooth_head: float, smooth_tail: float, shape: str = "concave"
) -> np.ndarray:
  """Per-class smoothing `eps_k` [K] from the training counts `n_k` [K].

  With `t = (n_k - n_min) / (n_max - n_min)`: 'concave' `tail + (head - tail) sin(pi t / 2)`,
  'linear' `tail + (head - tail) t`, 'convex' `head + (head - tail) sin(3 pi / 2 + pi t / 2)`
  (MiSLAS's shapes). The most frequent class gets `smooth_head`, the rarest `smooth_tail`.
  Equal counts (undefined there: 0 / 0) give `smooth_head` to every class.
  """
  counts = np.asarray(class_counts, np.float64)
  span = counts.max() - counts.min()
  t = (counts - counts.min()) / span if span > 0 else np.ones_like(counts)
  head, tail = float(smooth_head), float(smooth_tail)
  if shape == "concave":
    eps = tail + (head - tail) * np.sin(np.pi * t / 2)
  elif shape == "linear":
    eps = tail + (head - tail) * t
  elif shape == "convex":
    eps = head + (head - tail) * np.sin(1.5 * np.pi + np.pi * t / 2)
  else:
    raise ValueError(f"Unknown smoothing shape {shape!r}; expected one of {SMOOTHING_SHAPES}.")
  return eps.astype(np.float32)


def smoothed_cross_entropy(
    logits: jax.Array, labels: jax.Array, smoothing: jax.Array
) -> jax.Array:
  """Label-aware smoothed CE per example: [b, K], [b], [K] -> [b].

  `(1 - eps_y) (-log p_y) + eps_y mean_k(-log p_k)`, with `eps_y = smoothing[y]`.
  """
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  eps = jnp.asarray(smoothing)[labels]
  nll = -jnp.take_along_axis(log_probs, labels[:, None], axis=-1)[:, 0]
  return (1.0 - eps) * nll - eps * log_probs.mean(axis=-1)


def fold_lws(head: dict[str, jax.Array], scale: jax.Array) -> dict[str, jax.Array]:
  """The head whose logits are `scale * (f W + b)`: kernel [.., D, K] and bias [.., K] times
  `scale` [.., K] (any leading axes, e.g. devices)."""
  return {"kernel": head["kernel"] * scale[..., None, :], "bias": head["bias"] * scale}


# ------------------------------------------------------------------------ steps


def _cross_entropy(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def mixup_draws(
    key: jax.Array, step, batch_size: int, *, alpha: float, device_index
) -> tuple[jax.Array, jax.Array]:
  """The mix weight `~ Beta(alpha, alpha)` of a step (the same on every device) and this
  device's permutation [b] of its examples."""
  step_key = jax.random.fold_in(jax.random.fold_in(key, step), _STREAM_MIXUP)
  weight_key, perm_key = jax.random.split(step_key)
  mix_weight = jax.random.beta(weight_key, alpha, alpha)
  perm = jax.random.permutation(jax.random.fold_in(perm_key, device_index), batch_size)
  return mix_weight, perm


def mixup_step(
    state: train_state.TrainState,
    batch: dict[str, jax.Array],
    key: jax.Array,
    *,
    preprocess_fn: Callable[[jax.Array, jax.Array], jax.Array],
    alpha: float = 1.0,
    axis_name: str = "batch",
) -> tuple[train_state.TrainState, dict[str, jax.Array]]:
  """One MiSLAS stage-1 step: mixup of the whole model (their `mixup_data` / `mixup_criterion`).

  Args:
    state: replicated TrainState.
    batch: {'images': uint8 [b, H, W, C], 'labels': int [b], 'index': int [b]}.
    key: base PRNG key (same on every device).
    preprocess_fn: `(images, keys) -> float32 images` (weak augmentation + normalise).
    alpha: mix weight `w ~ Beta(alpha, alpha)`, one per step.
    axis_name: the device axis.

  Returns:
    The new state and {'loss', 'accuracy' (vs the unpermuted labels), 'mix_weight'}.
  """
  images = preprocess_fn(
      batch["images"],
      augment.example_keys(key, state.step, batch["index"], stream=_STREAM_WEAK),
  )
  labels = batch["labels"]
  mix_weight, perm = mixup_draws(
      key, state.step, images.shape[0], alpha=alpha,
      device_index=jax.lax.axis_index(axis_name),
  )
  mixed = mix_weight * images + (1.0 - mix_weight) * images[perm]

  def loss_fn(params):
    logits, updates = state.apply_fn(
        {"params": params, "batch_stats": state.batch_stats},
        mixed,
        train=True,
        mutable=["batch_stats"],
    )
    loss = (mix_weight * _cross_entropy(logits, labels).mean()
            + (1.0 - mix_weight) * _cross_entropy(logits, labels[perm]).mean())
    return loss, (logits, updates["batch_stats"])

  (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  grads = jax.lax.pmean(grads, axis_name)
  batch_stats = jax.lax.pmean(batch_stats, axis_name)
  state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
  metrics = {
      "loss": loss,
      "accuracy": jnp.mean(jnp.argmax(logits, -1) == labels),
      "mix_weight": mix_weight,
  }
  return state, jax.lax.pmean(metrics, axis_name)


class Stage2State(train_state.TrainState):
  """Stage 2: `params = {'head': {'kernel' [D, K], 'bias' [K]}, 'lws_scale' [K]}` are trained;
  `frozen` holds the rest of the model's parameters (the backbone)."""

  frozen: Any = None

  def eval_variables(self, *, use_ema: bool = False) -> dict[str, Any]:
    """The plain model's variables: the scales folded into the head."""
    del use_ema
    head = fold_lws(self.params["head"], self.params["lws_scale"])
    return {"params": {**self.frozen, "head": head}, "batch_stats": self.batch_stats}


def make_stage2_state(model, variables: dict[str, Any], tx) -> Stage2State:
  """Stage 2's state from the stage-1 model's `{'params', 'batch_stats'}` (scales at 1)."""
  params = jax.tree.map(jnp.asarray, variables["params"])
  head = params["head"]
  return Stage2State.create(
      apply_fn=model.apply,
      params={"head": head, "lws_scale": jnp.ones_like(head["bias"])},
      tx=tx,
      batch_stats=jax.tree.map(jnp.asarray, variables.get("batch_stats") or {}),
      frozen={k: v for k, v in params.items() if k != "head"},
  )


def stage2_step(
    state: Stage2State,
    batch: dict[str, jax.Array],
    key: jax.Array,
    *,
    preprocess_fn: Callable[[jax.Array, jax.Array], jax.Array],
    smoothing: jax.Array,
    shift_bn: bool = False,
    axis_name: str = "batch",
) -> tuple[Stage2State, dict[str, jax.Array]]:
  """One MiSLAS stage-2 step: label-aware smoothing on the LWS-scaled head, backbone frozen.

  Args:
    state: replicated `Stage2State`.
    batch: a class-balanced batch {'images', 'labels', 'index'}.
    key: base PRNG key.
    preprocess_fn: `(images, keys) -> float32 images` (weak augmentation + normalise).
    smoothing: `eps_k` [K] (`label_aware_smoothing`).
    shift_bn: backbone in training mode (batch statistics; running statistics updated, and
      averaged over devices), else on its running statistics (unchanged).
    axis_name: the device axis.

  Returns:
    The new state and {'loss', 'accuracy'} device means.
  """
  images = preprocess_fn(
      batch["images"],
      augment.example_keys(key, state.step, batch["index"], stream=_STREAM_STAGE2),
  )
  labels = batch["labels"]
  variables = {
      "params": {**state.frozen, "head": state.params["head"]},
      "batch_stats": state.batch_stats,
  }
  if shift_bn:
    features, updates = state.apply_fn(
        variables, images, train=True, mutable=["batch_stats"], method="features"
    )
    batch_stats = jax.lax.pmean(updates["batch_stats"], axis_name)
  else:
    features = state.apply_fn(variables, images, train=False, method="features")
    batch_stats = state.batch_stats
  features = jax.lax.stop_gradient(features)

  def loss_fn(params):
    logits = state.apply_fn({"params": {"head": params["head"]}}, features, method="classify")
    logits = logits * params["lws_scale"]
    return smoothed_cross_entropy(logits, labels, smoothing).mean(), logits

  (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  grads = jax.lax.pmean(grads, axis_name)
  state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
  metrics = {"loss": loss, "accuracy": jnp.mean(jnp.argmax(logits, -1) == labels)}
  return state, jax.lax.pmean(metrics, axis_name)


# ------------------------------------------------------------------------ class-balanced batches


def class_members(labels: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
  """The classes present in `labels` [n] (sorted) and the positions of each one's examples."""
  labels = np.asarray(labels)
  order = np.argsort(labels, kind="stable")
  classes, starts = np.unique(labels[order], return_index=True)
  return classes, np.split(order, starts[1:])


def class_balanced_positions(
    labels: np.ndarray,
    batch_size: int,
    *,
    seed: int,
    step: int,
    samples_per_class: int = 4,
    members: tuple[np.ndarray, list[np.ndarray]] | None = None,
) -> np.ndarray:
  """Positions [batch_size] into `labels` of batch `step` of their `ClassAwareSampler` stream.

  The stream visits the classes present in cycles, each cycle a fresh random order of them;
  each visit takes `samples_per_class` consecutive examples of that class, from a cycle over
  the class's examples in a fresh random order each time round. Every cycle of
  `C x samples_per_class` draws thus holds each class equally often. Computed statelessly from
  `(seed, step)` (the permutations are seeded by their cycle numbers), so a resumed run draws
  the same batches. `members`: `class_members(labels)`, if already computed.
  """
  classes, groups = class_members(labels) if members is None else members
  spc = int(samples_per_class)
  draw = np.arange(step * batch_size, (step + 1) * batch_size, dtype=np.int64)
  visit, within_visit = np.divmod(draw, spc)
  cycle, slot = np.divmod(visit, len(classes))
  which = np.empty_like(draw)  # Index into `classes` of each draw's class.
  for c in np.unique(cycle):
    order = np.random.default_rng([seed, 0, int(c)]).permutation(len(classes))
    which[cycle == c] = order[slot[cycle == c]]
  # A class's j-th visit is in cycle j: its stream position is cycle * spc + within_visit.
  position = cycle * spc + within_visit
  out = np.empty_like(draw)
  for k in np.unique(which):
    at = which == k
    group = groups[int(k)]
    lap, offset = np.divmod(position[at], len(group))
    picks = np.empty(len(lap), np.int64)
    for r in np.unique(lap):
      label = int(classes[k])
      order = np.random.default_rng([seed, 1, label, int(r)]).permutation(len(group))
      picks[lap == r] = order[offset[lap == r]]
    out[at] = group[picks]
  return out


@dataclasses.dataclass(frozen=True)
class ClassBalancedBatches:
  """`step -> batch` of `class_balanced_positions` over `split` (picklable, `layout` bound)."""

  split: pipeline.Split
  batch_size: int
  seed: int
  layout: pipeline.Layout
  samples_per_class: int = 4
  members: Any = dataclasses.field(default=None, repr=False, compare=False)

  def __post_init__(self):
    if self.members is None:  # Once, not per step (ImageNet-LT: 115,846 labels).
      object.__setattr__(self, "members", class_members(self.split.labels))

  @property
  def decodes(self) -> bool:
    """Whether loading decodes images (`loader.Feed(..., decodes=)`)."""
    return pipeline.decodes_on_access(self.split.source)

  def __call__(self, step: int) -> pipeline.Batch:
    picks = class_balanced_positions(
        None, self.batch_size, seed=self.seed, step=step,
        samples_per_class=self.samples_per_class, members=self.members,
    )
    local = self.split.indices[self.layout.share(picks)]
    return pipeline.train_batch(self.split.source, local, num_devices=self.layout.num_devices)


# ------------------------------------------------------------------------ the two stages


def stage1_config(config: ml_collections.ConfigDict, num_labeled: int) -> ml_collections.ConfigDict:
  """The config `pretrain.run` trains stage 1 with: `num_steps` = epochs x ceil(N / B), their
  SGD (no Nesterov) and plain cross-entropy inside the mixup loss."""
  config = config.copy_and_resolve_references()
  cfg = config.pretrain
  with config.unlocked():
    cfg.num_steps = cfg.mislas.stage1_epochs * steps_per_epoch(num_labeled, cfg.batch_size)
    cfg.nesterov = False
    cfg.logit_adjust_tau = 0.0
  return config


def run(config: ml_collections.ConfigDict, workdir: str, datasets, *, stage1) -> dict[str, Any]:
  """Both MiSLAS stages in `workdir`; the final (folded) model in `<workdir>/checkpoints`.

  Args:
    config: the run's config (`config.pretrain.method == 'mislas'`).
    workdir: the pre-training workdir.
    datasets: the built data sets.
    stage1: `stage1(config, workdir, datasets) -> result` trains stage 1 (`pretrain.run`).

  Returns:
    `{'val', 'test', 'steps', 'wall_time_s', 'stages'}` of the final model; `stages` holds each
    stage's steps and wall time (and stage 1's own val/test metrics).
  """
  ds, m = datasets, config.pretrain.mislas
  s1_config = stage1_config(config, len(ds.labeled))
  spe = steps_per_epoch(len(ds.labeled), config.pretrain.batch_size)
  logging.info(
      "MiSLAS: %d labeled examples, %d steps an epoch; stage 1 %d epochs = %d steps, stage 2 %d "
      "epochs = %d steps (config.pretrain.num_steps is not used).", len(ds.labeled), spe,
      m.stage1_epochs, s1_config.pretrain.num_steps, m.stage2_epochs, m.stage2_epochs * spe,
  )
  s1 = stage1(s1_config, os.path.join(workdir, STAGE1_DIR), ds)
  logging.info("MiSLAS stage 1 done (%d steps); stage 2 starts.", s1["steps"])
  s2, evaluate, state_repl = _stage2(config, workdir, ds)
  result = {
      s: evaluate.summary(evaluate(state_repl, getattr(ds, s), name=f"{s} (final)"))
      for s in ("val", "test")
  }
  stages = {
      "stage1": {"steps": s1["steps"], "wall_time_s": s1["wall_time_s"],
                 "val": s1["val"], "test": s1["test"]},
      "stage2": s2,
  }  # fmt: skip
  result.update(
      steps=s1["steps"] + s2["steps"],
      wall_time_s=s1["wall_time_s"] + s2["wall_time_s"],
      stages=stages,
  )
  reporting.save_json(workdir, "summary.json", {**result, "config": config.to_dict()})
  return result


def _stage2(config, workdir, ds):
  """Trains stage 2 (resuming `<workdir>/stage2/checkpoints`), writes the folded model to
  `<workdir>/checkpoints`; returns `({'steps', 'wall_time_s'}, evaluator, final state_repl)`."""
  cfg, m, t0 = config.pretrain, config.pretrain.mislas, time.time()
  stage_dir = os.path.join(workdir, STAGE2_DIR)
  spe = steps_per_epoch(len(ds.labeled), cfg.batch_size)
  num_steps = m.stage2_epochs * spe
  model = models.from_config(config.model, ds.num_classes)
  stored, _ = checkpointing.load_pretrained(os.path.join(workdir, STAGE1_DIR, "checkpoints"))
  variables, _ = train_state.pretrained_variables(stored, use_ema=False)
  schedule = epoch_schedule(m.stage2_learning_rate, spe, m.stage2_epochs, kind="cosine")
  tx = stage2_optimizer(
      schedule, head_lr_factor=m.head_lr_factor, momentum=cfg.momentum,
      weight_decay=cfg.weight_decay,
  )
  state = make_stage2_state(model, variables, tx)
  manager = checkpointing.make_manager(os.path.join(stage_dir, "checkpoints"))
  restored, resumed_at = train_state.restore(manager, {"state": state})
  if resumed_at is not None:
    logging.info("Resumed MiSLAS stage 2 from step %d.", resumed_at)
  clock = workdir_lib.StageClock(stage_dir, resumed_at, started=t0)
  options = loader.Options.from_config(config.data)
  evaluate = evaluation.Evaluator(
      model, ds, batch_size=config.eval_batch_size, options=options,
      head_mask=config.objective.hparams.head_mask,
  )
  writer = loop.Writer(stage_dir)
  guard = loop.DivergenceGuard(
      "MiSLAS stage 2", schedule=schedule, manager=manager,
      lr_field=f"config.pretrain.mislas.stage2_learning_rate={m.stage2_learning_rate}",
  )
  smoothing = label_aware_smoothing(
      ds.labeled_class_counts, smooth_head=m.smooth_head, smooth_tail=m.smooth_tail,
      shape=m.smooth_shape,
  )
  logging.info("MiSLAS label-aware smoothing per class: %s", np.round(smoothing, 4).tolist())
  preprocess = augment.make_preprocess(
      "weak", mean=ds.mean, std=ds.std, crop=config.data.train_augment
  )
  p_step = jax.pmap(
      functools.partial(
          stage2_step, preprocess_fn=preprocess, smoothing=smoothing, shift_bn=m.shift_bn,
          axis_name="batch",
      ),
      axis_name="batch", in_axes=(0, 0, None), donate_argnums=(0,),
  )
  batches = ClassBalancedBatches(
      ds.labeled, cfg.batch_size, config.seed + 2, pipeline.Layout.local(), m.samples_per_class
  )
  run = {"state": train_state.replicate(restored["state"]), "metrics": None}
  key = jax.random.key(config.seed + 3)
  feed = loader.Feed(
      batches, int(resumed_at or 0), num_steps, options=options, decodes=batches.decodes
  )

  def train_step(step):
    run["state"], run["metrics"] = p_step(run["state"], feed.next(step), key)
    return run["metrics"]

  def log(step):
    guard(step, run["state"], run["metrics"])
    scalars = train_state.unreplicate(run["metrics"])
    writer.scalars(step, {f"stage2/{k}": v for k, v in scalars.items()})

  def validate(step):
    if step < num_steps:
      summary = evaluate.summary(evaluate(run["state"], ds.val))
      writer.scalars(step, reporting.flat_scalars("stage2/val", summary))

  def save(step):
    guard(step, run["state"], run["metrics"])
    train_state.save(manager, step, {"state": train_state.unreplicate(run["state"])})
    clock.checkpointed(step)

  try:
    loop.run(
        start_step=int(resumed_at or 0),
        num_steps=num_steps,
        train_step=train_step,
        after_step=[
            loop.Periodic(cfg.log_every, log, at_end=True),
            loop.Periodic(cfg.eval_every, validate),
        ],
        checkpoint=loop.Periodic(cfg.checkpoint_every, save, at_end=True),
        progress=loop.Progress(num_steps, writer),
    )
  finally:
    feed.close()
    manager.wait_until_finished()
    manager.close()
  writer.close()
  _save_final(model, workdir, num_steps, train_state.unreplicate(run["state"]))
  return {"steps": num_steps, "wall_time_s": clock.elapsed()}, evaluate, run["state"]


def _save_final(model, workdir: str, step: int, state: Stage2State) -> None:
  """`<workdir>/checkpoints` at `step`: the plain Classifier, LWS scales folded into its head."""
  plain = train_state.from_variables(model, state.eval_variables(), optax.identity())
  manager = checkpointing.make_manager(os.path.join(workdir, "checkpoints"))
  try:
    if manager.latest_step() != step:
      train_state.save(manager, step, {"state": plain.replace(step=step)})
  finally:
    manager.wait_until_finished()
    manager.close()
