"""SelMix fine-tuning loop (SPEC §6).

Every `refresh_every` steps a validation pass gives the confusion matrix and class prototypes;
from them the objective's multipliers, the gain matrix G and the pair distribution P are
recomputed (and, semi-supervised, the unlabeled pool's pseudo-labels). In between, pairs are drawn
from P and the pmapped `steps.selmix_step` trains on their feature mixups.

Controls for experiments (`config.selmix.pairs`): 'gain' (SelMix), 'uniform' (mixup with P
uniform over class pairs) and 'instance' (x1, x2 uniform over examples; with
`mix_weight_min=1` this is plain cross-entropy fine-tuning).

State that a resumed run needs — train state, P, G, multipliers, pseudo-labels, the max-gain
history — is checkpointed; P/G/multipliers of every refresh also go to
`<workdir>/selmix_history/refresh_<step>.npz` for plots.
"""

import functools
import glob
import json
import os
import time
from typing import Any

from absl import logging
import flax.jax_utils
import flax.serialization
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from selmix_jax import checkpointing
from selmix_jax import evaluation
from selmix_jax import gains
from selmix_jax import objectives
from selmix_jax import optim
from selmix_jax import reporting
from selmix_jax import run_lib
from selmix_jax import sampling
from selmix_jax import steps
from selmix_jax.data import pipeline


def _head(params) -> tuple[jax.Array, jax.Array]:
  return params["head"]["kernel"], params["head"]["bias"]


def make_refresh_fn(objective, cfg):
  """Jitted `(confusion, prototypes, kernel, bias, multipliers) -> (multipliers, gain, P)`.

  Compiled once: everything that changes between refreshes is an array argument.
  """

  def refresh(confusion, prototypes, kernel, bias, multipliers):
    confusion = confusion / jnp.sum(confusion)
    multipliers = objective.update_multipliers(multipliers, confusion)
    gain = gains.gain_matrix(
        confusion,
        prototypes,
        kernel,
        bias,
        value_fn=objective.value,
        multipliers=multipliers,
        mix_weight=(cfg.mix_weight_min + 1.0) / 2.0,
        form=cfg.gain_form,
        train_bias=cfg.train_bias,
        chunk_size=cfg.get("gain_chunk_size", None),
    )
    probs = gains.pair_distribution(gain, temperature=cfg.temperature)
    return multipliers, gain, probs

  return jax.jit(refresh)


def _should_stop(max_gains: list[float], cfg) -> bool:
  """Early stop (SPEC §6): after >= `window` refreshes, the latest max gain is within `tol`
  (relative) of the mean of the last `window`."""
  window = cfg.early_stop_window
  if not cfg.early_stop or len(max_gains) < window:
    return False
  recent = np.asarray(max_gains[-window:])
  return abs(recent[-1] - recent.mean()) <= cfg.early_stop_tol * abs(recent.mean())


def _save_history(workdir: str, step: int, record: dict[str, Any]) -> None:
  directory = run_lib.ensure_dir(os.path.join(workdir, "selmix_history"))
  path = os.path.join(directory, f"refresh_{step:07d}.npz")
  tmp = path + ".tmp.npz"
  np.savez(tmp, **record)
  os.replace(tmp, path)


def load_history(workdir: str) -> list[dict[str, np.ndarray]]:
  """All refresh records of a run, in step order."""
  files = sorted(glob.glob(os.path.join(workdir, "selmix_history", "refresh_*.npz")))
  return [dict(np.load(f)) for f in files]


