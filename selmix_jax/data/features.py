"""Precomputed feature vectors as a data source (`config.data.name = 'features'`).

Any encoder's embeddings (a frozen image backbone, CLIP, a sentence or audio model) become a data
set: SelMix on a linear head over fixed features is the setting of SPEC §4's analysis, and mixing
precomputed features *is* feature mixup. `config.data.path` names either

  * an `.npz` with `{split}_features` [N, D] (real numbers) and `{split}_labels` [N] (integers in
    [0, K)) for the splits 'train', 'test' and optionally 'val', and optionally `class_names` [K]
    (strings); or
  * a folder of `.npy` files with the same names (`train_features.npy`, ...,
    `class_names.npy`, or `class_names.txt` with one name a line).

K is `len(class_names)` when given, else `max(train labels) + 1`. Without a 'val' split the
validation set is held out of 'train' (`config.data.val_per_class` per class, balanced, SPEC §8);
with one, `val_per_class` draws a balanced subset of it (0 = all of it). The long-tail options
(`labeled_max`, `labeled_imbalance`) subsample 'train' as for images.

A `FeatureSource` has the source interface of `sources` with `image_shape = (D,)` and float32
"images" (the feature vectors): batches carry them under `images` [devices, b, D]; the 'linear'
model (`models`) is the identity backbone plus the head, and `config.data.train_augment='none'`
leaves them as they are. Every check runs when a split is loaded, before any compute, and a bad
file fails with one line naming the file and key: a missing key, wrong shapes, N of features and
labels that differ, D that differs between splits, non-finite features, labels that are not
integers or lie outside [0, K), and a class absent from 'train'.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import ClassVar

import numpy as np

from selmix_jax import errors

SPLITS = ("train", "val", "test")


@dataclasses.dataclass(frozen=True)
class FeatureSource:
  """Feature vectors in memory, behind the image sources' interface.

  Attributes:
    features: float32 [N, D].
    labels: int32 [N].
    class_names: K names in class-id order.
  """

  features: np.ndarray
  labels: np.ndarray
  class_names: tuple[str, ...]
  decodes_on_access: ClassVar[bool] = False
  dtype: ClassVar[type] = np.float32  # What `get_images` returns (`pipeline` allocates it).

  def __post_init__(self):
    if self.features.ndim != 2 or self.labels.shape != (len(self.features),):
      raise errors.DataError(
          f"features must be [N, D] and labels [N], got {self.features.shape} and "
          f"{self.labels.shape}."
      )
    object.__setattr__(self, "features", np.asarray(self.features, np.float32))
    object.__setattr__(self, "labels", np.asarray(self.labels, np.int32))
    object.__setattr__(self, "class_names", tuple(self.class_names))

  def __len__(self) -> int:
    return len(self.labels)

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  @property
  def image_shape(self) -> tuple[int]:
    """(D,): one feature vector is one 'image'."""
    return (self.features.shape[1],)

  def get_images(self, indices: np.ndarray) -> np.ndarray:
    """float32 [len(indices), D]."""
    return self.features[np.asarray(indices, np.int64)]


class _Store:
  """Read access to the arrays of an `.npz` or a folder of `.npy` files, by key."""

  def __init__(self, path: str):
    self.path = os.path.expanduser(path)
    if not os.path.exists(self.path):
      raise errors.DataPathError(
          f"config.data.path={path!r} does not exist; 'features' needs an .npz or a folder of "
          ".npy files ({train,val,test}_features, {train,val,test}_labels)."
      )
    self.is_folder = os.path.isdir(self.path)
    if self.is_folder:
      names = os.listdir(self.path)
      self.keys = sorted(n[:-4] for n in names if n.endswith(".npy"))
      if "class_names.txt" in names:
        self.keys.append("class_names.txt")
    else:
      try:
        with np.load(self.path, allow_pickle=False) as z:
          self.keys = sorted(z.files)
      except Exception as e:  # A truncated or foreign file: say which.
        raise errors.DataError(
            f"{self.path}: "
            f"not a readable .npz ({type(e).__name__}: {e})."
        ) from e

  def where(self, key: str) -> str:
    if self.is_folder:
      name = key if key.endswith(".txt") else f"{key}.npy"
      return os.path.join(self.path, name)
    return f"{self.path}[{key!r}]"

  def has(self, key: str) -> bool:
    return key in self.keys

  def get(self, key: str) -> np.ndarray:
    if not self.has(key):
      raise errors.DataError(
          f"{self.path}: no key {key!r} (has {', '.join(self.keys) or 'nothing'}); expected "
          "{split}_features [N, D] and {split}_labels [N] for 'train' and 'test' ('val' optional)."
      )
    try:
      if self.is_folder:
        if key.endswith(".txt"):
          with open(self.where(key), encoding="utf-8") as f:
            return np.asarray([line.strip() for line in f if line.strip()])
        return np.load(self.where(key), allow_pickle=False)
      with np.load(self.path, allow_pickle=False) as z:
        return z[key]
    except ValueError as e:  # Object arrays need pickle: refused, as for any untrusted file.
      raise errors.DataError(
          f"{self.where(key)}: "
          f"cannot read ({e}); store plain numeric arrays."
      ) from e


def has_split(path: str, split: str) -> bool:
  """Whether the file or folder at `path` holds `{split}_features`."""
  return _Store(path).has(f"{split}_features")


def _class_names(store: _Store, train_labels: np.ndarray) -> tuple[str, ...]:
  key = "class_names" if store.has("class_names") else (
      "class_names.txt" if store.has("class_names.txt") else None)
  if key is None:
    k = int(train_labels.max()) + 1 if len(train_labels) else 0
    return tuple(f"class_{i}" for i in range(k))
  names = store.get(key)
  if names.ndim != 1 or not len(names):
    raise errors.DataError(
        f"{store.where(key)}: "
        f"class names must be [K] with K >= 1, got {names.shape}."
    )
  return tuple(str(n) for n in names)


def _labels(store: _Store, split: str, n: int, num_classes: int | None) -> np.ndarray:
  key = f"{split}_labels"
  labels = store.get(key)
  where = store.where(key)
  if labels.ndim != 1:
    raise errors.DataError(f"{where}: labels must be [N], got shape {labels.shape}.")
  if len(labels) != n:
    raise errors.DataError(
        f"{where}: {len(labels)} labels, but {store.where(f'{split}_features')} has {n} rows."
    )
  if labels.dtype.kind not in "iu":
    raise errors.DataError(
        f"{where}: labels must be integers (class ids), got dtype {labels.dtype}"
        + (f" (e.g. {labels[0]!r})" if len(labels) else "") + "."
    )
  if len(labels) and labels.min() < 0:
    raise errors.DataError(
        f"{where}: "
        f"label {int(labels.min())} is negative; expected class ids >= 0."
    )
  if num_classes is not None and len(labels) and labels.max() >= num_classes:
    raise errors.DataError(
        f"{where}: label {int(labels.max())} is out of range for {num_classes} classes "
        "(class_names, or the training labels, give K)."
    )
  return labels.astype(np.int32)


def _features(store: _Store, split: str, dim: int | None) -> np.ndarray:
  key = f"{split}_features"
  features = store.get(key)
  where = store.where(key)
  if features.ndim != 2 or not features.shape[0]:
    raise errors.DataError(
        f"{where}: "
        f"features must be [N, D] with N >= 1, got shape {features.shape}."
    )
  if features.dtype.kind not in "fiu":
    raise errors.DataError(f"{where}: features must be real numbers, got dtype {features.dtype}.")
  if dim is not None and features.shape[1] != dim:
    raise errors.DataError(
        f"{where}: D = {features.shape[1]}, but {store.where('train_features')} has D = {dim}."
    )
  features = np.asarray(features, np.float32)
  bad = ~np.isfinite(features).all(axis=1)
  if bad.any():
    row = int(np.flatnonzero(bad)[0])
    raise errors.DataError(
        f"{where}: {int(bad.sum())} row(s) hold NaN or inf (first: row {row}); features must be "
        "finite."
    )
  return features


def load(path: str, split: str) -> FeatureSource:
  """The split `split` ('train', 'val' or 'test') of the features at `path`, checked.

  Every split is labelled with the training split's classes: K comes from `class_names` or the
  training labels, and 'train' must hold every class. The training split is read once per file
  version (the other splits' checks need it).

  Raises:
    errors.DataPathError: (a FileNotFoundError) `path` does not exist.
    errors.DataError: (a ValueError) one line naming the file and key (module docstring).
  """
  store = _Store(path)
  train = _train(store.path, os.stat(store.path).st_mtime_ns)
  if split == "train":
    return train
  if split not in SPLITS:
    raise errors.DataError(f"{store.path}: unknown split {split!r}; expected one of {SPLITS}.")
  features = _features(store, split, train.image_shape[0])
  labels = _labels(store, split, len(features), train.num_classes)
  return FeatureSource(features, labels, train.class_names)


@functools.lru_cache(maxsize=1)
def _train(path: str, mtime_ns: int) -> FeatureSource:
  del mtime_ns  # Part of the cache key only: a rewritten file is read again.
  store = _Store(path)
  train_labels = store.get("train_labels")
  names = None  # With malformed labels, `_labels` reports what is wrong with them.
  if train_labels.dtype.kind in "iu" and train_labels.ndim == 1 and len(train_labels):
    names = _class_names(store, train_labels)
  features = _features(store, "train", None)
  labels = _labels(store, "train", len(features), len(names) if names else None)
  counts = np.bincount(labels, minlength=len(names))
  if (counts == 0).any():
    k = int(np.flatnonzero(counts == 0)[0])
    raise errors.DataError(
        f"{store.where('train_labels')}: class {names[k]!r} (id {k}) has no training example "
        f"({int((counts == 0).sum())} of {len(names)} classes absent); every class needs one."
    )
  return FeatureSource(features, labels, names)


def save(path: str, *, class_names=None, **arrays: np.ndarray) -> None:
  """Writes an `.npz` this module reads: `save(path, train_features=..., train_labels=..., ...)`.

  Written to a temporary name and renamed, so a reader never sees half a file.
  """
  if class_names is not None:
    arrays["class_names"] = np.asarray([str(n) for n in class_names])
  tmp = f"{path}.tmp{os.getpid()}.npz"
  np.savez(tmp, **arrays)
  os.replace(tmp, path)
