r"""Converts the SelMix authors' (and MiSLAS's) PyTorch checkpoints into Flax variables and
Orbax checkpoints.

Fine-tuning from a published checkpoint is two commands:

  python -m selmix_jax.convert --torch_checkpoint=model_best.pth --model=wrn28_2 \
    --num_classes=10 --out=runs/c10ssl/converted
  python launch/main.py --config=configs/cifar10_lt_ssl.py:min_recall \
    --config.selmix.init_checkpoint=runs/c10ssl/converted --workdir=runs/c10ssl/min_recall

The supervised CIFAR-LT experiments start from MiSLAS's published stage-2 checkpoints:

  python -m selmix_jax.convert --torch_checkpoint=model_best.pth.tar --model=resnet32 \
    --num_classes=10 --out=runs/c10/mislas_converted

The output directory is an Orbax `CheckpointManager` directory holding one step with
`{'state': {'params': ..., 'batch_stats': ...}}` (plain dicts of float32 NumPy arrays), the layout
`checkpointing.load_pretrained` reads. In Python, `from_torch(path, model_name, num_classes)`
returns the Flax variables `{'params': ..., 'batch_stats': ...}` of `models.get(model_name, ...)`.

Checkpoint layouts read (`torch.load` of a `.pth` file):
  - the release's pre-training checkpoint, `{'train_model', 'eval_model', 'optimizer',
    'scheduler', 'it'}`; `eval_model` (the EMA weights, where SelMix fine-tuning starts) is read
    unless `source='train_model'`;
  - the release's fine-tuning checkpoint `{'model', 'optimizer', 'it'}`, or `{'state_dict': ...}`;
  - MiSLAS's (github.com/dvlab-research/MiSLAS) `.pth.tar`, `{'epoch', 'state_dict_model',
    'state_dict_classifier', 'best_acc1', 'its_ece'}` after stage 1, plus
    `'state_dict_lws_model'` after stage 2: the backbone (`resnet32_fe`, or ResNet-50's
    `ResNet_FE`), its `Classifier` (`fc.weight`, `fc.bias`) and the learnable weight scaling
    `learned_norm` [1, K], folded into the head (`W[k] *= s[k]`, `b[k] *= s[k]`) so our logits
    equal their `learned_norm * fc(features)`. Places-LT's extra `state_dict_block` is refused;
  - a bare state dict.
  The layout is told by the top-level keys; a file with both MiSLAS's and the release's entries
  is refused, naming the keys found.
  State dicts may be those of the release's wrapper module (keys `model.*`, plus `classifier.*`,
  a second reference to `model.fc` that must equal it) and may carry DataParallel `module.`
  prefixes; `num_batches_tracked` buffers are ignored.

Models and PyTorch names (every other key is an error, as is a missing key or a wrong shape):
  - `wrn28_2` (and `wrn` with `depth`/`widen_factor`): the release's `build_WideResNet`,
    `conv1`, `block{g}.layer.{b}.{bn1,conv1,bn2,conv2,convShortcut}`, `bn1`, `fc`.
  - `resnet50`: torchvision's ResNet-50 names, which timm's `resnet50` (what the release builds
    with `timm.create_model`) shares: `conv1`, `bn1`,
    `layer{s}.{b}.{conv1,bn1,conv2,bn2,conv3,bn3,downsample.0,downsample.1}`, `fc`.
  - `resnet32` (and `resnet20`): MiSLAS's/LDAM-DRW's `resnet_cifar.py`, `conv1`, `bn1`,
    `layer{s}.{b}.{conv1,bn1,conv2,bn2}`, `fc`; the option-A shortcuts (strided subsampling,
    channels zero-padded on both sides) have no parameters there nor here.
  The release's WideResNet pools with `avg_pool2d(8)`, which equals our global average only on
  32x32 inputs (the size it was trained at, STL-10 included): feed converted WRNs 32x32 images.

Layouts: Conv2d weight [O, I, H, W] -> kernel [H, W, I, O]; Linear weight [K, D] -> kernel
[D, K]; BatchNorm weight/bias -> params scale/bias, running_mean/running_var -> batch_stats
mean/var.

Needs PyTorch (`pip install -e ".[torch]"`, the CPU wheel is enough); this is the only module of
the package that imports it, and only when a checkpoint is read.
"""

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from selmix_jax import checkpointing
from selmix_jax import models

