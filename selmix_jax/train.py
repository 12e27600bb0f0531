"""`train_and_evaluate(config, workdir)`: the one library call behind `launch/main.py`.

`config.mode` picks the job:
- 'pretrain': pre-training only (`<workdir>/checkpoints`, `summary.json`).
- 'selmix': SelMix fine-tuning from `config.selmix.init_checkpoint`.
- 'pretrain_and_selmix': both in one invocation (`<workdir>/pretrain`, `<workdir>/selmix`), ending
  with a before/after table of every SPEC §2 metric (also in `<workdir>/results.md`).

Config errors (unknown model, data set or objective, batch sizes that do not divide over the
devices, a missing pre-training checkpoint) are raised by `validate` before any compute.
"""

import os
from typing import Any

from absl import logging
import jax
import ml_collections

from selmix_jax import data
from selmix_jax import finetune
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


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks names, batch sizes and paths of `config`; raises ValueError/FileNotFoundError."""
  if config.mode not in MODES:
    raise ValueError(f"config.mode={config.mode!r}; expected one of {MODES}.")
  if config.model.name not in models.names():
    raise ValueError(
        f"config.model.name={config.model.name!r} is not a known model; "
        f"known: {', '.join(models.names())}."
    )
  if config.model.dtype not in models.DTYPES:
    raise ValueError(
        f"config.model.dtype={config.model.dtype!r}; expected one of {models.DTYPES}."
    )
  if config.data.name not in data.names():
    raise ValueError(
        f"config.data.name={config.data.name!r} is not a known data set; "
        f"known: {', '.join(data.names())}."
    )
  pipeline.check_global_batch(config.eval_batch_size, field="config.eval_batch_size")
  if config.data.train_augment not in augment.CROPS:
    raise ValueError(
        f"config.data.train_augment={config.data.train_augment!r}; expected one of "
        f"{augment.CROPS} (the crop of the weak training views)."
    )
  if config.mode in ("pretrain", "pretrain_and_selmix"):
    pipeline.check_global_batch(config.pretrain.batch_size, field="config.pretrain.batch_size")
    if config.pretrain.method not in pretrain.METHODS:
      raise ValueError(
          f"config.pretrain.method={config.pretrain.method!r}; expected one of {pretrain.METHODS}."
      )
    if config.pretrain.schedule not in pretrain.SCHEDULES:
      raise ValueError(
          f"config.pretrain.schedule={config.pretrain.schedule!r}; expected one of "
          f"{pretrain.SCHEDULES}."
      )
    if config.pretrain.method == "fixmatch" and config.data.unlabeled_max == 0:
      raise ValueError(
          "config.pretrain.method='fixmatch' needs an unlabeled pool: set "
          "config.data.unlabeled_max > 0 (-1 = every remaining training example)."
      )
  if config.mode in ("selmix", "pretrain_and_selmix"):
    if config.objective.name not in objectives.names():
      raise ValueError(
          f"config.objective.name={config.objective.name!r} is not a known objective; "
          f"known: {', '.join(objectives.names())}."
      )
    objectives.get(config.objective.name, **config.objective.get("hparams", {}))
    pipeline.check_global_batch(config.selmix.batch_size, field="config.selmix.batch_size")
    pairs.get(config.selmix.pairs)
    if config.selmix.partner_pool not in ("labeled", "unlabeled"):
      raise ValueError(
          f"config.selmix.partner_pool={config.selmix.partner_pool!r}; expected 'labeled' or "
          "'unlabeled' (semi-supervised: partners from the pseudo-labelled unlabeled pool)."
      )
    if config.selmix.partner_labels not in ("pseudo", "true"):
      raise ValueError(
          f"config.selmix.partner_labels={config.selmix.partner_labels!r}; expected 'pseudo' "
          "(SPEC §5) or 'true' (the unlabeled pool's true labels, the authors' release protocol)."
      )
    if config.selmix.partner_pool == "unlabeled" and config.data.unlabeled_max == 0:
      raise ValueError(
          "config.selmix.partner_pool='unlabeled' needs an unlabeled pool: set "
          "config.data.unlabeled_max > 0 (-1 = every remaining training example)."
      )
    if config.selmix.refresh_every <= 0:
      raise ValueError("config.selmix.refresh_every must be a positive number of steps.")
    if config.selmix.bn_stats not in steps.BN_STATS_MODES:
      raise ValueError(
          f"config.selmix.bn_stats={config.selmix.bn_stats!r}; expected 'batch' (each pass's "
          "own BatchNorm statistics, SPEC §6) or 'running' (the frozen running statistics)."
      )
  if config.mode == "selmix":
    path = config.selmix.init_checkpoint
    if not path or not os.path.isdir(path):
      raise FileNotFoundError(
          f"config.selmix.init_checkpoint={path!r} is not a directory. Point it at the "
          "`checkpoints` folder of a pre-training run (mode='pretrain')."
      )


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs the job `config.mode` in `workdir` (resuming whatever is already there).

  Holds the workdir's lock while it runs. A job that already finished in `workdir` with the same
  config prints its stored results and returns them without computing anything.
  """
  validate(config)
  logging.info(
      "JAX process %d/%d, %d local device(s), %d in all: %s",
      jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count(),
      jax.local_devices(),
  )
  os.makedirs(workdir, exist_ok=True)
  config_dict = config.to_dict()
  with workdir_lib.lock(workdir):
    done = workdir_lib.finished(workdir, config_dict)
    if done is not None:
      logging.info("%s holds a finished run of this config; its stored results:", workdir)
      _show(done["text"])
      return done["result"]
    datasets = data.build(config.data)
    logging.info(
        "Data %s: %d classes, labeled per class %s.",
        config.data.name,
        datasets.num_classes,
        datasets.labeled_class_counts.tolist(),
    )
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
    result = pretrain.run(config, workdir, datasets)
    table = reporting.metrics_table({"validation": result["val"], "test": result["test"]})
    return result, f"# {name}: pre-training ({result['steps']} steps)\n\n{table}\n"
  if config.mode == "pretrain_and_selmix":
    pre_dir = os.path.join(workdir, "pretrain")
    pretrain.run(config, pre_dir, datasets)
    with config.unlocked():
      config.selmix.init_checkpoint = os.path.join(pre_dir, "checkpoints")
    workdir = os.path.join(workdir, "selmix")
  result = finetune.run(config, workdir, datasets)
  table = reporting.metrics_table(
      {
          "pre-trained (test)": result["before"]["test"],
          f"SelMix {result['objective']} (test)": result["after"]["test"],
      }
  )
  title = f"# {name}: pre-train -> SelMix ({result['objective']})"
  if config.mode == "selmix":
    title = f"# {name}: SelMix ({result['objective']}) from {config.selmix.init_checkpoint}"
  text = f"{title}\n\nMetrics ×100 on the test split ({result['steps']} fine-tuning steps).\n\n"
  return result, text + table + "\n"


def _show(text: str) -> None:
  """The results table is the job's answer: process 0 prints it (even without logging to
  stderr) and logs it."""
  if jax.process_index() == 0:
    logging.info("Results:\n%s", text)
    print(text, flush=True)
