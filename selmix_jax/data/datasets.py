"""The data-set registry: one entry per data set holds everything about it.

An entry (`DatasetSpec`) names the loader of a split, the per-channel normalisation statistics
and the data set's split defaults. `pipeline.build(config.data)` reads only the entry of
`config.data.name`, so adding a data set is one `register` call (in a user module imported with
`launch/main.py --imports=my_pkg.my_data`):

  def load_my_data(config, split):          # config: the resolved `config.data`
    return sources.ArraySource(images, labels, class_names)

  datasets.register(datasets.DatasetSpec("my_data", load_my_data, test_split="val"))

Sources are described in `sources` (in-memory `ArraySource`, decode-on-access
`RandomAccessSource`); splits are drawn from them by `pipeline.build` (SPEC §8).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from selmix_jax.data import features
from selmix_jax.data import sources

Loader = Callable[[Any, str], Any]


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """One data set.

  Attributes:
    name: the `config.data.name` that selects it.
    load: `(data_config, split) -> source`, with the resolved `config.data` (every field of
      `pipeline.default_config()`) and a split name.
    mean: per-channel mean of [0, 1] pixels; None = computed on the training source.
    std: per-channel standard deviation; None = computed on the training source.
    test_split: split name of the test set when `config.data.test_split` is None.
    val_split: split of the validation set when `config.data.val_split` is None; None = a
      balanced set held out of the training split (SPEC §8); or a callable
      `(data_config) -> split or None` when that depends on the files (e.g. 'features').
    unlabeled_split: split of the unlabeled pool when `config.data.unlabeled_split` is None;
      None = drawn from the training split after validation and labeled.
  """

  name: str
  load: Loader
  mean: tuple[float, ...] | None = None
  std: tuple[float, ...] | None = None
  test_split: str = "test"
  val_split: str | Callable[[Any], str | None] | None = None
  unlabeled_split: str | None = None


_REGISTRY: dict[str, DatasetSpec] = {}


def register(spec: DatasetSpec, *, overwrite: bool = False) -> None:
  """Adds `spec` to the registry under `spec.name`."""
  if spec.name in _REGISTRY and not overwrite:
    raise ValueError(f"Data set {spec.name!r} is already registered; pass overwrite=True.")
  _REGISTRY[spec.name] = spec


def get(name: str) -> DatasetSpec:
  """The registry entry of `name`; a ValueError lists the known names."""
  if name not in _REGISTRY:
    raise ValueError(f"Unknown data set {name!r}; known: {', '.join(names())}.")
  return _REGISTRY[name]


def names() -> tuple[str, ...]:
  """Registered data-set names, in registration order."""
  return tuple(_REGISTRY)


# ----------------------------------------------------------------------------- built-ins

_IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def _digits(config, split):
  return sources.load_digits(split, test_fraction=config.digits_test_fraction, seed=config.seed)


def _image_folder(config, split):
  # Every split is labelled with the training split's class ids (a split missing a class is
  # warned about; one with a class the training split lacks is an error naming its folder).
  # Without `class_names` the classes go from most to least frequent in the training split
  # (ties by name; SPEC §2), so the head is the most frequent 90 % in an imbalanced folder.
  classes = config.class_names or sources.class_folders(
    config.root, config.train_split, by_count=True
  )
  train_classes, class_names = None, config.class_names
  if split != config.train_split:
    train_classes = classes
  elif class_names is None and list(classes) != sorted(classes):
    class_names = classes  # (Left None when it is the name order, so caches stay valid.)
  return sources.load_image_folder(
    config.root,
    split,
    class_names=class_names,
    train_classes=train_classes,
    image_size=config.image_size,
    cache_dir=config.cache_dir or None,
  )


def _tfds_in_memory(name):
  def load(config, split):
    source = sources.load_tfds(name, split, data_dir=config.data_dir)
    return sources.resized(source, config.image_size) if config.image_size else source

  return load


def _tfds_streaming(name):
  def load(config, split):
    kwargs = {}
    if name == "imagenet100":
      classes = config.imagenet100_classes
      if isinstance(classes, str):
        with open(classes, encoding="utf-8") as f:
          classes = [line.strip() for line in f if line.strip()]
      kwargs["classes"] = classes
    return sources.load_tfds(
      name,
      split,
      data_dir=config.data_dir,
      image_size=config.image_size or 224,
      cache_dir=config.cache_dir or None,
      **kwargs,
    )

  return load


def _features(config, split):
  return features.load(config.path, split)


def _features_val_split(config):
  # The file's own 'val' split when it has one, else a balanced set held out of 'train'.
  return "val" if features.has_split(config.path, "val") else None


for _entry in (
  DatasetSpec("digits", _digits),
  DatasetSpec("image_folder", _image_folder),
  DatasetSpec(
    "cifar10",
    _tfds_in_memory("cifar10"),
    mean=(0.4914, 0.4822, 0.4465),
    std=(0.2471, 0.2435, 0.2616),
  ),
  DatasetSpec(
    "cifar100",
    _tfds_in_memory("cifar100"),
    mean=(0.5071, 0.4865, 0.4409),
    std=(0.2673, 0.2564, 0.2762),
  ),
  DatasetSpec(
    "stl10",
    _tfds_in_memory("stl10"),
    mean=(0.4409, 0.4279, 0.3868),
    std=(0.2683, 0.2610, 0.2687),
    unlabeled_split="unlabelled",
  ),
  DatasetSpec("imagenet2012", _tfds_streaming("imagenet2012"), *_IMAGENET_STATS, "validation"),
  DatasetSpec("imagenet100", _tfds_streaming("imagenet100"), *_IMAGENET_STATS, "validation"),
  DatasetSpec(
    "imagenet_lt", _tfds_streaming("imagenet_lt"), *_IMAGENET_STATS, val_split="validation"
  ),
  # Feature vectors are used as they are: mean 0 and std 1 leave them unchanged.
  DatasetSpec("features", _features, (0.0,), (1.0,), val_split=_features_val_split),
):
  register(_entry)
