"""`head.fit`: SelMix on a linear head over fixed features, as a library call."""

import numpy as np
import pytest

from selmix_jax import head

K, D = 5, 8


def _mixture(counts, seed):
  rng = np.random.default_rng(0)  # The same class means for every split.
  means = 2.0 * rng.normal(size=(K, D))
  rng = np.random.default_rng(seed)
  y = np.repeat(np.arange(K), counts)
  return (means[y] + rng.normal(size=(len(y), D))).astype(np.float32), y


def _recalls(params, x, y):
  preds = np.argmax(x @ params["kernel"] + params["bias"], axis=1)
  return np.array([np.mean(preds[y == k] == k) for k in range(K)])


def test_fit_moves_min_recall_up_on_a_long_tailed_toy():
  x, y = _mixture([200, 100, 40, 15, 6], seed=1)
  val_x, val_y = _mixture([50] * K, seed=2)
  test_x, test_y = _mixture([200] * K, seed=3)
  result = head.fit(x, y, val_x, val_y, objective="min_recall", pretrain_steps=200,
                    num_steps=200, refresh_every=20, batch_size=64, learning_rate=0.05,
                    logit_adjust_tau=0.0)  # Plain CE: a head biased to the head classes.
  before = _recalls(result.pretrained_params, test_x, test_y)
  after = _recalls(result.params, test_x, test_y)
  # Validation (what SelMix optimises) and an independent test set, against a numpy oracle.
  assert result.final["val_min_recall"] > result.history["val_min_recall"][0] + 0.2
  assert after.min() > before.min() + 0.2
  np.testing.assert_allclose(result.final["val_min_recall"],
                             _recalls(result.params, val_x, val_y).min(), atol=1e-6)
  # History: one row per refresh, P concentrates (fewer effective pairs than the K² = 25).
  np.testing.assert_array_equal(result.history["step"], np.arange(0, 200, 20))
  assert np.all(result.history["effective_pairs"] < K * K)
  assert np.all(result.history["max_gain"] > 0)


def test_fit_from_init_params_and_controls():
  x, y = _mixture([60, 30, 10, 5, 3], seed=1)
  val_x, val_y = _mixture([10] * K, seed=2)
  init = {"kernel": np.zeros((D, K), np.float32), "bias": np.zeros(K, np.float32)}
  for pairs in ("uniform", "instance"):
    result = head.fit(x, y, val_x, val_y, init_params=init, pairs=pairs, num_steps=10,
                      refresh_every=5, batch_size=16)
    np.testing.assert_array_equal(result.pretrained_params["kernel"], init["kernel"])
    assert np.isnan(result.history["max_gain"]).all()
    assert not np.array_equal(result.params["kernel"], init["kernel"])


@pytest.mark.parametrize("change, message", [
    (lambda a: a.update(x=a["x"][:, :, None]), "features must be real \\[N, D\\]"),
    (lambda a: a.update(y=a["y"] + 0.5), "train_labels must be integers"),
    (lambda a: a["x"].__setitem__((0, 0), np.nan), "NaN or inf in 1 row"),
    (lambda a: a.update(val_x=a["val_x"][:, :3]), "val_features has D = 3"),
    (lambda a: a.update(val_y=a["val_y"] + K), "val_labels must lie in \\[0, 5\\)"),
    (lambda a: a.update(y=np.where(a["y"] == 2, 1, a["y"])), "class 2 has no training example"),
])
def test_fit_rejects_bad_inputs_before_compute(change, message):
  x, y = _mixture([6, 5, 4, 3, 2], seed=1)
  val_x, val_y = _mixture([2] * K, seed=2)
  arrays = {"x": x, "y": y, "val_x": val_x, "val_y": val_y}
  change(arrays)
  with pytest.raises(ValueError, match=message):
    head.fit(arrays["x"], arrays["y"], arrays["val_x"], arrays["val_y"], num_steps=1)


def test_readme_frozen_features_example_runs():
  import os  # pylint: disable=g-import-not-at-top
  import re  # pylint: disable=g-import-not-at-top

  readme = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                             "README.md"), encoding="utf-8").read()
  start = readme.index("## Frozen features (any encoder)")
  section = readme[start : readme.index("\n## ", start)]
  blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
  assert len(blocks) == 1
  namespace = {}
  exec(compile(blocks[0], "README.md", "exec"), namespace)  # pylint: disable=exec-used
  result = namespace["result"]
  assert result.params["kernel"].shape == (32, 10)
  assert namespace["logits"].shape == (300, 10)
  # What the example shows: SelMix raises the validation min recall of the CE-trained head.
  assert result.final["val_target"] > result.history["val_target"][0] + 0.1  # 0.50 -> 0.83
