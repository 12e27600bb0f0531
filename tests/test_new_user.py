"""What a new user meets: `--help`, the class order of a long-tailed folder, honest warnings."""

import io
import logging as std_logging
import os
import re
import subprocess
import sys

from absl import logging as absl_logging
import jax.numpy as jnp
import ml_collections
import numpy as np
import PIL.Image
import pytest

from selmix_jax import data
from selmix_jax import finetune
from selmix_jax import gains
from selmix_jax import loop
from selmix_jax import reporting
from selmix_jax import sampling
from selmix_jax.data import pipeline

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_MAIN = os.path.join(_REPO, "launch", "main.py")


def _warning(gain, temperature=0.1, temperature_scale="absolute"):
  probs = np.asarray(gains.pair_distribution(
      gain, temperature=temperature, temperature_scale=temperature_scale))
  return finetune.uniform_p_warning(
      gain, sampling.concentration(probs), temperature=temperature,
      temperature_scale=temperature_scale,
  )


def test_no_positive_gain_is_not_blamed_on_the_temperature():
  gain = np.zeros((6, 6), np.float32)
  gain[0, 1] = -0.2
  message = _warning(gain)
  assert message.startswith("No pair has a positive gain (all 36 gains <= 0")
  assert "temperature plays no part" in message
  assert "more fine-tuning steps will not help" in message
  assert "smaller config.selmix.temperature" not in message and "36 positive-gain" not in message


def test_small_positive_gains_blame_the_temperature():
  rng = np.random.default_rng(0)
  gain = np.where(rng.random((6, 6)) < 0.5, 1e-4 * rng.random((6, 6)), -1.0).astype(np.float32)
  positive = int((gain > 0).sum())
  message = _warning(gain, temperature=0.1)
  assert message.startswith(f"P is within 5% of uniform over its {positive} positive-gain pairs")
  assert "temperature is too large" in message
  assert "temperature_scale='max_gain'" in message
  # The same gains with T relative to the largest one: P concentrates, no warning.
  assert _warning(gain, temperature=0.1, temperature_scale="max_gain") is None


def test_loop_says_it_compiles_before_the_first_step_and_show_progress_prints_info():
  stream, verbosity = io.StringIO(), absl_logging.get_verbosity()
  loop.show_progress(stream)
  loop.show_progress(stream)  # A second call adds no second handler.
  try:
    calls = []
    loop.run(start_step=2, num_steps=4, train_step=lambda s: calls.append(s) or jnp.ones(()),
             progress=loop.Progress(4))
  finally:
    absl_logging.set_verbosity(verbosity)
    root = std_logging.getLogger()
    for handler in list(root.handlers):
      if getattr(handler, "selmix_progress", False):
        root.removeHandler(handler)
  text = stream.getvalue()
  assert calls == [2, 3]
  assert text.count("Step 2/4: compiling the step functions before the first step") == 1
  assert text.count("Step 3/4 done,") == 1 and "(compilation included)" in text
  assert text.startswith("I")  # absl's format: I<mmdd> <time> ...


def _leaf_fields(node, prefix=""):
  for key in node.keys():
    value = node[key]
    if isinstance(value, ml_collections.ConfigDict) and key != "kwargs":
      yield from _leaf_fields(value, f"{prefix}{key}.")
    else:
      yield f"{prefix}{key}"


def test_every_config_field_has_a_one_line_meaning():
  from selmix_jax.configs import base  # pylint: disable=g-import-not-at-top

  docs = base.field_docs()
  leaves = set(_leaf_fields(base.get_config()))
  assert leaves == set(docs), (sorted(leaves - set(docs)), sorted(set(docs) - leaves))
  assert all(len(meaning) > 10 for meaning in docs.values()), docs


def test_help_lists_every_field_objective_model_data_set_and_pair_strategy():
  from selmix_jax import data, models, objectives, pairs  # pylint: disable=g-import-not-at-top
  from selmix_jax.configs import base  # pylint: disable=g-import-not-at-top

  done = subprocess.run([sys.executable, _MAIN, "--help"], capture_output=True, text=True,
                        check=False, cwd=_REPO)
  assert done.returncode == 0, done.stderr[-2000:]
  lines = done.stdout.splitlines()
  for field, meaning in base.field_docs().items():
    (at,) = [i for i, line in enumerate(lines) if line.startswith(f"  {field} = ")]
    assert lines[at + 1].startswith("      ") and meaning.split()[0] in lines[at + 1], field
  # The values shown are the default config's (the run without --config).
  assert "  selmix.num_steps = 300" in lines and "  data.name = 'digits'" in lines
  text = " ".join(done.stdout.split())
  for name in [*objectives.names(), *models.names(), *data.names(), *pairs.names()]:
    assert re.search(rf"[ ,]{name}[,\s]", done.stdout), name
  for alias, target in objectives.aliases().items():
    assert f"{alias} -> {target}" in text
  for flag in ("--workdir", "--imports", "--config", "--helpfull"):
    assert f"  {flag}" in done.stdout


