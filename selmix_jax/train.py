"""`train_and_evaluate(config, workdir)`: the one library call behind `launch/main.py`.

`config.mode` picks the job:
- 'pretrain': pre-training only (`<workdir>/checkpoints`, `summary.json`).
- 'selmix': SelMix fine-tuning from `config.selmix.init_checkpoint`.
- 'pretrain_and_selmix': both in one invocation (`<workdir>/pretrain`, `<workdir>/selmix`), ending
  with a before/after table of every SPEC §2 metric (also in `<workdir>/results.md`).

Config errors (unknown names, options or data fields; batch sizes that do not divide over the
devices; non-positive learning rates, step counts or temperatures and other values out of range;
a missing path) are raised by `validate` as a `ConfigError` naming the field, before any data is
loaded or anything compiled. A run whose loss or state stops being finite raises `loop.Diverged`
(last good checkpoint kept); neither writes `run.json`, `results.md` or a `summary.json`.
"""

import math
import os
from typing import Any

from absl import logging
import jax
import ml_collections
import numpy as np

from selmix_jax import data
from selmix_jax import errors
from selmix_jax import finetune
from selmix_jax import frozen
from selmix_jax import gains
from selmix_jax import mislas
from selmix_jax import models
from selmix_jax import objectives
from selmix_jax import pairs
from selmix_jax import pretrain
from selmix_jax import reporting
from selmix_jax import steps
from selmix_jax import workdir as workdir_lib
from selmix_jax.data import augment
from selmix_jax.data import pipeline

MODES = ("pretrain", "selmix", "pretrain_and_selmix")


class ConfigError(errors.UserError):
  """A config value the run cannot use, found by `validate` before any compute; the message
  names the field (`config.selmix.temperature=0.0: must be > 0`)."""

  prefix = "Invalid config: "


class ConfigValueError(ConfigError, ValueError):
  """An invalid config value."""


class ConfigPathError(ConfigError, FileNotFoundError):
  """A config field names a file or folder that does not exist."""


def _int(v) -> bool:
  return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _real(v) -> bool:
  return isinstance(v, (int, float, np.number)) and not isinstance(v, bool) and math.isfinite(v)


_POSITIVE_INT = (lambda v: _int(v) and v > 0, "a positive integer")
_STEPS_OR_0 = (lambda v: _int(v) and v >= 0, "an integer >= 0 (0 = only at the end)")
_POSITIVE = (lambda v: _real(v) and v > 0, "> 0")
_NON_NEGATIVE = (lambda v: _real(v) and v >= 0, ">= 0")
_UNIT = (lambda v: _real(v) and 0 <= v <= 1, "in [0, 1]")
_DECAY = (lambda v: _real(v) and 0 <= v < 1, "in [0, 1)")

