"""benchmarks/cifar10_lt_table.py: run directories as arguments, every objective, every metric."""

import importlib.util
import json
import os

import numpy as np

from selmix_jax import metrics
from selmix_jax import objectives

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _table_module():
  path = os.path.join(_REPO, "benchmarks", "cifar10_lt_table.py")
  spec = importlib.util.spec_from_file_location("cifar10_lt_table", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _summary(objective, pairs="gain", mix_weight_min=0.6, seed=0, value=0.5):
  scalars = {m: value for m in metrics.SCALAR_METRICS}
  return {
      "objective": objective if pairs == "gain" else "none",
      "before": {"test": {m: 0.4 for m in metrics.SCALAR_METRICS}},
      "after": {"test": scalars},
      "target_before": {"target": 0.4},
      "target_after": {"target": value, "constraint_gap": 0.01},
      "pretrain_step": 100,
      "config": {"seed": seed, "selmix": {"init_checkpoint": "/runs/pre/checkpoints",
                                          "pairs": pairs, "mix_weight_min": mix_weight_min}},
  }  # fmt: skip


def test_every_objective_and_both_controls_from_run_directories(tmp_path):
  for seed in (0, 1):
    runs = {name: _summary(name, seed=seed, value=0.5 + 0.01 * seed)
            for name in objectives.names()}  # fmt: skip
    runs["uniform"] = _summary("min_recall", pairs="uniform", seed=seed)
    runs["plain"] = _summary("min_recall", pairs="instance", mix_weight_min=1.0, seed=seed)
    for name, summary in runs.items():
      os.makedirs(tmp_path / f"seed{seed}" / name)
      json.dump(summary, open(tmp_path / f"seed{seed}" / name / "summary.json", "w"))
  table = _table_module()
  summaries = table.find_summaries([str(tmp_path / "seed0"), str(tmp_path / "seed1")])
  assert len(summaries) == 2 * (len(objectives.names()) + 2)
  text = table.tables(summaries)
  for name in objectives.names():
    assert f"| SelMix ({name}) | 2 | 50.5 ± 0.7 |" in text, name
    assert f"| {name} | " in text
  assert "| uniform mixup | 2 |" in text and "| CE fine-tuning | 2 |" in text
  assert "min_head_tail_recall" in text.splitlines()[3]
  assert np.isclose(float(text.split("| min_recall | min_recall | ")[1].split(" |")[0]), 40.0)


def test_settings_beyond_the_seed_get_rows_and_the_val_split_is_read(tmp_path):
  """Runs that differ in more than the seed (here the temperature scale) are not averaged, and
  `--split=val` reports validation metrics and the objective's target from the val counts."""
  confusion_val = np.diag([8.0, 2.0]) + np.array([[0.0, 2.0], [8.0, 0.0]])  # Recalls 0.8, 0.2.
  for scale in ("absolute", "max_gain"):
    for seed in (0, 1):
      summary = _summary("min_recall", seed=seed, value=0.6 if scale == "max_gain" else 0.5)
      summary["config"]["selmix"]["temperature_scale"] = scale
      summary["config"]["selmix"]["log_every"] = 10 + seed  # Bookkeeping: not a variant.
      summary["config"]["objective"] = {"name": "min_recall", "hparams": {"tau": None}}
      for when in ("before", "after"):
        summary[when]["val"] = {m: 0.3 for m in metrics.SCALAR_METRICS}
        summary[when]["val"]["confusion"] = confusion_val.tolist()
      os.makedirs(tmp_path / f"{scale}{seed}")
      json.dump(summary, open(tmp_path / f"{scale}{seed}" / "summary.json", "w"))
  table = _table_module()
  summaries = table.find_summaries([str(tmp_path)])
  text = table.tables(summaries)
  assert "| SelMix (min_recall), temperature_scale=absolute | 2 | 50.0 ± 0.0 |" in text
  assert "| SelMix (min_recall), temperature_scale=max_gain | 2 | 60.0 ± 0.0 |" in text
  val = table.tables(summaries, "val")
  assert "val split" in val
  assert "| SelMix (min_recall), temperature_scale=max_gain | 2 | 30.0 ± 0.0 |" in val
  # The min-recall target on val comes from the val confusion counts: 2 / 10.
  row = "| SelMix (min_recall), temperature_scale=absolute | min_recall | 20.0 | 20.0 ± 0.0 |"
  assert row in val