SOURCES = ("eval_model", "train_model")
_BN_BUFFERS_IGNORED = "num_batches_tracked"
_WRAPPER_PREFIX = "model."
_WRAPPER_HEAD = "classifier."
_PARALLEL_PREFIX = "module."
# The SelMix release's top-level entries.
_RELEASE_ENTRIES = ("train_model", "eval_model", "model", "state_dict")
# MiSLAS's `.pth.tar` entries (beside 'epoch', 'best_acc1', 'its_ece', which are not read).
_MISLAS_MODEL = "state_dict_model"
_MISLAS_CLASSIFIER = "state_dict_classifier"
_MISLAS_LWS = "state_dict_lws_model"
_MISLAS_BLOCK = "state_dict_block"
_MISLAS_ENTRIES = (_MISLAS_MODEL, _MISLAS_CLASSIFIER, _MISLAS_LWS, _MISLAS_BLOCK)
_MISLAS_SCALE = "learned_norm"


def conv_kernel(weight: np.ndarray) -> np.ndarray:
  """PyTorch `Conv2d.weight` [O, I, H, W] -> Flax `Conv` kernel [H, W, I, O]."""
  return np.transpose(weight, (2, 3, 1, 0))


def dense_kernel(weight: np.ndarray) -> np.ndarray:
  """PyTorch `Linear.weight` [K, D] -> Flax `Dense` kernel [D, K]."""
  return np.transpose(weight)


def _conv_torch_shape(kernel_shape: tuple[int, ...]) -> tuple[int, ...]:
  h, w, i, o = kernel_shape
  return (o, i, h, w)


# For each kind of layer: its PyTorch entries as (suffix, Flax collection, Flax leaf, array
# conversion, PyTorch shape from the Flax shape).
_KINDS = {
  "conv": (("weight", "params", "kernel", conv_kernel, _conv_torch_shape),),
  "dense": (
    ("weight", "params", "kernel", dense_kernel, lambda s: tuple(reversed(s))),
    ("bias", "params", "bias", np.asarray, tuple),
  ),
  "bn": (
    ("weight", "params", "scale", np.asarray, tuple),
    ("bias", "params", "bias", np.asarray, tuple),
    ("running_mean", "batch_stats", "mean", np.asarray, tuple),
    ("running_var", "batch_stats", "var", np.asarray, tuple),
  ),
}


@dataclasses.dataclass(frozen=True)
class _Layer:
  """One PyTorch module (`torch_name`) and the Flax module path it becomes."""

  torch_name: str
  flax_path: tuple[str, ...]
  kind: str  # a key of _KINDS


def _wrn_layers(backbone: models.WideResNet) -> list[_Layer]:
  """The release's `build_WideResNet(depth, widen_factor)` names, in forward order."""
  per_group = (backbone.depth - 4) // 6
  widths = [w * backbone.widen_factor for w in (16, 32, 64)]
  layers = [_Layer("conv1", ("backbone", "Conv_0"), "conv")]
  in_width = 16
  for index in range(3 * per_group):
    group, block = divmod(index, per_group)
    torch_block, flax_block = f"block{group + 1}.layer.{block}", ("backbone", f"_WRNBlock_{index}")
    for torch_name, flax_name, kind in (
      ("bn1", "BatchNorm_0", "bn"),
      ("conv1", "Conv_0", "conv"),
      ("bn2", "BatchNorm_1", "bn"),
      ("conv2", "Conv_1", "conv"),
    ):
      layers.append(_Layer(f"{torch_block}.{torch_name}", (*flax_block, flax_name), kind))
    if in_width != widths[group]:
      layers.append(_Layer(f"{torch_block}.convShortcut", (*flax_block, "Conv_2"), "conv"))
    in_width = widths[group]
  layers.append(_Layer("bn1", ("backbone", "BatchNorm_0"), "bn"))
  return layers


