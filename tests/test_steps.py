"""Tests for selmix_jax.steps: device-count invariance, frozen statistics, exact eval counts."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from selmix_jax import models, optim, steps, train_state
from selmix_jax.data import augment

K = 5
B = 8  # global batch
SHAPE = (8, 8, 1)


def _noisy_preprocess(images, keys):
  """uint8 -> float plus per-example noise, so the test also checks the key derivation."""
  noise = jax.vmap(lambda k: jax.random.normal(k, SHAPE))(keys)
  return images.astype(jnp.float32) / 255.0 + 0.1 * noise


def _strong(images, keys):
  return 1.0 - _noisy_preprocess(images, keys)


LA = jnp.log(jnp.array([0.4, 0.3, 0.15, 0.1, 0.05]))


@functools.cache
def _model():
  # Cross-device BatchNorm statistics make 1 and 4 devices numerically equivalent.
  return models.get("cnn_small", num_classes=K, width=4, bn_axis_name="batch")


def _state(tx_kind="pretrain", ema=False):
  state = _initial_state(tx_kind)
  if ema:
    state = state.replace(ema_params=state.params, ema_batch_stats=state.batch_stats)
  return state


@functools.cache
def _initial_state(tx_kind):
  model = _model()
  if tx_kind == "pretrain":
    tx = optim.make_pretrain_optimizer(learning_rate=0.1)
  else:
    params = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((1, *SHAPE)), train=False)
    )["params"]
    tx = optim.make_selmix_optimizer(params, learning_rate=optim.cosine_schedule(0.5, 10))
  return jax.jit(lambda key: train_state.create(model, key, SHAPE, tx))(jax.random.key(0))


def test_create_train_state():
  tx = optim.make_pretrain_optimizer(learning_rate=0.1)
  for ema in (False, True):
    state = jax.eval_shape(
      lambda: train_state.create(_model(), jax.random.key(0), SHAPE, tx, ema=ema)
    )
    assert isinstance(state, train_state.TrainState)
    assert state.params["head"]["kernel"].shape == (8, K)
    assert "BatchNorm_0" in state.batch_stats["backbone"]
    if ema:
      chex.assert_trees_all_equal_shapes(state.ema_params, state.params)
      chex.assert_trees_all_equal_shapes(state.ema_batch_stats, state.batch_stats)
    else:
      assert state.ema_params is None and state.ema_batch_stats is None


def _device_sharding(n):
  # The sharding pmap gives its outputs (JAX >= 0.8). Placing inputs the same way means the
  # first call's state looks like every later one's: no second trace.
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:n]), ("batch",))
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("batch"))


def _replicate(tree, n):
  return jax.device_put(
    jax.tree.map(lambda x: jnp.broadcast_to(x, (n, *x.shape)), tree), _device_sharding(n)
  )


def _shard(batch, n):
  return jax.device_put(
    jax.tree.map(lambda x: x.reshape(n, x.shape[0] // n, *x.shape[1:]), batch),
    _device_sharding(n),
  )


# Test data from NumPy: no per-op compilation of eager jax.random calls.
def _images(rng, n):
  return rng.integers(0, 256, (n, *SHAPE), dtype=np.uint8)


def _supervised_batch(seed):
  rng = np.random.default_rng(seed)
  return {
    "images": _images(rng, B),
    "labels": rng.integers(0, K, B).astype(np.int32),
    "index": (np.arange(B) + 100 * seed).astype(np.int32),
  }


def _selmix_batch(seed):
  rng = np.random.default_rng(seed)
  return {
    "images1": _images(rng, B),
    "labels1": rng.integers(0, K, B).astype(np.int32),
    "index1": np.array([3, 3, 7, 1, 3, 9, 2, 7], np.int32),  # pairs drawn with replacement
    "images2": _images(rng, B),
    "index2": (np.arange(B) + 50).astype(np.int32),
  }


def _run(step_fn, state, batches, n):
  """Runs `step_fn` under pmap on the first n devices; returns device-0 state and metrics."""
  p_step = jax.pmap(step_fn, axis_name="batch", in_axes=(0, 0, None), devices=jax.devices()[:n])
  state = _replicate(state, n)
  metrics = []
  for batch in batches:
    state, m = p_step(state, _shard(batch, n), jax.random.key(42))
    metrics.append(jax.tree.map(lambda x: x[0], m))
  return jax.tree.map(lambda x: x[0], state), metrics


def _assert_trees_close(a, b, atol=2e-5):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=2e-5, atol=atol)


# Each configuration is compiled and run once and shared between tests (CPU time is scarce).
@functools.cache
def _supervised_run(n):
  @chex.assert_max_traces(n=1)  # one trace however many steps: nothing retraces
  def step(state, batch, key):
    return steps.supervised_step(
      state, batch, key, preprocess_fn=_noisy_preprocess, logit_adjustment=LA
    )

  chex.clear_trace_counter()  # count the traces of this run only
  return _run(step, _state(), [_supervised_batch(i) for i in range(3)], n)


@functools.cache
def _selmix_run(n, fuse_passes, bn_stats="batch"):
  step = functools.partial(
    steps.selmix_step, preprocess_fn=_noisy_preprocess, fuse_passes=fuse_passes,
    bn_stats=bn_stats,
  )
  return _run(step, _state("selmix"), [_selmix_batch(0), _selmix_batch(1)], n)


def test_four_devices():
  assert jax.local_device_count() == 4


def test_supervised_step_device_count_invariant():
  assert jax.local_device_count() == 4
  state = _state()
  s1, m1 = _supervised_run(1)
  s4, m4 = _supervised_run(4)
  assert int(s4.step) == 3  # and chex saw a single trace per device count
  _assert_trees_close(s1.params, s4.params)
  _assert_trees_close(s1.batch_stats, s4.batch_stats)
  _assert_trees_close(s1.opt_state, s4.opt_state)
  _assert_trees_close(m1, m4)
  # The parameters and running statistics did move.
  assert not np.allclose(s4.params["head"]["kernel"], state.params["head"]["kernel"])
  assert not np.allclose(
    s4.batch_stats["backbone"]["BatchNorm_0"]["mean"],
    state.batch_stats["backbone"]["BatchNorm_0"]["mean"],
  )


def test_supervised_loss_matches_oracle():
  """The first step's loss is CE(logits + la, y) of a direct forward on the same inputs."""
  state = _state()
  batch = _supervised_batch(0)
  _, metrics = _supervised_run(4)
  keys = augment.example_keys(jax.random.key(42), 0, jnp.asarray(batch["index"]), stream=0)
  model = models.get("cnn_small", num_classes=K, width=4)  # no device axis outside pmap
  logits, _ = jax.jit(functools.partial(model.apply, train=True, mutable=["batch_stats"]))(
    {"params": state.params, "batch_stats": state.batch_stats},
    _noisy_preprocess(batch["images"], keys),
  )
  z = np.asarray(logits + LA, np.float64)
  log_softmax = z - np.log(np.exp(z).sum(-1, keepdims=True))
  expected = -log_softmax[np.arange(B), batch["labels"]].mean()
  np.testing.assert_allclose(metrics[0]["loss"], expected, rtol=1e-5)
  accuracy = np.mean(np.asarray(logits).argmax(-1) == batch["labels"])
  np.testing.assert_allclose(metrics[0]["accuracy"], accuracy)


