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

The loop is `loop.run` with one `_Run` per run (its SelMix state, strategy and actions) and one
steps object that holds the train state(s) and runs the step; there are two, on one loop:

  host path (`_HostSteps`): pairs drawn on the host, batches streamed by one `loader.Feed` per
      refresh interval, opened with that interval's strategy (`pipeline.PairBatches`) and ended
      at the next refresh, so no batch is drawn from a stale P; each batch is a pure function of
      (seed, step, P of its interval). Any data; the path of a CPU run by default.
  device-resident path (`_DeviceSteps`, `config.data.device_resident`, `data.device`): the
      in-memory splits are uploaded once; the step draws its pairs from P on the device,
      gathers and augments them there (`steps.device_selmix_step`), and a refresh is one
      compiled program (validation pass, counts, prototypes, multipliers, G, P). Several runs
      (`run_many`) train as one program: their states stacked, the step vmapped over them.

The checkpoint holds the TrainState and the `SelMixState` pytree, so a resumed run continues with
the same P and draws the same batches. Every refresh's P, G and multipliers also go to
`<workdir>/selmix_history/refresh_<step>.npz` for the plots.
"""

import contextlib
import functools
import json
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
from selmix_jax.data import device
from selmix_jax.data import loader
from selmix_jax.data import pipeline


def run(config: ml_collections.ConfigDict, workdir: str, datasets) -> dict[str, Any]:
  """Fine-tunes from `config.selmix.init_checkpoint`; resumes from `<workdir>/checkpoints`.

  On the host path, or the device-resident one when `config.data.device_resident` takes it
  (`data.device`; 'auto' = on a non-CPU backend when the data fit).

  Returns:
    `{'objective', 'before': {'val', 'test'}, 'after': {'val', 'test'}, 'steps', ...}`.
  """
  return _train([config], [workdir], datasets, many=False)[0]


class RunManyError(errors.UserError, ValueError):
  """The configs of one `run_many` call cannot share a program (names the field)."""


# What the runs of one `run_many` call may differ in (with the objective, all but its head mask).
PER_RUN_FIELDS = (
    "seed", "selmix.pairs", "selmix.mix_weight_min", "selmix.temperature",
    "selmix.temperature_scale", "selmix.floor", "selmix.gain_form", "selmix.train_bias",
    "selmix.gain_chunk_size", "selmix.refresh_every", "selmix.log_every", "selmix.eval_every",
)


def run_many(configs, workdirs, datasets, *, skip_finished: bool = True) -> list[dict[str, Any]]:
  """Trains N fine-tuning runs from one checkpoint in one program, each in its own workdir.

  The runs share the model, data, `init_checkpoint`, batch size, number of steps, learning rate
  and checkpoint period, and may differ in `PER_RUN_FIELDS`: seed, objective, pair strategy
  ('gain', 'uniform', 'instance'), mix_weight_min, the gain's settings, refresh/log/eval periods.
  E.g. the 7 runs of one seed of the paper's CIFAR-10-LT table: the 5 objectives, 'plain_ft'
  (pairs 'instance', mix_weight_min 1) and 'uniform_mixup' (pairs 'uniform').

  They train on the device-resident path (`data.device`; whatever `device_resident='auto'`
  says, even on a CPU; False is an error): their train states are stacked on a leading run
  axis and one compiled step, `vmap`ped over the runs, advances all of them; each run refreshes
  with its own objective (one compiled validation-pass + refresh program per objective).

  Each workdir ends as a solo run's (`run`, then `train.train_and_evaluate`'s `run.json` and
  `results.md`): checkpoints, `summary.json` with before/after, `selmix_history`, plots. Runs
  resume from their checkpoints (runs that stopped at different steps are resumed in groups, one
  program per group). A run equals the same run alone on the device path within float rounding
  (vmapping the step over runs changes how XLA batches its convolutions, so it is not promised
  bit for bit); every run's draws are its own (its seed's keys), whatever the other runs.

  Args:
    configs: the runs' configs (`mode='selmix'`), e.g. variants of configs/cifar10_lt_cpu.py.
    workdirs: one workdir per config (held locked while training).
    datasets: the shared `data.Datasets` (`data.build(configs[0].data)`).
    skip_finished: return the stored result of a workdir that holds a finished run of its
      config instead of training it.

  Returns:
    The runs' results (as `run` returns them), in the order of `configs`.

  Raises:
    RunManyError: (a ValueError) the configs differ in a shared field (named), or early stop
      with several runs.
    data.device.DeviceResidentError: (a ValueError) `device_resident=False`, or data that
      cannot live on the devices (says why).
  """
  from selmix_jax import train  # pylint: disable=g-import-not-at-top  (train imports this module)

  configs, workdirs = list(configs), [str(w) for w in workdirs]
  if len(configs) != len(workdirs) or not configs:
    raise RunManyError(f"run_many: {len(configs)} configs and {len(workdirs)} workdirs.")
  for config in configs:
    train.validate(config)
  _check_shared(configs)
  results = [None] * len(configs)
  with contextlib.ExitStack() as stack:
    todo = []
    for i, (config, workdir) in enumerate(zip(configs, workdirs)):
      os.makedirs(workdir, exist_ok=True)
      stack.enter_context(workdir_lib.lock(workdir))
      done = workdir_lib.finished(workdir, config.to_dict()) if skip_finished else None
      if done is not None:
        logging.info("%s holds a finished run of this config; skipped.", workdir)
        results[i] = done["result"]
      else:
        todo.append(i)
    if todo:
      trained = _train([configs[i] for i in todo], [workdirs[i] for i in todo], datasets, many=True)
      for i, result in zip(todo, trained):
        results[i] = result
        text = _results_text(configs[i], result)
        if jax.process_index() == 0:
          with open(os.path.join(workdirs[i], "results.md"), "w", encoding="utf-8") as f:
            f.write(text)
        workdir_lib.mark_finished(workdirs[i], configs[i].to_dict(), result, text)
  return results


def _flat(tree, prefix=""):
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flat(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def _check_shared(configs) -> None:
  """Raises a ValueError naming the first shared field in which the configs differ."""
  per_run = lambda k: k in PER_RUN_FIELDS or (
      k.startswith("objective.") and k != "objective.hparams.head_mask"
  )
  first = _flat(configs[0].to_dict())
  for i, config in enumerate(configs[1:], 1):
    other = _flat(config.to_dict())
    for key in sorted(set(first) | set(other)):
      if not per_run(key) and first.get(key) != other.get(key):
        raise RunManyError(
            f"run_many: config {i} has config.{key}={other.get(key)!r}, config 0 has "
            f"{first.get(key)!r}; the runs of one program share it (they may differ only in "
            f"{', '.join(PER_RUN_FIELDS)} and the objective)."
        )
  if len(configs) > 1 and any(c.selmix.early_stop for c in configs):
    raise RunManyError(
        "run_many: config.selmix.early_stop=True needs a run of its own (several runs share "
        "one loop); run it with finetune.run."
    )


def _results_text(config, result) -> str:
  """The results table of a fine-tuning run, as `train.train_and_evaluate` writes it."""
  table = reporting.metrics_table({
      "pre-trained (test)": result["before"]["test"],
      f"{result['method']} (test)": result["after"]["test"],
  })
  return (
      f"# {config.data.name}: {result['method']} from {config.selmix.init_checkpoint}\n\n"
      f"Metrics ×100 on the test split ({result['steps']} fine-tuning steps, "
      f"{result['wall_time_s']:.0f} s).\n\n{table}\n"
  )


def _train(configs, workdirs, ds, *, many: bool) -> list[dict[str, Any]]:
  """The runs of `configs` (sharing what `_check_shared` checks) in one loop."""
  config, t0 = configs[0], time.time()
  cfg = config.selmix
  model = models.from_config(config.model, ds.num_classes)
  schedule = optim.cosine_schedule(cfg.learning_rate, cfg.num_steps)
  template, pre_step = _pretrained_state(config, model, ds, schedule)
  for c, w in zip(configs, workdirs):  # Refuses checkpoints of another config, data or start.
    workdir_lib.check_stage(w, workdir_lib.fingerprint("selmix", c, ds, init=(pre_step, template)))
  runs = [_Run(c, w, ds, template, schedule, started=t0) for c, w in zip(configs, workdirs)]
  resumed = sorted({r.resumed_at or 0 for r in runs})
  if len(resumed) > 1:  # Stopped at different steps: each group of runs in its own loop.
    for r in runs:
      r.close()
      r.writer.close()
    logging.info("The runs resume from different steps %s: one loop per step.", resumed)
    results = {}
    for step in resumed:
      group = [i for i, r in enumerate(runs) if (r.resumed_at or 0) == step]
      trained = _train([configs[i] for i in group], [workdirs[i] for i in group], ds, many=many)
      results.update(zip(group, trained))
    return [results[i] for i in range(len(runs))]

  resident = _resident(config, ds, runs, many=many)
  evaluate = evaluation.Evaluator(
      model, ds, batch_size=config.eval_batch_size, options=loader.Options.from_config(config.data),
      head_mask=config.objective.hparams.head_mask, resident=resident,
  )
  if resident is None:
    stepper = _HostSteps(runs[0], config, ds, evaluate)
  else:
    stepper = _DeviceSteps(runs, config, ds, resident, evaluate)
  for index, r in enumerate(runs):
    r.attach(index, stepper, evaluate)
  before = [_before(r, pre_step) for r in runs]
  try:
    step, stopped = loop.run(
        start_step=resumed[0],
        num_steps=cfg.num_steps,
        train_step=stepper.train_step,
        # Controls that sample no P need no refresh (unless their partners are pseudo-labelled).
        before_step=[
            loop.Periodic(r.cfg.refresh_every if r.needs_refresh else 0, r.refresh) for r in runs
        ],
        after_step=[
            action for r in runs for action in (
                loop.Periodic(r.cfg.log_every, r.log, at_end=True),
                loop.Periodic(r.cfg.eval_every, r.evaluate_test),
            )
        ],
        checkpoint=loop.Periodic(cfg.checkpoint_every, stepper.save_all, at_end=True),
        progress=loop.Progress(cfg.num_steps, runs[0].writer),
    )
  finally:
    stepper.close()
    for r in runs:  # On any exit, let an in-flight asynchronous save finish.
      r.close()
  return [r.finish(step, stopped, b, pre_step=pre_step) for r, b in zip(runs, before)]


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


def _resident(config, ds, runs, *, many: bool) -> device.Resident | None:
  """The splits the runs keep on the devices, or None for the host path (`data.device`)."""
  where = f"config.data.device_resident={config.data.get('device_resident', 'auto')!r}"
  setting = device.setting(config.data.get("device_resident", "auto"))
  if setting is False:
    if many:
      raise device.DeviceResidentError(
          f"{where}: run_many trains on the device-resident path only."
      )
    return None
  if setting == "auto" and not many and jax.default_backend() == "cpu":
    return None
  splits = {"first": ds.labeled, "val": ds.val}
  if runs[0].partner is not ds.labeled:
    splits["second"] = runs[0].partner
  budget = float(config.data.get("device_memory_gb", 8.0)) * 2**30
  reason = device.why_not(splits, budget)
  host_only = [r.cfg.pairs for r in runs if r.strategy.class_pairs() is None]
  if reason is None and host_only:
    reason = f"pair strategy {host_only[0]!r} draws its pairs on the host only"
  if reason is not None:
    if setting is True or many:
      raise device.DeviceResidentError(
          f"{where}: the device-resident path cannot be taken: {reason}."
      )
    logging.info("SelMix fine-tuning on the host path: %s.", reason)
    return None
  if device.why_not({**splits, "test": ds.test}, budget) is None:
    splits["test"] = ds.test
  logging.info(
      "SelMix fine-tuning on the device-resident path: %s uploaded (%.1f MiB per device).",
      ", ".join(splits), sum(device.nbytes(s) for s in splits.values()) / 2**20,
  )
  return device.Resident(splits)


class _HostSteps:
  """One run's steps on host batches: pairs drawn by the strategy on the host, batches streamed
  by one `loader.Feed` per refresh interval into the pmapped `steps.selmix_step`.

  The feed of an interval is opened with that interval's strategy and ends at the next refresh,
  so no batch is drawn from a stale P; each batch is a pure function of (seed, step, P).
  """

  on_device = False

  def __init__(self, run, config, ds, evaluate):
    cfg = config.selmix
    self.run, self.ds, self.cfg, self.seed = run, ds, cfg, config.seed
    self.state_repl, self.metrics = train_state.replicate(run.state), None
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

  def state(self, index):
    del index
    return self.state_repl

  def metrics_of(self, index):
    del index
    return self.metrics

  def train_step(self, step):
    if self.feed is None or self.feed.next_step != step or step >= self.feed.stop:
      self._open_feed(step)
    batch = self.feed.next(step)
    with errors.out_of_memory(
        "A SelMix fine-tuning step", "config.selmix.batch_size", self.cfg.batch_size
    ):
      self.state_repl, self.metrics = self.p_train_step(self.state_repl, batch, self.key)
    return self.metrics

  def _open_feed(self, step):
    """Streams the batches of `step` up to the next refresh, drawn by the current strategy."""
    self.close()
    r = self.run
    every = self.cfg.refresh_every if r.needs_refresh else self.cfg.num_steps
    stop = min(self.cfg.num_steps, (step // every + 1) * every)
    batches = pipeline.PairBatches(
        self.ds.labeled, r.partner, r.strategy, self.cfg.batch_size, self.seed,
        pipeline.Layout.local(),
    )
    self.feed = loader.Feed(batches, step, stop, options=self.options, decodes=batches.decodes)

  def before_refresh(self, index):
    del index
    self.close()  # Its batches were drawn from the P this refresh replaces.

  def refreshed(self, index):
    del index  # The next step opens a feed with the new strategy.

  def save_all(self, step):
    self.run.save(step)

  def close(self):
    if self.feed is not None:
      self.feed.close()
      self.feed = None


class _DeviceSteps:
  """The steps of R runs on device-resident pools: their train states stacked `[D, R, ...]`
  (devices, runs), one pmapped step `vmap`ped over the runs (`steps.device_selmix_step`: the
  pairs drawn, gathered and augmented on the device), each run's pair table uploaded when its
  strategy changes, and each run's refresh one compiled program (validation pass + SelMix
  refresh, `evaluation.device_pass` and `selmix_state.make_refresh_fn`).
  """

  on_device = True

  def __init__(self, runs, config, ds, resident, evaluate):
    cfg = config.selmix
    self.runs, self.ds, self.resident, self.evaluate = runs, ds, resident, evaluate
    self.batch_size = cfg.batch_size
    self.states = train_state.replicate(
        jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *[r.state for r in runs])
    )
    self.metrics = None
    self.hyper = jax.tree.map(device.replicated, {
        "seed": np.asarray([r.config.seed for r in runs], np.int32),
        "mix_weight_min": np.asarray([r.cfg.mix_weight_min for r in runs], np.float32),
    })
    names = resident.names
    self.pools = {
        "first": resident["first"],
        "second": resident["second" if "second" in names else "first"],
    }
    self.sizes = (len(self.pools["first"]), len(self.pools["second"]))
    self.tables = [device.pair_table(r.strategy.class_pairs(), *self.sizes) for r in runs]
    self.tables_on_device = None
    self.p_train_step = _device_step(
        cfg.batch_size // jax.local_device_count(), tuple(np.asarray(ds.mean).tolist()),
        tuple(np.asarray(ds.std).tolist()), config.data.train_augment,
        # A frozen backbone computes its features as evaluation does (running statistics).
        cfg.bn_stats if cfg.get("train_backbone", True) else "running",
    )
    self._take = jax.jit(
        lambda tree, i: jax.tree.map(lambda x: x[:, i], tree),
        out_shardings=train_state.local_sharding(),
    )
    self._programs = {}

  def state(self, index):
    """Run `index`'s TrainState, replicated as `pmap` takes it."""
    return self._take(self.states, index)

  def metrics_of(self, index):
    return None if self.metrics is None else self._take(self.metrics, index)

  def train_step(self, step):
    del step  # The step's draws fold in the state's own step count.
    if self.tables_on_device is None:
      stacked = jax.tree.map(lambda *xs: np.stack(xs), *self.tables)
      self.tables_on_device = jax.tree.map(device.replicated, stacked)
    with errors.out_of_memory(
        "A SelMix fine-tuning step", "config.selmix.batch_size", self.batch_size
    ):
      self.states, self.metrics = self.p_train_step(
          self.states, self.hyper, self.pools, self.tables_on_device
      )
    return self.metrics

  def before_refresh(self, index):
    del index

  def refreshed(self, index):
    """Run `index`'s strategy changed: its table is uploaded before the next step."""
    self.tables[index] = device.pair_table(self.runs[index].strategy.class_pairs(), *self.sizes)
    self.tables_on_device = None

  def validation_refresh(self, index, partner_labels, name):
    """Run `index`'s validation pass and SelMix refresh as one program: `(EvalResult, state)`."""
    r = self.runs[index]
    key = json.dumps([r.config.objective.to_dict(), r.refresh_kwargs], sort_keys=True, default=str)
    if key not in self._programs:
      self._programs[key] = self._refresh_program(r)
    variables = self.state(index).eval_variables()
    out, new = self._programs[key](
        variables, self.resident["val"], r.selmix, np.asarray(partner_labels, np.int32)
    )
    val = evaluation.device_result(out, len(self.ds.val), name=name)
    return val, selmix_state.to_host(train_state.unreplicate(new))

  def _refresh_program(self, r):
    refresh = selmix_state.make_refresh_fn(r.objective, **r.refresh_kwargs, jit=False)
    pass_body = self.evaluate.pass_body

    def program(variables, val, sel, partner_labels):
      out = pass_body(variables, val)
      prototypes = out["feature_sums"] / jnp.maximum(out["class_counts"], 1)[:, None]
      head = variables["params"]["head"]
      confusion = out["confusion"].astype(jnp.float32)
      return out, refresh(sel, confusion, prototypes, head["kernel"], head["bias"], partner_labels)

    return jax.pmap(program, axis_name="batch", in_axes=(0, 0, None, None))

  def save_all(self, step):
    for r in self.runs:
      r.save(step)

  def close(self):
    pass


