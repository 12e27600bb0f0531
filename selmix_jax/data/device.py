"""Device-resident data: in-memory splits uploaded to the accelerators once, and SelMix's pair
draw made there.

The host path streams every batch (`loader.Feed`): fine for decode-on-access data (ImageNet), but
for an in-memory uint8 split that fits in accelerator memory (CIFAR: 150 MB) it leaves the device
waiting on NumPy sampling, gathers and transfers. Here such a split is uploaded once, a full copy
on every local device (`upload`, `Resident`), and

  * an evaluation pass is one compiled program over fixed-size padded batches of it
    (`evaluation.device_pass`);
  * a SelMix step draws its pairs on the device (`sample_pairs`) from a small table uploaded at
    each refresh (`pair_table`: the class-pair distribution, each pool's examples sorted by class),
    gathers the images and augments them, inside the jitted step (`steps.device_selmix_step`).

`config.data.device_resident` chooses the path: 'auto' (the device path on a non-CPU backend when
the data fit, else the host path), True (the device path; an error says why it cannot be taken),
False (the host path). `config.data.device_memory_gb` is the budget of the uploads per device.
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

from selmix_jax import errors
from selmix_jax import train_state
from selmix_jax.data import pipeline

SETTINGS = ("auto", True, False)


class DeviceResidentError(errors.UserError, ValueError):
  """`config.data.device_resident` asks for what cannot be done (names the field and why)."""


def setting(value: Any) -> str | bool:
  """`config.data.device_resident` as 'auto', True or False (also from 'true'/'on'/'false'/...).

  Raises:
    DeviceResidentError: (a ValueError) anything else, naming the field.
  """
  if isinstance(value, str):
    lowered = value.strip().lower()
    if lowered == "auto":
      return "auto"
    if lowered in ("true", "on", "1", "yes"):
      return True
    if lowered in ("false", "off", "0", "no"):
      return False
  elif isinstance(value, (bool, np.bool_)) or value in (0, 1):
    return bool(value)
  raise DeviceResidentError(
      f"config.data.device_resident={value!r}; expected 'auto', True or False."
  )


def why_not(splits: dict[str, pipeline.Split], budget_bytes: float) -> str | None:
  """Why `splits` cannot all live on the devices (None when they can).

  They can when this is one process, every split's images are in memory (not decoded on
  access) and their uint8 bytes fit `budget_bytes` together.
  """
  if jax.process_count() > 1:
    return f"it runs one process only (this run has {jax.process_count()})"
  for name, split in splits.items():
    if pipeline.decodes_on_access(split.source):
      return f"the {name} split decodes its images on access (not an in-memory array)"
  total = sum(nbytes(s) for s in splits.values())
  if total > budget_bytes:
    return (
        f"the splits need {total / 2**30:.2f} GiB per device, over config.data.device_memory_gb="
        f"{budget_bytes / 2**30:g}"
    )
  return None


def nbytes(split: pipeline.Split) -> int:
  """Bytes of `split`'s images (uint8, or the source's `dtype`: float32 feature vectors)."""
  itemsize = np.dtype(getattr(split.source, "dtype", np.uint8)).itemsize
  return len(split) * int(np.prod(split.source.image_shape)) * itemsize


@flax.struct.dataclass
class DeviceSplit:
  """A split on every local device (leading device axis `D`, one full copy per device).

  Attributes:
    images: uint8 `[D, n, H, W, C]`, the split's images in the order of `split.indices` (or
      the source's float32 feature vectors `[D, n, F]`).
    labels: int32 `[D, n]`.
    index: int32 `[D, n]`, the source index of each example (what augmentation keys fold in).
  """

  images: jax.Array
  labels: jax.Array
  index: jax.Array

  def __len__(self) -> int:
    return self.images.shape[1]


def replicated(x: np.ndarray) -> jax.Array:
  """`[D, ...]`: one copy of host array `x` per local device, placed as `pmap` places its inputs
  (`train_state.local_sharding`); each device's copy is transferred straight from the host."""
  devices = jax.local_devices()
  x = np.asarray(x)
  shards = [jax.device_put(x[None], d) for d in devices]
  return jax.make_array_from_single_device_arrays(
      (len(devices), *x.shape), train_state.local_sharding(devices=devices), shards
  )


