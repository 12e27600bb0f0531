"""SelMix fine-tuning (SPEC §6): the loop, read top to bottom in `run`.

Data flow of one run:

  pre-training checkpoint --train_state.pretrained_variables--> TrainState (replicated)
  every `refresh_every` steps:  validation pass (evaluation.Evaluator) -> confusion, prototypes
      -> selmix_state refresh (multipliers, G, P, max gain; pseudo-labels when semi-supervised)
      -> pair strategy (pairs.get(config.selmix.pairs)).refreshed(P, partner labels)
  every step: strategy.sample -> index pairs -> pipeline batch -> pmapped steps.selmix_step
  periodically (loop.Periodic): log, test evaluation, checkpoint {TrainState, SelMixState}

A non-finite loss or state at a log, refresh or checkpoint step, or non-finite gains, raise
`loop.Diverged` (`loop.DivergenceGuard`); a pre-training checkpoint with NaN/inf weights is refused.

Batches stream through one `loader.Feed` per refresh interval: it is opened with the strategy
of that interval (`pipeline.PairBatches`) and ends at the next refresh, so no batch is ever drawn
from a stale P, and each batch is still a pure function of (seed, step, P of its interval).

The checkpoint holds the TrainState and the `SelMixState` pytree, so a resumed run continues with
the same P and draws the same batches. Every refresh's P, G and multipliers also go to
`<workdir>/selmix_history/refresh_<step>.npz` for the plots.
"""

import functools
import os
import time
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from selmix_jax import checkpointing
from selmix_jax import errors
from selmix_jax import evaluation
from selmix_jax import loop
from selmix_jax import models
from selmix_jax import objectives
from selmix_jax import optim
from selmix_jax import pairs
from selmix_jax import reporting
from selmix_jax import sampling
from selmix_jax import selmix_state
from selmix_jax import steps
from selmix_jax import train_state
from selmix_jax import workdir as workdir_lib
from selmix_jax.data import augment
from selmix_jax.data import loader
from selmix_jax.data import pipeline


def run(config: ml_collections.ConfigDict, workdir: str, datasets) -> dict[str, Any]:
  """Fine-tunes from `config.selmix.init_checkpoint`; resumes from `<workdir>/checkpoints`.

  Returns:
    `{'objective', 'before': {'val', 'test'}, 'after': {'val', 'test'}, 'steps', ...}`.
  """
  cfg, ds, t0 = config.selmix, datasets, time.time()
  objective = objectives.from_config(config.objective)
  model = models.from_config(config.model, ds.num_classes)
  schedule = optim.cosine_schedule(cfg.learning_rate, cfg.num_steps)
  state, pre_step = _pretrained_state(config, model, ds, schedule)
  partner = _partner_pool(cfg, ds)
  sel = selmix_state.init(
      objective, ds.num_classes, partner.labels,
      history_length=cfg.num_steps // cfg.refresh_every + 1,
  )
  manager = checkpointing.make_manager(os.path.join(workdir, "checkpoints"))
  restored, resumed_at = train_state.restore(manager, {"state": state, "selmix": sel})
  if resumed_at is not None:
    logging.info("Resumed SelMix fine-tuning from step %d.", resumed_at)
  evaluate = evaluation.Evaluator(
      model, ds, batch_size=config.eval_batch_size, options=loader.Options.from_config(config.data),
      head_mask=config.objective.hparams.head_mask,
  )
  clock = workdir_lib.StageClock(workdir, resumed_at, started=t0)
  r = _Run(config, ds, partner, objective, evaluate, schedule, manager, workdir, clock, **restored)
  before = _before(config, workdir, r, pre_step, fresh=resumed_at is None)
  try:
    step, stopped = loop.run(
        start_step=int(resumed_at or 0),
        num_steps=cfg.num_steps,
        train_step=r.train_step,
        # Controls that sample no P need no refresh (unless their partners are pseudo-labelled).
        before_step=[loop.Periodic(cfg.refresh_every if r.needs_refresh else 0, r.refresh)],
        after_step=[
            loop.Periodic(cfg.log_every, r.log, at_end=True),
            loop.Periodic(cfg.eval_every, r.evaluate_test),
        ],
        checkpoint=loop.Periodic(cfg.checkpoint_every, r.save, at_end=True),
        progress=loop.Progress(cfg.num_steps, r.writer),
    )
  finally:
    r.close_feed()
    manager.wait_until_finished()  # On any exit, let an in-flight asynchronous save finish.
    manager.close()
  return r.finish(step, stopped, before, pre_step=pre_step)


