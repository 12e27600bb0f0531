"""Tests of the image sources and their loaders."""

import pathlib
import zipfile

import numpy as np
import PIL.Image
import pytest

from selmix_jax.data import datasets, sources

_SHARED_DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"
_CIFAR_ZIP = _SHARED_DATA / "cifar10-jpeg.zip"


def test_digits_split_is_stratified_deterministic_and_disjoint():
  train = sources.load_digits("train")
  test = sources.load_digits("test")
  assert len(train) + len(test) == 1797
  assert train.image_shape == (8, 8, 1) and train.images.dtype == np.uint8
  assert train.images.max() == 255 and train.images.min() == 0
  counts = np.bincount(test.labels, minlength=10)
  np.testing.assert_array_equal(counts, np.round(0.3 * (counts + np.bincount(train.labels))))
  np.testing.assert_array_equal(sources.load_digits("test").images, test.images)
  assert not np.array_equal(sources.load_digits("test", seed=1).labels, test.labels)
  # No image is in both splits (digits has a few duplicates, so compare row sets loosely).
  assert len(set(map(bytes, train.images))) + len(set(map(bytes, test.images))) >= 1797 - 10
  np.testing.assert_array_equal(train.get_images([3, 1]), train.images[[3, 1]])


def _write_folder(root, split="train", classes=("cat", "ant", "bee"), per_class=3, size=6):
  rng = np.random.default_rng(0)
  for k, name in enumerate(classes):
    folder = root / split / name
    folder.mkdir(parents=True)
    for i in range(per_class):
      pixels = np.full((size, size, 3), 40 * k + i, np.uint8) + rng.integers(
        0, 2, (size, size, 3), dtype=np.uint8
      )
      ext = ("png", "jpg", "jpeg")[i % 3]
      PIL.Image.fromarray(pixels).save(folder / f"{i:03d}.{ext}")
  return root


def test_image_folder_layout_order_and_cache(tmp_path):
  root = _write_folder(tmp_path / "data")
  cache = tmp_path / "cache"
  source = sources.load_image_folder(root, "train", cache_dir=cache)
  assert source.class_names == ("ant", "bee", "cat")
  np.testing.assert_array_equal(source.labels, [0, 0, 0, 1, 1, 1, 2, 2, 2])
  assert source.image_shape == (6, 6, 3)
  # PNGs are lossless: "ant" is written with class index 1 -> value 40 + i (+0/1 noise).
  assert abs(int(source.images[0].mean()) - 40) <= 1
  assert len(list(cache.glob("*.npz"))) == 1
  again = sources.load_image_folder(root, "train", cache_dir=cache)
  np.testing.assert_array_equal(again.images, source.images)
  assert again.class_names == source.class_names and type(again.class_names[0]) is str
  ordered = sources.load_image_folder(
    root, "train", class_names=["cat", "bee", "ant"], image_size=4, cache_dir=None
  )
  assert ordered.image_shape == (4, 4, 3)
  np.testing.assert_array_equal(ordered.labels, [0, 0, 0, 1, 1, 1, 2, 2, 2])


def test_image_folder_cache_is_invalidated_by_a_new_file(tmp_path):
  root = _write_folder(tmp_path / "data")
  cache = tmp_path / "cache"
  assert len(sources.load_image_folder(root, "train", cache_dir=cache)) == 9
  PIL.Image.new("RGB", (6, 6)).save(root / "train" / "bee" / "new.png")
  assert len(sources.load_image_folder(root, "train", cache_dir=cache)) == 10


def test_image_folder_from_zip_with_top_folder(tmp_path):
  root = _write_folder(tmp_path / "mydata")
  archive = tmp_path / "mydata.zip"
  with zipfile.ZipFile(archive, "w") as z:
    for path in sorted(root.rglob("*")):
      z.write(path, pathlib.Path("mydata") / path.relative_to(root))
  from_dir = sources.load_image_folder(root, "train", cache_dir=None)
  from_zip = sources.load_image_folder(archive, "train", cache_dir=None)
  np.testing.assert_array_equal(from_zip.images, from_dir.images)
  np.testing.assert_array_equal(from_zip.labels, from_dir.labels)
  assert from_zip.class_names == from_dir.class_names


def test_image_folder_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="nowhere"):
    sources.load_image_folder(tmp_path / "nowhere", "train", cache_dir=None)
  root = _write_folder(tmp_path / "data")
  with pytest.raises(FileNotFoundError, match=r"No split folder .*test"):
    sources.load_image_folder(root, "test", cache_dir=None)
  (root / "empty_split").mkdir()
  with pytest.raises(ValueError, match="has no class folders"):
    sources.load_image_folder(root, "empty_split", cache_dir=None)
  (root / "train" / "dog").mkdir()
  (root / "train" / "dog" / "notes.txt").write_text("not an image")
  with pytest.raises(ValueError, match=r"Class folder .*dog holds no images"):
    sources.load_image_folder(root, "train", cache_dir=None)
  (root / "train" / "dog" / "bad.jpg").write_bytes(b"definitely not a jpeg")
  with pytest.raises(ValueError, match=r"Image .*dog/bad.jpg is not an image"):
    sources.load_image_folder(root, "train", cache_dir=None)
  with pytest.raises(ValueError, match=r"no folder for classes \['zebra'\]"):
    sources.load_image_folder(root, "train", class_names=["ant", "zebra"], cache_dir=None)


