"""Frozen backbones: a backbone's features as a file, and head-only SelMix over cached features.

`export(config, checkpoint_dir, path)` writes the features of a pre-trained image model on the
run's labeled, validation and test splits (BatchNorm on its running statistics, no
augmentation) as a `data/features.py` `.npz` with the class names: `data.name='features'` and
`head.fit` read it, and so does any other project.

`run(config, workdir, datasets)` is SelMix with `config.selmix.train_backbone=False` when no
augmentation needs the features recomputed (`config.data.train_augment='none'`, partners from the
labeled pool): the backbone's features are computed once per split and cached in
`<workdir>/features/` (reused while the checkpoint, weights and data are the same), SelMix runs
on the 'linear' model over them (`finetune.run` on the features data set, its head initialised
from the checkpoint's head), and the full model (the unchanged backbone and BatchNorm statistics
plus the new head) is written to `<workdir>/model/checkpoints`, a checkpoint every
`config.selmix.init_checkpoint` and evaluation accept. A head-only run then costs one feature pass
plus head steps. With augmentation the loop recomputes features every step, frozen weights or not
(`finetune.run` with the backbone group at zero updates).
"""

import copy
import json
import os
import shutil
from typing import Any

from absl import logging
import jax
import ml_collections
import numpy as np
import optax

from selmix_jax import checkpointing
from selmix_jax import data
from selmix_jax import finetune
from selmix_jax import models
from selmix_jax import train_state
from selmix_jax.data import augment
from selmix_jax.data import features as features_lib
from selmix_jax.data import pipeline


def caches(config: ml_collections.ConfigDict) -> bool:
  """Whether a fine-tuning run of `config` trains the head on cached features (`run`)."""
  cfg = config.selmix
  return (not cfg.get("train_backbone", True) and config.data.train_augment == "none"
          and config.data.name != "features" and cfg.partner_pool == "labeled")


def split_features(model, variables, split, *, batch_size: int, mean, std) -> np.ndarray:
  """float32 [len(split), D] features g(x) of a split's examples, in order (running BN stats).

  One device; batches of `batch_size` (the last padded and cut off).
  """
  preprocess = augment.make_preprocess("none", mean=mean, std=std)
  apply = jax.jit(lambda v, x: model.apply(v, preprocess(x, None), train=False,
                                           method="features"))
  out = []
  for batch in pipeline.eval_batches(split.source, split.indices, batch_size, num_devices=1):
    valid = batch["mask"][0]
    out.append(np.asarray(apply(variables, batch["images"][0]))[valid])
  return np.concatenate(out).astype(np.float32)


def _load(config, checkpoint_dir):
  stored, step = checkpointing.load_pretrained(checkpoint_dir)
  variables, which = train_state.pretrained_variables(stored, use_ema=config.selmix.use_ema)
  return variables, step, which


def export(config: ml_collections.ConfigDict, checkpoint_dir: str, path: str,
           datasets=None) -> dict[str, Any]:
  """Writes the features of `checkpoint_dir`'s model on the splits of `config.data` to `path`.

  Splits: 'train' = the labeled split, 'val' = the validation split (flipped copies included
  when `val_flip`), 'test' = the test split; with `class_names`. The EMA weights are used when
  `config.selmix.use_ema` and the checkpoint has them.

  Returns:
    `{'step', 'weights', 'shapes'}` of what was written.
  """
  ds = datasets or data.build(config.data)
  model = models.from_config(config.model, ds.num_classes)
  variables, step, which = _load(config, checkpoint_dir)
  arrays = {}
  for name, split in (("train", ds.labeled), ("val", ds.val), ("test", ds.test)):
    logging.info("Computing %s features (%d examples).", name, len(split))
    arrays[f"{name}_features"] = split_features(
        model, variables, split, batch_size=config.eval_batch_size, mean=ds.mean, std=ds.std
    )
    arrays[f"{name}_labels"] = np.asarray(split.labels, np.int32)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  features_lib.save(path, class_names=ds.class_names, **arrays)
  return {"step": step, "weights": which,
          "shapes": {k: list(v.shape) for k, v in arrays.items()}}


def _head_config(config, path, init_checkpoint):
  head = copy.deepcopy(config)
  with head.unlocked():
    head.model = ml_collections.ConfigDict({"name": "linear", "kwargs": {}, "dtype": "float32"})
    head.data = data.default_config()
    head.data.update(name="features", path=path, labeled_max=-1, val_split="val",
                     val_per_class=0, train_augment="none", seed=config.data.seed)
    head.selmix.init_checkpoint = init_checkpoint
    head.selmix.use_ema = False
  return head


def run(config: ml_collections.ConfigDict, workdir: str, datasets) -> dict[str, Any]:
  """Head-only SelMix over cached backbone features (see the module docstring)."""
  cfg = config.selmix
  cache = os.path.join(workdir, "features")
  path = os.path.join(cache, "features.npz")
  key = {"checkpoint": os.path.abspath(cfg.init_checkpoint), "ema": cfg.use_ema,
         "model": config.model.to_dict(), "data": config.data.to_dict(),
         "eval_batch_size": config.eval_batch_size}
  key_path = os.path.join(cache, "key.json")
  variables, step, _ = _load(config, cfg.init_checkpoint)
  key["step"] = int(step)
  stored_key = None
  if os.path.exists(key_path) and os.path.exists(path):
    with open(key_path, encoding="utf-8") as f:
      stored_key = json.load(f)
  init_dir = os.path.join(cache, "head_init")
  if stored_key != json.loads(json.dumps(key, default=str)):
    shutil.rmtree(init_dir, ignore_errors=True)
    export(config, cfg.init_checkpoint, path, datasets=datasets)
    # The checkpoint's head, as a 'linear' model's pre-training checkpoint.
    linear = models.get("linear", num_classes=datasets.num_classes)
    head_vars = {"params": {"head": variables["params"]["head"]}, "batch_stats": {}}
    manager = checkpointing.make_manager(init_dir)
    train_state.save(manager, int(step),
                     {"state": train_state.from_variables(linear, head_vars, optax.identity())})
    manager.wait_until_finished()
    manager.close()
    with open(key_path, "w", encoding="utf-8") as f:  # Last: the cache is complete.
      json.dump(key, f, default=str)
  else:
    logging.info("Backbone features read from %s.", path)
  head_config = _head_config(config, path, init_dir)
  result = finetune.run(head_config, workdir, data.build(head_config.data))

  # Write back the full model: unchanged backbone and BatchNorm statistics, the new head.
  tuned, _ = checkpointing.load_pretrained(os.path.join(workdir, "checkpoints"))
  full = {"params": {**variables["params"], "head": tuned["state"]["params"]["head"]},
          "batch_stats": variables.get("batch_stats") or {}}
  model = models.from_config(config.model, datasets.num_classes)
  manager = checkpointing.make_manager(os.path.join(workdir, "model", "checkpoints"))
  train_state.save(manager, int(result["steps"]),
                   {"state": train_state.from_variables(model, full, optax.identity())})
  manager.wait_until_finished()
  manager.close()
  result["full_model_checkpoint"] = os.path.join(workdir, "model", "checkpoints")
  return result