def test_selmix_step_device_count_invariant_and_frozen_bn():
  assert jax.local_device_count() == 4
  state = _state("selmix")
  s1, m1 = _selmix_run(1, False)
  s4, m4 = _selmix_run(4, False)
  _assert_trees_close(s1.params, s4.params)
  _assert_trees_close(m1, m4)
  # Running statistics untouched; BatchNorm scale/offset frozen; the rest moves.
  chex.assert_trees_all_equal(s4.batch_stats, state.batch_stats)
  bn = state.params["backbone"]["BatchNorm_1"]
  chex.assert_trees_all_equal(s4.params["backbone"]["BatchNorm_1"], bn)
  assert not np.allclose(s4.params["head"]["kernel"], state.params["head"]["kernel"])
  assert not np.allclose(
    s4.params["backbone"]["Conv_0"]["kernel"], state.params["backbone"]["Conv_0"]["kernel"]
  )
  for m in m4:
    assert 0.6 <= float(m["mix_weight"]) <= 1.0


@pytest.mark.parametrize("bn_stats", ["batch", "running"])
def test_selmix_loss_matches_oracle(bn_stats):
  """First-step loss = CE(head(w g(x1) + (1 - w) g(x2)), y1), g with `bn_stats` BatchNorm."""
  state = _state("selmix")
  batch = _selmix_batch(0)
  _, metrics = _selmix_run(1, False, bn_stats)
  key, position = jax.random.key(42), jnp.arange(B)  # one device: position = batch slot
  x1_keys = jax.vmap(jax.random.fold_in)(
      augment.example_keys(key, 0, jnp.asarray(batch["index1"]), stream=steps._STREAM_X1), position
  )
  x2_keys = jax.vmap(jax.random.fold_in)(
      augment.example_keys(key, 0, jnp.asarray(batch["index2"]), stream=steps._STREAM_X2), position
  )
  mix_keys = augment.example_keys(key, 0, position, stream=steps._STREAM_MIX)
  w = np.asarray(jax.vmap(lambda k: jax.random.uniform(k, (), minval=0.6, maxval=1.0))(mix_keys))
  model = models.get("cnn_small", num_classes=K, width=4)
  variables = {"params": state.params, "batch_stats": state.batch_stats}

  @jax.jit
  def features(x):
    if bn_stats == "running":  # what evaluation computes
      return model.apply(variables, x, train=False, method="features")
    return model.apply(variables, x, train=True, method="features", mutable=["batch_stats"])[0]

  f1 = np.asarray(features(_noisy_preprocess(batch["images1"], x1_keys)), np.float64)
  f2 = np.asarray(features(_noisy_preprocess(batch["images2"], x2_keys)), np.float64)
  mixed = w[:, None] * f1 + (1 - w[:, None]) * f2
  head = jax.tree.map(lambda x: np.asarray(x, np.float64), state.params["head"])
  z = mixed @ head["kernel"] + head["bias"]
  log_softmax = z - np.log(np.exp(z).sum(-1, keepdims=True))
  expected = -log_softmax[np.arange(B), batch["labels1"]].mean()
  np.testing.assert_allclose(metrics[0]["loss"], expected, rtol=1e-5)
  np.testing.assert_allclose(metrics[0]["mix_weight"], w.mean(), rtol=1e-6)
  assert len(np.unique(w)) == B  # repeated index1 still gets distinct draws


