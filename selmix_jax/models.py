"""Flax Linen classifiers split into a backbone `g(x)` and a linear head `(W, b)`.

SelMix mixes backbone features and reads the head, so every model is a `Classifier`:

  logits = model.apply(variables, x, train=train)
  feats = model.apply(variables, x, train=train, method='features')    # [B, D]
  logits = model.apply(variables, feats, method='classify')            # [B, K]

Parameters are `{'backbone': {...}, 'head': {'kernel': [D, K], 'bias': [K]}}`; BatchNorm
running statistics live in the `batch_stats` collection. Inputs are float32 NHWC images,
already normalised.

`dtype`: the backbone's compute dtype (`config.model.dtype`: 'float32', or 'bfloat16' for
accelerators). Parameters, BatchNorm statistics (and their reductions) stay float32 whatever it
is; the pooled features are cast to float32 before the head, so logits, losses, metrics,
prototypes and gains are float32 too.

`bn_axis_name`: when set, BatchNorm in training mode averages its batch statistics over that
named axis (`pmap`/`shard_map` axis), so the statistics are those of the global batch and the
result does not depend on the number of devices. Leave it `None` for per-device statistics
(the usual data-parallel recipe); the axis must be bound whenever `train=True` if it is set.

Use `get(name, num_classes=K, **kwargs)`; `names()` lists the registry.
"""

import dataclasses
import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

# He-normal with fan_out, as in FixMatch's WideResNet and torchvision's ResNets.
_conv_init_fan_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# He-normal with fan_in, as in the CIFAR ResNets of LDAM/MiSLAS (`kaiming_normal_`).
_conv_init_fan_in = nn.initializers.variance_scaling(2.0, "fan_in", "normal")


class Classifier(nn.Module):
  """A backbone followed by a linear head named `head`.

  Attributes:
    backbone: module mapping `(x [B, H, W, C], train)` to features `[B, D]`.
    num_classes: K, the head's output size.
    head_kernel_init: initialiser of the head kernel `[D, K]`.
  """

  backbone: nn.Module
  num_classes: int
  head_kernel_init: Callable[..., Any] = nn.initializers.lecun_normal()

  def setup(self):
    # Named `head` by its attribute name: params['head'] = {'kernel': [D, K], 'bias': [K]}.
    self.head = nn.Dense(self.num_classes, kernel_init=self.head_kernel_init)

  def features(self, x: jax.Array, train: bool) -> jax.Array:
    """Backbone features g(x) after global pooling: [B, H, W, C] -> float32 [B, D]."""
    return self.backbone(x, train=train).astype(jnp.float32)

  def classify(self, features: jax.Array) -> jax.Array:
    """Linear head: [B, D] -> logits [B, K]."""
    return self.head(features)

  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    """Logits: [B, H, W, C] -> [B, K]."""
    return self.classify(self.features(x, train=train))


def _batch_norm(
    train: bool, momentum: float, axis_name: str | None, *, epsilon: float, dtype: Any
):
  """BatchNorm factory of every backbone: batch statistics (synced over `axis_name` if set)
  when training, running statistics otherwise. Outputs `dtype`; statistics are computed and
  kept in float32 (Flax's `force_float32_reductions`, float32 `batch_stats`)."""
  return functools.partial(
      nn.BatchNorm,
      use_running_average=not train,
      momentum=momentum,
      epsilon=epsilon,
      axis_name=axis_name if train else None,
      dtype=dtype,
  )


def _pool(x: jax.Array) -> jax.Array:
  """Global average pooling, in float32 whatever the compute dtype: [B, H, W, C] -> [B, C]."""
  return x.astype(jnp.float32).mean(axis=(1, 2))


# ----------------------------------------------------------------------------------------
# WideResNet (FixMatch).


