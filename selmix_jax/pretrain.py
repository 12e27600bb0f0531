"""Pre-training loop: supervised (CE or logit-adjusted CE) or FixMatch(/LA), SPEC §7.

The step bodies live in `steps`; this module pmaps them, feeds batches, evaluates, checkpoints
(and resumes from) `<workdir>/checkpoints`, and writes TensorBoard scalars and `summary.json`.
"""

import functools
import os
import time
from typing import Any

from absl import logging
import flax.jax_utils
import flax.serialization
import jax
import ml_collections
import numpy as np

from selmix_jax import checkpointing
from selmix_jax import evaluation
from selmix_jax import optim
from selmix_jax import reporting
from selmix_jax import run_lib
from selmix_jax import steps
from selmix_jax.data import pipeline


def _schedule(cfg: ml_collections.ConfigDict):
  if cfg.schedule == "cosine":
    return optim.cosine_schedule(cfg.learning_rate, cfg.num_steps)
  if cfg.schedule == "fixmatch_cosine":
    return optim.fixmatch_cosine_schedule(cfg.learning_rate, cfg.num_steps)
  raise ValueError(
      f"config.pretrain.schedule={cfg.schedule!r}; expected 'cosine' or 'fixmatch_cosine'."
  )


def make_train_step(cfg, *, mean, std, logit_adjustment):
  """The pmapped pre-training step for `cfg.method`."""
  la = None if logit_adjustment is None else np.asarray(logit_adjustment)
  if cfg.method == "supervised":
    body = functools.partial(
        steps.supervised_step,
        preprocess_fn=run_lib.make_preprocess("weak", mean=mean, std=std),
        logit_adjustment=la,
        axis_name="batch",
    )
  elif cfg.method == "fixmatch":
    body = functools.partial(
        steps.fixmatch_step,
        weak_fn=run_lib.make_preprocess("weak", mean=mean, std=std),
        strong_fn=run_lib.make_preprocess("strong", mean=mean, std=std),
        threshold=cfg.threshold,
        unlabeled_weight=cfg.unlabeled_weight,
        logit_adjustment=la,
        ema_decay=cfg.ema_decay,
        axis_name="batch",
    )
  else:
    raise ValueError(
        f"config.pretrain.method={cfg.method!r}; expected 'supervised' or 'fixmatch'."
    )
  # The base key is shared (in_axes None); the body folds in step and example indices.
  return jax.pmap(body, axis_name="batch", in_axes=(0, 0, None), donate_argnums=(0,))


def _batch(ds, cfg, seed: int, step: int) -> dict[str, Any]:
  """The global batch of `step`, derived from (seed, step) only, so resumption is exact."""
  num_devices = jax.local_device_count()
  picks = pipeline.uniform_indices(len(ds.labeled.indices), cfg.batch_size, seed=seed, step=step)
  labeled = ds.labeled.indices[run_lib.process_share(picks)]
  batch = pipeline.train_batch(ds.labeled.source, labeled, num_devices=num_devices)
  if cfg.method != "fixmatch":
    return batch
  num_unlabeled = cfg.batch_size * cfg.unlabeled_ratio
  picks_u = pipeline.uniform_indices(
      len(ds.unlabeled.indices), num_unlabeled, seed=seed + 1, step=step
  )
  unlabeled = pipeline.train_batch(
      ds.unlabeled.source,
      ds.unlabeled.indices[run_lib.process_share(picks_u)],
      num_devices=num_devices,
  )
  return {
      "labeled_images": batch["images"],
      "labels": batch["labels"],
      "labeled_index": batch["index"],
      "unlabeled_images": unlabeled["images"],
      "unlabeled_index": unlabeled["index"],
  }