def test_default_config_takes_an_objective_variant():
  from selmix_jax.configs import default  # pylint: disable=g-import-not-at-top

  assert default.get_config("min_recall").mode == "pretrain_and_selmix"
  combined = default.get_config("tiny,gmean")
  assert combined.objective.name == "gmean" and combined.pretrain.num_steps == 12
  assert default.get_config("pretrain").mode == "pretrain"
  with pytest.raises(ValueError, match="'min_recal' is not 'tiny', 'tiny_ssl', 'pretrain' or an"):
    default.get_config("min_recal")


def _long_tailed_folder(root, counts):
  """`root/{train,test}/<class>/*.png`: `counts[name]` training images, 2 test images each."""
  for split in ("train", "test"):
    for name, n in counts.items():
      folder = root / split / name
      folder.mkdir(parents=True)
      for i in range(n if split == "train" else 2):
        PIL.Image.new("RGB", (4, 4), (i, 10 * len(name), 0)).save(folder / f"{i}.png")
  return root


_COUNTS = {"ant": 3, "bee": 9, "cat": 5, "dog": 12, "eel": 4, "fox": 7, "gnu": 6, "hen": 8,
           "owl": 10, "yak": 11}  # The least frequent class sorts first by name.


def _folder_config(root, **overrides):
  config = data.default_config()
  config.update({"name": "image_folder", "root": str(root), "labeled_max": -1,
                 "val_per_class": 1, "cache_dir": "", **overrides})
  return config


def test_an_imbalanced_folder_is_ordered_by_frequency_and_logged_with_names(tmp_path):
  root = _long_tailed_folder(tmp_path / "lt", _COUNTS)
  ds = data.build(_folder_config(root))
  by_count = sorted(_COUNTS, key=lambda c: (-_COUNTS[c], c))
  assert ds.class_names == tuple(by_count) == ("dog", "yak", "owl", "bee", "hen", "fox", "gnu",
                                               "cat", "eel", "ant")
  np.testing.assert_array_equal(ds.labeled_class_counts, [_COUNTS[c] - 1 for c in by_count])
  # Every split uses that order: test image i of class c has green 10 * len(c), red i.
  assert [ds.class_names[y] for y in ds.test.labels[::2]] == list(by_count)
  assert pipeline.head_tail_warning(ds.class_names, ds.labeled_class_counts) is None
  text = pipeline.describe(ds)
  assert "labeled 65, per class: dog 11, yak 10, owl 9, bee 8, hen 7, fox 6, gnu 5, cat 4, " \
         "eel 3, ant 2." in text
  assert "validation 10, 1 each." in text and "test 20, 2 each." in text


def test_a_declared_order_against_the_counts_is_warned_about_naming_the_classes(tmp_path):
  root = _long_tailed_folder(tmp_path / "lt", _COUNTS)
  names = tuple(sorted(_COUNTS))  # The user's order is kept, and the warning says why it hurts.
  ds = data.build(_folder_config(root, class_names=names))
  assert ds.class_names == names
  message = pipeline.head_tail_warning(ds.class_names, ds.labeled_class_counts)
  assert message.startswith("The classes are not ordered by frequency, but the head is the "
                            "first 9 of the 10 classes in class order")
  assert "tail yak 10, while head class ant has 2 labeled examples" in message
  assert "By frequency the tail would be ant." in message
  assert pipeline.head_tail_warning(names, ds.labeled_class_counts, (True,) * 9 + (False,)) is None


def test_every_plot_of_a_run_has_axis_labels_and_a_title(tmp_path, monkeypatch):
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  figures = {}
  close = plt.close

  def keep(fig):
    figures[fig.axes[0].get_title() or fig.get_suptitle()] = fig
    close(fig)

  monkeypatch.setattr(plt, "close", keep)
  k = 4
  rng = np.random.default_rng(0)
  for step in (0, 10):
    probs = rng.random((k, k))
    reporting.save_refresh(str(tmp_path), step, {
        "step": np.asarray(step), "pair_probs": probs / probs.sum(), "gain": rng.random((k, k)),
        "multipliers": np.ones(k) / k, "val_recalls": rng.random(k), "val_target": np.asarray(0.5),
    })
  summary = {"recall": rng.random(k)}
  result = {"objective": "min_recall", "method": "SelMix (min_recall)",
            "before": {"test": summary}, "after": {"test": summary}}
  reporting.plot_selmix_run(str(tmp_path), result, ["a", "b", "c", "d"])
  assert sorted(os.listdir(tmp_path)) == ["pair_probs.png", "recalls.png", "refresh_curves.png",
                                          "selmix_history", "val_recalls.png"]
  assert len(figures) == 4, list(figures)
  for title, fig in figures.items():
    assert title, fig
    plots = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    assert all(ax.get_xlabel() for ax in plots), title
    assert plots[0].get_ylabel(), title
  refresh = next(f for t, f in figures.items() if t.startswith("Objective target"))
  assert refresh.axes[0].get_ylabel() == "validation target (min_recall)"