def _resnet_layers(backbone: models.ResNet) -> list[_Layer]:
  """torchvision's `resnet50` names (timm's `resnet50` uses the same), in forward order."""
  layers = [
    _Layer("conv1", ("backbone", "Conv_0"), "conv"),
    _Layer("bn1", ("backbone", "BatchNorm_0"), "bn"),
  ]
  index = 0
  for stage, num_blocks in enumerate(backbone.stage_sizes):
    for block in range(num_blocks):
      torch_block, flax_block = f"layer{stage + 1}.{block}", ("backbone", f"_Bottleneck_{index}")
      for i in range(3):
        layers.append(_Layer(f"{torch_block}.conv{i + 1}", (*flax_block, f"Conv_{i}"), "conv"))
        layers.append(_Layer(f"{torch_block}.bn{i + 1}", (*flax_block, f"BatchNorm_{i}"), "bn"))
      if block == 0:  # Every stage's first block projects its shortcut.
        layers.append(_Layer(f"{torch_block}.downsample.0", (*flax_block, "proj_conv"), "conv"))
        layers.append(_Layer(f"{torch_block}.downsample.1", (*flax_block, "proj_bn"), "bn"))
      index += 1
  return layers


def _cifar_resnet_layers(backbone: models.CifarResNet) -> list[_Layer]:
  """MiSLAS's (and LDAM-DRW's) `resnet_cifar.py` names, in forward order.

  Their option-A shortcut (`LambdaLayer`: subsample, zero-pad the channels) has no parameters,
  like ours, so every block is two convolutions and two BatchNorms on both sides.
  """
  layers = [
    _Layer("conv1", ("backbone", "Conv_0"), "conv"),
    _Layer("bn1", ("backbone", "BatchNorm_0"), "bn"),
  ]
  for index in range(len(backbone.widths) * backbone.blocks_per_stage):
    stage, block = divmod(index, backbone.blocks_per_stage)
    torch_block = f"layer{stage + 1}.{block}"
    flax_block = ("backbone", f"_CifarBasicBlock_{index}")
    for i in range(2):
      layers.append(_Layer(f"{torch_block}.conv{i + 1}", (*flax_block, f"Conv_{i}"), "conv"))
      layers.append(_Layer(f"{torch_block}.bn{i + 1}", (*flax_block, f"BatchNorm_{i}"), "bn"))
  return layers


def _layers(model: models.Classifier, model_name: str) -> list[_Layer]:
  if isinstance(model.backbone, models.WideResNet):
    layers = _wrn_layers(model.backbone)
  elif isinstance(model.backbone, models.ResNet):
    layers = _resnet_layers(model.backbone)
  elif isinstance(model.backbone, models.CifarResNet):
    layers = _cifar_resnet_layers(model.backbone)
  else:
    raise ValueError(
      f"No PyTorch layout is known for model {model_name!r}; convertible models: "
      "'wrn28_2' and 'wrn' (the release's WideResNet), 'resnet50' (torchvision/timm, "
      "MiSLAS), 'resnet32' and 'resnet20' (MiSLAS/LDAM-DRW CIFAR ResNets)."
    )
  return layers + [_Layer("fc", ("head",), "dense")]


# ------------------------------------------------------------------------------------------
# Reading a .pth file.


def _import_torch():
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
      "Converting PyTorch checkpoints needs torch: pip install -e '.[torch]' (the CPU wheel "
      "is enough)."
    ) from e
  return torch


def _is_state_dict(obj: Any, torch) -> bool:
  return (
    isinstance(obj, Mapping)
    and bool(obj)
    and all(isinstance(v, torch.Tensor) for v in obj.values())
  )