def test_selmix_bn_stats_modes_differ_and_running_is_device_invariant():
  _, m_batch = _selmix_run(1, False)
  s1, m1 = _selmix_run(1, False, "running")
  s4, m4 = _selmix_run(4, False, "running")
  assert abs(float(m_batch[0]["loss"]) - float(m1[0]["loss"])) > 1e-4
  _assert_trees_close(s1.params, s4.params)
  _assert_trees_close(m1, m4)
  chex.assert_trees_all_equal(s4.batch_stats, _state("selmix").batch_stats)
  with pytest.raises(ValueError, match="bn_stats"):
    steps.selmix_step(s1, _selmix_batch(0), jax.random.key(0), preprocess_fn=_noisy_preprocess,
                      bn_stats="frozen")


def test_selmix_fused_passes_equal_separate():
  s_sep, m_sep = _selmix_run(4, False)
  s_fused, m_fused = _selmix_run(4, True)
  _assert_trees_close(s_sep.params, s_fused.params, atol=1e-6)
  _assert_trees_close(m_sep, m_fused, atol=1e-6)


def _fixmatch_batch():
  rng = np.random.default_rng(3)
  return {
    "labeled_images": _images(rng, B),
    "labels": rng.integers(0, K, B).astype(np.int32),
    "labeled_index": np.arange(B, dtype=np.int32),
    "unlabeled_images": _images(rng, 2 * B),
    "unlabeled_index": np.arange(2 * B, dtype=np.int32) + 1000,
  }


