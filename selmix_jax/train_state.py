"""The training state and every conversion it goes through: host <-> devices <-> checkpoint.

A run's state has three forms, and this module is the only place that converts between them:

  TrainState (host)  --replicate-->    device replicas (leading device axis, what pmap eats)
                     <--unreplicate--
  TrainState         --to_checkpoint-->  plain nested dict of NumPy arrays (what Orbax stores)
                     <--from_checkpoint-- (into a template TrainState of the same model)

plus `pretrained_variables`, which picks the `{'params', 'batch_stats'}` to fine-tune from out of
a pre-training checkpoint (its EMA copy when there is one and it is asked for). Checkpoints hold
plain dicts (no Flax classes) so they load in a notebook; `flax.serialization` gives the dict form
of a dataclass pytree, so the same two functions serve the SelMix state (`selmix_state`).
"""

from typing import Any, TypeVar

import flax
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state

from selmix_jax import checkpointing

T = TypeVar("T")


class TrainState(train_state.TrainState):
  """`flax` TrainState plus BatchNorm statistics and an optional EMA (None when unused)."""

  batch_stats: Any = None
  ema_params: Any = None
  ema_batch_stats: Any = None

  def eval_variables(self, *, use_ema: bool = False) -> dict[str, Any]:
    """`{'params', 'batch_stats'}` to evaluate: the EMA copies when `use_ema`."""
    if use_ema:
      return {"params": self.ema_params, "batch_stats": self.ema_batch_stats}
    return {"params": self.params, "batch_stats": self.batch_stats}


def create(
    model: flax.linen.Module,
    key: jax.Array,
    image_shape: tuple[int, ...],
    tx: optax.GradientTransformation,
    *,
    ema: bool = False,
) -> TrainState:
  """Initialises a model on a dummy input and wraps it.

  Args:
    model: a `selmix_jax.models.Classifier`.
    key: PRNG key for the initialisation.
    image_shape: `(H, W, C)` of one input image, or a whole input shape `(N, H, W, C)`.
    tx: the optimiser.
    ema: also keep EMA copies of `params` and `batch_stats` (initialised to them).
  """
  input_shape = tuple(image_shape) if len(image_shape) == 4 else (1, *image_shape)
  variables = model.init(key, jnp.zeros(input_shape, jnp.float32), train=False)
  params = variables["params"]
  batch_stats = variables.get("batch_stats", {})
  return TrainState.create(
      apply_fn=model.apply,
      params=params,
      tx=tx,
      batch_stats=batch_stats,
      ema_params=params if ema else None,
      ema_batch_stats=batch_stats if ema else None,
  )


def from_variables(model, variables: dict[str, Any], tx: optax.GradientTransformation):
  """A TrainState (step 0, no EMA) around given `{'params', 'batch_stats'}`."""
  return TrainState.create(
      apply_fn=model.apply,
      params=jax.tree.map(jnp.asarray, variables["params"]),
      tx=tx,
      batch_stats=jax.tree.map(jnp.asarray, variables.get("batch_stats") or {}),
  )


def local_sharding(axis_name: str = "batch", devices=None) -> jax.sharding.NamedSharding:
  """Leading axis split over this process's devices, as `pmap(axis_name=...)` places its
  inputs and outputs: what `replicate` and `loader.Feed` (the batches) put on the devices.

  Under JAX >= 0.8 `pmap` keys its trace cache on input shardings, so inputs placed this way
  compile the step once.
  """
  devices = jax.local_devices() if devices is None else devices
  mesh = jax.sharding.Mesh(np.array(devices), (axis_name,))
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(axis_name))


def replicate(tree: T, *, axis_name: str = "batch", devices=None) -> T:
  """Stacks `tree` over the local devices, placed as `pmap(..., axis_name)` places outputs.

  Under JAX >= 0.8 `pmap` is `jit(shard_map)` and its trace cache sees input shardings:
  a state replicated any other way (e.g. `flax.jax_utils.replicate`, whose mesh axis is
  named differently) makes the second call trace and compile the step again.

  Args:
    tree: a host or single-device pytree (e.g. a TrainState).
    axis_name: the pmap axis name of the step that will consume the tree.
    devices: defaults to `jax.local_devices()`.

  Returns:
    The tree with a leading device axis, sharded one slice per device.
  """
  devices = jax.local_devices() if devices is None else devices
  return jax.device_put(
      jax.tree.map(lambda x: jnp.broadcast_to(x, (len(devices), *jnp.shape(x))), tree),
      local_sharding(axis_name, devices),
  )


def local_replicas(x: jax.Array) -> np.ndarray:
  """`[n_local, ...]` host copy of this process's slices of a `[n_devices, ...]` pmap output.

  Reads only the shards on this process's devices: indexing a multi-process array (`x[0]`)
  would be a collective that every process must join.
  """
  if not isinstance(x, jax.Array):
    return np.asarray(x)
  shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0)
  return np.concatenate([np.asarray(s.data) for s in shards])


def unreplicate(tree: T) -> T:
  """This process's first copy of a replicated tree (the replicas are identical), on the host."""
  return jax.tree.map(lambda x: local_replicas(x)[0], tree)


def to_checkpoint(tree: Any) -> dict[str, Any]:
  """A TrainState (or any dataclass pytree) as a nested dict of host NumPy arrays."""
  as_dict = flax.serialization.to_state_dict(tree)
  return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), as_dict)


def from_checkpoint(template: T, stored: dict[str, Any]) -> T:
  """Fills `template` (same model/optimiser) with the arrays of a `to_checkpoint` dict."""
  return flax.serialization.from_state_dict(template, stored)


def save(manager, step: int, trees: dict[str, Any]) -> None:
  """Checkpoints host pytrees `{'state': TrainState, 'selmix': SelMixState, ...}` at `step`.

  Unreplicate device replicas first (`unreplicate`). Asynchronous; atomic on completion.
  """
  checkpointing.save(manager, step, {k: to_checkpoint(v) for k, v in trees.items()})


def restore(manager, templates: dict[str, T]) -> tuple[dict[str, T], int | None]:
  """The latest readable checkpoint of `manager` filled into host `templates`, and its step.

  Returns the templates unchanged and None when the manager holds no finished checkpoint. See
  `checkpointing.restore_latest` for damaged and mismatched checkpoints.
  """
  stored, step = checkpointing.restore_latest(
      manager, {k: to_checkpoint(v) for k, v in templates.items()}
  )
  if step is None:
    return templates, None
  return {k: from_checkpoint(v, stored[k]) for k, v in templates.items()}, step


def pretrained_variables(stored: dict[str, Any], *, use_ema: bool) -> tuple[dict[str, Any], str]:
  """The `{'params', 'batch_stats'}` to fine-tune from, out of a pre-training checkpoint.

  Args:
    stored: the checkpoint tree, `{'state': to_checkpoint(TrainState)}`.
    use_ema: take the EMA copy when the checkpoint has one (SPEC §6; FixMatch keeps one).

  Returns:
    `(variables, which)` with `which` in ('EMA', 'raw') for messages.
  """
  state = stored.get("state", {})
  prefix = "ema_" if use_ema and state.get("ema_params") else ""
  variables = {
      "params": state.get(prefix + "params"),
      "batch_stats": state.get(prefix + "batch_stats"),
  }
  return variables, ("EMA" if prefix else "raw")