def _select_state_dict(
  ckpt: Any, source: str, where: str, torch
) -> tuple[Mapping, str, dict[str, str]]:
  """Picks the state dict of `source` out of a checkpoint file's top-level object.

  Returns:
    `(state_dict, entry, origins)`: `origins` maps a key of `state_dict` assembled from several
    entries (the MiSLAS layout) to its key inside its entry, for messages.
  """
  if _is_state_dict(ckpt, torch):
    return ckpt, "bare state dict", {}
  if not isinstance(ckpt, Mapping):
    raise TypeError(f"{where}: expected a dict (a state dict or a checkpoint), got {type(ckpt)}.")
  found = sorted(map(str, ckpt))
  mislas = [k for k in _MISLAS_ENTRIES if k in ckpt]
  if mislas:
    release = [k for k in _RELEASE_ENTRIES if k in ckpt]
    if release:
      raise ValueError(
        f"{where}: ambiguous layout: MiSLAS entries {mislas} beside the SelMix release's "
        f"{release} (top-level keys: {found}); save one model per file."
      )
    if source != SOURCES[0]:
      raise ValueError(
        f"{where}: a MiSLAS checkpoint holds one model; source={source!r} applies to the SelMix "
        "release's pre-training checkpoints only."
      )
    return _mislas_state_dict(ckpt, where, torch)
  if source in ckpt:
    chosen = source
  elif source == "eval_model" and "model" in ckpt:  # the release's fine-tuning checkpoints
    chosen = "model"
  elif source == "eval_model" and "state_dict" in ckpt:
    chosen = "state_dict"
  else:
    raise ValueError(
      f"{where}: no entry {source!r} (top-level keys: {found}). Expected the "
      "release's {'train_model', 'eval_model', ...}, {'model', ...}, {'state_dict', ...}, "
      "MiSLAS's {'state_dict_model', 'state_dict_classifier', ...} or a bare state dict."
    )
  if not _is_state_dict(ckpt[chosen], torch):
    raise ValueError(f"{where}: entry {chosen!r} is not a state dict of tensors.")
  return ckpt[chosen], f"entry {chosen!r}", {}