def _fixmatch_oracle_logits(state, batch):
  """float64 logits of the labeled, weak and strong views: one direct forward on their concat
  (as the step does, so BatchNorm sees all three), with the step's per-example keys."""
  key = jax.random.key(42)

  def keys(stream, index):
    return augment.example_keys(key, 0, jnp.asarray(index), stream=stream)

  x_l = _noisy_preprocess(batch["labeled_images"], keys(0, batch["labeled_index"]))
  x_uw = _noisy_preprocess(batch["unlabeled_images"], keys(1, batch["unlabeled_index"]))
  x_us = _strong(batch["unlabeled_images"], keys(2, batch["unlabeled_index"]))
  model = models.get("cnn_small", num_classes=K, width=4)  # no device axis outside pmap
  logits, _ = jax.jit(functools.partial(model.apply, train=True, mutable=["batch_stats"]))(
    {"params": state.params, "batch_stats": state.batch_stats},
    jnp.concatenate([x_l, x_uw, x_us]),
  )
  return np.split(np.asarray(logits, np.float64), [B, 3 * B])


def _log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def test_fixmatch_step_matches_a_numpy_oracle_at_a_fractional_threshold():
  """Pseudo-labels = argmax of the weak view, kept where its confidence is >= the threshold;
  CE of the strong view against them; logit-adjusted CE on the labeled view; EMA of the step."""
  assert jax.local_device_count() == 4
  state, batch = _state(ema=True), _fixmatch_batch()
  logits_l, logits_uw, logits_us = _fixmatch_oracle_logits(state, batch)
  probs_uw = np.exp(_log_softmax(logits_uw))
  confidence, pseudo = probs_uw.max(-1), probs_uw.argmax(-1)
  # A threshold strictly inside (0, 1), midway across the widest gap between the 5th and 12th
  # most confident weak views: far from every confidence, so float rounding cannot move the mask.
  ordered = np.sort(confidence)
  gap = 4 + int(np.argmax(np.diff(ordered[4:12])))
  threshold = float(ordered[gap] + ordered[gap + 1]) / 2
  assert 0 < threshold < 1 and ordered[gap + 1] - ordered[gap] > 1e-3
  mask = confidence >= threshold
  assert 0 < mask.mean() < 1
  unlabeled_loss = np.mean(mask * -_log_softmax(logits_us)[np.arange(2 * B), pseudo])
  labeled_loss = np.mean(-_log_softmax(logits_l + np.asarray(LA))[np.arange(B), batch["labels"]])
  # A step with the views swapped would report a loss 50x the tolerance away (the oracle tells).
  swapped = np.mean(mask * -_log_softmax(logits_uw)[np.arange(2 * B), logits_us.argmax(-1)])
  assert abs(swapped - unlabeled_loss) > 1e-3

  step = functools.partial(
    steps.fixmatch_step, weak_fn=_noisy_preprocess, strong_fn=_strong, threshold=threshold,
    unlabeled_weight=2.0, logit_adjustment=LA,
  )
  s4, (m4,) = _run(step, state, [batch], 4)
  assert set(m4) == {"loss", "labeled_loss", "unlabeled_loss", "mask_rate"}
  np.testing.assert_allclose(m4["mask_rate"], mask.mean(), rtol=1e-6)
  np.testing.assert_allclose(m4["unlabeled_loss"], unlabeled_loss, rtol=2e-5)
  np.testing.assert_allclose(m4["labeled_loss"], labeled_loss, rtol=2e-5)
  np.testing.assert_allclose(m4["loss"], labeled_loss + 2.0 * unlabeled_loss, rtol=2e-5)
  # EMA moved by (1 - decay) of the step: ema = 0.999 * old + 0.001 * new.
  _assert_trees_close(
    s4.ema_params,
    jax.tree.map(lambda o, p: 0.999 * o + 0.001 * p, state.params, s4.params),
    atol=1e-7,
  )
  _assert_trees_close(
    s4.ema_batch_stats,
    jax.tree.map(lambda o, p: 0.999 * o + 0.001 * p, state.batch_stats, s4.batch_stats),
    atol=1e-7,
  )