class _WRNBlock(nn.Module):
  """Pre-activation residual block of FixMatch's WideResNet as its PyTorch ports (and SelMix's
  release, `models/nets/wrn.py`) define it.

  `x = act(bn1(x0))` feeds the first 3x3 convolution. Where the channel count changes, the 1x1
  projection shortcut reads that pre-activated `x` as well; elsewhere the shortcut is the raw
  input `x0`. (The TF original pre-activates the shortcut in the very first block only, so its
  weights are not interchangeable with these.)
  """

  filters: int
  stride: int
  norm: Callable[..., nn.Module]
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x0):
    act = functools.partial(nn.leaky_relu, negative_slope=0.1)
    conv = functools.partial(
        nn.Conv, use_bias=False, kernel_init=_conv_init_fan_out, dtype=self.dtype
    )
    x = act(self.norm()(x0))
    y = conv(self.filters, (3, 3), strides=self.stride, padding=1)(x)
    y = act(self.norm()(y))
    y = conv(self.filters, (3, 3), padding=1)(y)
    if x0.shape[-1] != self.filters:
      # Created last, so the shortcut stays `Conv_2` (checkpoint names unchanged).
      x0 = conv(self.filters, (1, 1), strides=self.stride, padding=0)(x)
    elif self.stride != 1:
      raise ValueError("A strided WideResNet block must change the channel count.")
    return x0 + y


class WideResNet(nn.Module):
  """WideResNet-depth-widen_factor backbone with LeakyReLU 0.1 (FixMatch); D = 64 * widen.

  Matches `build_WideResNet` of SelMix's release (PyTorch) layer for layer: stem conv,
  3 groups of pre-activation blocks, final BatchNorm + LeakyReLU, global average pool.
  BatchNorm epsilon is PyTorch's 1e-5, so converted checkpoints (`selmix_jax.convert`)
  compute the same function.
  """

  depth: int = 28
  widen_factor: int = 2
  bn_momentum: float = 0.999  # Flax convention; PyTorch's momentum=0.001.
  bn_epsilon: float = 1e-5  # PyTorch's default, as in the release.
  bn_axis_name: str | None = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    if (self.depth - 4) % 6:
      raise ValueError(f"WideResNet depth must be 6n + 4, got {self.depth}.")
    blocks_per_group = (self.depth - 4) // 6
    norm = _batch_norm(
        train, self.bn_momentum, self.bn_axis_name, epsilon=self.bn_epsilon, dtype=self.dtype
    )
    x = nn.Conv(
        16, (3, 3), padding=1, use_bias=False, kernel_init=_conv_init_fan_out, dtype=self.dtype
    )(x)
    for width, stride in zip((16, 32, 64), (1, 2, 2)):
      for block in range(blocks_per_group):
        x = _WRNBlock(
            filters=width * self.widen_factor,
            stride=stride if block == 0 else 1,
            norm=norm,
            dtype=self.dtype,
        )(x)
    x = nn.leaky_relu(norm()(x), negative_slope=0.1)
    return _pool(x)


# ----------------------------------------------------------------------------------------
# CIFAR ResNet-32 (He et al. 2016; as in LDAM-DRW / MiSLAS).


