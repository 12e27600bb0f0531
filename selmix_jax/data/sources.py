"""Image sources with one random-access API, and loaders for the supported data sets.

Every source exposes the same interface, and the rest of the code base uses only it:

  * `len(source)`: number of examples N;
  * `source.labels`: int32 [N] class ids (-1 for examples without a label, e.g.
    STL-10's `unlabelled` split), read once at construction;
  * `source.class_names`: tuple of K names; `source.num_classes` = K;
  * `source.image_shape`: (H, W, C);
  * `source.get_images(indices)`: uint8 [len(indices), H, W, C];
  * `source.decodes_on_access` (optional, default False): whether `get_images` decodes, so that
    loading it in worker processes pays off (`loader.Feed`).

`ArraySource` keeps all images in memory (digits, CIFAR, STL-10, image folders;
also exposes `.images`). `RandomAccessSource` wraps a TFDS `data_source` (ImageNet),
decoding JPEG bytes with PIL and resizing on access (shorter side to `image_size`,
then a central `image_size`² crop), in a thread pool; pickled into a grain worker process, it
decodes in the worker's own thread.

Loaders: `load_digits`, `load_image_folder` (a directory or a .zip holding
`<split>/<class>/*.{jpg,jpeg,png}`, cached as .npz) and `load_tfds` (cifar10, cifar100,
stl10, imagenet2012, imagenet100, imagenet_lt). Which loader serves which
`config.data.name` is the `datasets` registry's business.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import hashlib
import importlib.resources
import io
import json
import os
import pathlib
import zipfile
from collections.abc import Sequence
from typing import ClassVar

import numpy as np
import PIL.Image
from absl import logging

from selmix_jax import errors

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
DEFAULT_CACHE_DIR = os.path.join("~", ".cache", "selmix_jax")
_NUM_THREADS = min(8, os.cpu_count() or 1)


@dataclasses.dataclass(frozen=True)
class ArraySource:
  """All images in memory.

  Attributes:
    images: uint8 [N, H, W, C].
    labels: int32 [N].
    class_names: K class names in class-id order.
  """

  images: np.ndarray
  labels: np.ndarray
  class_names: tuple[str, ...]
  decodes_on_access: ClassVar[bool] = False

  def __post_init__(self):
    if self.images.ndim != 4 or self.images.dtype != np.uint8:
      raise ValueError(
        f"images must be uint8 [N, H, W, C], got {self.images.dtype} {self.images.shape}."
      )
    if self.labels.shape != (len(self.images),):
      raise ValueError(f"labels {self.labels.shape} do not match images {self.images.shape}.")
    object.__setattr__(self, "labels", np.asarray(self.labels, np.int32))
    object.__setattr__(self, "class_names", tuple(self.class_names))

  def __len__(self) -> int:
    return len(self.labels)

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return tuple(self.images.shape[1:])

  def get_images(self, indices: np.ndarray) -> np.ndarray:
    """uint8 [len(indices), H, W, C] for integer `indices` into this source."""
    return self.images[np.asarray(indices, np.int64)]


class RandomAccessSource:
  """Decode-on-access source over an indexable sequence of records (TFDS data_source).

  Records are dicts with an `image` (encoded bytes or a decoded uint8 array); only
  the records listed in `record_indices` are exposed, as examples 0..N-1.

  `get_images` decodes in a pool of `num_threads` threads kept for the source's lifetime. A
  pickled copy (what a grain worker process holds) decodes in its caller's thread: there the
  worker processes are the parallelism, and threads on top would only oversubscribe the cores.
  """

  decodes_on_access: ClassVar[bool] = True

  def __init__(
    self,
    records: Sequence[dict],
    record_indices: np.ndarray,
    labels: np.ndarray,
    class_names: Sequence[str],
    *,
    image_size: int,
    num_threads: int = _NUM_THREADS,
  ):
    """Builds the source.

    Args:
      records: random-access sequence; `records[i]['image']` is bytes or uint8 [h, w, c].
      record_indices: int [N] positions in `records` of the exposed examples.
      labels: int [N] labels of the exposed examples (already remapped).
      class_names: K names.
      image_size: output side; images are resized (shorter side) and centre-cropped.
      num_threads: decode threads.
    """
    self._records = records
    self._record_indices = np.asarray(record_indices, np.int64)
    self.labels = np.asarray(labels, np.int32)
    self.class_names = tuple(class_names)
    self._image_size = int(image_size)
    self._num_threads = num_threads
    self._pool = None
    if self.labels.shape != self._record_indices.shape:
      raise ValueError("labels and record_indices must have the same length.")

  def __getstate__(self) -> dict:
    state = dict(self.__dict__)
    state.update(_pool=None, _num_threads=1)  # See the class docstring.
    return state

  def __len__(self) -> int:
    return len(self.labels)

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return (self._image_size, self._image_size, 3)

  def _one(self, i: int) -> np.ndarray:
    image = self._records[int(i)]["image"]
    if isinstance(image, (bytes, np.bytes_)):
      pil = PIL.Image.open(io.BytesIO(image))
    else:
      pil = PIL.Image.fromarray(np.asarray(image).squeeze())
    return _resize_center_crop(pil.convert("RGB"), self._image_size)

  def get_images(self, indices: np.ndarray) -> np.ndarray:
    """uint8 [len(indices), S, S, 3], decoded and resized now."""
    rec = self._record_indices[np.asarray(indices, np.int64)]
    out = np.empty((len(rec),) + self.image_shape, np.uint8)
    if self._num_threads > 1 and len(rec) > 1:
      if self._pool is None:
        self._pool = concurrent.futures.ThreadPoolExecutor(self._num_threads)
      decoded = self._pool.map(self._one, rec)
    else:
      decoded = map(self._one, rec)
    for j, image in enumerate(decoded):
      out[j] = image
    return out


def _resize_center_crop(pil: PIL.Image.Image, size: int) -> np.ndarray:
  """Resizes the shorter side to `size` (bilinear) and crops the centre square."""
  w, h = pil.size
  scale = size / min(w, h)
  new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
  if (new_w, new_h) != (w, h):
    pil = pil.resize((new_w, new_h), PIL.Image.BILINEAR)
  left, top = (new_w - size) // 2, (new_h - size) // 2
  return np.asarray(pil.crop((left, top, left + size, top + size)))


def resized(source: ArraySource, size: int) -> ArraySource:
  """`source` with every image resized to `size`² (PIL, antialiased bilinear); as is when
  the images already have that size."""
  if source.image_shape[:2] == (size, size):
    return source
  logging.info("Resizing %d images from %s to %dx%d.", len(source), source.image_shape, size, size)
  out = np.empty((len(source), size, size, source.image_shape[2]), np.uint8)
  for i, image in enumerate(source.images):
    pil = PIL.Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image)
    array = np.asarray(pil.resize((size, size), PIL.Image.BILINEAR, reducing_gap=None))
    out[i] = array if array.ndim == 3 else array[..., None]
  return ArraySource(out, source.labels, source.class_names)


# ----------------------------------------------------------------------------- digits


def load_digits(split: str, *, test_fraction: float = 0.3, seed: int = 0) -> ArraySource:
  """scikit-learn's bundled 8×8 digits as uint8 [N, 8, 8, 1] (0..16 scaled to 0..255).

  There is no official test split; a stratified one is drawn per class with
  `numpy.random.default_rng([seed, class])` (`round(test_fraction * n_class)` test
  examples per class). Examples keep their original order within each split.

  Args:
    split: 'train' or 'test'.
    test_fraction: share of each class held out as test.
    seed: seed of the train/test split.

  Returns:
    An `ArraySource` with class names '0'..'9'.
  """
  import sklearn.datasets  # pylint: disable=g-import-not-at-top  (heavy, optional)

  if split not in ("train", "test"):
    raise ValueError(f"digits has splits 'train' and 'test', got {split!r}.")
  bunch = sklearn.datasets.load_digits()
  images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
  labels = bunch.target.astype(np.int32)
  is_test = np.zeros(len(labels), bool)
  for k in range(10):
    members = np.flatnonzero(labels == k)
    rng = np.random.default_rng([seed, k])
    is_test[rng.permutation(members)[: round(test_fraction * len(members))]] = True
  keep = is_test if split == "test" else ~is_test
  return ArraySource(images[keep], labels[keep], tuple(str(k) for k in range(10)))


# ----------------------------------------------------------------------- image folder


class _Tree:
  """Read-only view of a directory or a zip archive: list folders/files, read bytes."""

  def __init__(self, root: pathlib.Path):
    self.root = root
    self.zip = zipfile.ZipFile(root) if root.suffix.lower() == ".zip" else None
    if self.zip is not None:
      # One pass over the archive: folder -> (sub-folders, files).
      self._index = collections.defaultdict(lambda: (set(), set()))
      for name in self.zip.namelist():
        parts = name.rstrip("/").split("/")
        for depth in range(len(parts) - 1):
          self._index["/".join(parts[:depth])][0].add(parts[depth])
        if not name.endswith("/"):
          self._index["/".join(parts[:-1])][1].add(parts[-1])
        else:
          self._index["/".join(parts[:-1])][0].add(parts[-1])

  def listing(self, folder: str) -> tuple[list[str], list[str]]:
    """(sub-folder names, file names) directly in `folder` ('' = top), sorted."""
    if self.zip is None:
      base = self.root / folder
      entries = sorted(os.listdir(base)) if base.is_dir() else []
      return (
        [e for e in entries if (base / e).is_dir()],
        [e for e in entries if (base / e).is_file()],
      )
    folders, files = self._index.get(folder.strip("/"), (set(), set()))
    return sorted(folders), sorted(files)

  def is_folder(self, folder: str) -> bool:
    if self.zip is None:
      return (self.root / folder).is_dir()
    return folder.strip("/") in self._index

  def read(self, path: str) -> bytes:
    if self.zip is None:
      return (self.root / path).read_bytes()
    return self.zip.read(path)

  def describe(self, path: str) -> str:
    return f"{self.root}!/{path}" if self.zip is not None else str(self.root / path)


def _fingerprint(root: pathlib.Path, split: str) -> list[int]:
  """Cache-key material: size and mtime of `root`; for folders also the mtimes of the
  split folder and its class folders, which change when files are added or removed."""
  stat = root.stat()
  parts = [stat.st_size, stat.st_mtime_ns]
  if root.is_dir() and (root / split).is_dir():
    for folder in [root / split] + sorted((root / split).iterdir()):
      parts.append(folder.stat().st_mtime_ns)
  return parts


def _decode(data: bytes, channels: int, image_size: int | None) -> np.ndarray:
  pil = PIL.Image.open(io.BytesIO(data))
  pil = pil.convert("RGB" if channels == 3 else "L")
  if image_size is not None and pil.size != (image_size, image_size):
    pil = pil.resize((image_size, image_size), PIL.Image.BILINEAR)
  array = np.asarray(pil, np.uint8)
  return array if array.ndim == 3 else array[..., None]


def _split_folder(tree: _Tree, split: str) -> str:
  """The folder of `split` in `tree`: `<split>`, or `<top>/<split>` under a single top folder."""
  if tree.is_folder(split):
    return split
  top_folders, _ = tree.listing("")
  if len(top_folders) == 1 and tree.is_folder(f"{top_folders[0]}/{split}"):
    return f"{top_folders[0]}/{split}"
  raise errors.DataPathError(
    f"No split folder {tree.describe(split)} (expected <root>/{split}/<class>/*.jpg"
    f"{' or <root>/<top>/' + split + '/<class>/*.jpg' if tree.zip else ''})."
  )


def _root_path(root: str | os.PathLike, split: str) -> pathlib.Path:
  root = pathlib.Path(root).expanduser().absolute()
  if not root.exists():
    raise errors.DataPathError(
      f"Image folder {root} does not exist (expected {root}/{split}/<class>/*.jpg)."
    )
  return root


def class_folders(
  root: str | os.PathLike, split: str, *, by_count: bool = False
) -> tuple[str, ...]:
  """The class-folder names of `root/<split>` (a directory or .zip), reading no image.

  Args:
    root: folder or .zip file.
    split: sub-folder name.
    by_count: order by descending number of image files (ties by name), the SPEC's
      most-to-least-frequent class order; False = sorted by name.
  """
  tree = _Tree(_root_path(root, split))
  base = _split_folder(tree, split)
  folders = tuple(tree.listing(base)[0])
  if not by_count:
    return folders
  counts = {
    name: sum(f.lower().endswith(IMAGE_EXTENSIONS) for f in tree.listing(f"{base}/{name}")[1])
    for name in folders
  }
  return tuple(sorted(folders, key=lambda name: (-counts[name], name)))


def load_image_folder(
  root: str | os.PathLike,
  split: str,
  *,
  class_names: Sequence[str] | None = None,
  train_classes: Sequence[str] | None = None,
  image_size: int | None = None,
  channels: int = 3,
  cache_dir: str | os.PathLike | None = DEFAULT_CACHE_DIR,
  num_threads: int = _NUM_THREADS,
) -> ArraySource:
  """Loads `root/<split>/<class>/*.{jpg,jpeg,png}` into memory.

  `root` may also be a .zip file holding that layout, either at the top of the
  archive or inside a single top-level folder (auto-detected), e.g.
  `load_image_folder('cifar10-jpeg.zip', 'train')`. Files are read in sorted order
  (class, then file name), so the example order is deterministic.

  Args:
    root: folder or .zip file.
    split: sub-folder name, e.g. 'train' or 'test'.
    class_names: class order; default = sorted class-folder names. Every listed class
      must have a folder (unless `train_classes` is given); folders not listed are ignored.
    train_classes: for a split other than the training split: the training split's class
      list, so that labels are the training split's class ids. A class of it without a
      folder here simply has no examples in this split (`pipeline.build` warns about it);
      a class folder that is not in it is an error (unless `class_names` is given, whose
      unlisted folders are ignored).
    image_size: resize every image to `image_size`² (bilinear); None keeps the stored
      size, which must then be the same for all images.
    channels: 3 (RGB) or 1 (grayscale).
    cache_dir: where decoded arrays are cached as .npz, keyed by the absolute path,
      modification time and size of `root`, `split`, `class_names`, `image_size`,
      `channels`; None disables the cache.
    num_threads: decode threads.

  Returns:
    An `ArraySource`.

  Raises:
    errors.DataPathError: (a FileNotFoundError) `root` or `root/<split>` does not exist.
    errors.DataError: (a ValueError) no class folders, a class folder without images, an unreadable
      image, mixed image sizes without `image_size`, a listed class without folder, or
      a folder of a class not in `train_classes` (the message names the folder).
  """
  root = _root_path(root, split)
  if channels not in (1, 3):
    raise ValueError(f"channels must be 1 or 3, got {channels}.")
  cache_path = None
  if cache_dir is not None:
    key = json.dumps(
      [
        str(root),
        _fingerprint(root, split),
        split,
        None if class_names is None else list(class_names),
        None if train_classes is None else list(train_classes),
        image_size,
        channels,
      ]
    )
    digest = hashlib.sha1(key.encode()).hexdigest()[:16]
    cache_path = pathlib.Path(cache_dir).expanduser() / f"{root.stem}-{split}-{digest}.npz"
    if cache_path.exists():
      with np.load(cache_path) as cached:
        logging.info("Loaded %s/%s from cache %s.", root, split, cache_path)
        return ArraySource(
          cached["images"], cached["labels"], tuple(str(c) for c in cached["class_names"])
        )

  tree = _Tree(root)
  base = _split_folder(tree, split)
  folders, _ = tree.listing(base)
  if not folders:
    raise errors.DataError(
      f"Split folder {tree.describe(base)} has no class folders (expected "
      f"{base}/<class>/*.jpg, one folder per class)."
    )
  if train_classes is not None:
    class_names = _classes_of_train(tree, base, folders, class_names, train_classes)
  elif class_names is None:
    class_names = folders
  else:
    missing = sorted(set(class_names) - set(folders))
    if missing:
      raise errors.DataError(
        f"Split folder {tree.describe(base)} has no folder for classes {missing} of class_names "
        "(config.data.class_names)."
      )
  paths, labels = [], []
  for k, name in enumerate(class_names):
    if name not in folders:
      continue  # A class of the training split that this split lacks (warned about).
    files = [f for f in tree.listing(f"{base}/{name}")[1] if f.lower().endswith(IMAGE_EXTENSIONS)]
    if not files:
      raise errors.DataError(
        f"Class folder {tree.describe(f'{base}/{name}')} holds no images "
        f"(expected files ending in {', '.join(IMAGE_EXTENSIONS)})."
      )
    paths += [f"{base}/{name}/{f}" for f in files]
    labels += [k] * len(files)

  # Bytes are read in the calling thread (zipfile shares one file handle); decoding,
  # which releases the GIL inside PIL, runs in the pool.
  logging.info("Decoding %d images from %s/%s.", len(paths), root, split)
  images = None
  with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
    datas = (tree.read(p) for p in paths)
    decoded = pool.map(lambda pd: _decode_named(pd, channels, image_size, tree), zip(paths, datas))
    for j, image in enumerate(decoded):
      if images is None:
        images = np.empty((len(paths),) + image.shape, np.uint8)
      elif image.shape != images.shape[1:]:
        raise errors.DataError(
          f"Image {tree.describe(paths[j])} has shape {image.shape}, but "
          f"{tree.describe(paths[0])} has {images.shape[1:]}: images of one data set must have "
          "one size; set image_size (config.data.image_size) to resize them all."
        )
      images[j] = image
  source = ArraySource(images, np.asarray(labels, np.int32), tuple(class_names))
  if cache_path is not None:
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache_path.with_suffix(f".tmp{os.getpid()}.npz")
    np.savez(
      tmp, images=source.images, labels=source.labels, class_names=np.asarray(source.class_names)
    )
    os.replace(tmp, cache_path)
    logging.info("Cached %s/%s at %s.", root, split, cache_path)
  return source


def _classes_of_train(tree, base, folders, class_names, train_classes):
  """`train_classes` as this split's class list, after checking the split's folders."""
  train_classes = tuple(train_classes)
  listed = folders if class_names is None else [f for f in folders if f in class_names]
  unknown = [f for f in listed if f not in train_classes]
  if unknown:
    raise errors.DataError(
      f"Class folder {tree.describe(f'{base}/{unknown[0]}')} is not a class of the training "
      f"split ({', '.join(train_classes)}): its images would get a label the model does not "
      "have. Remove or rename it, or add that class to the training split."
    )
  return train_classes  # Classes without a folder get no examples (`pipeline.build` warns).


def _decode_named(path_and_data, channels, image_size, tree):
  path, data = path_and_data
  if not data:
    raise errors.DataError(
      f"Image {tree.describe(path)} is empty (0 bytes; expected a JPEG or PNG image): "
      "remove it or copy it again."
    )
  try:
    return _decode(data, channels, image_size)
  except PIL.UnidentifiedImageError as e:
    raise errors.DataError(
      f"Image {tree.describe(path)} is not an image ({len(data)} bytes starting {data[:8]!r}; "
      "expected a JPEG or PNG image): remove it or copy it again."
    ) from e
  except (OSError, ValueError, SyntaxError) as e:  # PIL raises all three for bad data.
    raise errors.DataError(
      f"Image {tree.describe(path)} cannot be decoded ({len(data)} bytes, PIL says: {e}; "
      "expected a complete JPEG or PNG image): remove it or copy it again."
    ) from e


# ------------------------------------------------------------------------------- TFDS

IN_MEMORY_TFDS = ("cifar10", "cifar100", "stl10")
RANDOM_ACCESS_TFDS = ("imagenet2012", "imagenet100", "imagenet_lt")


def imagenet100_classes() -> tuple[str, ...]:
  """The 100 ImageNet synsets of CMC (Tian et al., 2019), shipped with the package.

  This is the ImageNet-100 used across the contrastive and long-tailed SSL
  literature; as a class order we use the sorted synset ids, i.e. the order of
  their ImageNet-1k labels.
  """
  text = importlib.resources.files(__package__).joinpath("imagenet100_classes.txt").read_text()
  return tuple(sorted(line.strip() for line in text.splitlines() if line.strip()))


def _import_tfds():
  """TensorFlow Datasets, imported on first use (the `[tfds]` extra); TensorFlow kept off GPUs."""
  try:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
      "TFDS data sets need TensorFlow Datasets: pip install 'selmix_jax[tfds]' "
      f"(or use an image folder: config.data.name='image_folder'). ({e})"
    ) from e
  # TensorFlow only reads data here; the accelerators belong to JAX.
  tf.config.set_visible_devices([], "GPU")
  return tfds


def load_tfds(
  name: str,
  split: str,
  *,
  data_dir: str | None = None,
  image_size: int = 224,
  classes: Sequence[str] | None = None,
  cache_dir: str | os.PathLike | None = DEFAULT_CACHE_DIR,
) -> ArraySource | RandomAccessSource:
  """Loads a TFDS data set.

  cifar10, cifar100 and stl10 (splits train, test, unlabelled) load fully into
  memory as uint8. imagenet2012, imagenet100 (an imagenet2012 subset) and
  imagenet_lt (splits train, validation, test) are random-access sources over
  `tfds.data_source` (the data must be prepared in array_record format); their
  labels are read once (images not decoded) and cached in `cache_dir`.

  Args:
    name: one of `IN_MEMORY_TFDS + RANDOM_ACCESS_TFDS`.
    split: TFDS split name.
    data_dir: TFDS data directory (None = TFDS default).
    image_size: output side for the random-access sets.
    classes: imagenet100 only: the synsets to keep (default `imagenet100_classes()`).
    cache_dir: label cache of the random-access sets (None disables it).

  Returns:
    An `ArraySource` or a `RandomAccessSource`.
  """
  tfds = _import_tfds()

  if name in IN_MEMORY_TFDS:
    # Batches of 4096 rather than batch_size=-1: the latter aborts inside TF for
    # mocked data sets and needs a second full copy in memory.
    dataset, info = tfds.load(name, split=split, data_dir=data_dir, with_info=True)
    images, labels = [], []
    for batch in tfds.as_numpy(dataset.batch(4096)):
      images.append(batch["image"].astype(np.uint8))
      labels.append(batch["label"].astype(np.int32))
    return ArraySource(
      np.concatenate(images), np.concatenate(labels), tuple(info.features["label"].names)
    )
  if name not in RANDOM_ACCESS_TFDS:
    raise ValueError(
      f"Unknown TFDS data set {name!r}; known: {IN_MEMORY_TFDS + RANDOM_ACCESS_TFDS}."
    )
  tfds_name = "imagenet2012" if name == "imagenet100" else name
  records = tfds.data_source(
    tfds_name,
    split=split,
    data_dir=data_dir,
    decoders={"image": tfds.decode.SkipDecoding()},
  )
  all_names = tuple(tfds.builder(tfds_name, data_dir=data_dir).info.features["label"].names)
  all_labels = _record_labels(records, f"{tfds_name}-{split}-{data_dir}", cache_dir)
  if name != "imagenet100":
    return RandomAccessSource(
      records, np.arange(len(records)), all_labels, all_names, image_size=image_size
    )
  keep_names = tuple(sorted(classes)) if classes is not None else imagenet100_classes()
  unknown = sorted(set(keep_names) - set(all_names))
  if unknown:
    raise ValueError(f"imagenet100 classes not in imagenet2012: {unknown[:5]}.")
  remap = np.full(len(all_names), -1, np.int32)
  remap[[all_names.index(n) for n in keep_names]] = np.arange(len(keep_names))
  kept = np.flatnonzero(remap[all_labels] >= 0)
  return RandomAccessSource(
    records, kept, remap[all_labels[kept]], keep_names, image_size=image_size
  )


def _record_labels(records: Sequence[dict], key: str, cache_dir) -> np.ndarray:
  """int32 [len(records)] labels, read once (1.3M records take minutes) and cached."""
  path = None
  if cache_dir is not None:
    digest = hashlib.sha1(f"{key}-{len(records)}".encode()).hexdigest()[:16]
    path = pathlib.Path(cache_dir).expanduser() / f"labels-{digest}.npy"
    if path.exists():
      return np.load(path)
  logging.info("Reading %d labels of %s.", len(records), key)
  labels = np.fromiter(
    (int(records[i]["label"]) for i in range(len(records))), np.int32, count=len(records)
  )
  if path is not None:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, labels)
  return labels
