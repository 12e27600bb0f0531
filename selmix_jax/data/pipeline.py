"""Host-side batching and the single `build(config)` entry point of the data layer.

Batches are dicts of NumPy arrays laid out for `pmap` (leading device axis):

  images  uint8 [D, b, H, W, C]   (augmentation and normalisation happen on device)
  labels  int32 [D, b]
  mask    bool  [D, b]            (False on padding; use it in every accumulation)
  index   int32 [D, b]            (index into the source; -1 on padding)

with `D` local devices and `b = global_batch / (D * process_count)`. Training
batches are built from index arrays handed out by samplers (`uniform_indices`, the
SelMix pair sampler) so that the whole input pipeline is a function of
`(seed, step)`; evaluation batches cover a split exactly once with a padded, masked
last batch.

`EvalBatches` and `PairBatches` are those batches as picklable `step -> batch` callables with
the process layout (`Layout`) bound, for `loader.Feed` to load ahead, in worker processes when
the source decodes on access.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from selmix_jax import confusion
from selmix_jax import errors
from selmix_jax.data import datasets, sources, splits

Batch = dict[str, np.ndarray]
Source = sources.ArraySource | sources.RandomAccessSource


# ---------------------------------------------------------------------- batching


def process_slice(global_array: np.ndarray, process_index: int, process_count: int) -> np.ndarray:
  """This process's contiguous share of a global array's leading axis.

  Args:
    global_array: [N, ...] with N divisible by `process_count`.
    process_index: this process (`jax.process_index()`).
    process_count: number of processes (`jax.process_count()`).

  Returns:
    [N / process_count, ...].
  """
  n = len(global_array)
  if n % process_count:
    raise ValueError(f"Leading size {n} is not divisible by the process count {process_count}.")
  share = n // process_count
  return global_array[process_index * share : (process_index + 1) * share]


def check_global_batch(batch_size: int, *, field: str) -> int:
  """Returns the per-device batch size, or raises a ValueError naming the config field."""
  devices = jax.device_count()
  if batch_size <= 0 or batch_size % devices:
    raise ValueError(
      f"{field}={batch_size} must be a positive multiple of the number of devices "
      f"({devices} = {jax.process_count()} process(es) x {jax.local_device_count()} local)."
    )
  return batch_size // devices


def _check_divisible(batch_size: int, num_devices: int, process_count: int) -> int:
  shards = num_devices * process_count
  if batch_size <= 0 or batch_size % shards:
    raise ValueError(
      f"Global batch size {batch_size} must be a positive multiple of the number of devices "
      f"({num_devices} local x {process_count} processes = {shards})."
    )
  return batch_size // shards


def _assemble(source: Source, index: np.ndarray, mask: np.ndarray, num_devices: int) -> Batch:
  """Gathers the images of `index[mask]` and reshapes everything to [D, b, ...]."""
  dtype = getattr(source, "dtype", np.uint8)  # float32 for `features.FeatureSource`.
  images = np.zeros((len(index),) + tuple(source.image_shape), dtype)
  labels = np.zeros(len(index), np.int32)
  if mask.any():
    images[mask] = source.get_images(index[mask])
    labels[mask] = source.labels[index[mask]]
  per_device = len(index) // num_devices
  shape = (num_devices, per_device)
  return {
    "images": images.reshape(shape + images.shape[1:]),
    "labels": labels.reshape(shape),
    "mask": mask.reshape(shape),
    "index": np.where(mask, index, -1).astype(np.int32).reshape(shape),
  }


@dataclasses.dataclass(frozen=True)
class Layout:
  """How one process lays out a global batch: its share, split over its local devices.

  Bound into the `step -> batch` callables in the main process, so a worker process (which has
  no JAX devices or distributed runtime of its own) lays batches out as the trainer expects.
  """

  num_devices: int = 1
  process_index: int = 0
  process_count: int = 1

  @classmethod
  def local(cls) -> Layout:
    """This process's layout (`jax.local_device_count()`, `process_index()`, `process_count()`)."""
    return cls(jax.local_device_count(), jax.process_index(), jax.process_count())

  def share(self, global_array: np.ndarray) -> np.ndarray:
    """This process's contiguous share of `global_array`'s leading axis."""
    return process_slice(global_array, self.process_index, self.process_count)