def _mislas_state_dict(ckpt: Mapping, where: str, torch) -> tuple[dict, str, dict[str, str]]:
  """One plain state dict from MiSLAS's backbone, classifier and (stage 2) LWS entries.

  MiSLAS's logits are `learned_norm * fc(backbone(x))` (`learned_norm` [1, K], the learnable
  weight scaling of stage 2; absent after stage 1). The scale is folded into the head,
  `fc.weight[k] *= s[k]`, `fc.bias[k] *= s[k]`, so our logits equal theirs.
  """
  found = sorted(map(str, ckpt))
  if _MISLAS_BLOCK in ckpt:
    raise ValueError(
      f"{where}: MiSLAS's Places-LT layout (an extra {_MISLAS_BLOCK!r}, a bottleneck after "
      f"ResNet-152) is not supported (top-level keys: {found})."
    )
  for entry in (_MISLAS_MODEL, _MISLAS_CLASSIFIER):
    if entry not in ckpt:
      raise ValueError(
        f"{where}: a MiSLAS checkpoint needs both {_MISLAS_MODEL!r} and "
        f"{_MISLAS_CLASSIFIER!r}; top-level keys: {found}."
      )
  parts = {}
  for entry in (_MISLAS_MODEL, _MISLAS_CLASSIFIER, _MISLAS_LWS):
    if entry in ckpt:
      if not _is_state_dict(ckpt[entry], torch):
        raise ValueError(f"{where}: entry {entry!r} is not a state dict of tensors.")
      parts[entry] = {_strip(k, _PARALLEL_PREFIX): k for k in ckpt[entry]}
  if set(parts[_MISLAS_CLASSIFIER]) != {"fc.weight", "fc.bias"}:
    raise ValueError(
      f"{where}: {_MISLAS_CLASSIFIER!r} has keys {sorted(ckpt[_MISLAS_CLASSIFIER])}; expected "
      "MiSLAS's Classifier, 'fc.weight' and 'fc.bias' (with or without 'module.')."
    )
  merged, origins = {}, {}
  for entry in (_MISLAS_MODEL, _MISLAS_CLASSIFIER):
    for name, key in parts[entry].items():
      if name in merged:
        raise ValueError(
          f"{where}: {entry}[{key!r}] and {_MISLAS_MODEL}[{origins[name]!r}] both name "
          f"{name!r}."
        )
      merged[name] = ckpt[entry][key]
      origins[name] = key
  description = f"MiSLAS {_MISLAS_MODEL} + {_MISLAS_CLASSIFIER}"
  if _MISLAS_LWS in parts:
    lws = parts[_MISLAS_LWS]
    if set(lws) != {_MISLAS_SCALE}:
      raise ValueError(
        f"{where}: {_MISLAS_LWS!r} has keys {sorted(ckpt[_MISLAS_LWS])}; expected MiSLAS's "
        f"LearnableWeightScaling, {_MISLAS_SCALE!r} (with or without 'module.')."
      )
    scale = ckpt[_MISLAS_LWS][lws[_MISLAS_SCALE]]
    weight, bias = merged["fc.weight"], merged["fc.bias"]
    num_classes = weight.shape[0]
    if tuple(scale.shape) not in ((1, num_classes), (num_classes,)):
      raise ValueError(
        f"{where}: {_MISLAS_LWS}[{lws[_MISLAS_SCALE]!r}] has shape {tuple(scale.shape)}; "
        f"expected (1, {num_classes}) for the classifier's {num_classes} classes."
      )
    scale = scale.detach().to(device="cpu", dtype=torch.float64).reshape(-1)
    merged["fc.weight"] = weight.to(device="cpu", dtype=torch.float64) * scale[:, None]
    merged["fc.bias"] = bias.to(device="cpu", dtype=torch.float64) * scale
    description += f" + {_MISLAS_LWS} (folded into fc)"
  return merged, description, origins


def _numpy_scalar_globals() -> list[Any]:
  """What `torch.load(weights_only=True)` needs to rebuild plain NumPy scalars."""
  core = getattr(np, "_core", None) or np.core  # NumPy 2 renamed numpy.core to numpy._core.
  scalar = core.multiarray.scalar
  dtypes = [
    getattr(np.dtypes, f"{kind}DType")
    for kind in (
      "Bool", "Float16", "Float32", "Float64", "Int8", "Int16", "Int32", "Int64",
      "UInt8", "UInt16", "UInt32", "UInt64",
    )
  ]
  # Files written under NumPy 1.x name the scalar constructor `numpy.core.multiarray.scalar`.
  return [scalar, (scalar, "numpy.core.multiarray.scalar"), np.dtype, *dtypes]


def _strip(key: str, prefix: str) -> str:
  while key.startswith(prefix):
    key = key[len(prefix) :]
  return key


