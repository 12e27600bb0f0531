"""Tests of batching and `build(config)`."""

import jax
import ml_collections
import numpy as np
import pytest

from selmix_jax.data import pipeline, sources, splits


def _source(n=37, k=4, h=4):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (n, h, h, 3), dtype=np.uint8)
  return sources.ArraySource(images, (np.arange(n) % k).astype(np.int32), tuple("abcd"[:k]))


def test_fake_devices_are_present():
  assert jax.local_device_count() > 1


@pytest.mark.parametrize("num_devices", [1, 2, 4])
@pytest.mark.parametrize("batch_size", [4, 8, 12, 64])
def test_eval_pass_covers_each_example_once(num_devices, batch_size):
  source = _source()
  indices = np.random.default_rng(1).permutation(37)[:29]
  seen, counts = [], np.zeros(4, np.int64)
  for batch in pipeline.eval_batches(source, indices, batch_size, num_devices=num_devices):
    assert batch["images"].shape == (num_devices, batch_size // num_devices, 4, 4, 3)
    assert batch["images"].dtype == np.uint8 and batch["labels"].dtype == np.int32
    mask, index = batch["mask"].ravel(), batch["index"].ravel()
    assert (index[~mask] == -1).all() and (
      batch["images"].reshape(batch_size, -1)[~mask] == 0
    ).all()
    seen += list(index[mask])
    np.add.at(counts, batch["labels"].ravel()[mask], 1)
    np.testing.assert_array_equal(
      batch["images"].reshape((-1, 4, 4, 3))[mask], source.images[index[mask]]
    )
  assert sorted(seen) == sorted(indices)
  np.testing.assert_array_equal(counts, np.bincount(source.labels[indices], minlength=4))


def test_eval_batches_multi_process_shares_partition_the_batch():
  source = _source()
  indices = np.arange(37)
  shares = [
    list(pipeline.eval_batches(source, indices, 8, num_devices=2, process_index=p, process_count=2))
    for p in range(2)
  ]
  seen = np.concatenate([b["index"][b["mask"]] for share in shares for b in share])
  np.testing.assert_array_equal(np.sort(seen), indices)
  assert shares[0][0]["images"].shape == (2, 2, 4, 4, 3)


def test_batch_size_must_divide_devices():
  with pytest.raises(
    ValueError,
    match=r"Global batch size 6 must be a positive multiple .* \(4 local x 1 processes = 4\)",
  ):
    next(pipeline.eval_batches(_source(), np.arange(10), 6, num_devices=4))
  with pytest.raises(ValueError, match="multiple of the number of devices"):
    pipeline.train_batch(_source(), np.arange(6), num_devices=4)


def test_train_batch_and_uniform_indices():
  source = _source()
  idx = pipeline.uniform_indices(37, 8, seed=3, step=5)
  np.testing.assert_array_equal(idx, pipeline.uniform_indices(37, 8, seed=3, step=5))
  assert not np.array_equal(idx, pipeline.uniform_indices(37, 8, seed=3, step=6))
  batch = pipeline.train_batch(source, idx, num_devices=4)
  assert batch["mask"].all() and batch["labels"].shape == (4, 2)
  np.testing.assert_array_equal(batch["index"].ravel(), idx)
  np.testing.assert_array_equal(batch["images"].reshape(8, 4, 4, 3), source.images[idx])


def test_process_slice():
  np.testing.assert_array_equal(pipeline.process_slice(np.arange(8), 1, 4), [2, 3])
  with pytest.raises(ValueError, match="not divisible"):
    pipeline.process_slice(np.arange(7), 0, 2)


def _digits_config(**overrides):
  config = ml_collections.ConfigDict(
    dict(
      name="digits",
      labeled_max=40,
      labeled_imbalance=10.0,
      unlabeled_max=50,
      unlabeled_imbalance=10.0,
      val_per_class=30,
      seed=0,
    )
  )
  config.update(overrides)
  return config


def test_build_digits_semi_supervised():
  data = pipeline.build(_digits_config())
  assert data.num_classes == 10 and data.class_names == tuple("0123456789")
  assert data.image_shape == (8, 8, 1) and data.mean.shape == data.std.shape == (1,)
  np.testing.assert_array_equal(data.labeled_class_counts, splits.labeled_counts(40, 10, 10))
  np.testing.assert_array_equal(
    data.unlabeled.class_counts(10), splits.unlabeled_counts(50, 10, 10)
  )
  np.testing.assert_array_equal(data.val.class_counts(10), [30] * 10)
  pools = [data.labeled.indices, data.unlabeled.indices, data.val.indices]
  assert len(np.unique(np.concatenate(pools))) == sum(map(len, pools))
  assert len(data.test) == 1797 - len(data.labeled.source)
  again = pipeline.build(_digits_config())
  np.testing.assert_array_equal(again.labeled.indices, data.labeled.indices)


def test_build_digits_supervised_flipped_validation_and_all_remaining():
  data = pipeline.build(_digits_config(unlabeled_max=0, labeled_max=None, val_flip=True))
  assert data.unlabeled is None
  train = data.labeled.source
  np.testing.assert_array_equal(data.labeled_class_counts, np.bincount(train.labels) - 30)
  assert len(data.val) == 600
  np.testing.assert_array_equal(data.val.class_counts(10), [60] * 10)
  images = data.val.source.get_images(np.asarray([0, 300]))
  np.testing.assert_array_equal(images[1], images[0][:, ::-1])


def test_build_rejects_unknown_fields_and_too_many_examples():
  with pytest.raises(KeyError, match="labelled_max"):
    pipeline.build(_digits_config(labelled_max=3))
  with pytest.raises(ValueError, match=r"class '0' \(id 0\) of the training split .* fewer"):
    pipeline.build(_digits_config(labeled_max=1000))
  with pytest.raises(ValueError, match="Unknown data set"):
    pipeline.build(_digits_config(name="mnist"))


def test_build_image_folder_with_unlabeled_split(tmp_path):
  import PIL.Image  # pylint: disable=g-import-not-at-top

  for split, per_class in (("train", 12), ("test", 2), ("extra", 5)):
    for name in ("a", "b"):
      folder = tmp_path / split / name
      folder.mkdir(parents=True)
      for i in range(per_class):
        PIL.Image.new("RGB", (4, 4), (i, 0, 0)).save(folder / f"{i}.png")
  config = ml_collections.ConfigDict(
    dict(
      name="image_folder",
      root=str(tmp_path),
      labeled_max=8,
      labeled_imbalance=2.0,
      unlabeled_split="extra",
      unlabeled_max=-1,
      val_per_class=2,
      cache_dir="",
    )
  )
  data = pipeline.build(config)
  np.testing.assert_array_equal(data.labeled_class_counts, [8, 4])
  assert len(data.unlabeled) == 10 and len(data.test) == 4 and len(data.val) == 4


def test_names_and_package_entry_point():
  from selmix_jax import data  # pylint: disable=g-import-not-at-top

  assert data.build is pipeline.build
  assert {"digits", "cifar10", "cifar100", "stl10", "imagenet100", "imagenet_lt"} <= set(
    data.names()
  )


def test_build_labeled_max_minus_one_means_all():
  data = pipeline.build(_digits_config(labeled_max=-1, unlabeled_max=0))
  np.testing.assert_array_equal(
    data.labeled_class_counts, np.bincount(data.labeled.source.labels) - 30
  )


def test_build_stl10_takes_the_unlabelled_split_by_default(tmp_path):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  (the [tfds] extra)
  config = ml_collections.ConfigDict(
    dict(
      name="stl10",
      labeled_max=5,
      labeled_imbalance=5.0,
      unlabeled_max=-1,
      val_per_class=2,
      data_dir=str(tmp_path),
    )
  )
  with tfds.testing.mock_data(num_examples=150):
    data = pipeline.build(config)
  assert data.image_shape == (96, 96, 3)
  np.testing.assert_array_equal(data.labeled_class_counts, splits.labeled_counts(5, 5.0, 10))
  assert data.unlabeled.source is not data.labeled.source and len(data.unlabeled) == 150
  np.testing.assert_array_equal(data.val.class_counts(10), [2] * 10)


def test_a_registered_data_set_is_built_from_its_one_entry(registries):
  del registries  # Its registrations are undone after the test.
  from selmix_jax.data import datasets  # pylint: disable=g-import-not-at-top

  def load(config, split):
    rng = np.random.default_rng(0 if split == "train" else 1)
    n = 60 if split == "train" else 12
    images = rng.integers(0, 256, (n, 4, 4, 3), dtype=np.uint8)
    return sources.ArraySource(images, np.arange(n) % 3, ("x", "y", "z"))

  datasets.register(
    datasets.DatasetSpec("test_blobs", load, mean=(0.5,) * 3, std=(0.25,) * 3, test_split="val"),
    overwrite=True,
  )
  data = pipeline.build(
    ml_collections.ConfigDict(dict(name="test_blobs", labeled_max=8, val_per_class=4))
  )
  assert "test_blobs" in pipeline.names()
  assert data.class_names == ("x", "y", "z") and len(data.test) == 12
  np.testing.assert_array_equal(data.labeled_class_counts, splits.labeled_counts(8, 10.0, 3))
  np.testing.assert_allclose(data.mean, [0.5] * 3)
  with pytest.raises(ValueError, match="already registered"):
    datasets.register(datasets.DatasetSpec("test_blobs", load))


def test_validation_drawn_from_the_test_split_is_left_out_of_the_test_set():
  data = pipeline.build(
    _digits_config(unlabeled_max=0, val_split="test", val_per_class=5, labeled_max=20)
  )
  test_source = data.test.source
  assert data.val.source is test_source
  assert not set(data.val.indices) & set(data.test.indices)
  assert len(data.val) + len(data.test) == len(test_source)
  np.testing.assert_array_equal(data.val.class_counts(10), [5] * 10)


# The image-folder class-mismatch cases (a test split lacking a class, or with one the training
# split lacks) live in test_bad_inputs.py, the catalogue that benchmarks/README.md lists.


def test_a_loader_whose_splits_disagree_on_the_classes_is_refused(registries):
  del registries  # Its registrations are undone after the test.
  from selmix_jax.data import datasets  # pylint: disable=g-import-not-at-top

  def load(config, split):
    del config
    names = ("x", "y", "z") if split == "train" else ("x", "z")
    n = 60 if split == "train" else 10
    images = np.zeros((n, 4, 4, 3), np.uint8)
    return sources.ArraySource(images, np.arange(n) % len(names), names)

  datasets.register(datasets.DatasetSpec("test_mismatch", load), overwrite=True)
  with pytest.raises(ValueError, match=r"test_split='test' of test_mismatch has classes"):
    pipeline.build(ml_collections.ConfigDict(dict(name="test_mismatch", labeled_max=8)))
