"""Pieces every training loop shares: preprocessing, batch layout checks, writers and progress."""

import functools
import os
from typing import Any, Callable

from absl import logging
from clu import metric_writers
from clu import periodic_actions
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from selmix_jax import models
from selmix_jax import reporting
from selmix_jax.data import augment
from selmix_jax.data import pipeline


def make_preprocess(
    kind: str, *, mean, std, pad: int = 4
) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """Per-device preprocessing `(uint8 images [B, H, W, C], keys [B]) -> float32 normalised`.

  Args:
    kind: 'none' (evaluation), 'weak' (flip + pad-crop) or 'strong' (RandAugment + Cutout).
    mean: per-channel mean of [0, 1] pixels.
    std: per-channel standard deviation.
    pad: padding of the weak random crop.
  """
  mean = tuple(float(m) for m in np.atleast_1d(mean))
  std = tuple(float(s) for s in np.atleast_1d(std))

  def preprocess(images, keys):
    x = images.astype(jnp.float32) / 255.0
    if kind == "weak":
      x = jax.vmap(functools.partial(augment.weak, pad=pad))(x, keys)
    elif kind == "strong":
      x = jax.vmap(augment.strong)(x, keys)
    elif kind != "none":
      raise ValueError(f"Unknown preprocessing {kind!r}; expected 'none', 'weak' or 'strong'.")
    return augment.normalize(x, jnp.asarray(mean), jnp.asarray(std))

  return preprocess


def check_global_batch(batch_size: int, *, field: str) -> int:
  """Returns the per-device batch size, or raises a ValueError naming the config field."""
  devices = jax.device_count()
  if batch_size <= 0 or batch_size % devices:
    raise ValueError(
        f"{field}={batch_size} must be a positive multiple of the number of devices "
        f"({devices} = {jax.process_count()} process(es) x {jax.local_device_count()} local)."
    )
  return batch_size // devices


def build_model(config: ml_collections.ConfigDict, num_classes: int):
  return models.get(config.model.name, num_classes=num_classes, **config.model.get("kwargs", {}))


def logit_adjustment(class_counts: np.ndarray, tau: float) -> np.ndarray | None:
  """`tau * log(prior)` of the training labels (Menon et al.), or None when tau is 0."""
  if not tau:
    return None
  prior = np.asarray(class_counts, np.float64) / np.sum(class_counts)
  return (tau * np.log(np.maximum(prior, 1e-12))).astype(np.float32)


def process_share(global_indices: np.ndarray) -> np.ndarray:
  """The slice of a global batch this process loads (each host reads only its own examples)."""
  return pipeline.process_slice(global_indices, jax.process_index(), jax.process_count())


class Reporter:
  """TensorBoard writer (clu) plus steps/s and ETA progress; only process 0 writes files."""

  def __init__(self, workdir: str, num_steps: int):
    self.is_main = jax.process_index() == 0
    self.writer_dir = workdir
    self.writer = metric_writers.create_default_writer(
        workdir, just_logging=not self.is_main, asynchronous=False
    )
    self.progress = periodic_actions.ReportProgress(
        num_train_steps=num_steps, writer=self.writer, every_secs=30.0
    )

  def step(self, step: int) -> None:
    self.progress(step)

  def scalars(self, step: int, scalars: dict[str, Any]) -> None:
    flat = {k: float(v) for k, v in scalars.items() if np.ndim(v) == 0}
    self.writer.write_scalars(step, flat)

  def close(self) -> None:
    self.writer.flush()
    self.writer.close()


def flat_scalars(prefix: str, summary: dict[str, Any]) -> dict[str, float]:
  """The scalar entries of a metric summary, prefixed (`test/min_recall`, ...)."""
  return {f"{prefix}/{k}": float(v) for k, v in summary.items() if np.ndim(v) == 0}


def save_json(workdir: str, name: str, payload: dict[str, Any]) -> None:
  """Process 0 writes `<workdir>/<name>` atomically (the other processes write nothing)."""
  if jax.process_index() == 0:
    reporting.write_json(os.path.join(workdir, name), payload)


def ensure_dir(path: str) -> str:
  os.makedirs(path, exist_ok=True)
  return path


def log_devices() -> None:
  logging.info(
      "JAX process %d/%d, %d local device(s), %d total: %s",
      jax.process_index(),
      jax.process_count(),
      jax.local_device_count(),
      jax.device_count(),
      jax.local_devices(),
  )