def normalize_keys(state_dict: Mapping[str, np.ndarray], *, where: str) -> dict[str, str]:
  """Maps each key of a release state dict to the plain model's name.

  Strips DataParallel `module.` prefixes and the wrapper's `model.` prefix, and drops the
  wrapper's `classifier.*` (a second reference to `fc`) after checking it equals `fc`.

  Args:
    state_dict: {PyTorch key: array}.
    where: file (and entry) named in errors.

  Returns:
    {plain name (e.g. 'block1.layer.0.bn1.weight'): key in `state_dict`}.

  Raises:
    ValueError: a wrapper key outside `model.*`/`classifier.*`, a `classifier.*` entry that
      differs from `model.fc.*`, or two keys with the same plain name.
  """
  keys = {_strip(k, _PARALLEL_PREFIX): k for k in state_dict}
  wrapped = any(k.startswith(_WRAPPER_PREFIX) for k in keys)
  names = {}
  for key, original in keys.items():
    if wrapped and key.startswith(_WRAPPER_HEAD):
      twin = f"{_WRAPPER_PREFIX}fc.{key[len(_WRAPPER_HEAD) :]}"
      if twin not in keys or not np.array_equal(state_dict[keys[twin]], state_dict[original]):
        raise ValueError(
          f"{where}: key {original!r} (the wrapper's classifier) does not equal {twin!r}."
        )
      continue
    if wrapped:
      if not key.startswith(_WRAPPER_PREFIX):
        raise ValueError(
          f"{where}: unexpected key {original!r} beside the wrapper's 'model.*' and "
          "'classifier.*' keys."
        )
      key = _strip(key[len(_WRAPPER_PREFIX) :], _PARALLEL_PREFIX)
    if key in names:
      raise ValueError(f"{where}: keys {names[key]!r} and {original!r} both name {key!r}.")
    names[key] = original
  return names


def load_torch_state_dict(
  path: str, *, source: str = "eval_model", trust_pickle: bool = False
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """Reads one model's state dict from a `.pth` file as float32 NumPy arrays.

  Args:
    path: the checkpoint file.
    source: 'eval_model' (the EMA weights SelMix fine-tunes from) or 'train_model'.
    trust_pickle: load with `weights_only=False` (runs arbitrary pickled code: only for files
      from a source you trust, when the safe loader refuses one).

  Returns:
    `(state_dict, info)`: `state_dict` maps plain names (see `normalize_keys`) to float32
    arrays, without `num_batches_tracked`; `info` has `where` (file and entry, for messages),
    `original_keys` (plain name -> key in the file or its entry), `step` (the checkpoint's `it`,
    or 0) and `epoch` (MiSLAS's `epoch`, or None).

  Raises:
    FileNotFoundError: no such file.
    ImportError: torch is not installed.
    TypeError: the file holds something other than a dict.
    ValueError: an unreadable file or an unexpected layout (the message names the key).
  """
  if source not in SOURCES:
    raise ValueError(f"source={source!r}; expected one of {SOURCES}.")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"PyTorch checkpoint {path!r} does not exist.")
  torch = _import_torch()
  try:
    # NumPy scalars are allowed: MiSLAS stores its ECE ('its_ece') as one.
    with torch.serialization.safe_globals(_numpy_scalar_globals()):
      ckpt = torch.load(path, map_location="cpu", weights_only=not trust_pickle)
  except Exception as e:  # torch raises UnpicklingError, RuntimeError, ... for bad files.
    hint = (
      ""
      if trust_pickle
      else (
        " If the file holds more than tensors and plain types and you trust its origin, pass "
        "trust_pickle=True (--trust_pickle)."
      )
    )
    raise ValueError(f"Could not read PyTorch checkpoint {path!r}: {e}.{hint}") from e
  raw, entry, origins = _select_state_dict(ckpt, source, path, torch)
  where = f"{path} ({entry})"
  arrays = {}
  for key, tensor in raw.items():
    if key.rsplit(".", 1)[-1] == _BN_BUFFERS_IGNORED:
      continue
    arrays[key] = tensor.detach().to(device="cpu", dtype=torch.float32).numpy()
  names = normalize_keys(arrays, where=where)
  step = ckpt.get("it", 0) if isinstance(ckpt, Mapping) else 0
  epoch = ckpt.get("epoch") if isinstance(ckpt, Mapping) else None
  info = {
    "where": where,
    "original_keys": {name: origins.get(key, key) for name, key in names.items()},
    "step": int(step) if isinstance(step, int) and step >= 0 else 0,
    "epoch": epoch if isinstance(epoch, int) else None,  # MiSLAS's epoch count
  }
  return {name: arrays[key] for name, key in names.items()}, info


# ------------------------------------------------------------------------------------------
# State dict -> Flax variables.


