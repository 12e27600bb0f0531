"""Optimisers and learning-rate schedules for pre-training and SelMix fine-tuning.

Parameter roles are read from the parameter tree of a `selmix_jax.models.Classifier`:
- a module holding `scale` (and no `kernel`) is a normalisation layer: its `scale`/`bias`
  are BatchNorm parameters;
- `kernel` leaves are weights and the only leaves that get weight decay;
- everything under the top-level `head` is the linear head.
"""

import math
from typing import Any

import jax
import jax.numpy as jnp
import optax

HEAD, BACKBONE, FROZEN = "head", "backbone", "frozen"


def _key_name(entry) -> str:
  return str(getattr(entry, "key", getattr(entry, "name", entry)))


def weight_decay_mask(params: Any) -> Any:
  """True for `kernel` leaves (conv and dense weights), False for biases and norm params."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: bool(path) and _key_name(path[-1]) == "kernel", params
  )


def _is_norm_module(subtree: Any) -> bool:
  return isinstance(subtree, dict) and "scale" in subtree and "kernel" not in subtree


def _label_tree(tree: Any, top_level: str | None, in_norm: bool) -> Any:
  if isinstance(tree, dict) or hasattr(tree, "items"):
    norm_here = in_norm or _is_norm_module(dict(tree))
    return {
        k: _label_tree(v, top_level if top_level is not None else str(k), norm_here)
        for k, v in tree.items()
    }
  if in_norm:
    return FROZEN
  return HEAD if top_level == HEAD else BACKBONE


def selmix_param_labels(params: Any) -> Any:
  """Labels each parameter 'head', 'backbone' or 'frozen' (normalisation scale/bias).

  Args:
    params: the `params` collection of a `Classifier` (nested dicts).

  Returns:
    A tree of the same structure holding label strings.
  """
  return _label_tree(params, None, False)


def make_pretrain_optimizer(
    *,
    learning_rate: optax.ScalarOrSchedule,
    momentum: float = 0.9,
    nesterov: bool = True,
    weight_decay: float = 5e-4,
    decay_all: bool = False,
) -> optax.GradientTransformation:
  """SGD with (Nesterov) momentum; L2 weight decay on kernels only (PyTorch-style coupled).

  The decay is added to the gradient before momentum, as `torch.optim.SGD(weight_decay=...)`
  does on the parameter group that holds the weights. `decay_all` decays every parameter
  (biases and normalisation scales too), as one torch group holding the whole model does.
  """
  return optax.chain(
      optax.add_decayed_weights(weight_decay, mask=None if decay_all else weight_decay_mask),
      optax.sgd(learning_rate, momentum=momentum, nesterov=nesterov),
  )


def _scaled(learning_rate: optax.ScalarOrSchedule, factor: float) -> optax.ScalarOrSchedule:
  if callable(learning_rate):
    return lambda count: factor * learning_rate(count)
  return factor * learning_rate


def make_selmix_optimizer(
    params: Any,
    *,
    learning_rate: optax.ScalarOrSchedule,
    backbone_lr_mult: float = 0.1,
    weight_decay: float = 5e-4,
    train_backbone: bool = True,
) -> optax.GradientTransformation:
  """SelMix fine-tuning optimiser (SPEC section 6): plain SGD with parameter groups.

  Groups: 'head' at `learning_rate`, 'backbone' at `backbone_lr_mult * learning_rate`,
  'frozen' (BatchNorm scale/offset) gets zero updates. Weight decay on kernels only, added to
  the gradient before the group's learning rate is applied.

  Args:
    params: the model's `params` tree, used to assign the groups.
    learning_rate: float or schedule for the head.
    backbone_lr_mult: backbone learning rate relative to the head's.
    weight_decay: L2 coefficient on kernels.
    train_backbone: False = the head only: the 'backbone' group gets zero updates too (the
      authors' `freeze_backbone`), so its parameters stay bit-identical.
  """
  labels = selmix_param_labels(params)
  backbone = optax.sgd(_scaled(learning_rate, backbone_lr_mult))
  if not train_backbone:
    backbone = optax.set_to_zero()
  return optax.chain(
      optax.add_decayed_weights(weight_decay, mask=weight_decay_mask),
      optax.multi_transform(
          {
              HEAD: optax.sgd(learning_rate),
              BACKBONE: backbone,
              FROZEN: optax.set_to_zero(),
          },
          labels,
      ),
  )


def cosine_schedule(base_lr: float, num_steps: int) -> optax.Schedule:
  """`base_lr * (1 + cos(pi k / K)) / 2`: cosine decay to 0 at step K = num_steps."""
  return optax.cosine_decay_schedule(base_lr, decay_steps=num_steps, alpha=0.0)


def fixmatch_cosine_schedule(base_lr: float, num_steps: int) -> optax.Schedule:
  """FixMatch's `base_lr * cos(7 pi k / (16 K))` (ends at ~0.2 * base_lr), clipped at K."""

  def schedule(count):
    k = jnp.minimum(count, num_steps).astype(jnp.float32)
    return base_lr * jnp.cos(7.0 * math.pi * k / (16.0 * num_steps))

  return schedule