def run(config: ml_collections.ConfigDict, workdir: str, datasets) -> dict[str, Any]:
  """Pre-trains per `config.pretrain`; resumes from `<workdir>/checkpoints` if present.

  Returns:
    `{'val': summary, 'test': summary, 'steps': int, 'wall_time_s': float}` of the final model.
  """
  cfg = config.pretrain
  ds = datasets
  run_lib.ensure_dir(workdir)
  run_lib.check_global_batch(cfg.batch_size, field="config.pretrain.batch_size")
  run_lib.check_global_batch(config.eval_batch_size, field="config.eval_batch_size")
  if cfg.method == "fixmatch" and ds.unlabeled is None:
    raise ValueError(
        "config.pretrain.method='fixmatch' needs an unlabeled pool: set "
        "config.data.unlabeled_max > 0."
    )
  model = run_lib.build_model(config, ds.num_classes)
  tx = optim.make_pretrain_optimizer(
      learning_rate=_schedule(cfg),
      momentum=cfg.momentum,
      nesterov=cfg.nesterov,
      weight_decay=cfg.weight_decay,
  )
  use_ema = cfg.method == "fixmatch" or cfg.get("ema_decay_supervised", 0.0) > 0
  state = steps.create_train_state(
      model, jax.random.key(config.seed), (1, *ds.image_shape), tx, ema=use_ema
  )
  manager = checkpointing.make_manager(os.path.join(workdir, "checkpoints"))
  if manager.latest_step() is not None:
    restored = checkpointing.restore(manager, {"state": flax.serialization.to_state_dict(state)})
    state = flax.serialization.from_state_dict(state, restored["state"])
    logging.info("Resumed pre-training from step %d.", int(state.step))
  start_step = int(state.step)

  la = run_lib.logit_adjustment(ds.labeled_class_counts, cfg.logit_adjust_tau)
  p_train_step = make_train_step(cfg, mean=ds.mean, std=ds.std, logit_adjustment=la)
  p_eval_step = evaluation.make_p_eval_step(
      model,
      num_classes=ds.num_classes,
      preprocess_fn=run_lib.make_preprocess("none", mean=ds.mean, std=ds.std),
  )
  reporter = run_lib.Reporter(workdir, cfg.num_steps)
  key = jax.random.key(config.seed + 1)
  state_repl = steps.replicate(state)  # placed as pmap places outputs: no retrace
  t0 = time.time()

  def evaluate(split):  # The EMA copy when training keeps one (FixMatch).
    return evaluation.evaluate_split(
        p_eval_step,
        state_repl.eval_variables(use_ema=use_ema),
        getattr(ds, split),
        batch_size=config.eval_batch_size,
    ).summary()

  # On any exit, let an in-flight asynchronous save finish: a preempted run keeps its work.
  try:
    for step in range(start_step, cfg.num_steps):
      batch = _batch(ds, cfg, config.seed, step)
      state_repl, train_metrics = p_train_step(state_repl, batch, key)
      reporter.step(step + 1)
      if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.num_steps:
        scalars = flax.jax_utils.unreplicate(train_metrics)
        reporter.scalars(step + 1, {f"train/{k}": v for k, v in scalars.items()})
      if (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.num_steps:
        reporter.scalars(step + 1, run_lib.flat_scalars("val", evaluate("val")))
      if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.num_steps:
        state = flax.jax_utils.unreplicate(state_repl)
        checkpointing.save(
            manager, step + 1, {"state": flax.serialization.to_state_dict(state)}
        )
  finally:
    manager.wait_until_finished()
    manager.close()

  result = {
      "val": evaluate("val"),
      "test": evaluate("test"),
      "steps": cfg.num_steps,
      "wall_time_s": time.time() - t0,
  }
  reporter.scalars(cfg.num_steps, run_lib.flat_scalars("test", result["test"]))
  reporter.close()
  run_lib.save_json(workdir, "summary.json", {**result, "config": config.to_dict()})
  logging.info(
      "Pre-training done (%d steps, %.0f s). Test:\n%s",
      cfg.num_steps,
      result["wall_time_s"],
      reporting.metrics_table({"test": result["test"]}),
  )
  return result