def _template(model: models.Classifier) -> dict[str, Any]:
  """Shapes of the model's variables; parameter shapes do not depend on the image size."""
  x = jnp.zeros((1, 32, 32, 3), jnp.float32)
  return jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))


def _get(tree: Mapping, path: tuple[str, ...]) -> Any:
  for name in path:
    tree = tree[name]
  return tree


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
  for name in path[:-1]:
    tree = tree.setdefault(name, {})
  tree[path[-1]] = value


def _leaf_paths(tree: Mapping, prefix: tuple[str, ...] = ()) -> set[tuple[str, ...]]:
  out = set()
  for k, v in tree.items():
    out |= _leaf_paths(v, (*prefix, k)) if isinstance(v, Mapping) else {(*prefix, k)}
  return out


def state_dict_to_flax(
  state_dict: Mapping[str, np.ndarray],
  model: models.Classifier,
  *,
  model_name: str,
  where: str = "state dict",
  original_keys: Mapping[str, str] | None = None,
) -> dict[str, Any]:
  """Converts a plain-named state dict into the Flax variables of `model`.

  Args:
    state_dict: {plain PyTorch name: float32 array} (see `load_torch_state_dict`).
    model: the `Classifier` to fill, e.g. `models.get('wrn28_2', num_classes=10)`.
    model_name: its registry name (for messages).
    where: the file (and entry) named in errors.
    original_keys: plain name -> key as stored in the file, for messages.

  Returns:
    `{'params': ..., 'batch_stats': ...}` of nested dicts of float32 NumPy arrays.

  Raises:
    ValueError: a missing key, an unexpected key or a wrong shape; the message names the key.
  """
  original_keys = original_keys or {}
  template = _template(model)
  out: dict[str, Any] = {"params": {}, "batch_stats": {}}
  used = set()
  for layer in _layers(model, model_name):
    for suffix, collection, leaf, to_flax, torch_shape in _KINDS[layer.kind]:
      key = f"{layer.torch_name}.{suffix}"
      if key not in state_dict:
        stripped = any(name != stored for name, stored in original_keys.items())
        raise ValueError(
          f"{where}: missing key {key!r}"
          + (" (named without its 'model.'/'module.' prefixes)" if stripped else "")
          + f", which {model_name} (num_classes={model.num_classes}) needs. Wrong --model, or "
          "not a checkpoint of the release?"
        )
      want = torch_shape(_get(template[collection], (*layer.flax_path, leaf)).shape)
      if tuple(state_dict[key].shape) != want:
        raise ValueError(
          f"{where}: key {original_keys.get(key, key)!r} has shape "
          f"{tuple(state_dict[key].shape)}, but {model_name} with num_classes="
          f"{model.num_classes} needs {want}."
        )
      value = np.asarray(to_flax(state_dict[key]), np.float32)
      _set(out[collection], (*layer.flax_path, leaf), value)
      used.add(key)
  unexpected = sorted(set(state_dict) - used)
  if unexpected:
    raise ValueError(
      f"{where}: unexpected key {original_keys.get(unexpected[0], unexpected[0])!r} "
      f"({len(unexpected)} unexpected in all): {model_name} has no such layer. Wrong --model?"
    )
  for collection in ("params", "batch_stats"):
    missing = _leaf_paths(template.get(collection, {})) - _leaf_paths(out[collection])
    if missing:  # The layer tables above must cover the Flax model; a bug if they do not.
      raise AssertionError(f"Conversion to {model_name} leaves {min(missing)} unset.")
  return out


def _convert(
  path: str, model_name: str, num_classes: int, *, source: str, trust_pickle: bool, **kwargs
) -> tuple[dict[str, Any], dict[str, Any]]:
  model = models.get(model_name, num_classes=num_classes, **kwargs)
  state_dict, info = load_torch_state_dict(path, source=source, trust_pickle=trust_pickle)
  variables = state_dict_to_flax(
    state_dict,
    model,
    model_name=model_name,
    where=info["where"],
    original_keys=info["original_keys"],
  )
  return variables, info