def eval_plan(
  indices: np.ndarray, batch_size: int, layout: Layout
) -> tuple[np.ndarray, np.ndarray]:
  """This process's index and mask of every evaluation batch over `indices`.

  Args:
    indices: int [n] indices into a source.
    batch_size: global batch size, divisible by `layout.num_devices * layout.process_count`.
    layout: this process's layout.

  Returns:
    `(index, mask)`, int64 and bool `[num_batches, batch_size / process_count]`: the batches
    cover `indices` once in order, the last one padded (mask False, index 0).
  """
  _check_divisible(batch_size, layout.num_devices, layout.process_count)
  indices = np.asarray(indices, np.int64)
  num_batches = -(-len(indices) // batch_size)
  index = np.zeros(num_batches * batch_size, np.int64)
  index[: len(indices)] = indices
  mask = np.arange(num_batches * batch_size) < len(indices)
  shape = (num_batches, layout.process_count, batch_size // layout.process_count)
  return (
    index.reshape(shape)[:, layout.process_index],
    mask.reshape(shape)[:, layout.process_index],
  )


@dataclasses.dataclass(frozen=True)
class EvalBatches:
  """Evaluation batch `t` of a plan (`eval_plan`) as a picklable `t -> batch`.

  Attributes:
    source: a source.
    index: int [num_batches, b] this process's indices per batch.
    mask: bool [num_batches, b] validity (False on padding).
    num_devices: local devices.
  """

  source: Source
  index: np.ndarray
  mask: np.ndarray
  num_devices: int

  def __len__(self) -> int:
    return len(self.index)

  @property
  def decodes(self) -> bool:
    """Whether loading decodes images (`loader.Feed(..., decodes=)`)."""
    return decodes_on_access(self.source)

  def __call__(self, t: int) -> Batch:
    return _assemble(self.source, self.index[t], self.mask[t], self.num_devices)


def eval_batches(
  source: Source,
  indices: np.ndarray,
  batch_size: int,
  *,
  num_devices: int | None = None,
  process_index: int = 0,
  process_count: int = 1,
) -> Iterator[Batch]:
  """Every example of `indices` exactly once with mask True; last batch padded.

  The synchronous path; `evaluation.evaluate` streams the same batches (`EvalBatches`).

  Args:
    source: a source.
    indices: int [n] indices into `source`.
    batch_size: global batch size, divisible by `num_devices * process_count`.
    num_devices: local devices (default `jax.local_device_count()`).
    process_index: this process; each process yields only its share of each batch.
    process_count: number of processes.

  Yields:
    Batches (see the module docstring) of `batch_size / process_count` examples.
  """
  layout = Layout(num_devices or jax.local_device_count(), process_index, process_count)
  batches = EvalBatches(source, *eval_plan(indices, batch_size, layout), layout.num_devices)
  for t in range(len(batches)):
    yield batches(t)


def train_batch(
  source: Source,
  indices: np.ndarray,
  *,
  num_devices: int | None = None,
  process_index: int = 0,
  process_count: int = 1,
) -> Batch:
  """The batch of the given global `indices` (all valid), this process's share.

  Args:
    source: a source.
    indices: int [B] global batch of indices into `source`.
    num_devices: local devices (default `jax.local_device_count()`).
    process_index: this process.
    process_count: number of processes.

  Returns:
    A batch (see the module docstring) with `mask` all True.
  """
  num_devices = num_devices or jax.local_device_count()
  indices = np.asarray(indices, np.int64)
  _check_divisible(len(indices), num_devices, process_count)
  local = process_slice(indices, process_index, process_count)
  return _assemble(source, local, np.ones(len(local), bool), num_devices)


def uniform_indices(num_examples: int, batch_size: int, *, seed: int, step: int) -> np.ndarray:
  """`batch_size` positions drawn uniformly (with replacement) from `[0, num_examples)`.

  A pure function of `(seed, step)`, so a resumed run draws the same batches. Map
  positions to source indices with `split.indices[positions]`.
  """
  if num_examples <= 0:
    raise ValueError(f"Cannot sample from {num_examples} examples.")
  return np.random.default_rng([seed, step]).integers(0, num_examples, batch_size)


@dataclasses.dataclass(frozen=True)
class UniformBatches:
  """`step -> batch` of `batch_size` examples of `split` drawn by `uniform_indices(seed, step)`.

  Picklable, with this process's `layout` bound (it loads only its share).
  """

  split: Split
  batch_size: int
  seed: int
  layout: Layout

  @property
  def decodes(self) -> bool:
    """Whether loading decodes images (`loader.Feed(..., decodes=)`)."""
    return decodes_on_access(self.split.source)

  def __call__(self, step: int) -> Batch:
    picks = uniform_indices(len(self.split), self.batch_size, seed=self.seed, step=step)
    local = self.split.indices[self.layout.share(picks)]
    return train_batch(self.split.source, local, num_devices=self.layout.num_devices)


@dataclasses.dataclass(frozen=True)
class PairBatches:
  """`step -> batch` of the index pairs a pair strategy draws at `(seed, step)` (SelMix).

  `strategy.sample(batch_size, seed=seed, step=step)` gives positions `(idx1, idx2)` in
  `first` (x1, whose label is kept) and `second` (the partner pool). Picklable, with this
  process's `layout` bound. The batch holds images1, labels1, index1, images2, index2.
  """

  first: Split
  second: Split
  strategy: Any
  batch_size: int
  seed: int
  layout: Layout

  @property
  def decodes(self) -> bool:
    """Whether loading decodes images (`loader.Feed(..., decodes=)`)."""
    return decodes_on_access(self.first.source) or decodes_on_access(self.second.source)

  def __call__(self, step: int) -> Batch:
    idx1, idx2 = self.strategy.sample(self.batch_size, seed=self.seed, step=step)
    first, second = self._batch(self.first, idx1), self._batch(self.second, idx2)
    return {
      "images1": first["images"],
      "labels1": first["labels"],
      "index1": first["index"],
      "images2": second["images"],
      "index2": second["index"],
    }

  def _batch(self, split: Split, positions: np.ndarray) -> Batch:
    local = split.indices[self.layout.share(positions)]
    return train_batch(split.source, local, num_devices=self.layout.num_devices)


# ------------------------------------------------------------------------ splits


@dataclasses.dataclass(frozen=True)
class Split:
  """A subset of a source: `source` plus int64 `indices` [n] into it."""

  source: Source
  indices: np.ndarray

  def __len__(self) -> int:
    return len(self.indices)

  @property
  def labels(self) -> np.ndarray:
    """int32 [n] labels of the split's examples."""
    return self.source.labels[self.indices]

  def class_counts(self, num_classes: int) -> np.ndarray:
    """int64 [K] examples per class (labels < 0 are not counted)."""
    labels = self.labels
    return np.bincount(labels[labels >= 0], minlength=num_classes)


def decodes_on_access(source) -> bool:
  """Whether `source.get_images` decodes (then worker processes pay off), e.g. a
  `sources.RandomAccessSource`; False for in-memory sources and those that do not say."""
  return bool(getattr(source, "decodes_on_access", False))


class FlipAppendedSource:
  """Examples `base[indices]` followed by their horizontally flipped copies (2n)."""

  def __init__(self, base: Source, indices: np.ndarray):
    self._base = base
    self._indices = np.asarray(indices, np.int64)
    self.labels = np.concatenate([base.labels[self._indices]] * 2).astype(np.int32)
    self.class_names = base.class_names
    self.image_shape = base.image_shape

  def __len__(self) -> int:
    return len(self.labels)

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  @property
  def decodes_on_access(self) -> bool:
    return decodes_on_access(self._base)

  def get_images(self, indices: np.ndarray) -> np.ndarray:
    indices = np.asarray(indices, np.int64)
    n = len(self._indices)
    images = self._base.get_images(self._indices[indices % n])
    flipped = indices >= n
    images[flipped] = images[flipped][:, :, ::-1]
    return images


@dataclasses.dataclass(frozen=True)
class Datasets:
  """Everything the trainers need from the data layer.

  Attributes:
    labeled: labeled training split.
    unlabeled: unlabeled pool (labels are not to be used), or None when supervised.
    val: balanced validation split (with flipped copies appended if `val_flip`).
    test: test split.
    num_classes: K.
    class_names: K names.
    image_shape: (H, W, C) of every image.
    mean: [C] per-channel mean of images in [0, 1], for `augment.normalize`.
    std: [C] per-channel standard deviation.
    labeled_class_counts: int64 [K] examples per class in `labeled`.
  """

  labeled: Split
  unlabeled: Split | None
  val: Split
  test: Split
  num_classes: int
  class_names: tuple[str, ...]
  image_shape: tuple[int, int, int]
  mean: np.ndarray
  std: np.ndarray
  labeled_class_counts: np.ndarray


def names() -> tuple[str, ...]:
  """Data set names `build` accepts as `config.name` (the `datasets` registry)."""
  return datasets.names()


def default_config() -> ml_collections.ConfigDict:
  """The `data` section with every field `build` reads, at its default value.

  The one set of data defaults: `configs/base.py` starts from it, and `build` fills any field a
  config leaves out from it.
  """
  def optional(field_type):  # A None default that a config or the command line can set.
    return ml_collections.FieldReference(None, field_type=field_type)

  return ml_collections.ConfigDict(
    {
      "name": "digits",
      "root": "",
      "path": "",
      "data_dir": optional(str),
      "cache_dir": optional(str),
      "train_split": "train",
      "test_split": optional(str),
      "val_split": optional(str),
      "unlabeled_split": optional(str),
      "labeled_max": 90,
      "labeled_imbalance": 10.0,
      "unlabeled_max": 0,
      "unlabeled_imbalance": 1.0,
      "val_per_class": 30,
      "val_flip": False,
      "seed": 0,
      "image_size": optional(int),
      "class_names": optional(tuple),
      "imagenet100_classes": optional(object),
      "digits_test_fraction": 0.3,
      "mean": optional(tuple),
      "std": optional(tuple),
      # Read by the trainers (`loader.Options`, `augment.make_preprocess`), not by `build`.
      "num_workers": -1,
      "prefetch": 2,
      "train_augment": "pad_crop",
      # SelMix fine-tuning with in-memory splits on the devices (`data.device`): 'auto' (on a
      # non-CPU backend when they fit), True or False; the uploads' budget per device.
      "device_resident": ml_collections.FieldReference("auto", field_type=object),
      "device_memory_gb": 8.0,
    }
  )


def field_docs() -> dict[str, str]:
  """`{field: its first sentence}` for every field `build`'s docstring documents (the `data`
  lines of `launch/main.py --help`), in the docstring's order."""
  doc = build.__doc__
  block = doc[doc.index("Config fields") : doc.index("SPEC §8 settings")]
  entries: list[list[str]] = []
  for line in block.splitlines():
    head = re.match(r"^    (\w+(?:, \w+)*): (.*)$", line)
    if head:
      entries.append([head.group(1), head.group(2)])
    elif entries and line.startswith("      "):
      entries[-1][1] += " " + line.strip()
    elif not line.strip() or not line.startswith("    "):
      entries.append(["", ""])  # A section break ends the entry.
  docs = {}
  for names_, text in entries:
    first = re.split(r"(?<=\.)\s+(?=[A-Z`])", text.strip(), maxsplit=1)[0].rstrip(".")
    for name in filter(None, names_.split(", ")):
      docs[name] = first
  return docs


def _resolve(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Merges `config` over `default_config()` and fills the data set's split defaults."""
  full = default_config()
  full.lock()
  full.update(dict(config))  # Unknown fields raise a KeyError naming them.
  entry = datasets.get(full.name)
  full.test_split = full.test_split or entry.test_split
  entry_val = entry.val_split(full) if callable(entry.val_split) else entry.val_split
  full.val_split = full.val_split or entry_val or full.train_split
  full.unlabeled_split = full.unlabeled_split or entry.unlabeled_split or full.train_split
  if full.cache_dir is None:
    full.cache_dir = sources.DEFAULT_CACHE_DIR
  if full.labeled_max is not None and full.labeled_max < 0:
    full.labeled_max = None
  return full


def _load(config: ml_collections.ConfigDict, split: str) -> Source:
  return datasets.get(config.name).load(config, split)


def _load_like(config: ml_collections.ConfigDict, field: str, train: Source, *, labeled=True):
  """Loads split `config.<field>`, checked to use the training split's class ids.

  A class with no examples there is logged as a warning (its recall is undefined there and
  left out of the metrics); class names that differ from the training split's, or labels
  outside its classes (`confusion.check_labels`; -1 allowed in an unlabeled pool), are an
  `errors.DataError`: they would make every count of that split wrong.
  """
  split = config[field]
  source = _load(config, split)
  where = f"config.data.{field}={split!r} of {config.name}"
  if tuple(source.class_names) != tuple(train.class_names):
    raise errors.DataError(
      f"{where} has classes {tuple(source.class_names)}, but the training split "
      f"{config.train_split!r} has {tuple(train.class_names)}: its labels would mean other "
      "classes. A data set's loader must label every split with the training split's classes."
    )
  labels = source.labels
  _check_labels(labels, train.num_classes, where, unlabeled_ok=not labeled)
  if labeled:
    counts = np.bincount(labels[labels >= 0], minlength=train.num_classes)
    for k in np.flatnonzero(counts == 0):
      logging.warning(
        "%s has no examples of class %r (id %d) of the training split: its recall there is "
        "undefined and left out of the recall metrics.", where, train.class_names[k], k,
      )
  return source


def _check_labels(labels: np.ndarray, num_classes: int, where: str, *, unlabeled_ok: bool):
  """`confusion.check_labels` as a `DataError`; -1 ("no label") allowed where `unlabeled_ok`."""
  try:
    confusion.check_labels(
      labels, num_classes, where=where, mask=(labels != -1) if unlabeled_ok else None
    )
  except ValueError as e:
    raise errors.DataError(str(e)) from e


def _check_class_sizes(config, train: Source, available, held_out, labeled, unlabeled) -> None:
  """A `DataError` naming the config fields when a class has fewer examples than requested."""
  unlabeled = np.zeros_like(labeled) if unlabeled is None else unlabeled
  requested = held_out + labeled + unlabeled
  short = np.flatnonzero(requested > available)
  if not short.size:
    return
  k = int(short[0])
  if config.labeled_max is not None and labeled[k] > 0:
    field = f"config.data.labeled_max={config.labeled_max}"
  elif unlabeled[k] > 0:
    field = f"config.data.unlabeled_max={config.unlabeled_max}"
  else:
    field = f"config.data.val_per_class={config.val_per_class}"
  raise errors.DataError(
    f"{field}: class {train.class_names[k]!r} (id {k}) of the training split "
    f"{config.train_split!r} of {config.name} has {available[k]} examples, fewer than the "
    f"{requested[k]} requested ({held_out} validation + {labeled[k]} labeled + {unlabeled[k]} "
    f"unlabeled; {len(short)} class(es) short). Lower {field.split('=')[0]}, or use a data "
    "set with more examples of that class."
  )


def _balanced_val(labels: np.ndarray, num_classes: int, per_class: int, seed: int) -> np.ndarray:
  return splits.split_indices(
    labels, val_per_class=per_class, labeled_counts=np.zeros(num_classes, np.int64), seed=seed
  )["val"]


def build(config: ml_collections.ConfigDict) -> Datasets:
  """Loads the sources and draws the splits described by the `data` config.

  Config fields (defaults in `default_config()`; unknown fields raise KeyError):
    name: one of `names()`: 'digits', 'image_folder', 'cifar10', 'cifar100', 'stl10',
      'imagenet2012', 'imagenet100', 'imagenet_lt', 'features'.
    root: image_folder only: a folder or .zip with `<split>/<class>/*.jpg`.
    path: features only: an .npz or a folder of .npy files of feature vectors (`features`).
    data_dir: TFDS data directory (None = TFDS default).
    cache_dir: cache of decoded image folders and ImageNet label lists; None =
      `~/.cache/selmix_jax`, '' = no cache.
    train_split: split the labeled (and by default validation/unlabeled) examples
      come from; 'train'.
    test_split: None = 'test', or 'validation' for imagenet2012/imagenet100 (the
      official ImageNet validation set). Digits' test split is drawn with `seed`.
    val_split: None = `train_split` (a balanced validation set is held out of the
      training split before anything else), or 'validation' for imagenet_lt. With
      another split, `val_per_class` > 0 draws a balanced subset of it and 0 takes
      all of it; when that split is also the test split, the test set is what the
      validation set leaves (they never overlap).
    unlabeled_split: None = `train_split` (the pool is drawn after validation and
      labeled, without overlap), or 'unlabelled' for stl10.
    labeled_max: N1 of SPEC §8; None or -1 = every training example left after
      validation (e.g. the ImageNet-LT training list as published).
    labeled_imbalance: rho_l >= 1, the largest over the smallest labeled class count.
    unlabeled_max: M1; 0 = supervised (`unlabeled` is None); -1 = every example of
      the training split left after validation and labeled, or all of a separate
      `unlabeled_split`.
    unlabeled_imbalance: rho_u; < 1 gives the inverted profile.
    val_per_class: balanced validation examples per class.
    val_flip: append horizontally flipped copies of the validation images.
    seed: seed of every split (and of digits' train/test split).
    image_size: side to resize images to: image folders and in-memory TFDS sets
      (None keeps the stored size), and the ImageNet side (None = 224).
    class_names: image_folder only: class order (None = the class folders of the training
      split from most to least images, ties by name, SPEC §2). Every split is labelled with
      the training split's classes: a split without a class is logged as a warning (that
      class is absent there), a class folder the training split lacks is a ValueError naming
      the folder.
    imagenet100_classes: None = the shipped CMC list, or a list / path of a .txt.
    digits_test_fraction: share of each digits class held out as test (0.3).
    mean, std: per-channel statistics in [0, 1]; None = standard values of the data
      set, or computed on the training source for digits and image folders.

  Fields the trainers read (how batches are streamed, `loader.Options`; not used here):
    num_workers: worker processes that decode batches of decode-on-access sources (ImageNet);
      -1 = every CPU but one (at most 32), 0 = a background thread of the training process.
      In-memory sources are always gathered by the thread.
    prefetch: batches transferred to the devices ahead of the step that uses them.
    train_augment: the crop of every weak training view (pre-training, FixMatch's weak and
      strong views, SelMix): 'pad_crop' (flip + reflect-pad-4 crop, CIFAR) or
      'random_resized_crop' (torchvision's RandomResizedCrop + flip, ImageNet).
    device_resident: SelMix fine-tuning keeps its in-memory splits on the devices, draws its
      pairs there and refreshes in one compiled program (`data.device`): 'auto' = when the
      backend is not the CPU and the splits fit `device_memory_gb`; True = always (an error
      says why it cannot); False = the host path (batches streamed by `loader.Feed`).
    device_memory_gb: budget of those uploads per device (uint8 images).

  SPEC §8 settings, e.g. CIFAR-10-LT SSL: name='cifar10', labeled_max=1500,
  labeled_imbalance=100, unlabeled_max=3000, unlabeled_imbalance=100 (or 1, or
  0.01 with unlabeled_max=30), val_per_class=500, val_flip=True. STL-10-LT:
  name='stl10', labeled_max=450, labeled_imbalance=10 or 100, val_per_class=50,
  unlabeled_max=-1. ImageNet-LT: name='imagenet_lt', labeled_max=-1,
  val_per_class=0, unlabeled_max=0.

  Args:
    config: the `data` ConfigDict.

  Returns:
    A `Datasets`.

  Raises:
    KeyError: unknown config field.
    ValueError: unknown data set.
    errors.DataError: (a ValueError) a class with fewer examples than requested (names the
      field), a split whose classes are not the training split's (names, labels outside
      [0, K)), or the loader's own (an empty folder, an unreadable image, ...).
  """
  config = _resolve(config)
  train = _load(config, config.train_split)
  num_classes = train.num_classes
  labels = train.labels
  _check_labels(
    labels, num_classes, f"config.data.train_split={config.train_split!r} of {config.name}",
    unlabeled_ok=True,
  )
  test = _load_like(config, "test_split", train)
  available = np.bincount(labels[labels >= 0], minlength=num_classes)

  val_from_train = config.val_split == config.train_split
  unlabeled_from_train = config.unlabeled_split == config.train_split
  held_out = config.val_per_class if val_from_train else 0
  if config.labeled_max is None:
    labeled_counts = np.maximum(available - held_out, 0)
  else:
    labeled_counts = splits.labeled_counts(
      config.labeled_max, config.labeled_imbalance, num_classes
    )
  unlabeled_counts = None
  if unlabeled_from_train and config.unlabeled_max == -1:
    unlabeled_counts = np.maximum(available - held_out - labeled_counts, 0)
  elif unlabeled_from_train and config.unlabeled_max > 0:
    unlabeled_counts = splits.unlabeled_counts(
      config.unlabeled_max, config.unlabeled_imbalance, num_classes
    )
  _check_class_sizes(config, train, available, held_out, labeled_counts, unlabeled_counts)
  drawn = splits.split_indices(
    labels,
    val_per_class=held_out,
    labeled_counts=labeled_counts,
    unlabeled_counts=unlabeled_counts,
    seed=config.seed,
  )

  if val_from_train:
    val_source, val_indices = train, drawn["val"]
  else:
    same_as_test = config.val_split == config.test_split
    val_source = test if same_as_test else _load_like(config, "val_split", train)
    if config.val_per_class > 0:
      val_indices = _balanced_val(val_source.labels, num_classes, config.val_per_class, config.seed)
    else:
      val_indices = np.arange(len(val_source))
  test_indices = np.arange(len(test))
  if not val_from_train and config.val_split == config.test_split:
    # Validation drawn from the test split: the test set is the rest, so they never overlap.
    test_indices = np.setdiff1d(test_indices, val_indices)
  val = Split(val_source, val_indices)
  if config.val_flip:
    flipped = FlipAppendedSource(val_source, val_indices)
    val = Split(flipped, np.arange(len(flipped)))

  unlabeled = None
  if unlabeled_counts is not None:
    unlabeled = Split(train, drawn["unlabeled"])
  elif not unlabeled_from_train and config.unlabeled_max != 0:
    pool = _load_like(config, "unlabeled_split", train, labeled=False)
    if config.unlabeled_max == -1:
      unlabeled = Split(pool, np.arange(len(pool)))
    else:
      counts = splits.unlabeled_counts(
        config.unlabeled_max, config.unlabeled_imbalance, num_classes
      )
      picked = splits.split_indices(
        pool.labels,
        val_per_class=0,
        labeled_counts=np.zeros(num_classes, np.int64),
        unlabeled_counts=counts,
        seed=config.seed,
      )
      unlabeled = Split(pool, picked["unlabeled"])

  labeled = Split(train, drawn["labeled"])
  mean, std = _statistics(config, train)
  return Datasets(
    labeled=labeled,
    unlabeled=unlabeled,
    val=val,
    test=Split(test, test_indices),
    num_classes=num_classes,
    class_names=tuple(train.class_names),
    image_shape=tuple(train.image_shape),
    mean=mean,
    std=std,
    labeled_class_counts=labeled.class_counts(num_classes),
  )


def _statistics(config: ml_collections.ConfigDict, train: Source) -> tuple[np.ndarray, np.ndarray]:
  if config.mean is not None and config.std is not None:
    return np.asarray(config.mean, np.float32), np.asarray(config.std, np.float32)
  entry = datasets.get(config.name)
  if entry.mean is not None:
    return np.asarray(entry.mean, np.float32), np.asarray(entry.std, np.float32)
  # Digits / image folders: statistics of (a fixed subsample of) the training source.
  sample = np.random.default_rng(0).permutation(len(train))[:10_000]
  pixels = train.get_images(np.sort(sample)).astype(np.float64) / 255.0
  axes = tuple(range(pixels.ndim - 1))
  return pixels.mean(axes).astype(np.float32), pixels.std(axes).astype(np.float32)


# ---------------------------------------------------------------------- reporting


def per_class(class_names, counts) -> str:
  """`'dog 130, cat 70, ...'`: each class name beside its count, in class order."""
  return ", ".join(f"{name} {int(n)}" for name, n in zip(class_names, counts))


def describe(ds: Datasets) -> str:
  """The split sizes of `ds` for the log, with class names beside every per-class count."""
  lines = [
    f"{ds.num_classes} classes; labeled {len(ds.labeled)}, per class: "
    f"{per_class(ds.class_names, ds.labeled_class_counts)}."
  ]
  if ds.unlabeled is not None:
    counts = ds.unlabeled.class_counts(ds.num_classes)
    lines.append(f"unlabeled {len(ds.unlabeled)} (true labels, never used), per class: "
                 f"{per_class(ds.class_names, counts)}.")
  for name, split in (("validation", ds.val), ("test", ds.test)):
    counts = split.class_counts(ds.num_classes)
    each = f"{int(counts[0])} each" if len(set(counts.tolist())) == 1 else (
      f"per class: {per_class(ds.class_names, counts)}")
    lines.append(f"{name} {len(split)}, {each}.")
  return "\n".join(lines)


def head_tail_warning(class_names, counts, head_mask=None) -> str | None:
  """The warning for a class order whose head is not the frequent classes, or None.

  The head is the first `int(0.9 K)` classes in class order (SPEC §2, which orders data sets
  from most to least frequent) unless a `head_mask` is given. A tail class with more labeled
  examples than a head class means that order is not by frequency: min head-tail recall, the
  head/tail objectives and the plots would then call frequent classes tail.

  Args:
    class_names: K names, in class order.
    counts: [K] labeled examples per class.
    head_mask: the configured head mask, or None for the default (then checked).
  """
  counts = np.asarray(counts)
  num_head = int(0.9 * len(counts))
  if head_mask is not None or num_head == 0 or num_head == len(counts):
    return None
  head, tail = counts[:num_head], counts[num_head:]
  if head.min() >= tail.max():
    return None
  order = np.argsort(-counts, kind="stable")
  names = list(class_names)
  by_count = [names[k] for k in order[num_head:]]
  return (
    f"The classes are not ordered by frequency, but the head is the first {num_head} of the "
    f"{len(counts)} classes in class order (min head-tail recall, the head/tail objectives, "
    f"the plots): tail {per_class(names[num_head:], tail)}, while head class "
    f"{names[int(np.argmin(head))]} has {int(head.min())} labeled examples. By frequency the "
    f"tail would be {', '.join(by_count)}. Give config.data.class_names from most to least "
    "frequent (an image folder without class_names is ordered so), or "
    "config.objective.hparams.head_mask."
  )