def uniform_p_warning(gain, spread, *, temperature, temperature_scale) -> str | None:
  """The warning for a P that mixes like uniform mixup, or None when P is concentrated.

  Two different causes, with different advice: no pair has a positive gain (P is uniform over
  all K^2 pairs by the SPEC's rule; no mixup improves the objective to first order), or the
  positive gains are too small for the temperature (P nearly uniform over them).

  Args:
    gain: `[K, K]` gain matrix of the refresh.
    spread: `sampling.concentration` of the refresh's P.
    temperature: `config.selmix.temperature`.
    temperature_scale: `config.selmix.temperature_scale`.
  """
  gain = np.asarray(gain)
  positive = int(np.sum(gain > 0))
  if positive == 0:
    return (
        f"No pair has a positive gain (all {gain.size} gains <= 0, the largest "
        f"{float(gain.max()):.3g}): P is uniform over all pairs by rule and SelMix mixes like "
        "uniform mixup until a refresh finds a positive gain; no mixup improves the objective "
        "to first order. The temperature plays no part here. If selmix/positive_gain_pairs "
        "stays 0, more fine-tuning steps will not help: check that the objective is the one "
        "you mean (config.objective.name, config.objective.hparams) and whether the model "
        "already is at its best on validation for it."
    )
  if spread["near_uniform"] and positive > 1:
    return (
        f"P is within 5% of uniform over its {positive} positive-gain pairs (max gain "
        f"{float(gain.max()):.3g} against temperature {temperature:g}, scale "
        f"{temperature_scale!r}): the temperature is too large for these gains, so SelMix mixes "
        "like uniform mixup over them. A smaller config.selmix.temperature, or "
        "config.selmix.temperature_scale='max_gain' (T relative to the largest gain), "
        "concentrates it."
    )
  return None


