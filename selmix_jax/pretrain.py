"""Pre-training (SPEC §7): supervised (CE or logit-adjusted CE) or FixMatch(/LA), read in `run`.

The step bodies live in `steps`; `run` builds the state (resuming `<workdir>/checkpoints`), pmaps
the step, and runs the shared loop (`loop.run`) with log, validation and checkpoint actions; it
ends with the validation and test metrics of the final model in `summary.json`. A non-finite loss
or state at a log or checkpoint step raises `loop.Diverged` instead (`loop.DivergenceGuard`).
Batches are pure functions of `(seed, step)`, so a resumed run draws the same batches; one
`loader.Feed` loads them ahead for the whole run.
"""

import dataclasses
import functools
import os
import time
from typing import Any

from absl import logging
import jax
import ml_collections

from selmix_jax import checkpointing
from selmix_jax import errors
from selmix_jax import evaluation
from selmix_jax import loop
from selmix_jax import mislas
from selmix_jax import models
from selmix_jax import optim
from selmix_jax import reporting
from selmix_jax import steps
from selmix_jax import train_state
from selmix_jax import workdir as workdir_lib
from selmix_jax.data import augment
from selmix_jax.data import loader
from selmix_jax.data import pipeline

METHODS = ("supervised", "fixmatch", "mislas")
SCHEDULES = ("cosine", "fixmatch_cosine")


def run(
    config: ml_collections.ConfigDict, workdir: str, datasets, *, mislas_stage1: bool = False
) -> dict[str, Any]:
  """Pre-trains per `config.pretrain`; resumes from `<workdir>/checkpoints` if present.

  Method 'mislas' runs `mislas.run`: its stage 1 is this function (`mislas_stage1=True`) on
  `<workdir>/stage1`, its stage 2 and final model follow there.

  Returns:
    `{'val': summary, 'test': summary, 'steps': int, 'wall_time_s': float}` of the final model.
  """
  # Refuses checkpoints of another config or data set (`workdir.WorkdirError`) before reading
  # (MiSLAS: this covers its stage 2 and final model here; stage 1 checks its own directory).
  workdir_lib.check_stage(workdir, workdir_lib.fingerprint("pretrain", config, datasets))
  if config.pretrain.method == "mislas" and not mislas_stage1:
    stage1 = functools.partial(run, mislas_stage1=True)
    return mislas.run(config, workdir, datasets, stage1=stage1)
  cfg, ds, t0 = config.pretrain, datasets, time.time()
  model = models.from_config(config.model, ds.num_classes)
  use_ema = cfg.method == "fixmatch" or cfg.get("ema_decay_supervised", 0.0) > 0
  schedule = _schedule(cfg)
  tx = optim.make_pretrain_optimizer(
      learning_rate=schedule,
      momentum=cfg.momentum,
      nesterov=cfg.nesterov,
      weight_decay=cfg.weight_decay,
      decay_all=cfg.method == "mislas",  # As torch's SGD on their one parameter group.
  )
  state = train_state.create(model, jax.random.key(config.seed), ds.image_shape, tx, ema=use_ema)
  manager = checkpointing.make_manager(os.path.join(workdir, "checkpoints"))
  restored, resumed_at = train_state.restore(manager, {"state": state})
  if resumed_at is not None:
    logging.info("Resumed pre-training from step %d.", resumed_at)
  clock = workdir_lib.StageClock(workdir, resumed_at, started=t0)
  options = loader.Options.from_config(config.data)
  evaluate = evaluation.Evaluator(
      model, ds, batch_size=config.eval_batch_size, use_ema=use_ema, options=options,
      head_mask=config.objective.hparams.head_mask,
  )
  writer = loop.Writer(workdir)
  guard = loop.DivergenceGuard(
      "Pre-training", schedule=schedule, manager=manager,
      lr_field=f"config.pretrain.learning_rate={cfg.learning_rate}",
  )
  r = _Run(config, ds, restored["state"], int(resumed_at or 0), options, evaluate, writer, guard,
           clock)
  try:
    loop.run(
        start_step=int(resumed_at or 0),
        num_steps=cfg.num_steps,
        train_step=r.train_step,
        after_step=[
            loop.Periodic(cfg.log_every, r.log, at_end=True),
            loop.Periodic(cfg.eval_every, r.validate),
        ],
        checkpoint=loop.Periodic(cfg.checkpoint_every, r.save, at_end=True),
        progress=loop.Progress(cfg.num_steps, writer),
    )
  finally:
    r.feed.close()
    manager.wait_until_finished()  # On any exit, let an in-flight asynchronous save finish.
    manager.close()

  result = {
      s: evaluate.summary(evaluate(r.state_repl, getattr(ds, s), name=f"{s} (final)"))
      for s in ("val", "test")
  }
  result.update(steps=cfg.num_steps, wall_time_s=clock.elapsed())
  writer.scalars(cfg.num_steps, reporting.flat_scalars("test", result["test"]))
  writer.close()
  reporting.save_json(workdir, "summary.json", {**result, "config": config.to_dict()})
  return result