def test_image_folder_mixed_sizes_need_image_size(tmp_path):
  root = _write_folder(tmp_path / "data")
  PIL.Image.new("RGB", (9, 7)).save(root / "train" / "ant" / "odd.png")
  with pytest.raises(ValueError, match=r"set image_size \(config.data.image_size\)"):
    sources.load_image_folder(root, "train", cache_dir=None)
  assert sources.load_image_folder(root, "train", image_size=5, cache_dir=None).image_shape == (
    5,
    5,
    3,
  )


def test_unknown_dataset_lists_known_names():
  with pytest.raises(
    ValueError, match=r"Unknown data set 'mnist'; known: digits, image_folder, cifar10"
  ):
    datasets.get("mnist")


def test_imagenet100_class_list_is_shipped():
  classes = sources.imagenet100_classes()
  assert len(classes) == len(set(classes)) == 100
  assert list(classes) == sorted(classes) and classes[0].startswith("n0")


@pytest.mark.skipif(
  not _CIFAR_ZIP.exists(), reason=f"offline CIFAR-10 copy not found at {_CIFAR_ZIP}"
)
def test_offline_cifar10_zip_layout_and_a_few_images():
  with zipfile.ZipFile(_CIFAR_ZIP) as z:
    names = [n for n in z.namelist() if n.endswith(".jpg")]
    assert len(names) == 60_000
    classes = sorted({n.split("/")[2] for n in names})
    assert classes == [
      "airplane",
      "automobile",
      "bird",
      "cat",
      "deer",
      "dog",
      "frog",
      "horse",
      "ship",
      "truck",
    ]
    for name in names[:: len(names) // 5][:5]:
      image = sources._decode(z.read(name), 3, None)  # pylint: disable=protected-access
      assert image.shape == (32, 32, 3) and image.dtype == np.uint8


# ------------------------------------------------------------------------------ TFDS

import tensorflow_datasets as tfds  # noqa: E402  (the [tfds] extra, which the test extra installs)


def test_tfds_cifar10_in_memory(tmp_path):
  with tfds.testing.mock_data(num_examples=7):
    source = sources.load_tfds("cifar10", "train", data_dir=str(tmp_path))
  assert isinstance(source, sources.ArraySource)
  assert source.images.shape == (7, 32, 32, 3) and source.images.dtype == np.uint8
  assert source.labels.dtype == np.int32 and source.num_classes == 10


def test_tfds_stl10_unlabelled_split(tmp_path):
  with tfds.testing.mock_data(num_examples=5):
    source = sources.load_tfds("stl10", "unlabelled", data_dir=str(tmp_path))
  assert source.images.shape == (5, 96, 96, 3)


def test_tfds_imagenet_random_access(tmp_path):
  with tfds.testing.mock_data(num_examples=6):
    source = sources.load_tfds("imagenet_lt", "train", image_size=16, cache_dir=tmp_path)
    assert isinstance(source, sources.RandomAccessSource)
    assert len(source) == 6 and source.num_classes == 1000
    images = source.get_images(np.asarray([4, 0, 4]))
    assert images.shape == (3, 16, 16, 3) and images.dtype == np.uint8
    np.testing.assert_array_equal(images[0], images[2])
    assert len(list(tmp_path.glob("labels-*.npy"))) == 1


def test_tfds_imagenet100_keeps_and_remaps_listed_classes(tmp_path):
  with tfds.testing.mock_data(num_examples=40):
    everything = sources.load_tfds("imagenet2012", "train", image_size=8, cache_dir=None)
    keep = [everything.class_names[i] for i in np.unique(everything.labels)[:3]]
    subset = sources.load_tfds("imagenet100", "train", classes=keep, image_size=8, cache_dir=None)
  assert subset.class_names == tuple(sorted(keep))
  assert len(subset) == np.isin(everything.labels, np.unique(everything.labels)[:3]).sum()
  assert set(subset.labels) <= {0, 1, 2}


def test_tfds_in_memory_set_resized_by_image_size(tmp_path):
  import ml_collections  # pylint: disable=g-import-not-at-top

  from selmix_jax.data import pipeline  # pylint: disable=g-import-not-at-top

  config = ml_collections.ConfigDict(
    dict(name="stl10", image_size=32, labeled_max=2, labeled_imbalance=2.0, val_per_class=1,
         unlabeled_max=0, data_dir=str(tmp_path))
  )  # fmt: skip
  with tfds.testing.mock_data(num_examples=200):
    data = pipeline.build(config)
  assert data.image_shape == (32, 32, 3)
  source = sources.ArraySource(np.full((2, 96, 96, 3), 200, np.uint8), np.zeros(2), ("a",))
  small = sources.resized(source, 32)
  assert small.images.shape == (2, 32, 32, 3) and (small.images == 200).all()