@functools.lru_cache(maxsize=8)
def _device_step(local_batch, mean, std, crop, bn_stats):
  """The pmapped device-resident step, vmapped over runs (`steps.device_selmix_step`).

  Cached: every `_DeviceSteps` with these settings shares one function, so a process that
  trains several groups of runs (or a run alone after them) compiles each shape once.
  """
  body = functools.partial(
      steps.device_selmix_step,
      batch_size=local_batch,
      preprocess_fn=augment.make_preprocess("weak", mean=mean, std=std, crop=crop),
      bn_stats=bn_stats,
      axis_name="batch",
  )
  return jax.pmap(
      jax.vmap(body, in_axes=(0, 0, None, 0)), axis_name="batch", donate_argnums=(0,)
  )


class _Run:
  """One fine-tuning run: its config, workdir, SelMix state and pair strategy, and the loop's
  actions over them (refresh, log, test evaluation, checkpoint, final summary).

  Its train state lives in the steps object it is attached to (`_HostSteps` or `_DeviceSteps`),
  which holds the train states of all runs of the loop.
  """

  def __init__(self, config, workdir, ds, template, schedule, *, started):
    """Restores the run from `<workdir>/checkpoints` (else starts from `template`)."""
    cfg = self.cfg = config.selmix
    self.config, self.workdir, self.ds = config, workdir, ds
    self.objective = objectives.from_config(config.objective)
    self.partner = _partner_pool(cfg, ds)
    sel = selmix_state.init(
        self.objective, ds.num_classes, self.partner.labels,
        history_length=cfg.num_steps // cfg.refresh_every + 1,
    )
    self.manager = checkpointing.make_manager(os.path.join(workdir, "checkpoints"))
    restored, self.resumed_at = train_state.restore(
        self.manager, {"state": template, "selmix": sel}
    )
    if self.resumed_at is not None:
      logging.info("Resumed SelMix fine-tuning from step %d.", self.resumed_at)
    self.state, self.selmix = restored["state"], restored["selmix"]
    self.clock = workdir_lib.StageClock(workdir, self.resumed_at, started=started)
    self.writer = loop.Writer(workdir)
    self.guard = loop.DivergenceGuard(
        "SelMix fine-tuning",
        schedule=schedule,
        lr_field=f"config.selmix.learning_rate={cfg.learning_rate}",
        manager=self.manager,
    )
    self.refresh_kwargs = dict(
        mix_weight=(cfg.mix_weight_min + 1.0) / 2.0, temperature=cfg.temperature,
        temperature_scale=cfg.temperature_scale, form=cfg.gain_form, train_bias=cfg.train_bias,
        chunk_size=cfg.gain_chunk_size,
    )
    self.refresh_fn = selmix_state.make_refresh_fn(self.objective, **self.refresh_kwargs)
    self.strategy = pairs.get(cfg.pairs)(
        ds.labeled.labels, self.selmix.partner_labels, num_classes=ds.num_classes,
        floor=cfg.floor,
    ).refreshed(self.selmix.pair_probs, self.selmix.partner_labels)
    self.pseudo = cfg.partner_pool == "unlabeled" and cfg.partner_labels == "pseudo"
    self.needs_refresh = self.strategy.uses_pair_probs or self.pseudo
    self.method = _method(cfg, self.objective, self.strategy)
    self.initial = {}  # Passes over the starting model that the step-0 refresh reuses.
    self.warned_uniform = False
    self.index = self.steps = self.evaluate = None

  def attach(self, index, steps_, evaluate):
    """Trains as run `index` of `steps_`, evaluated by `evaluate`."""
    self.index, self.steps, self.evaluate = index, steps_, evaluate
    self.state = None  # The steps object holds it now.

  @property
  def state_repl(self):
    return self.steps.state(self.index)

  @property
  def metrics(self):
    return self.steps.metrics_of(self.index)

  def refresh(self, step):
    """Validation pass -> new SelMixState (and pseudo-labels) -> the strategy's next table."""
    cfg, ds = self.cfg, self.ds
    state_repl = self.state_repl
    self.guard(step, state_repl, self.metrics)  # Gains of a diverged model mean nothing.
    self.steps.before_refresh(self.index)
    initial, self.initial = (self.initial if step == 0 else {}), {}
    partner_labels = self.selmix.partner_labels
    if self.pseudo:
      unlabeled = initial.get("unlabeled") or self.evaluate(
          state_repl, self.partner, name=f"unlabeled pool (step {step})", announce=False
      )
      partner_labels = unlabeled.preds.astype(np.int32)
    if not self.strategy.uses_pair_probs:  # A control: new partner labels only.
      self.selmix = self.selmix.replace(partner_labels=partner_labels)
      self.strategy = self.strategy.refreshed(self.selmix.pair_probs, partner_labels)
      self.steps.refreshed(self.index)
      return None
    name = f"validation (step {step})"
    if "val" in initial or not self.steps.on_device:
      val = initial.get("val") or self.evaluate(state_repl, ds.val, name=name, announce=False)
      head = train_state.unreplicate(state_repl.params)["head"]
      self.selmix = selmix_state.to_host(self.refresh_fn(
          self.selmix,
          jnp.asarray(val.confusion, jnp.float32),
          jnp.asarray(val.prototypes, jnp.float32),
          head["kernel"],
          head["bias"],
          partner_labels,
      ))
    else:  # Validation pass and refresh in one program on the device.
      val, self.selmix = self.steps.validation_refresh(self.index, partner_labels, name)
    if not (np.isfinite(self.selmix.gain).all() and np.isfinite(self.selmix.pair_probs).all()):
      # Never sample from a NaN P (or silently uniformly): stop with what went wrong.
      self.guard.fail(step, (
          f"the refresh's gains are not finite ({np.sum(~np.isfinite(self.selmix.gain))} of "
          f"{self.selmix.gain.size} entries, max gain {self.selmix.max_gain}), from a valid "
          f"validation confusion matrix of {int(val.confusion.sum())} examples"
      ))
    self.strategy = self.strategy.refreshed(self.selmix.pair_probs, self.selmix.partner_labels)
    self.steps.refreshed(self.index)
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
    state_repl = self.state_repl
    self.guard(step, state_repl, self.metrics)  # Never checkpoint a non-finite state.
    host = {"state": train_state.unreplicate(state_repl), "selmix": self.selmix}
    train_state.save(self.manager, step, host)
    self.clock.checkpointed(step)

  def close(self):
    """Lets an in-flight asynchronous save finish and closes the checkpoint manager."""
    self.manager.wait_until_finished()
    self.manager.close()

  def finish(self, step, stopped, before, *, pre_step) -> dict[str, Any]:
    """The final model's passes, `summary.json` and the plots; returns the run's result.

    `wall_time_s` covers the whole stage, from its start to the final passes, across restarts
    (`workdir.StageClock`).
    """
    state_repl = self.state_repl
    after = {
        s: self.evaluate.summary(
            self.evaluate(state_repl, getattr(self.ds, s), name=f"{s} (final)")
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


def _before(r, pre_step) -> dict[str, Any]:
  """Validation and test metrics of run `r`'s starting model (`before.json`, for a resume).

  The passes come from the starting checkpoint's `evaluation.EvalCache` when an earlier run from
  it made them; the validation (and unlabeled) pass also feed the step-0 refresh.
  """
  config, workdir = r.config, r.workdir
  if r.resumed_at is not None:
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