class _Run:
  """The mutable parts of one fine-tuning run and the loop's actions over them."""

  def __init__(self, config, ds, partner, objective, evaluate, schedule, manager, workdir, clock,
               *, state, selmix):
    cfg = self.cfg = config.selmix
    self.config, self.seed, self.ds, self.partner = config, config.seed, ds, partner
    self.objective, self.evaluate, self.workdir, self.clock = objective, evaluate, workdir, clock
    self.writer, self.manager = loop.Writer(workdir), manager
    self.guard = loop.DivergenceGuard(
        "SelMix fine-tuning",
        schedule=schedule,
        lr_field=f"config.selmix.learning_rate={cfg.learning_rate}",
        manager=manager,
    )
    self.state_repl, self.selmix, self.metrics = train_state.replicate(state), selmix, None
    self.options, self.feed = loader.Options.from_config(config.data), None
    self.key = jax.random.key(config.seed + 2)
    self.p_train_step = jax.pmap(
        functools.partial(
            steps.selmix_step,
            preprocess_fn=augment.make_preprocess(
                "weak", mean=ds.mean, std=ds.std, crop=config.data.train_augment
            ),
            mix_weight_min=cfg.mix_weight_min,
            # A frozen backbone computes its features as evaluation does (running statistics).
            bn_stats=cfg.bn_stats if cfg.get("train_backbone", True) else "running",
            axis_name="batch",
        ),
        axis_name="batch", in_axes=(0, 0, None), donate_argnums=(0,),
    )
    self.refresh_fn = selmix_state.make_refresh_fn(
        objective, mix_weight=(cfg.mix_weight_min + 1.0) / 2.0, temperature=cfg.temperature,
        temperature_scale=cfg.temperature_scale, form=cfg.gain_form, train_bias=cfg.train_bias,
        chunk_size=cfg.gain_chunk_size,
    )
    self.strategy = pairs.get(cfg.pairs)(
        ds.labeled.labels, selmix.partner_labels, num_classes=ds.num_classes, floor=cfg.floor
    ).refreshed(selmix.pair_probs, selmix.partner_labels)
    self.pseudo = cfg.partner_pool == "unlabeled" and cfg.partner_labels == "pseudo"
    self.needs_refresh = self.strategy.uses_pair_probs or self.pseudo
    self.method = _method(cfg, objective, self.strategy)
    self.initial = {}  # Passes over the starting model that the step-0 refresh reuses.
    self.warned_uniform = False

  def train_step(self, step):
    if self.feed is None or self.feed.next_step != step:
      self._open_feed(step)
    batch = self.feed.next(step)
    with errors.out_of_memory(
        "A SelMix fine-tuning step", "config.selmix.batch_size", self.cfg.batch_size
    ):
      self.state_repl, self.metrics = self.p_train_step(self.state_repl, batch, self.key)
    return self.metrics

  def _open_feed(self, step):
    """Streams the batches of `step` up to the next refresh, drawn by the current strategy."""
    self.close_feed()
    every = self.cfg.refresh_every if self.needs_refresh else self.cfg.num_steps
    stop = min(self.cfg.num_steps, (step // every + 1) * every)
    batches = pipeline.PairBatches(
        self.ds.labeled, self.partner, self.strategy, self.cfg.batch_size, self.seed,
        pipeline.Layout.local(),
    )
    self.feed = loader.Feed(batches, step, stop, options=self.options, decodes=batches.decodes)

  def close_feed(self):
    if self.feed is not None:
      self.feed.close()
      self.feed = None

  def refresh(self, step):
    """Validation pass -> new SelMixState (and pseudo-labels) -> the strategy's next table."""
    cfg, ds = self.cfg, self.ds
    self.guard(step, self.state_repl, self.metrics)  # Gains of a diverged model mean nothing.
    self.close_feed()  # Its batches were drawn from the P this refresh replaces.
    initial, self.initial = (self.initial if step == 0 else {}), {}
    partner_labels = self.selmix.partner_labels
    if self.pseudo:
      unlabeled = initial.get("unlabeled") or self.evaluate(
          self.state_repl, self.partner, name=f"unlabeled pool (step {step})", announce=False
      )
      partner_labels = unlabeled.preds.astype(np.int32)
    if not self.strategy.uses_pair_probs:  # A control: new partner labels only.
      self.selmix = self.selmix.replace(partner_labels=partner_labels)
      self.strategy = self.strategy.refreshed(self.selmix.pair_probs, partner_labels)
      return None
    val = initial.get("val") or self.evaluate(
        self.state_repl, ds.val, name=f"validation (step {step})", announce=False
    )
    head = train_state.unreplicate(self.state_repl.params)["head"]
    self.selmix = selmix_state.to_host(self.refresh_fn(
        self.selmix,
        jnp.asarray(val.confusion, jnp.float32),
        jnp.asarray(val.prototypes, jnp.float32),
        head["kernel"],
        head["bias"],
        partner_labels,
    ))
    if not (np.isfinite(self.selmix.gain).all() and np.isfinite(self.selmix.pair_probs).all()):
      # Never sample from a NaN P (or silently uniformly): stop with what went wrong.
      self.guard.fail(step, (
          f"the refresh's gains are not finite ({np.sum(~np.isfinite(self.selmix.gain))} of "
          f"{self.selmix.gain.size} entries, max gain {self.selmix.max_gain}), from a valid "
          f"validation confusion matrix of {int(val.confusion.sum())} examples"
      ))
    self.strategy = self.strategy.refreshed(self.selmix.pair_probs, self.selmix.partner_labels)
    self._report_refresh(step, val)
    if cfg.early_stop and selmix_state.should_stop(
        self.selmix.max_gains, window=cfg.early_stop_window, tol=cfg.early_stop_tol
    ):
      logging.info("Early stop at step %d: the max gain has plateaued.", step)
      return loop.STOP
    return None

  def _report_refresh(self, step, val):
    sel, summary = self.selmix, self.evaluate.summary(val)
    target = float(_target(self.objective, val.confusion)["target"])
    spread = sampling.concentration(sel.pair_probs)
    self.writer.scalars(step, {
        **reporting.flat_scalars("val", summary),
        "selmix/max_gain": sel.max_gain,
        "selmix/positive_gain_pairs": float(np.mean(sel.gain > 0)),
        "selmix/val_target": target,
        "selmix/effective_pairs": spread["effective_pairs"],
        "selmix/support_pairs": spread["support"],
        "selmix/top1_mass": spread["top1_mass"],
        "selmix/top10_mass": spread["top10_mass"],
    })
    logging.info(
        "Refresh at step %d: val target %.4f, mean recall %.4f, min recall %.4f, max gain %.3g, "
        "P: %.1f effective pairs of %d.", step, target, float(summary["mean_recall"]),
        float(summary["min_recall"]), sel.max_gain, spread["effective_pairs"], spread["support"],
    )
    warning = uniform_p_warning(
        sel.gain, spread, temperature=self.cfg.temperature,
        temperature_scale=self.cfg.temperature_scale,
    )
    if warning and not self.warned_uniform:
      self.warned_uniform = True
      logging.warning("%s", warning)
    if jax.process_index() == 0:
      reporting.save_refresh(self.workdir, step, {
          "step": np.asarray(step),
          "pair_probs": sel.pair_probs,
          "gain": sel.gain,
          "multipliers": sel.multipliers,
          "val_recalls": np.asarray(summary["recall"]),
          "val_target": np.asarray(target),
      })

  def log(self, step):
    self.guard(step, self.state_repl, self.metrics)
    scalars = train_state.unreplicate(self.metrics)
    self.writer.scalars(step, {f"train/{k}": v for k, v in scalars.items()})

  def evaluate_test(self, step):
    if step < self.cfg.num_steps:  # The final model is evaluated after the loop.
      summary = self.evaluate.summary(self.evaluate(self.state_repl, self.ds.test))
      self.writer.scalars(step, reporting.flat_scalars("test", summary))

  def save(self, step):
    self.guard(step, self.state_repl, self.metrics)  # Never checkpoint a non-finite state.
    host = {"state": train_state.unreplicate(self.state_repl), "selmix": self.selmix}
    train_state.save(self.manager, step, host)
    self.clock.checkpointed(step)

  def finish(self, step, stopped, before, *, pre_step) -> dict[str, Any]:
    """The final model's passes, `summary.json` and the plots; returns the run's result.

    `wall_time_s` covers the whole stage, from its start to the final passes, across restarts
    (`workdir.StageClock`).
    """
    after = {
        s: self.evaluate.summary(
            self.evaluate(self.state_repl, getattr(self.ds, s), name=f"{s} (final)")
        )
        for s in ("val", "test")
    }
    self.writer.scalars(step, reporting.flat_scalars("final_test", after["test"]))
    self.writer.close()
    objective = self.objective
    result = {
        "objective": objective.name if self.strategy.uses_pair_probs else "none",
        "method": self.method,
        "before": before,
        "after": after,
        "target_before": _target(objective, before["test"]["confusion"]),
        "target_after": _target(objective, after["test"]["confusion"]),
        "steps": step,
        "stopped_early": stopped,
        "pretrain_step": pre_step,
        "wall_time_s": self.clock.elapsed(),
    }
    reporting.save_json(self.workdir, "summary.json", {**result, "config": self.config.to_dict()})
    if jax.process_index() == 0:
      reporting.plot_selmix_run(self.workdir, result, self.ds.class_names)
    return result


def _partner_pool(cfg, ds) -> pipeline.Split:
  """The pool x2 comes from: the unlabeled pool when semi-supervised, else the labeled set."""
  if cfg.partner_pool != "unlabeled":
    return ds.labeled
  if ds.unlabeled is None:
    raise ValueError(
        "config.selmix.partner_pool='unlabeled' needs an unlabeled pool "
        "(config.data.unlabeled_max > 0)."
    )
  return ds.unlabeled


def _pretrained_state(config, model, ds, schedule) -> tuple[train_state.TrainState, int]:
  """The TrainState to fine-tune: pre-trained weights (EMA when kept), the SelMix optimiser.

  Raises:
    checkpointing.NonFiniteCheckpointError: (a ValueError) the checkpoint's weights hold NaN or
      inf (a diverged pre-training).
  """
  cfg = config.selmix
  stored, pre_step = checkpointing.load_pretrained(cfg.init_checkpoint)
  variables, which = train_state.pretrained_variables(stored, use_ema=cfg.use_ema)
  bad = checkpointing.non_finite_entries(variables)
  if bad:
    raise checkpointing.NonFiniteCheckpointError(
        f"config.selmix.init_checkpoint={cfg.init_checkpoint!r}: the {which} weights of step "
        f"{pre_step} hold NaN or inf in {len(bad)} array(s), e.g. {bad[0]!r}: that "
        "pre-training diverged. Fine-tune from a finite checkpoint."
    )
  template = jax.eval_shape(  # Shapes only: an eager init of a ResNet takes seconds.
      lambda: model.init(jax.random.key(0), jnp.zeros((1, *ds.image_shape)), train=False)
  )
  checkpointing.check_compatible(
      variables, dict(template), where=f"{cfg.init_checkpoint} ({which} weights)"
  )
  tx = optim.make_selmix_optimizer(
      variables["params"],
      learning_rate=schedule,
      backbone_lr_mult=cfg.backbone_lr_mult,
      weight_decay=cfg.weight_decay,
      train_backbone=cfg.get("train_backbone", True),
  )
  return train_state.from_variables(model, variables, tx), pre_step


def _before(config, workdir, r, pre_step, *, fresh: bool) -> dict[str, Any]:
  """Validation and test metrics of the starting model (`before.json`, for a resume).

  The passes come from the starting checkpoint's `evaluation.EvalCache` when an earlier run from
  it made them; the validation (and unlabeled) pass also feed the step-0 refresh.
  """
  if not fresh:
    return reporting.load_json(os.path.join(workdir, "before.json"))
  cache = evaluation.EvalCache(
      config.selmix.init_checkpoint,
      {"step": pre_step, "ema": config.selmix.use_ema, "model": config.model.to_dict(),
       "data": config.data.to_dict()},
  )  # fmt: skip
  passes = {"val": r.ds.val, "test": r.ds.test}
  if r.pseudo:
    passes["unlabeled"] = r.partner
  results = {name: cache.evaluate(r.evaluate, r.state_repl, split, name)
             for name, split in passes.items()}  # fmt: skip
  r.initial = {k: v for k, v in results.items() if k != "test"}
  before = {split: r.evaluate.summary(results[split]) for split in ("val", "test")}
  reporting.save_json(workdir, "before.json", before)
  return before


def _method(cfg, objective, strategy) -> str:
  """What a run is, for tables and plots: SelMix for an objective, or the control it is."""
  if strategy.uses_pair_probs:
    return f"SelMix ({objective.name})"
  if cfg.pairs == "uniform":
    return "uniform mixup"
  if cfg.pairs == "instance":
    return "CE fine-tuning" if cfg.mix_weight_min >= 1.0 else "instance mixup"
  return f"control: {cfg.pairs} pairs"


def _target(objective, confusion) -> dict[str, Any]:
  return jax.tree.map(np.asarray, objective.target(jnp.asarray(confusion, jnp.float32)))