def run(config: ml_collections.ConfigDict, workdir: str, datasets) -> dict[str, Any]:
  """Fine-tunes from `config.selmix.init_checkpoint`; resumes from `<workdir>/checkpoints`.

  Returns:
    `{'before': {'val', 'test'}, 'after': {'val', 'test'}, 'steps', 'wall_time_s', ...}`.
  """
  cfg = config.selmix
  ds = datasets
  num_classes = ds.num_classes
  run_lib.ensure_dir(workdir)
  run_lib.check_global_batch(cfg.batch_size, field="config.selmix.batch_size")
  semi = cfg.get("partner_pool", "labeled") == "unlabeled"
  if semi and ds.unlabeled is None:
    raise ValueError(
        "config.selmix.partner_pool='unlabeled' needs an unlabeled pool "
        "(config.data.unlabeled_max > 0)."
    )
  objective = objectives.get(config.objective.name, **config.objective.get("hparams", {}))
  model = run_lib.build_model(config, num_classes)
  schedule = optim.cosine_schedule(cfg.learning_rate, cfg.num_steps)
  template = model.init(
      jax.random.key(config.seed), jnp.zeros((1, *ds.image_shape), jnp.float32), train=False
  )
  pretrained, pre_step = checkpointing.load_pretrained(cfg.init_checkpoint)
  stored = pretrained.get("state", {})
  # Pre-training may keep an EMA copy (FixMatch); SPEC §6 starts from it when present.
  prefix = "ema_" if cfg.use_ema and stored.get("ema_params") else ""
  pre = {
      "params": stored.get(prefix + "params"),
      "batch_stats": stored.get(prefix + "batch_stats"),
  }
  checkpointing.check_compatible(
      pre, dict(template), where=f"{cfg.init_checkpoint} ({prefix or 'raw '}weights)"
  )
  params = jax.tree.map(jnp.asarray, pre["params"])
  tx = optim.make_selmix_optimizer(
      params,
      learning_rate=schedule,
      backbone_lr_mult=cfg.backbone_lr_mult,
      weight_decay=cfg.weight_decay,
  )
  state = steps.TrainState.create(
      apply_fn=model.apply,
      params=params,
      tx=tx,
      batch_stats=jax.tree.map(jnp.asarray, pre["batch_stats"]),
  )

  labels1 = ds.labeled.labels
  pool2 = ds.unlabeled if semi else ds.labeled
  selmix_state = {
      "pair_probs": np.full((num_classes, num_classes), 1.0 / num_classes**2, np.float32),
      "gain": np.zeros((num_classes, num_classes), np.float32),
      "multipliers": np.asarray(objective.init_multipliers(num_classes), np.float32),
      "partner_labels": np.asarray(pool2.labels, np.int32),
      "max_gain_history": np.zeros((cfg.num_steps // cfg.refresh_every + 1,), np.float32),
      "num_refreshes": np.asarray(0, np.int32),
  }
  manager = checkpointing.make_manager(os.path.join(workdir, "checkpoints"))
  if manager.latest_step() is not None:
    restored = checkpointing.restore(
        manager, {"state": flax.serialization.to_state_dict(state), "selmix": selmix_state}
    )
    state = flax.serialization.from_state_dict(state, restored["state"])
    selmix_state = restored["selmix"]
    logging.info("Resumed SelMix fine-tuning from step %d.", int(state.step))
  start_step = int(state.step)

  p_eval_step = evaluation.make_p_eval_step(
      model,
      num_classes=num_classes,
      preprocess_fn=run_lib.make_preprocess("none", mean=ds.mean, std=ds.std),
  )
  p_train_step = jax.pmap(
      functools.partial(
          steps.selmix_step,
          preprocess_fn=run_lib.make_preprocess("weak", mean=ds.mean, std=ds.std),
          mix_weight_min=cfg.mix_weight_min,
          bn_stats=cfg.bn_stats,
          axis_name="batch",
      ),
      axis_name="batch",
      in_axes=(0, 0, None),
      donate_argnums=(0,),
  )
  refresh_fn = make_refresh_fn(objective, cfg)
  sampler = sampling.PairSampler(
      labels1, selmix_state["partner_labels"], num_classes=num_classes
  )
  table = None
  reporter = run_lib.Reporter(workdir, cfg.num_steps)
  key = jax.random.key(config.seed + 2)
  state_repl = steps.replicate(state)  # placed as pmap places outputs: no retrace
  evaluate = functools.partial(_evaluate, p_eval_step, ds, config.eval_batch_size)

  before = None
  if start_step == 0:
    before = {"val": evaluate(state_repl, "val"), "test": evaluate(state_repl, "test")}
    run_lib.save_json(workdir, "before.json", before)
  t0 = time.time()
  step = start_step
  stopped_early = False
  # On any exit, let an in-flight asynchronous save finish: a preempted run keeps its work.
  try:
    while step < cfg.num_steps:
      if step % cfg.refresh_every == 0:
        selmix_state = _refresh(
            step, state_repl, selmix_state, ds, cfg, objective, refresh_fn, p_eval_step,
            config.eval_batch_size, semi, reporter, workdir,
        )
        sampler = sampler.with_partner_labels(selmix_state["partner_labels"]) if semi else sampler
        table = None
        n = int(selmix_state["num_refreshes"])
        if _should_stop(list(selmix_state["max_gain_history"][:n]), cfg):
          logging.info("Early stop at step %d: max gain has plateaued.", step)
          stopped_early = True
          break
      if table is None:  # After a refresh or a resume: the sampling table of the new P.
        table = sampler.prepare(
            _pairs_for(cfg, selmix_state["pair_probs"], num_classes), floor=cfg.floor
        )
      if cfg.pairs == "instance":
        rng = np.random.default_rng([config.seed, step])
        idx1 = rng.integers(0, len(labels1), cfg.batch_size)
        idx2 = rng.integers(0, len(pool2.indices), cfg.batch_size)
      else:
        idx1, idx2, _, _ = sampler.sample(table, cfg.batch_size, seed=config.seed, step=step)
      batch = _pair_batch(ds, pool2, idx1, idx2)
      state_repl, train_metrics = p_train_step(state_repl, batch, key)
      step += 1
      reporter.step(step)
      if step % cfg.log_every == 0 or step == cfg.num_steps:
        scalars = flax.jax_utils.unreplicate(train_metrics)
        reporter.scalars(step, {f"train/{k}": v for k, v in scalars.items()})
      if step % cfg.eval_every == 0 and step < cfg.num_steps:
        reporter.scalars(step, run_lib.flat_scalars("test", evaluate(state_repl, "test")))
      if step % cfg.checkpoint_every == 0 or step == cfg.num_steps:
        _checkpoint(manager, step, state_repl, selmix_state)
    if stopped_early:
      _checkpoint(manager, step, state_repl, selmix_state)
  finally:
    manager.wait_until_finished()
    manager.close()

  after = {"val": evaluate(state_repl, "val"), "test": evaluate(state_repl, "test")}
  reporter.scalars(step, run_lib.flat_scalars("final_test", after["test"]))
  reporter.close()
  if before is None:
    before = _load_json(workdir, "before.json")
  result = {
      "objective": objective.name,
      "before": before,
      "after": after,
      "target_before": _target(objective, before["test"]["confusion"]),
      "target_after": _target(objective, after["test"]["confusion"]),
      "steps": step,
      "stopped_early": stopped_early,
      "pretrain_step": pre_step,
      "wall_time_s": time.time() - t0,
  }
  run_lib.save_json(workdir, "summary.json", {**result, "config": config.to_dict()})
  if jax.process_index() == 0:
    _plots(workdir, result, ds.class_names)
  return result


def _pairs_for(cfg, pair_probs: np.ndarray, num_classes: int) -> np.ndarray:
  if cfg.pairs == "gain":
    return np.asarray(pair_probs)
  if cfg.pairs in ("uniform", "instance"):
    return np.full((num_classes, num_classes), 1.0 / num_classes**2)
  raise ValueError(
      f"config.selmix.pairs={cfg.pairs!r}; expected 'gain', 'uniform' or 'instance'."
  )


def _pair_batch(ds, pool2, idx1, idx2) -> dict[str, np.ndarray]:
  """Device-laid-out batch of the pairs `(labeled[idx1], pool2[idx2])` this process loads."""
  num_devices = jax.local_device_count()
  first = pipeline.train_batch(
      ds.labeled.source, ds.labeled.indices[run_lib.process_share(idx1)], num_devices=num_devices
  )
  second = pipeline.train_batch(
      pool2.source, pool2.indices[run_lib.process_share(idx2)], num_devices=num_devices
  )
  return {
      "images1": first["images"],
      "labels1": first["labels"],
      "index1": first["index"],
      "images2": second["images"],
      "index2": second["index"],
  }


def _evaluate(p_eval_step, ds, batch_size, state_repl, split) -> dict[str, Any]:
  return evaluation.evaluate_split(
      p_eval_step, state_repl.eval_variables(), getattr(ds, split), batch_size=batch_size
  ).summary()


def _refresh(step, state_repl, selmix_state, ds, cfg, objective, refresh_fn, p_eval_step,
             eval_batch_size, semi, reporter, workdir):
  """Validation pass -> multipliers, G, P (and pseudo-labels); returns the new SelMix state."""
  variables = state_repl.eval_variables()
  val = evaluation.evaluate_split(p_eval_step, variables, ds.val, batch_size=eval_batch_size)
  kernel, bias = _head(flax.jax_utils.unreplicate(state_repl.params))
  multipliers, gain, probs = refresh_fn(
      jnp.asarray(val.confusion, jnp.float32),
      jnp.asarray(val.prototypes, jnp.float32),
      kernel,
      bias,
      jnp.asarray(selmix_state["multipliers"]),
  )
  new = dict(selmix_state)
  new["multipliers"] = np.asarray(multipliers)
  new["gain"] = np.asarray(gain)
  new["pair_probs"] = np.asarray(probs)
  max_gain = float(np.max(new["gain"]))
  n = int(selmix_state["num_refreshes"])
  new["max_gain_history"] = np.asarray(selmix_state["max_gain_history"]).copy()
  new["max_gain_history"][min(n, len(new["max_gain_history"]) - 1)] = max_gain
  new["num_refreshes"] = np.asarray(n + 1, np.int32)
  if semi:
    unl = evaluation.evaluate_split(
        p_eval_step, variables, ds.unlabeled, batch_size=eval_batch_size
    )
    new["partner_labels"] = unl.preds.astype(np.int32)
  summary = val.summary()
  target = _target(objective, val.confusion)
  scalars = {
      **run_lib.flat_scalars("val", summary),
      "selmix/max_gain": max_gain,
      "selmix/positive_gain_pairs": float(np.mean(new["gain"] > 0)),
      "selmix/val_target": float(target["target"]),
  }
  reporter.scalars(step, scalars)
  logging.info(
      "Refresh at step %d: val target %.4f, mean recall %.4f, min recall %.4f, max gain %.3g.",
      step, float(target["target"]), float(summary["mean_recall"]),
      float(summary["min_recall"]), max_gain,
  )
  if jax.process_index() == 0:
    _save_history(
        workdir, step,
        {
            "step": np.asarray(step),
            "pair_probs": new["pair_probs"],
            "gain": new["gain"],
            "multipliers": new["multipliers"],
            "val_recalls": np.asarray(summary["recall"]),
            "val_target": np.asarray(float(target["target"])),
        },
    )
  return new


def _checkpoint(manager, step, state_repl, selmix_state) -> None:
  state = flax.jax_utils.unreplicate(state_repl)
  checkpointing.save(
      manager, step, {"state": flax.serialization.to_state_dict(state), "selmix": selmix_state}
  )


def _target(objective, confusion) -> dict[str, Any]:
  return jax.tree.map(np.asarray, objective.target(jnp.asarray(confusion, jnp.float32)))


def _load_json(workdir, name) -> dict[str, Any]:
  with open(os.path.join(workdir, name), encoding="utf-8") as f:
    return json.load(f)


def _plots(workdir: str, result: dict[str, Any], class_names) -> None:
  reporting.plot_recalls(
      os.path.join(workdir, "recalls.png"),
      {
          "pre-trained": result["before"]["test"]["recall"],
          f"SelMix ({result['objective']})": result["after"]["test"]["recall"],
      },
      class_names=class_names,
      title="Per-class test recall",
  )
  history = load_history(workdir)
  if history:
    refresh_steps = [int(h["step"]) for h in history]
    reporting.plot_pair_probs(
        os.path.join(workdir, "pair_probs.png"),
        [(step, h["pair_probs"]) for step, h in zip(refresh_steps, history)],
    )
    reporting.plot_curves(
        os.path.join(workdir, "refresh_curves.png"),
        refresh_steps,
        {"val target": [float(h["val_target"]) for h in history]},
    )
    recalls = np.stack([h["val_recalls"] for h in history])
    if recalls.shape[1] <= 20:  # One line per class stays readable up to ~20 classes.
      names = list(class_names) if class_names is not None else range(recalls.shape[1])
      reporting.plot_curves(
          os.path.join(workdir, "val_recalls.png"),
          refresh_steps,
          {str(name): recalls[:, i] for i, name in enumerate(names)},
          ylabel="validation recall",
      )
