"""Streaming input (`loader.Feed`): the same batches as the synchronous path, in order, with
worker processes or without, never past the end of its steps; evaluation through it."""

import io
import pickle

import jax
import numpy as np
import PIL.Image
import pytest

from selmix_jax import evaluation, models, pairs, train_state
from selmix_jax.data import augment, loader, pipeline, sources

LAYOUT = pipeline.Layout(num_devices=4)


def _array_split(n=40, k=4, side=6):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (n, side, side, 3), dtype=np.uint8)
  source = sources.ArraySource(images, (np.arange(n) % k).astype(np.int32), tuple("abcd"[:k]))
  return pipeline.Split(source, np.arange(3, n))


def _jpeg_split(n=30, k=3, side=12):
  """A decode-on-access source over JPEG records of random content and sizes."""
  rng = np.random.default_rng(1)
  records = []
  for _ in range(n):
    h, w = rng.integers(side, 2 * side, 2)
    data = io.BytesIO()
    PIL.Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(data, "JPEG")
    records.append({"image": data.getvalue()})
  labels = (np.arange(n) % k).astype(np.int32)
  source = sources.RandomAccessSource(
    records, np.arange(n), labels, tuple("xyz"[:k]), image_size=side, num_threads=3
  )
  return pipeline.Split(source, np.arange(n))


def _assert_batches_equal(streamed, expected):
  assert streamed.keys() == expected.keys()
  for name, value in expected.items():
    np.testing.assert_array_equal(np.asarray(streamed[name]), value, err_msg=name)


def test_feed_yields_the_synchronous_batches_in_order_on_the_devices():
  assert jax.local_device_count() == 4
  batches = pipeline.UniformBatches(_array_split(), 8, seed=3, layout=LAYOUT)
  with loader.Feed(batches, 5, 12, options=loader.Options(prefetch=3), decodes=False) as feed:
    assert feed.num_workers == 0
    for step in range(5, 12):
      batch = feed.next(step)
      _assert_batches_equal(batch, batches(step))
      assert batch["images"].sharding == train_state.local_sharding()
      assert batch["images"].shape == (4, 2, 6, 6, 3)
    with pytest.raises(ValueError, match="ends before step 12"):
      feed.next(12)


def test_feed_refuses_a_step_out_of_order():
  batches = pipeline.UniformBatches(_array_split(), 4, seed=0, layout=LAYOUT)
  with loader.Feed(batches, 0, 3, decodes=False) as feed, pytest.raises(ValueError, match="not 1"):
    feed.next(1)


class _Recording:
  def __init__(self, batches):
    self.batches, self.steps = batches, []

  def __call__(self, step):
    self.steps.append(step)
    return self.batches(step)


def test_feed_loads_nothing_beyond_its_last_step():
  load = _Recording(pipeline.UniformBatches(_array_split(), 4, seed=0, layout=LAYOUT))
  with loader.Feed(load, 10, 14, options=loader.Options(prefetch=4), decodes=False) as feed:
    feed.next(10)
  assert set(load.steps) <= set(range(10, 14))
  load.steps.clear()
  with loader.Feed(load, 10, 14, options=loader.Options(prefetch=4), decodes=False) as feed:
    assert len(list(feed)) == 4
  assert load.steps == [10, 11, 12, 13]


def test_pair_batches_hold_the_strategy_draws():
  split = _array_split()
  strategy = pairs.get("gain")(split.labels, split.labels, num_classes=4).refreshed(
    np.eye(4) / 4.0, split.labels
  )
  batches = pipeline.PairBatches(split, split, strategy, 8, seed=1, layout=LAYOUT)
  idx1, idx2 = strategy.sample(8, seed=1, step=7)
  batch = batches(7)
  np.testing.assert_array_equal(batch["index1"].ravel(), split.indices[idx1])
  np.testing.assert_array_equal(batch["index2"].ravel(), split.indices[idx2])
  np.testing.assert_array_equal(batch["labels1"].ravel(), split.labels[idx1])
  np.testing.assert_array_equal(
    batch["images2"].reshape(8, 6, 6, 3), split.source.images[split.indices[idx2]]
  )
  # The second process of two loads the second half of every batch.
  half = pipeline.PairBatches(split, split, strategy, 8, 1, pipeline.Layout(2, 1, 2))(7)
  np.testing.assert_array_equal(half["index1"].ravel(), split.indices[idx1[4:]])


def test_a_pickled_random_access_source_decodes_alike_in_its_own_thread():
  source = _jpeg_split().source
  copy = pickle.loads(pickle.dumps(source))
  assert copy._num_threads == 1 and source._num_threads == 3
  indices = np.asarray([4, 0, 29, 4])
  np.testing.assert_array_equal(copy.get_images(indices), source.get_images(indices))
  assert pipeline.decodes_on_access(source) and not pipeline.decodes_on_access(
    _array_split().source
  )
  flipped = pipeline.FlipAppendedSource(source, np.arange(3))
  assert pipeline.decodes_on_access(flipped)


def test_worker_processes_give_the_in_process_batches():
  split = _jpeg_split()
  batches = pipeline.UniformBatches(split, 8, seed=2, layout=LAYOUT)
  with loader.Feed(batches, 0, 5, options=loader.Options(num_workers=2)) as feed:
    assert feed.num_workers == 2
    streamed = [jax.tree.map(np.asarray, feed.next(step)) for step in range(5)]
  for step in range(5):
    _assert_batches_equal(streamed[step], batches(step))


def test_evaluate_streams_every_example_once_with_workers_or_without():
  split = _jpeg_split(n=29)  # 29 = 3 batches of 12, the last padded.
  model = models.get("cnn_small", num_classes=3, width=4)
  variables = model.init(jax.random.key(0), np.zeros((1, 12, 12, 3), np.float32), train=False)
  p_eval = evaluation.make_p_eval_step(
    model, num_classes=3, preprocess_fn=augment.make_preprocess("none", mean=0.5, std=0.25)
  )
  variables_repl = train_state.replicate(dict(variables))
  results = [
    evaluation.evaluate_split(
      p_eval, variables_repl, split, batch_size=12, options=loader.Options(num_workers=workers)
    )
    for workers in (0, 2)
  ]
  in_thread, in_workers = results
  assert in_thread.confusion.sum() == 29
  np.testing.assert_array_equal(in_thread.class_counts, np.bincount(split.labels, minlength=3))
  np.testing.assert_array_equal(in_thread.confusion, in_workers.confusion)
  np.testing.assert_array_equal(in_thread.preds, in_workers.preds)
  np.testing.assert_allclose(in_thread.feature_sums, in_workers.feature_sums, rtol=0, atol=0)
  # The synchronous path, one batch at a time, predicts the same for every example.
  preds = []
  for batch in pipeline.eval_batches(split.source, split.indices, 12, num_devices=4):
    out = p_eval(variables_repl, batch)
    preds.append(np.asarray(out["preds"]).ravel()[batch["mask"].ravel()])
  np.testing.assert_array_equal(np.concatenate(preds), in_thread.preds)