class _Run:
  """The mutable parts of one pre-training run and the loop's actions over them."""

  def __init__(self, config, ds, state, start_step, options, evaluate, writer, guard, clock):
    self.cfg, self.ds, self.evaluate, self.writer, self.guard = (
        config.pretrain, ds, evaluate, writer, guard
    )
    self.state_repl, self.metrics, self.clock = train_state.replicate(state), None, clock
    self.key = jax.random.key(config.seed + 1)
    self.p_train_step = make_train_step(self.cfg, ds, train_augment=config.data.train_augment)
    batches = make_batches(ds, self.cfg, config.seed, pipeline.Layout.local())
    self.feed = loader.Feed(
        batches, start_step, self.cfg.num_steps, options=options, decodes=batches.decodes
    )

  def train_step(self, step):
    batch = self.feed.next(step)
    with errors.out_of_memory(
        "A pre-training step", "config.pretrain.batch_size", self.cfg.batch_size
    ):
      self.state_repl, self.metrics = self.p_train_step(self.state_repl, batch, self.key)
    return self.metrics

  def log(self, step):
    self.guard(step, self.state_repl, self.metrics)
    scalars = train_state.unreplicate(self.metrics)
    self.writer.scalars(step, {f"train/{k}": v for k, v in scalars.items()})

  def validate(self, step):
    if step < self.cfg.num_steps:  # The final model is evaluated after the loop.
      summary = self.evaluate.summary(self.evaluate(self.state_repl, self.ds.val))
      self.writer.scalars(step, reporting.flat_scalars("val", summary))

  def save(self, step):
    self.guard(step, self.state_repl, self.metrics)  # Never checkpoint a non-finite state.
    train_state.save(self.guard.manager, step, {"state": train_state.unreplicate(self.state_repl)})
    self.clock.checkpointed(step)


def _schedule(cfg: ml_collections.ConfigDict):
  if cfg.method == "mislas":
    return mislas.stage1_schedule(cfg)
  if cfg.schedule == "cosine":
    return optim.cosine_schedule(cfg.learning_rate, cfg.num_steps)
  if cfg.schedule == "fixmatch_cosine":
    return optim.fixmatch_cosine_schedule(cfg.learning_rate, cfg.num_steps)
  raise ValueError(f"config.pretrain.schedule={cfg.schedule!r}; expected one of {SCHEDULES}.")


def make_train_step(cfg: ml_collections.ConfigDict, ds, *, train_augment: str = "pad_crop"):
  """The pmapped pre-training step for `cfg.method` on data set `ds`.

  `train_augment` is the crop of the weak views (`config.data.train_augment`): 'pad_crop' or
  'random_resized_crop'.
  """
  la = steps.logit_adjustment(ds.labeled_class_counts, cfg.logit_adjust_tau)
  preprocess = functools.partial(
      augment.make_preprocess, mean=ds.mean, std=ds.std, crop=train_augment
  )
  if cfg.method == "supervised":
    body = functools.partial(
        steps.supervised_step,
        preprocess_fn=preprocess("weak"),
        logit_adjustment=la,
        axis_name="batch",
    )
  elif cfg.method == "fixmatch":
    body = functools.partial(
        steps.fixmatch_step,
        weak_fn=preprocess("weak"),
        strong_fn=preprocess("strong"),
        threshold=cfg.threshold,
        unlabeled_weight=cfg.unlabeled_weight,
        logit_adjustment=la,
        ema_decay=cfg.ema_decay,
        axis_name="batch",
    )
  elif cfg.method == "mislas":
    body = functools.partial(
        mislas.mixup_step, preprocess_fn=preprocess("weak"), alpha=cfg.mislas.alpha,
        axis_name="batch",
    )
  else:
    raise ValueError(f"config.pretrain.method={cfg.method!r}; expected one of {METHODS}.")
  # The base key is shared (in_axes None); the body folds in step and example indices.
  return jax.pmap(body, axis_name="batch", in_axes=(0, 0, None), donate_argnums=(0,))


def make_batches(ds, cfg: ml_collections.ConfigDict, seed: int, layout: pipeline.Layout):
  """The picklable `step -> batch` of pre-training: a function of `(seed, step)` only."""
  labeled = pipeline.UniformBatches(ds.labeled, cfg.batch_size, seed, layout)
  if cfg.method != "fixmatch":
    return _Batches(labeled)
  unlabeled = pipeline.UniformBatches(
      ds.unlabeled, cfg.batch_size * cfg.unlabeled_ratio, seed + 1, layout
  )
  return _Batches(labeled, unlabeled)


@dataclasses.dataclass(frozen=True)
class _Batches:
  """Supervised batches of `labeled`, or FixMatch's labeled + unlabeled batches of a step."""

  labeled: pipeline.UniformBatches
  unlabeled: pipeline.UniformBatches | None = None

  @property
  def decodes(self) -> bool:
    return self.labeled.decodes or (self.unlabeled is not None and self.unlabeled.decodes)

  def __call__(self, step: int) -> dict[str, Any]:
    batch = self.labeled(step)
    if self.unlabeled is None:
      return batch
    unlabeled = self.unlabeled(step)
    return {
        "labeled_images": batch["images"],
        "labels": batch["labels"],
        "labeled_index": batch["index"],
        "unlabeled_images": unlabeled["images"],
        "unlabeled_index": unlabeled["index"],
    }