# Ranges of numeric fields: {field: (predicate, what it must be)}, by the stage that reads them.
_DATA_RANGES = {
    "labeled_max": (lambda v: v is None or (_int(v) and (v == -1 or v > 0)),
                    "None or -1 (every example) or a positive count"),
    "labeled_imbalance": (lambda v: _real(v) and v >= 1, ">= 1 (rho_l)"),
    "unlabeled_max": (lambda v: _int(v) and v >= -1, "-1 (every example), 0 or a count"),
    "unlabeled_imbalance": (lambda v: _real(v) and v > 0, "> 0 (rho_u; < 1 inverts the profile)"),
    "val_per_class": (lambda v: _int(v) and v >= 0, "an integer >= 0"),
    "digits_test_fraction": (lambda v: _real(v) and 0 < v < 1, "in (0, 1)"),
    "image_size": (lambda v: v is None or (_int(v) and v > 0), "None or a positive integer"),
}
_PRETRAIN_RANGES = {
    "num_steps": _POSITIVE_INT,
    "learning_rate": _POSITIVE,
    "momentum": _DECAY,
    "weight_decay": _NON_NEGATIVE,
    "logit_adjust_tau": (_real, "a finite number"),
    "ema_decay_supervised": _DECAY,
    "log_every": _POSITIVE_INT,
    "eval_every": _STEPS_OR_0,
    "checkpoint_every": _STEPS_OR_0,
}
_FIXMATCH_RANGES = {
    "unlabeled_ratio": _POSITIVE_INT,
    "threshold": _UNIT,
    "unlabeled_weight": _NON_NEGATIVE,
    "ema_decay": _DECAY,
}
_MISLAS_RANGES = {
    "stage1_epochs": _POSITIVE_INT,
    "alpha": _POSITIVE,
    "warmup_epochs": (lambda v: _int(v) and v >= 0, "an integer >= 0"),
    "decay_epochs": (lambda v: isinstance(v, (tuple, list)) and all(_int(e) and e > 0 for e in v),
                     "a tuple of positive epochs"),
    "decay_factor": (lambda v: _real(v) and 0 < v <= 1, "in (0, 1]"),
    "stage2_epochs": _POSITIVE_INT,
    "stage2_learning_rate": _POSITIVE,
    "head_lr_factor": _NON_NEGATIVE,
    "smooth_head": (lambda v: _real(v) and 0 <= v < 1, "in [0, 1)"),
    "smooth_tail": (lambda v: _real(v) and 0 <= v < 1, "in [0, 1)"),
    "samples_per_class": _POSITIVE_INT,
}
_SELMIX_RANGES = {
    "num_steps": _POSITIVE_INT,
    "learning_rate": _POSITIVE,
    "backbone_lr_mult": _NON_NEGATIVE,
    "weight_decay": _NON_NEGATIVE,
    "mix_weight_min": _UNIT,
    "temperature": _POSITIVE,
    "floor": (lambda v: v is None or (_real(v) and 0 <= v <= 1), "None (1/K) or in [0, 1]"),
    "gain_chunk_size": (lambda v: v is None or (_int(v) and v > 0), "None or a positive integer"),
    "refresh_every": _POSITIVE_INT,
    "early_stop_window": _POSITIVE_INT,
    "early_stop_tol": _NON_NEGATIVE,
    "log_every": _POSITIVE_INT,
    "eval_every": _STEPS_OR_0,
    "checkpoint_every": _STEPS_OR_0,
}


def _check_choice(section: ml_collections.ConfigDict, prefix: str, name: str, choices) -> None:
  if section[name] not in choices:
    raise ValueError(f"{prefix}.{name}={section[name]!r}; expected one of {choices}.")