class _CifarBasicBlock(nn.Module):
  """Basic block with the parameter-free 'option A' shortcut (subsample + zero channels)."""

  filters: int
  stride: int
  norm: Callable[..., nn.Module]
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(
        nn.Conv,
        kernel_size=(3, 3),
        padding=1,
        use_bias=False,
        kernel_init=_conv_init_fan_in,
        dtype=self.dtype,
    )
    y = nn.relu(self.norm()(conv(self.filters, strides=self.stride)(x)))
    y = self.norm()(conv(self.filters)(y))
    if self.stride != 1 or x.shape[-1] != self.filters:
      x = x[:, :: self.stride, :: self.stride, :]
      pad = self.filters - x.shape[-1]
      x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (pad // 2, pad - pad // 2)))
    return nn.relu(x + y)


class CifarResNet(nn.Module):
  """CIFAR ResNet-(6n+2): 3 stages of n basic blocks, 16/32/64 channels; D = 64."""

  blocks_per_stage: int = 5
  widths: Sequence[int] = (16, 32, 64)
  bn_momentum: float = 0.9
  bn_axis_name: str | None = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    norm = _batch_norm(
        train, self.bn_momentum, self.bn_axis_name, epsilon=1e-5, dtype=self.dtype
    )
    x = nn.Conv(
        self.widths[0],
        (3, 3),
        padding=1,
        use_bias=False,
        kernel_init=_conv_init_fan_in,
        dtype=self.dtype,
    )(x)
    x = nn.relu(norm()(x))
    for stage, width in enumerate(self.widths):
      for block in range(self.blocks_per_stage):
        stride = 2 if (stage > 0 and block == 0) else 1
        x = _CifarBasicBlock(filters=width, stride=stride, norm=norm, dtype=self.dtype)(x)
    return _pool(x)


# ----------------------------------------------------------------------------------------
# ImageNet ResNet-50 (as in Flax's examples/imagenet).


class _Bottleneck(nn.Module):
  filters: int
  stride: int
  norm: Callable[..., nn.Module]
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(
        nn.Conv, use_bias=False, kernel_init=_conv_init_fan_out, dtype=self.dtype
    )
    residual = x
    y = nn.relu(self.norm()(conv(self.filters, (1, 1))(x)))
    y = nn.relu(self.norm()(conv(self.filters, (3, 3), strides=self.stride, padding=1)(y)))
    y = conv(self.filters * 4, (1, 1))(y)
    # Zero-initialised last scale: each block starts as the identity (Goyal et al. 2017).
    y = self.norm(scale_init=nn.initializers.zeros)(y)
    if residual.shape != y.shape:
      residual = conv(self.filters * 4, (1, 1), strides=self.stride, name="proj_conv")(residual)
      residual = self.norm(name="proj_bn")(residual)
    return nn.relu(residual + y)


class ResNet(nn.Module):
  """ImageNet bottleneck ResNet; `stage_sizes=(3, 4, 6, 3)` is ResNet-50 (D = 2048)."""

  stage_sizes: Sequence[int] = (3, 4, 6, 3)
  width: int = 64
  bn_momentum: float = 0.9
  bn_axis_name: str | None = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    norm = _batch_norm(
        train, self.bn_momentum, self.bn_axis_name, epsilon=1e-5, dtype=self.dtype
    )
    x = nn.Conv(
        self.width,
        (7, 7),
        strides=2,
        padding=3,
        use_bias=False,
        kernel_init=_conv_init_fan_out,
        dtype=self.dtype,
    )(x)
    x = nn.relu(norm()(x))
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for stage, num_blocks in enumerate(self.stage_sizes):
      for block in range(num_blocks):
        stride = 2 if (stage > 0 and block == 0) else 1
        x = _Bottleneck(
            filters=self.width * 2**stage, stride=stride, norm=norm, dtype=self.dtype
        )(x)
    return _pool(x)


# ----------------------------------------------------------------------------------------
# Small CNN for 8x8 digits (tests, smoke runs).


class SmallCNN(nn.Module):
  """conv-BN-ReLU x3 (the second with stride 2), global average pool; D = 2 * width."""

  width: int = 32
  bn_momentum: float = 0.9
  bn_axis_name: str | None = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    norm = _batch_norm(
        train, self.bn_momentum, self.bn_axis_name, epsilon=1e-5, dtype=self.dtype
    )
    conv = functools.partial(
        nn.Conv, kernel_size=(3, 3), padding=1, use_bias=False, dtype=self.dtype
    )
    x = nn.relu(norm()(conv(self.width)(x)))
    x = nn.relu(norm()(conv(2 * self.width, strides=2)(x)))
    x = nn.relu(norm()(conv(2 * self.width)(x)))
    return _pool(x)


# ----------------------------------------------------------------------------------------
# Identity backbone: a linear classifier over precomputed features.


class Identity(nn.Module):
  """The input as its own features: `[B, D]` (or `[B, ...]`, flattened) -> float32 `[B, D]`.

  With it, `Classifier` is a linear head over feature vectors (`data.name='features'`); no
  parameters and no BatchNorm, so `params = {'head': ...}`. `bn_axis_name` and `dtype` exist so
  it takes the options every backbone takes; the features stay float32.
  """

  bn_axis_name: str | None = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    del train
    return x.reshape(x.shape[0], -1).astype(jnp.float32)


def _linear(*, num_classes, **kwargs):
  return Classifier(backbone=Identity(**kwargs), num_classes=num_classes)


# ----------------------------------------------------------------------------------------
# Registry.


def _wrn(*, num_classes, depth=28, widen_factor=2, **kwargs):
  return Classifier(
      backbone=WideResNet(depth=depth, widen_factor=widen_factor, **kwargs),
      num_classes=num_classes,
      head_kernel_init=nn.initializers.glorot_normal(),
  )


def _cifar_resnet(*, num_classes, blocks_per_stage, **kwargs):
  return Classifier(
      backbone=CifarResNet(blocks_per_stage=blocks_per_stage, **kwargs), num_classes=num_classes
  )


def _resnet50(*, num_classes, stage_sizes=(3, 4, 6, 3), **kwargs):
  return Classifier(backbone=ResNet(stage_sizes=stage_sizes, **kwargs), num_classes=num_classes)


def _cnn_small(*, num_classes, **kwargs):
  return Classifier(backbone=SmallCNN(**kwargs), num_classes=num_classes)


_REGISTRY: dict[str, Callable[..., Classifier]] = {
    "wrn28_2": functools.partial(_wrn, depth=28, widen_factor=2),
    "wrn": _wrn,
    "resnet20": functools.partial(_cifar_resnet, blocks_per_stage=3),
    "resnet32": functools.partial(_cifar_resnet, blocks_per_stage=5),
    "resnet50": _resnet50,
    "cnn_small": _cnn_small,
    "linear": _linear,
}


def names() -> list[str]:
  """Registered model names, sorted."""
  return sorted(_REGISTRY)


def accepted_kwargs(name: str) -> tuple[str, ...]:
  """The backbone options model `name` accepts as keyword arguments (its dataclass fields)."""
  if name not in _REGISTRY:
    raise ValueError(f"Unknown model {name!r}; known models: {', '.join(names())}.")
  backbone = _REGISTRY[name](num_classes=1).backbone  # Constructing a module computes nothing.
  return tuple(f.name for f in dataclasses.fields(backbone) if f.name not in ("parent", "name"))


def check_kwargs(name: str, kwargs, *, field: str | None = None) -> None:
  """Raises a ValueError for an option model `name` does not accept, listing the accepted ones.

  Args:
    name: a registered model.
    kwargs: the options (a mapping).
    field: the config field holding them (e.g. 'config.model.kwargs'), named in the message.
  """
  accepted = accepted_kwargs(name)
  for key in kwargs:
    if key not in accepted:
      problem = f"model {name!r} has no option {key!r}; it accepts {', '.join(accepted)}."
      if field:
        raise ValueError(f"{field}.{key}={kwargs[key]!r}: {problem}")
      raise ValueError(problem[0].upper() + problem[1:])


def get(name: str, *, num_classes: int, **kwargs) -> Classifier:
  """Builds a registered model.

  Args:
    name: one of `names()`.
    num_classes: K.
    **kwargs: backbone options (`accepted_kwargs(name)`), e.g. `dtype=jnp.bfloat16`,
      `bn_axis_name='batch'`,
      `depth`/`widen_factor` for 'wrn', `width` for 'cnn_small'.

  Returns:
    A `Classifier` with `__call__(x, train)`, `features(x, train)` and `classify(features)`.

  Raises:
    ValueError: for an unknown name or an option the model does not accept.
  """
  check_kwargs(name, kwargs)
  return _REGISTRY[name](num_classes=num_classes, **kwargs)


DTYPES = ("float32", "bfloat16")


def from_config(config, num_classes: int) -> Classifier:
  """The model of a `config.model` section: `name`, its `kwargs` and compute `dtype`."""
  dtype = config.get("dtype", "float32")
  if dtype not in DTYPES:
    raise ValueError(f"config.model.dtype={dtype!r}; expected one of {DTYPES}.")
  return get(
      config.name, num_classes=num_classes, dtype=jnp.dtype(dtype), **config.get("kwargs", {})
  )
