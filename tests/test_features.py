"""Features as a data source (`data.name='features'`), the 'linear' model, and bad feature files."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from selmix_jax import data
from selmix_jax import errors
from selmix_jax import models
from selmix_jax import train
from selmix_jax.configs import features as features_config
from selmix_jax.data import features
from selmix_jax.data import splits

K, D = 4, 6


def _arrays(seed=0, val=True):
  """A small long-tailed Gaussian mixture: train 40/20/10/5 per class, val 6, test 8."""
  rng = np.random.default_rng(seed)
  means = 2.0 * rng.normal(size=(K, D))

  def draw(counts):
    y = np.repeat(np.arange(K), counts)
    return (means[y] + rng.normal(size=(len(y), D))).astype(np.float32), y.astype(np.int64)

  out = {}
  for split, counts in (("train", [40, 20, 10, 5]), ("val", [6] * K), ("test", [8] * K)):
    if split == "val" and not val:
      continue
    out[f"{split}_features"], out[f"{split}_labels"] = draw(counts)
  return out


def _data_config(path, **fields):
  config = features_config.get_config().data
  config.path = str(path)
  config.update(fields)
  return config


def test_npz_and_npy_folder_load_the_same(tmp_path):
  arrays = _arrays()
  features.save(str(tmp_path / "f.npz"), class_names=["a", "b", "c", "d"], **arrays)
  folder = tmp_path / "npy"
  folder.mkdir()
  for key, value in arrays.items():
    np.save(folder / f"{key}.npy", value)
  (folder / "class_names.txt").write_text("a\nb\nc\nd\n")
  for path in (tmp_path / "f.npz", folder):
    ds = data.build(_data_config(path))
    assert ds.class_names == ("a", "b", "c", "d")
    assert ds.image_shape == (D,)
    np.testing.assert_array_equal(ds.labeled_class_counts, [40, 20, 10, 5])
    assert len(ds.val) == 6 * K and len(ds.test) == 8 * K  # The file's val, all of it.
    batch = next(iter(data.pipeline.eval_batches(ds.test.source, ds.test.indices, 8,
                                                 num_devices=1)))
    assert batch["images"].dtype == np.float32
    np.testing.assert_array_equal(batch["images"][0], arrays["test_features"][:8])


def test_no_val_split_holds_out_a_balanced_validation_set(tmp_path):
  features.save(str(tmp_path / "f.npz"), **_arrays(val=False))
  ds = data.build(_data_config(tmp_path / "f.npz", val_per_class=2, labeled_max=20,
                               labeled_imbalance=8.0))
  np.testing.assert_array_equal(ds.val.class_counts(K), [2] * K)
  assert ds.class_names == tuple(f"class_{k}" for k in range(K))
  # Long-tail options apply: N1 = 20, rho = 8 -> 20 ... 2 (`splits.labeled_counts`).
  np.testing.assert_array_equal(
      ds.labeled_class_counts, splits.labeled_counts(20, 8.0, K)
  )
  assert ds.labeled_class_counts[-1] < ds.labeled_class_counts[0]
  assert not set(ds.val.indices) & set(ds.labeled.indices)


def test_linear_model_features_are_the_input():
  model = models.get("linear", num_classes=K)
  x = jnp.arange(2 * D, dtype=jnp.float32).reshape(2, D)
  variables = model.init(jax.random.key(0), x, train=False)
  assert set(variables["params"]) == {"head"}
  np.testing.assert_array_equal(model.apply(variables, x, train=False, method="features"), x)
  head = variables["params"]["head"]
  np.testing.assert_allclose(
      model.apply(variables, x, train=False), x @ head["kernel"] + head["bias"], rtol=1e-6
  )


def test_features_run_end_to_end(tmp_path):
  features.save(str(tmp_path / "f.npz"), **_arrays())
  config = features_config.get_config()
  config.data.path = str(tmp_path / "f.npz")
  config.eval_batch_size = 32
  config.pretrain.num_steps = 20
  config.pretrain.batch_size = 16
  config.selmix.num_steps = 6
  config.selmix.batch_size = 16
  config.selmix.refresh_every = 3
  result = train.train_and_evaluate(config, str(tmp_path / "run"))
  summary = json.load(open(tmp_path / "run" / "selmix" / "summary.json"))
  assert summary["method"] == "SelMix (min_recall)" and summary["steps"] == 6
  assert np.isfinite(result["after"]["test"]["mean_recall"])
  # The pre-trained linear head separates this mixture well above chance (1/K).
  assert result["before"]["test"]["mean_recall"] > 0.6
  assert os.path.exists(tmp_path / "run" / "selmix" / "recalls.png")


def test_features_config_refuses_augmentation(tmp_path):
  features.save(str(tmp_path / "f.npz"), **_arrays())
  config = features_config.get_config()
  config.data.path = str(tmp_path / "f.npz")
  config.data.train_augment = "pad_crop"
  with pytest.raises(train.ConfigError, match="train_augment='pad_crop'.*'none'"):
    train.validate(config)


def test_missing_path_is_a_config_error(tmp_path):
  config = features_config.get_config()
  config.data.path = str(tmp_path / "nothing.npz")
  with pytest.raises(train.ConfigPathError, match="nothing.npz"):
    train.validate(config)


def _bad(arrays, case):
  if case == "missing_key":
    del arrays["test_labels"]
    return "test_labels", "no key 'test_labels'"
  if case == "features_not_2d":
    arrays["train_features"] = arrays["train_features"][:, :, None]
    return "train_features", "must be \\[N, D\\]"
  if case == "mismatched_n":
    arrays["val_labels"] = arrays["val_labels"][:-1]
    return "val_labels", "23 labels, but .*val_features.* has 24 rows"
  if case == "mismatched_d":
    arrays["test_features"] = arrays["test_features"][:, :-1]
    return "test_features", "D = 5, but .*train_features.* has D = 6"
  if case == "nan_features":
    arrays["val_features"][3, 2] = np.nan
    return "val_features", "1 row\\(s\\) hold NaN or inf \\(first: row 3\\)"
  if case == "inf_features":
    arrays["train_features"][7, 0] = np.inf
    return "train_features", "NaN or inf \\(first: row 7\\)"
  if case == "float_labels":
    arrays["train_labels"] = arrays["train_labels"] + 0.5
    return "train_labels", "must be integers"
  if case == "label_out_of_range":
    arrays["test_labels"][0] = K
    return "test_labels", f"label {K} is out of range for {K} classes"
  if case == "negative_label":
    arrays["val_labels"][0] = -1
    return "val_labels", "label -1 is negative"
  if case == "class_absent_from_train":
    keep = arrays["train_labels"] != 2
    arrays["train_features"] = arrays["train_features"][keep]
    arrays["train_labels"] = arrays["train_labels"][keep]
    return "train_labels", "class 'class_2' \\(id 2\\) has no training example"
  raise AssertionError(case)


@pytest.mark.parametrize("case", [
    "missing_key", "features_not_2d", "mismatched_n", "mismatched_d", "nan_features",
    "inf_features", "float_labels", "label_out_of_range", "negative_label",
    "class_absent_from_train",
])
def test_bad_feature_file_fails_with_one_line_naming_file_and_key(tmp_path, case):
  arrays = _arrays()
  key, message = _bad(arrays, case)
  path = tmp_path / f"{case}.npz"
  features.save(str(path), **arrays)
  with pytest.raises(ValueError, match=message) as info:
    data.build(_data_config(path))
  text = str(info.value)
  assert isinstance(info.value, errors.DataError)  # One line on the command line, exit 2.
  assert "\n" not in text
  assert str(path) in text and key in text


def test_bad_npy_folder_names_the_file(tmp_path):
  arrays = _arrays()
  arrays["test_features"][0, 0] = np.nan
  for k, v in arrays.items():
    np.save(tmp_path / f"{k}.npy", v)
  with pytest.raises(ValueError, match="test_features.npy: 1 row"):
    data.build(_data_config(tmp_path))


def test_train_backbone_false_leaves_backbone_and_batchnorm_bit_identical(tmp_path):
  from selmix_jax import checkpointing  # pylint: disable=g-import-not-at-top
  from selmix_jax.configs import default  # pylint: disable=g-import-not-at-top

  config = default.get_config("tiny")
  config.selmix.train_backbone = False
  config.selmix.use_ema = False
  config.selmix.learning_rate = 0.1  # Large steps: a leak into the backbone could not hide.
  train.train_and_evaluate(config, str(tmp_path))
  before, _ = checkpointing.load_pretrained(str(tmp_path / "pretrain" / "checkpoints"))
  after, _ = checkpointing.load_pretrained(str(tmp_path / "selmix" / "checkpoints"))
  before, after = before["state"], after["state"]
  flat = lambda tree: {jax.tree_util.keystr(p): np.asarray(v)  # noqa: E731
                       for p, v in jax.tree_util.tree_leaves_with_path(tree)}
  pre_backbone = flat(before["params"]["backbone"])
  post_backbone = flat(after["params"]["backbone"])
  assert pre_backbone.keys() == post_backbone.keys() and len(pre_backbone) > 5
  for name, value in pre_backbone.items():
    np.testing.assert_array_equal(post_backbone[name], value, err_msg=name)
  pre_stats, post_stats = flat(before["batch_stats"]), flat(after["batch_stats"])
  assert pre_stats.keys() == post_stats.keys() and len(pre_stats) >= 6
  for name, value in pre_stats.items():
    np.testing.assert_array_equal(post_stats[name], value, err_msg=name)
  # The head did train.
  assert not np.array_equal(after["params"]["head"]["kernel"], before["params"]["head"]["kernel"])


def test_frozen_backbone_without_augmentation_trains_the_head_on_cached_features(tmp_path):
  from selmix_jax import checkpointing  # pylint: disable=g-import-not-at-top
  from selmix_jax.configs import default  # pylint: disable=g-import-not-at-top

  config = default.get_config("tiny")
  config.data.train_augment = "none"
  config.selmix.train_backbone = False
  config.selmix.use_ema = False
  config.selmix.learning_rate = 0.1
  result = train.train_and_evaluate(config, str(tmp_path))
  ds = data.build(config.data)
  cached = np.load(tmp_path / "selmix" / "features" / "features.npz")
  # The labeled split's features, D = 2 * width 8, labels in order.
  assert cached["train_features"].shape == (len(ds.labeled), 16)
  np.testing.assert_array_equal(cached["train_labels"], ds.labeled.labels)
  assert tuple(cached["class_names"]) == tuple(str(d) for d in range(10))
  before, _ = checkpointing.load_pretrained(str(tmp_path / "pretrain" / "checkpoints"))
  after, _ = checkpointing.load_pretrained(result["full_model_checkpoint"])
  before, after = before["state"], after["state"]
  for part in ("params", "batch_stats"):
    pre, post = before[part], after[part]
    if part == "params":
      pre, post = pre["backbone"], post["backbone"]
    pairs = zip(jax.tree_util.tree_leaves(pre), jax.tree_util.tree_leaves(post))
    for a, b in pairs:
      np.testing.assert_array_equal(a, b)
  assert not np.array_equal(after["params"]["head"]["kernel"], before["params"]["head"]["kernel"])
  # The full model on the test images scores what the head did on their cached features.
  model = models.from_config(config.model, 10)
  from selmix_jax import frozen  # pylint: disable=g-import-not-at-top
  feats = frozen.split_features(model, {k: after[k] for k in ("params", "batch_stats")}, ds.test,
                                batch_size=64, mean=ds.mean, std=ds.std)
  np.testing.assert_allclose(feats, np.load(tmp_path / "selmix" / "features" /
                                            "features.npz")["test_features"], rtol=1e-5, atol=1e-6)
  preds = np.argmax(feats @ after["params"]["head"]["kernel"] + after["params"]["head"]["bias"], 1)
  labels = ds.test.labels
  recalls = [np.mean(preds[labels == k] == k) for k in range(10)]
  np.testing.assert_allclose(np.mean(recalls), result["after"]["test"]["mean_recall"], atol=1e-6)