def _check_ranges(section: ml_collections.ConfigDict, prefix: str, ranges) -> None:
  for name, (ok, expected) in ranges.items():
    if name in section and not ok(section[name]):
      raise ValueError(f"{prefix}.{name}={section[name]!r}: must be {expected}.")


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks every field `config.mode` uses, before any data is loaded or anything compiled.

  Names, batch sizes (positive multiples of the device count), numeric ranges (positive learning
  rates, step counts and temperatures, probabilities in [0, 1], ...), the model's options, the
  objective's hyperparameters, data fields and paths. Warns when `selmix.refresh_every` exceeds
  `selmix.num_steps` (one refresh, at step 0).

  Raises:
    ConfigValueError: (a ValueError) naming the field, its value and what it must be.
    ConfigPathError: (a FileNotFoundError) a path field naming nothing.
  """
  try:
    _validate(config)
  except ConfigError:
    raise
  except FileNotFoundError as e:
    raise ConfigPathError(str(e)) from e
  except ValueError as e:  # From the checks here and the registries' (`objectives.get`, ...).
    raise ConfigValueError(str(e)) from e


def _validate(config: ml_collections.ConfigDict) -> None:
  _check_choice(config, "config", "mode", MODES)
  if config.model.name not in models.names():
    raise ValueError(
        f"config.model.name={config.model.name!r} is not a known model; "
        f"known: {', '.join(models.names())}."
    )
  _check_choice(config.model, "config.model", "dtype", models.DTYPES)
  models.check_kwargs(
      config.model.name, config.model.get("kwargs", {}), field="config.model.kwargs"
  )
  _validate_data(config.data)
  pipeline.check_global_batch(config.eval_batch_size, field="config.eval_batch_size")
  if config.data.train_augment not in augment.CROPS:
    raise ValueError(
        f"config.data.train_augment={config.data.train_augment!r}; expected one of "
        f"{augment.CROPS} (the crop of the weak training views)."
    )
  if config.mode in ("pretrain", "pretrain_and_selmix"):
    _validate_pretrain(config)
  if config.mode in ("selmix", "pretrain_and_selmix"):
    _validate_selmix(config)
  if config.mode == "selmix":
    path = config.selmix.init_checkpoint
    if not path or not os.path.isdir(path):
      raise FileNotFoundError(
          f"config.selmix.init_checkpoint={path!r} is not a directory. Point it at the "
          "`checkpoints` folder of a pre-training run (mode='pretrain')."
      )


def _validate_data(cfg: ml_collections.ConfigDict) -> None:
  if cfg.name not in data.names():
    raise ValueError(
        f"config.data.name={cfg.name!r} is not a known data set; known: {', '.join(data.names())}."
    )
  known = pipeline.default_config()
  unknown = sorted(set(cfg) - set(known))
  if unknown:
    raise ValueError(
        f"config.data.{unknown[0]} is not a data field; known: {', '.join(sorted(known))}."
    )
  _check_ranges(cfg, "config.data", _DATA_RANGES)
  if cfg.name == "features":
    path = cfg.get("path", "")
    if not path or not os.path.exists(os.path.expanduser(path)):
      raise FileNotFoundError(
          f"config.data.path={path!r} does not exist; 'features' needs an .npz or a folder of "
          ".npy files ({train,val,test}_features [N, D], {train,val,test}_labels [N])."
      )
    if cfg.train_augment != "none":
      raise ValueError(
          f"config.data.train_augment={cfg.train_augment!r}: feature vectors take no image "
          "augmentation; set it to 'none'."
      )
    if cfg.val_flip:
      raise ValueError("config.data.val_flip=True: feature vectors cannot be flipped.")
  if cfg.name == "image_folder":
    root = cfg.get("root", "")
    if not root or not os.path.exists(os.path.expanduser(root)):
      raise FileNotFoundError(
          f"config.data.root={root!r} does not exist; image_folder needs a folder or .zip "
          "holding <split>/<class>/*.jpg."
      )


def _validate_pretrain(config: ml_collections.ConfigDict) -> None:
  cfg = config.pretrain
  pipeline.check_global_batch(cfg.batch_size, field="config.pretrain.batch_size")
  _check_choice(cfg, "config.pretrain", "method", pretrain.METHODS)
  _check_choice(cfg, "config.pretrain", "schedule", pretrain.SCHEDULES)
  _check_ranges(cfg, "config.pretrain", _PRETRAIN_RANGES)
  if cfg.method == "fixmatch" and config.data.name == "features":
    raise ValueError(
        "config.pretrain.method='fixmatch' needs images (its strong view is RandAugment); "
        "with config.data.name='features' use 'supervised' (CE or logit-adjusted CE)."
    )
  if cfg.method == "mislas":
    _validate_mislas(cfg)
  if cfg.method == "fixmatch":
    _check_ranges(cfg, "config.pretrain", _FIXMATCH_RANGES)
    if config.data.unlabeled_max == 0:
      raise ValueError(
          "config.pretrain.method='fixmatch' needs an unlabeled pool: set "
          "config.data.unlabeled_max > 0 (-1 = every remaining training example)."
      )


def _validate_mislas(cfg: ml_collections.ConfigDict) -> None:
  m = cfg.get("mislas")
  if m is None:
    raise ValueError(
        "config.pretrain.method='mislas' needs config.pretrain.mislas (its stage fields; "
        "configs/base.py sets them to the release's CIFAR-10-LT values)."
    )
  known = mislas.default_config()
  unknown = sorted(set(m) - set(known))
  if unknown:
    raise ValueError(
        f"config.pretrain.mislas.{unknown[0]} is not a MiSLAS field; known: "
        f"{', '.join(sorted(known))}."
    )
  missing = sorted(set(known) - set(m))
  if missing:
    raise ValueError(f"config.pretrain.mislas.{missing[0]} is missing.")
  _check_ranges(m, "config.pretrain.mislas", _MISLAS_RANGES)
  _check_choice(m, "config.pretrain.mislas", "schedule", mislas.SCHEDULES)
  _check_choice(m, "config.pretrain.mislas", "smooth_shape", mislas.SMOOTHING_SHAPES)
  if m.schedule == "step" and m.warmup_epochs > m.stage1_epochs:
    raise ValueError(
        f"config.pretrain.mislas.warmup_epochs={m.warmup_epochs}: must be <= "
        f"config.pretrain.mislas.stage1_epochs={m.stage1_epochs}."
    )
  if not isinstance(m.shift_bn, bool):
    raise ValueError(f"config.pretrain.mislas.shift_bn={m.shift_bn!r}: must be True or False.")


def _validate_selmix(config: ml_collections.ConfigDict) -> None:
  cfg = config.selmix
  if not objectives.is_known(config.objective.name):
    raise ValueError(
        f"config.objective.name={config.objective.name!r} is not a known objective; "
        f"known: {', '.join(objectives.names())}."
    )
  hparams = {k: v for k, v in config.objective.get("hparams", {}).items() if v is not None}
  for key, value in hparams.items():
    problem = objectives.hparam_problem(key, value)
    if problem:
      raise ValueError(f"config.objective.hparams.{key}={value!r}: {problem}.")
  try:
    objectives.from_config(config.objective)
  except (ValueError, TypeError) as e:
    raise ValueError(f"config.objective.hparams: {e}") from e
  pipeline.check_global_batch(cfg.batch_size, field="config.selmix.batch_size")
  pairs.get(cfg.pairs)
  _check_ranges(cfg, "config.selmix", _SELMIX_RANGES)
  if not isinstance(cfg.get("train_backbone", True), bool):
    raise ValueError(
        f"config.selmix.train_backbone={cfg.train_backbone!r}: must be True or False."
    )
  _check_choice(cfg, "config.selmix", "gain_form", gains.FORMS)
  if cfg.partner_pool not in ("labeled", "unlabeled"):
    raise ValueError(
        f"config.selmix.partner_pool={cfg.partner_pool!r}; expected 'labeled' or "
        "'unlabeled' (semi-supervised: partners from the pseudo-labelled unlabeled pool)."
    )
  if cfg.partner_labels not in ("pseudo", "true"):
    raise ValueError(
        f"config.selmix.partner_labels={cfg.partner_labels!r}; expected 'pseudo' "
        "(SPEC §5) or 'true' (the unlabeled pool's true labels, the authors' release protocol)."
    )
  if cfg.partner_pool == "unlabeled" and config.data.unlabeled_max == 0:
    raise ValueError(
        "config.selmix.partner_pool='unlabeled' needs an unlabeled pool: set "
        "config.data.unlabeled_max > 0 (-1 = every remaining training example)."
    )
  if cfg.bn_stats not in steps.BN_STATS_MODES:
    raise ValueError(
        f"config.selmix.bn_stats={cfg.bn_stats!r}; expected 'batch' (each pass's "
        "own BatchNorm statistics, SPEC §6) or 'running' (the frozen running statistics)."
    )
  if cfg.refresh_every > cfg.num_steps:
    logging.warning(
        "config.selmix.refresh_every=%d exceeds config.selmix.num_steps=%d: P is computed "
        "once, at step 0, and never refreshed.", cfg.refresh_every, cfg.num_steps,
    )


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, *, restart: bool = False
) -> dict[str, Any]:
  """Runs the job `config.mode` in `workdir` (resuming whatever of this run is already there).

  Holds the workdir's lock while it runs. A job that already finished in `workdir` with the same
  config prints its stored results and returns them without computing anything. A workdir
  holding another run (finished, or checkpoints of another config or data set) is refused with
  `workdir.WorkdirError`; `restart=True` (`--restart`) deletes that run first (`workdir.clear`).
  """
  validate(config)
  logging.info(
      "JAX process %d/%d, %d local device(s), %d in all: %s",
      jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count(),
      jax.local_devices(),
  )
  workdir_lib.create(workdir)
  config_dict = config.to_dict()
  with workdir_lib.lock(workdir):
    if restart:
      workdir_lib.clear(workdir)
    done = workdir_lib.finished(workdir, config_dict)
    if done is not None:
      logging.info("%s holds a finished run of this config; its stored results:", workdir)
      _show(done["text"])
      return done["result"]
    datasets = data.build(config.data)
    logging.info("Data %s: %s", config.data.name, pipeline.describe(datasets))
    head_mask = config.objective.hparams.head_mask
    warning = pipeline.head_tail_warning(
        datasets.class_names, datasets.labeled_class_counts, head_mask
    )
    if warning:
      logging.warning("%s", warning)
    if head_mask is not None and len(head_mask) != datasets.num_classes:
      raise ConfigValueError(
          f"config.objective.hparams.head_mask has {len(head_mask)} entries; the data set has "
          f"{datasets.num_classes} classes ({', '.join(datasets.class_names[:5])}, ...)."
      )
    # Logged once the config, the workdir and the data are checked, so that a mistake in
    # any of them ends in its own line rather than after this dump.
    logging.info("Config:\n%s", config)
    result, text = _run(config, workdir, datasets)
    if jax.process_index() == 0:
      with open(os.path.join(workdir, "results.md"), "w", encoding="utf-8") as f:
        f.write(text)
    workdir_lib.mark_finished(workdir, config_dict, result, text)
    _show(text)
  return result


def _run(config, workdir, datasets) -> tuple[dict[str, Any], str]:
  """Runs the stages of `config.mode`; returns the result and its results table (Markdown)."""
  name = config.data.name
  if config.mode == "pretrain":
    _announce("Pre-training", config.pretrain, config.model.name)
    result = pretrain.run(config, workdir, datasets)
    return result, _pretrain_text(name, result)
  if config.mode == "pretrain_and_selmix":
    pre_dir = os.path.join(workdir, "pretrain")
    _announce("Pre-training", config.pretrain, config.model.name)
    _show(_pretrain_text(name, pretrain.run(config, pre_dir, datasets)))  # Each stage's table.
    with config.unlocked():
      config.selmix.init_checkpoint = os.path.join(pre_dir, "checkpoints")
    workdir = os.path.join(workdir, "selmix")
  _announce(f"SelMix fine-tuning for {config.objective.name}", config.selmix, config.model.name)
  # A frozen backbone without augmentation: its features once, then the head (`frozen`).
  result = (frozen.run if frozen.caches(config) else finetune.run)(config, workdir, datasets)
  table = reporting.metrics_table(
      {
          "pre-trained (test)": result["before"]["test"],
          f"{result['method']} (test)": result["after"]["test"],
      }
  )
  title = f"# {name}: pre-train -> {result['method']}"
  if config.mode == "selmix":
    title = f"# {name}: {result['method']} from {config.selmix.init_checkpoint}"
  text = (
      f"{title}\n\nMetrics ×100 on the test split ({result['steps']} fine-tuning steps, "
      f"{result['wall_time_s']:.0f} s).\n\n"
  )
  return result, text + table + "\n"


def _announce(stage: str, cfg: ml_collections.ConfigDict, model: str) -> None:
  """The line that starts a stage, before its silent part (building the model, restoring a
  checkpoint, the first evaluation passes and compilations)."""
  logging.info(
      "%s: %d steps of %d, %s; building the model and compiling its steps first (a minute or "
      "more for a ResNet on a CPU).", stage, cfg.num_steps, cfg.batch_size, model,
  )


def _pretrain_text(name: str, result: dict[str, Any]) -> str:
  table = reporting.metrics_table({"validation": result["val"], "test": result["test"]})
  return (
      f"# {name}: pre-training ({result['steps']} steps, {result['wall_time_s']:.0f} s)\n\n"
      f"Metrics ×100.\n\n{table}\n"
  )


def _show(text: str) -> None:
  """The results table is the job's answer: process 0 prints it once, on stdout (even without
  logging to stderr); the log gets only its title, so a terminal shows the table once."""
  if jax.process_index() == 0:
    logging.info("Results table on stdout: %s", text.splitlines()[0].lstrip("# "))
    print(text, flush=True)
