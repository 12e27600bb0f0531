"""Tests for selmix_jax.models and selmix_jax.optim."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from selmix_jax import models, optim

# Small variants keep compilation fast; the full-size ones are checked with eval_shape only.
# `modes`: the train flags checked (train mode for one model only: the Classifier code path
# is shared, and each mode of a deep model costs a compile).
# The ResNets are shallow versions of the same modules (full sizes: test_full_size_shapes).
_SMALL = [
  ("cnn_small", dict(width=4), (8, 8, 1), 8, (False, True)),
  ("wrn", dict(depth=10, widen_factor=1), (8, 8, 3), 64, (False,)),
  ("cifar_resnet8", dict(blocks_per_stage=1), (8, 8, 3), 64, (False,)),
  ("resnet_tiny", dict(stage_sizes=(1, 1), width=4), (16, 16, 3), 32, (False,)),
]


def _small_model(name, num_classes, **kwargs):
  if name == "cifar_resnet8":
    return models.Classifier(backbone=models.CifarResNet(**kwargs), num_classes=num_classes)
  if name == "resnet_tiny":
    return models.Classifier(backbone=models.ResNet(**kwargs), num_classes=num_classes)
  return models.get(name, num_classes=num_classes, **kwargs)


def _init(model, shape, seed=0):
  # One compiled call instead of many op-by-op dispatches.
  return jax.jit(lambda k: model.init(k, jnp.zeros((1, *shape)), train=False))(jax.random.key(seed))


def test_registry_names_and_unknown():
  assert {"wrn28_2", "wrn", "resnet20", "resnet32", "resnet50", "cnn_small"} <= set(models.names())
  with pytest.raises(ValueError, match="wrn28_2"):
    models.get("vgg16", num_classes=10)


@pytest.mark.parametrize(
  "name,feature_dim,num_params",
  [
    ("wrn28_2", 128, 1_467_610),
    ("resnet20", 64, 269_722),  # ResNet-32 minus its 2 extra blocks a stage
    ("resnet32", 64, 464_154),
    ("resnet50", 2048, None),
  ],
)
def test_full_size_shapes(name, feature_dim, num_params):
  model = models.get(name, num_classes=10)
  shape = (2, 32, 32, 3)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape), train=False))
  head = variables["params"]["head"]
  assert head["kernel"].shape == (feature_dim, 10)
  assert head["bias"].shape == (10,)
  if num_params is not None:  # WRN-28-2 ~1.5M, ResNet-20 ~0.27M, ResNet-32 ~0.46M, as published.
    assert sum(x.size for x in jax.tree.leaves(variables["params"])) == num_params
  feats = jax.eval_shape(
    lambda v: model.apply(v, jnp.zeros(shape), train=False, method="features"), variables
  )
  assert feats.shape == (2, feature_dim)


@pytest.mark.parametrize("name,kwargs,shape,feature_dim,modes", _SMALL)
def test_features_classify_consistent(name, kwargs, shape, feature_dim, modes):
  model = _small_model(name, 5, **kwargs)
  variables = _init(model, shape)
  assert variables["params"]["head"]["kernel"].shape == (feature_dim, 5)
  x = jax.random.normal(jax.random.key(1), (3, *shape))

  @jax.jit
  def run(variables, x):
    out = {}
    for train in modes:
      mutable = ["batch_stats"] if train else False
      logits = model.apply(variables, x, train=train, mutable=mutable)
      feats = model.apply(variables, x, train=train, method="features", mutable=mutable)
      if train:
        logits, feats = logits[0], feats[0]
      out[train] = logits, feats, model.apply(variables, feats, method="classify")
    return out

  for logits, feats, again in run(variables, x).values():
    assert logits.shape == (3, 5) and feats.shape == (3, feature_dim)
    np.testing.assert_allclose(again, logits, rtol=1e-5, atol=1e-5)
    # The head is a plain affine map W^T g + b.
    head = variables["params"]["head"]
    np.testing.assert_allclose(feats @ head["kernel"] + head["bias"], logits, rtol=1e-5, atol=1e-5)


def test_batchnorm_modes():
  model = models.get("cnn_small", num_classes=3, width=4)
  variables = _init(model, (8, 8, 1))
  x = 3.0 + jax.random.normal(jax.random.key(2), (4, 8, 8, 1))
  _, updates = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(
    variables, x
  )
  changed = jax.tree.map(
    lambda a, b: bool(jnp.any(a != b)), variables["batch_stats"], updates["batch_stats"]
  )
  assert all(jax.tree.leaves(changed))
  # Flax momentum 0.9: new mean = 0.9 * 0 + 0.1 * batch mean of the first conv's output.
  first = updates["batch_stats"]["backbone"]["BatchNorm_0"]["mean"]
  conv_out = jax.jit(
    lambda x, w: jax.lax.conv_general_dilated(
      x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
  )(x, variables["params"]["backbone"]["Conv_0"]["kernel"])
  np.testing.assert_allclose(first, 0.1 * conv_out.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-5)


def test_wrn_bn_momentum():
  model = models.get("wrn", num_classes=3, depth=10, widen_factor=1)
  assert model.backbone.bn_momentum == 0.999
  assert model.backbone.bn_epsilon == 1e-5  # PyTorch's, as in the authors' release
  assert models.get("resnet32", num_classes=3).backbone.bn_momentum == 0.9


def test_wrn_projection_reads_the_preactivated_input():
  # As in the authors' release: where a block changes width, both its first conv and its 1x1
  # shortcut read act(bn1(x)). With bn1's scale and offset zeroed, that block (the second of
  # WRN-10-1: 16 -> 32 channels) and so the whole network no longer depend on the input.
  model = models.get("wrn", num_classes=3, depth=10, widen_factor=1)
  variables = _init(model, (8, 8, 3))
  bn1 = variables["params"]["backbone"]["_WRNBlock_1"]["BatchNorm_0"]
  assert "Conv_2" in variables["params"]["backbone"]["_WRNBlock_1"]
  bn1["scale"], bn1["bias"] = jnp.zeros_like(bn1["scale"]), jnp.zeros_like(bn1["bias"])
  x = jax.random.normal(jax.random.key(3), (2, 8, 8, 3))
  logits = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)
  np.testing.assert_allclose(logits[0], logits[1], atol=1e-6)


# ------------------------------------------------------------------------------------------
# bfloat16 compute.

# Stated tolerance: bf16 logits within 2 % of the largest float32 logit (measured at random
# init on 64 N(0, 1) inputs: cnn_small 0.3 %, ResNet-20 0.5 %, WRN-28-2 1.1 %, ResNet-50 at
# 64 px 0.9 %, eval and train mode; argmax agreement 97-100 %).
BF16_RTOL = 0.02


@pytest.mark.parametrize("name,kwargs,shape,feature_dim,modes", _SMALL[1:])  # cnn_small: below
def test_bfloat16_logits_close_to_float32(name, kwargs, shape, feature_dim, modes):
  del feature_dim, modes
  f32 = _small_model(name, 5, **kwargs)
  bf16 = _small_model(name, 5, dtype=jnp.bfloat16, **kwargs)
  variables = _init(f32, shape)
  x = jax.random.normal(jax.random.key(1), (16, *shape))

  @functools.partial(jax.jit, static_argnums=0)
  def run(model, variables, x):
    feats = model.apply(variables, x, train=False, method="features")
    logits, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
    return feats, model.apply(variables, x, train=False), logits, updates["batch_stats"]

  want, got = run(f32, variables, x), run(bf16, variables, x)
  for a, b in zip(want[:3], got[:3]):
    assert b.dtype == jnp.float32  # features and logits leave the backbone as float32
    assert float(jnp.max(jnp.abs(a - b))) <= BF16_RTOL * float(jnp.max(jnp.abs(a)))
  for a, b in zip(jax.tree.leaves(want[3]), jax.tree.leaves(got[3])):
    assert b.dtype == jnp.float32  # BatchNorm statistics
    np.testing.assert_allclose(b, a, rtol=0.05, atol=0.02)


def test_bfloat16_training_keeps_float32_state_and_learns():
  from selmix_jax import steps, train_state  # pylint: disable=g-import-not-at-top
  from selmix_jax.data import augment  # pylint: disable=g-import-not-at-top

  model = models.get("cnn_small", num_classes=3, width=8, dtype=jnp.bfloat16)
  tx = optim.make_pretrain_optimizer(learning_rate=0.05)
  state = jax.jit(lambda k: train_state.create(model, k, (8, 8, 1), tx))(jax.random.key(0))
  rng = np.random.default_rng(0)
  labels = np.arange(24) % 3
  # Class k: a bright k-th band of rows on noise.
  images = rng.integers(0, 100, (24, 8, 8, 1))
  for i, k in enumerate(labels):
    images[i, 3 * k : 3 * k + 2] += 150
  batch = {
    "images": images.astype(np.uint8)[None],
    "labels": labels.astype(np.int32)[None],
    "index": np.arange(24, dtype=np.int32)[None],
  }
  p_step = jax.pmap(
    functools.partial(
      steps.supervised_step,
      preprocess_fn=augment.make_preprocess("none", mean=0.3, std=0.3),
    ),
    axis_name="batch",
    in_axes=(0, 0, None),
    devices=jax.devices()[:1],
  )
  state = train_state.replicate(state, devices=jax.devices()[:1])
  losses = []
  for _ in range(15):
    state, metrics = p_step(state, batch, jax.random.key(1))
    losses.append(float(metrics["loss"][0]))
  assert metrics["loss"].dtype == jnp.float32
  assert losses[-1] < 0.5 * losses[0], losses
  for tree in (state.params, state.opt_state, state.batch_stats):
    for leaf in jax.tree.leaves(tree):
      assert leaf.dtype in (jnp.float32, jnp.int32), leaf.dtype


# ------------------------------------------------------------------------------------------
# Optimisers.


@functools.cache
def _params():
  model = models.get("cnn_small", num_classes=3, width=2)
  return _init(model, (8, 8, 1))["params"]


def test_param_labels():
  labels = optim.selmix_param_labels(_params())
  assert labels["head"] == {"kernel": "head", "bias": "head"}
  assert labels["backbone"]["Conv_0"]["kernel"] == "backbone"
  assert labels["backbone"]["BatchNorm_0"] == {"scale": "frozen", "bias": "frozen"}
  mask = optim.weight_decay_mask(_params())
  assert mask["head"] == {"kernel": True, "bias": False}
  assert mask["backbone"]["BatchNorm_0"] == {"scale": False, "bias": False}


def test_selmix_optimizer_groups():
  params = _params()
  lr, wd = 0.5, 0.01
  tx = optim.make_selmix_optimizer(params, learning_rate=lambda count: lr, weight_decay=wd)
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.3), params)
  updates, _ = tx.update(grads, tx.init(params), params)
  labels = optim.selmix_param_labels(params)
  mask = optim.weight_decay_mask(params)

  def expected(label, decay, p, g):
    rule = -lr * (g + (wd * p if decay else 0.0))  # plain SGD step of the head's group
    return {"head": rule, "backbone": 0.1 * rule, "frozen": 0.0 * p}[label]

  want = jax.tree.map(expected, labels, mask, params, grads)
  for got, exp in zip(jax.tree.leaves(updates), jax.tree.leaves(want)):
    np.testing.assert_allclose(got, exp, rtol=1e-6, atol=1e-8)
  bn = updates["backbone"]["BatchNorm_1"]
  assert not np.any(bn["scale"]) and not np.any(bn["bias"])
  # Plain SGD, no momentum: a second step with the same gradient repeats the first update.
  state = tx.init(params)
  u1, state = tx.update(grads, state, params)
  u2, _ = tx.update(grads, state, params)
  for a, b in zip(jax.tree.leaves(u1), jax.tree.leaves(u2)):
    np.testing.assert_allclose(a, b, rtol=1e-6)


def test_pretrain_optimizer_decay_on_kernels_only():
  params = _params()
  lr, wd, m = 0.1, 5e-4, 0.9
  tx = optim.make_pretrain_optimizer(learning_rate=lr, momentum=m, weight_decay=wd)
  zero = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zero, tx.init(params), params)
  assert not np.any(updates["head"]["bias"])
  assert not np.any(updates["backbone"]["BatchNorm_0"]["scale"])
  # Nesterov's first step is (1 + m) times the gradient, here the decay term wd * w.
  np.testing.assert_allclose(
    updates["head"]["kernel"], -lr * (1 + m) * wd * params["head"]["kernel"], rtol=1e-5
  )


def test_schedules():
  cos = optim.cosine_schedule(0.2, 100)
  np.testing.assert_allclose([cos(0), cos(50), cos(100)], [0.2, 0.1, 0.0], atol=1e-7)
  fm = optim.fixmatch_cosine_schedule(0.03, 1000)
  np.testing.assert_allclose(fm(0), 0.03, rtol=1e-6)
  np.testing.assert_allclose(fm(500), 0.03 * np.cos(7 * np.pi / 32), rtol=1e-5)
  np.testing.assert_allclose(fm(1000), 0.03 * np.cos(7 * np.pi / 16), rtol=1e-5)
  assert isinstance(optax.sgd(cos), optax.GradientTransformation)