def _eval_batch():
  rng = np.random.default_rng(7)
  images = rng.normal(size=(B, *SHAPE)).astype(np.float32)
  labels = rng.integers(0, K, B).astype(np.int32)
  mask = np.array([True] * 6 + [False] * 2)  # the last two are padding
  return {"images": images, "labels": labels, "mask": mask}


@functools.cache
def _eval_run(n):
  step = functools.partial(steps.eval_step, num_classes=K)
  p_step = jax.pmap(step, axis_name="batch", devices=jax.devices()[:n])
  return p_step(_replicate(_state(), n), _shard(_eval_batch(), n))


def test_eval_step_exact_counts_across_devices():
  assert jax.local_device_count() == 4
  state = _state()
  batch = _eval_batch()
  out1, out4 = _eval_run(1), _eval_run(4)
  for name in ("confusion", "class_counts"):
    chex.assert_trees_all_equal(out1[name][0], out4[name][0])
  np.testing.assert_allclose(out1["feature_sums"][0], out4["feature_sums"][0], atol=1e-5)
  np.testing.assert_array_equal(out4["preds"].reshape(-1), out1["preds"].reshape(-1))

  # Oracle: a direct forward in eval mode and a loop over unmasked examples.
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  model = _model()
  feats, logits = jax.jit(
    lambda v, x: (model.apply(v, x, train=False, method="features"), model.apply(v, x, False))
  )(variables, batch["images"])
  feats, logits = np.asarray(feats), np.asarray(logits)
  preds = logits.argmax(-1)
  confusion = np.zeros((K, K), np.int64)
  sums = np.zeros((K, feats.shape[1]))
  counts = np.zeros(K, np.int64)
  for y, p, f, m in zip(batch["labels"], preds, feats, batch["mask"]):
    if m:
      confusion[y, p] += 1
      sums[y] += f
      counts[y] += 1
  np.testing.assert_array_equal(out4["confusion"][0], confusion)
  assert out4["confusion"][0].sum() == 6 and out4["confusion"].dtype == jnp.int32
  np.testing.assert_array_equal(out4["class_counts"][0], counts)
  np.testing.assert_allclose(out4["feature_sums"][0], sums, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(out4["preds"].reshape(-1), preds)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  np.testing.assert_allclose(out4["max_prob"].reshape(-1), probs.max(-1), rtol=1e-5)


def test_eval_step_variables_and_ema():
  state = _state(ema=True)
  state = state.replace(ema_params=jax.tree.map(lambda x: x + 0.01, state.params))
  batch = _shard(_eval_batch(), 4)
  step = functools.partial(steps.eval_step, num_classes=K)
  out_params = _eval_run(4)  # the same state's own (non-EMA) parameters
  out_ema_flag = jax.pmap(functools.partial(step, use_ema=True), axis_name="batch")(
    _replicate(state, 4), batch
  )
  ema_vars = {"params": state.ema_params, "batch_stats": state.ema_batch_stats}
  out_vars = jax.pmap(functools.partial(step, apply_fn=state.apply_fn), axis_name="batch")(
    _replicate(ema_vars, 4), batch
  )
  np.testing.assert_allclose(out_ema_flag["feature_sums"], out_vars["feature_sums"], atol=1e-6)
  assert not np.allclose(out_params["feature_sums"], out_vars["feature_sums"])