def from_torch(
  path: str,
  model_name: str,
  num_classes: int,
  *,
  source: str = "eval_model",
  trust_pickle: bool = False,
  **model_kwargs: Any,
) -> dict[str, Any]:
  """Flax variables of our registered model from one of the release's `.pth` files.

  Args:
    path: the PyTorch checkpoint.
    model_name: 'wrn28_2', 'wrn' (with `depth`/`widen_factor` in `model_kwargs`), 'resnet50',
      'resnet32' or 'resnet20'.
    num_classes: K of the checkpoint's head.
    source: 'eval_model' (EMA weights; default) or 'train_model' of a pre-training checkpoint.
    trust_pickle: see `load_torch_state_dict`.
    **model_kwargs: passed to `models.get`.

  Returns:
    `{'params': ..., 'batch_stats': ...}` (nested dicts of float32 NumPy arrays) for
    `models.get(model_name, num_classes=num_classes, **model_kwargs).apply`.

  Raises:
    ValueError: unknown model, or a file that does not match it (names the key).
  """
  variables, _ = _convert(
    path, model_name, num_classes, source=source, trust_pickle=trust_pickle, **model_kwargs
  )
  return variables


def write_checkpoint(
  torch_checkpoint: str,
  model_name: str,
  num_classes: int,
  out: str,
  *,
  source: str = "eval_model",
  trust_pickle: bool = False,
) -> str:
  """Converts `torch_checkpoint` and writes it as an Orbax checkpoint for fine-tuning.

  The directory `out` gets one step (the release's iteration count `it`, else 0) holding
  `{'state': {'params', 'batch_stats'}}`, which `checkpointing.load_pretrained(out)` reads:
  pass it as `--config.selmix.init_checkpoint=<out>`.

  Returns:
    The absolute path of `out`.

  Raises:
    FileExistsError: `out` already holds a checkpoint.
    ValueError: see `from_torch`.
  """
  variables, info = _convert(
    torch_checkpoint, model_name, num_classes, source=source, trust_pickle=trust_pickle
  )
  manager = checkpointing.make_manager(out, max_to_keep=1)
  existing = manager.latest_step()
  if existing is not None:
    manager.close()
    raise FileExistsError(
      f"{out!r} already holds a checkpoint (step {existing}); pick a new --out."
    )
  checkpointing.save(manager, info["step"], {"state": variables}, force=True)
  manager.wait_until_finished()
  manager.close()
  logging.info(
    "Converted %s%s into %s (%s, K = %d, %d parameters) at step %d.",
    info["where"],
    "" if info["epoch"] is None else f" of epoch {info['epoch']}",
    out,
    model_name,
    num_classes,
    sum(x.size for x in jax.tree.leaves(variables["params"])),
    info["step"],
  )
  return os.path.abspath(out)


# ------------------------------------------------------------------------------------------
# Command line.


def _define_flags() -> None:
  flags.DEFINE_string("torch_checkpoint", None, "The release's .pth (or MiSLAS's .pth.tar) file.")
  flags.DEFINE_string("model", None, "Our model name: wrn28_2, resnet50 or resnet32.")
  flags.DEFINE_integer("num_classes", None, "Number of classes K of the checkpoint.")
  flags.DEFINE_string("out", None, "New Orbax checkpoint directory (init_checkpoint).")
  flags.DEFINE_enum("source", "eval_model", SOURCES, "Which weights of a pre-training checkpoint.")
  flags.DEFINE_bool(
    "trust_pickle", False, "torch.load(weights_only=False); only for files you trust."
  )
  flags.mark_flags_as_required(["torch_checkpoint", "model", "num_classes", "out"])


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  write_checkpoint(
    f.torch_checkpoint,
    f.model,
    f.num_classes,
    f.out,
    source=f.source,
    trust_pickle=f.trust_pickle,
  )


if __name__ == "__main__":
  _define_flags()
  app.run(main)