def upload(split: pipeline.Split) -> DeviceSplit:
  """Copies `split` (an in-memory source) to every local device."""
  return DeviceSplit(
      images=replicated(split.source.get_images(split.indices)),
      labels=replicated(np.asarray(split.labels, np.int32)),
      index=replicated(np.asarray(split.indices, np.int32)),
  )


class Resident:
  """The splits of one data set that live on the devices, uploaded once.

  `resident.get(split)` is the `DeviceSplit` of a `pipeline.Split` object that was uploaded,
  else None (then the host path serves it).
  """

  def __init__(self, splits: dict[str, pipeline.Split]):
    self._splits = {name: (split, upload(split)) for name, split in splits.items()}

  def get(self, split: pipeline.Split) -> DeviceSplit | None:
    for stored, on_device in self._splits.values():
      if stored is split:
        return on_device
    return None

  def __getitem__(self, name: str) -> DeviceSplit:
    return self._splits[name][1]

  @property
  def names(self) -> tuple[str, ...]:
    return tuple(self._splits)


def pair_table(pairs, pool1_size: int, pool2_size: int) -> dict[str, np.ndarray]:
  """The host arrays `sample_pairs` draws from, for one run until its next refresh.

  Args:
    pairs: a `sampling.ClassPairs` (the strategy's `class_pairs()`).
    pool1_size: N1, the length `order1` is padded to (so every run's table has one shape).
    pool2_size: N2, likewise for `order2`.

  Returns:
    `{'log_rows' [K] float32 log P(y1), 'log_cond' [K, K] float32 log P(y2 | y1) (-inf where
    the pair is never drawn), 'order1' [N1], 'offsets1' [K], 'counts1' [K], 'order2' [N2],
    'offsets2' [K], 'counts2' [K] int32}`.
  """
  probs = np.asarray(pairs.probs, np.float64)
  rows = probs.sum(axis=1)
  with np.errstate(divide="ignore", invalid="ignore"):
    log_rows = np.log(rows)
    log_cond = np.where(probs > 0, np.log(probs) - log_rows[:, None], -np.inf)
  log_cond = np.where(rows[:, None] > 0, log_cond, 0.0)  # A row never drawn: any finite values.

  def padded(order, size):
    out = np.zeros(size, np.int32)
    out[: len(order)] = order
    return out

  return {
      "log_rows": log_rows.astype(np.float32),
      "log_cond": log_cond.astype(np.float32),
      "order1": padded(pairs.order1, pool1_size),
      "offsets1": np.asarray(pairs.offsets1, np.int32),
      "counts1": np.asarray(pairs.counts1, np.int32),
      "order2": padded(pairs.order2, pool2_size),
      "offsets2": np.asarray(pairs.offsets2, np.int32),
      "counts2": np.asarray(pairs.counts2, np.int32),
  }


def _within(order, offsets, counts, classes, uniforms):
  """A uniform position among the examples of each class (`sampling._ClassIndex.draw`)."""
  n = counts[classes]
  within = jnp.minimum((uniforms * n).astype(jnp.int32), n - 1)
  return order[offsets[classes] + within]


def sample_pairs(table: dict[str, jax.Array], key: jax.Array, num: int):
  """`num` SelMix pairs drawn on the device: `(y1, y2)` from the table's class-pair
  distribution (y1 from its row sums, then y2 from the row), then an example uniformly within
  each class of its pool. Jittable; exact categoricals (Gumbel-max over log-probabilities), so
  pairs of probability 1e-9 are drawn as often as they should be.

  Args:
    table: `pair_table`'s arrays (on the device).
    key: a PRNG key (fold in the step and the device index before).
    num: pairs to draw.

  Returns:
    `(pos1, pos2)`, int32 `[num]` positions in pool 1 and pool 2.
  """
  k_rows, k_cols, k_1, k_2 = jax.random.split(key, 4)
  y1 = jax.random.categorical(k_rows, table["log_rows"], shape=(num,))
  y2 = jax.random.categorical(k_cols, table["log_cond"][y1], axis=-1)
  pos1 = _within(table["order1"], table["offsets1"], table["counts1"], y1,
                 jax.random.uniform(k_1, (num,)))
  pos2 = _within(table["order2"], table["offsets2"], table["counts2"], y2,
                 jax.random.uniform(k_2, (num,)))
  return pos1, pos2
