"""Per-device training and evaluation steps.

Every step is a module-level function of `(state, batch, key)` written for ONE device; it
communicates only through named-axis collectives over `axis_name`, so the call site chooses
the transform:

  p_step = jax.pmap(
      functools.partial(supervised_step, preprocess_fn=preprocess),
      axis_name='batch', in_axes=(0, 0, None), donate_argnums=(0,))

(`jax.shard_map` over a mesh axis named 'batch' works unchanged.) Hyperparameters and the
augmentation callables are bound with `functools.partial`; nothing else is static.

Batches hold uint8 images; the step augments and normalises them itself with keys derived per
example from `(key, step, stream, dataset index)`, so the random draws do not depend on how
the global batch is split over devices. `preprocess_fn(images_uint8 [b, H, W, C], keys [b])`
must return float32 `[b, H, W, C]`.
"""

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from selmix_jax import confusion as confusion_lib
from selmix_jax import train_state
from selmix_jax.data import augment
from selmix_jax.data import device as device_lib

Preprocess = Callable[[jax.Array, jax.Array], jax.Array]

# Random streams folded in after the step, so different uses of one example never share keys.
_STREAM_LABELED_WEAK, _STREAM_UNLABELED_WEAK, _STREAM_UNLABELED_STRONG = 0, 1, 2
_STREAM_X1, _STREAM_X2, _STREAM_MIX = 3, 4, 5
_STREAM_PAIRS = 6  # The device-resident pair draw (`device_selmix_step`).


def logit_adjustment(class_counts: np.ndarray, tau: float) -> np.ndarray | None:
  """`tau * log(prior)` [K] of the training labels (Menon et al. 2021), or None when tau is 0."""
  if not tau:
    return None
  prior = np.asarray(class_counts, np.float64) / np.sum(class_counts)
  return (tau * np.log(np.maximum(prior, 1e-12))).astype(np.float32)


def _keys(key, step, stream, index):
  return augment.example_keys(key, step, index, stream=stream)


def _cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Per-example CE: [b, K], [b] -> [b]."""
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def _accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return jnp.mean(jnp.argmax(logits, axis=-1) == labels)


def supervised_step(
    state: train_state.TrainState,
    batch: dict[str, jax.Array],
    key: jax.Array,
    *,
    preprocess_fn: Preprocess,
    logit_adjustment: jax.Array | None = None,
    axis_name: str = "batch",
) -> tuple[train_state.TrainState, dict[str, jax.Array]]:
  """One SGD step of (logit-adjusted) cross-entropy.

  Args:
    state: replicated TrainState.
    batch: {'images': uint8 [b, H, W, C], 'labels': int [b], 'index': int [b]}.
    key: base PRNG key (same on every device).
    preprocess_fn: `(images, keys) -> float32 images`, e.g. weak augmentation + normalise.
    logit_adjustment: `tau * log(prior)` [K] added to the logits inside the loss only
      (Menon et al. 2021), or None for plain CE.
    axis_name: the device axis.

  Returns:
    The new state and {'loss', 'accuracy'} averaged over devices (accuracy of raw logits).
  """
  images = preprocess_fn(
      batch["images"], _keys(key, state.step, _STREAM_LABELED_WEAK, batch["index"])
  )
  labels = batch["labels"]

  def loss_fn(params):
    logits, updates = state.apply_fn(
        {"params": params, "batch_stats": state.batch_stats},
        images,
        train=True,
        mutable=["batch_stats"],
    )
    adjusted = logits if logit_adjustment is None else logits + logit_adjustment
    return _cross_entropy(adjusted, labels).mean(), (logits, updates["batch_stats"])

  (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  grads = jax.lax.pmean(grads, axis_name)
  # Running statistics stay identical on all devices (a no-op when BN syncs its statistics).
  batch_stats = jax.lax.pmean(batch_stats, axis_name)
  state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
  metrics = {"loss": loss, "accuracy": _accuracy(logits, labels)}
  return state, jax.lax.pmean(metrics, axis_name)


def _ema(decay: float, ema_tree: Any, tree: Any) -> Any:
  return jax.tree.map(lambda e, x: decay * e + (1.0 - decay) * x, ema_tree, tree)


def fixmatch_step(
    state: train_state.TrainState,
    batch: dict[str, jax.Array],
    key: jax.Array,
    *,
    weak_fn: Preprocess,
    strong_fn: Preprocess,
    threshold: float = 0.95,
    unlabeled_weight: float = 1.0,
    logit_adjustment: jax.Array | None = None,
    ema_decay: float = 0.999,
    axis_name: str = "batch",
) -> tuple[train_state.TrainState, dict[str, jax.Array]]:
  """One FixMatch step (Sohn et al. 2020), optionally logit-adjusted on the labeled loss.

  One forward pass on concat(labeled weak, unlabeled weak, unlabeled strong), so BatchNorm
  sees all three views. Pseudo-labels are the argmax of the (stop-gradient) weak-view
  prediction, kept where its confidence is >= `threshold`.

  Args:
    state: replicated TrainState; its EMA (if not None) is updated after the step.
    batch: {'labeled_images' uint8 [b, ...], 'labels' [b], 'labeled_index' [b],
      'unlabeled_images' uint8 [mu*b, ...], 'unlabeled_index' [mu*b]}.
    key: base PRNG key.
    weak_fn, strong_fn: `(images, keys) -> float32 images` (augment + normalise).
    threshold: confidence threshold for pseudo-labels.
    unlabeled_weight: weight of the unlabeled loss.
    logit_adjustment: `tau * log(prior)` [K] for the labeled loss, or None.
    ema_decay: EMA decay of params and batch_stats.
    axis_name: the device axis.

  Returns:
    The new state and {'loss', 'labeled_loss', 'unlabeled_loss', 'mask_rate'} device means.
  """
  labels = batch["labels"]
  x_l = weak_fn(
      batch["labeled_images"],
      _keys(key, state.step, _STREAM_LABELED_WEAK, batch["labeled_index"]),
  )
  u_index = batch["unlabeled_index"]
  x_uw = weak_fn(
      batch["unlabeled_images"], _keys(key, state.step, _STREAM_UNLABELED_WEAK, u_index)
  )
  x_us = strong_fn(
      batch["unlabeled_images"], _keys(key, state.step, _STREAM_UNLABELED_STRONG, u_index)
  )
  num_l, num_u = x_l.shape[0], x_uw.shape[0]

  def loss_fn(params):
    logits, updates = state.apply_fn(
        {"params": params, "batch_stats": state.batch_stats},
        jnp.concatenate([x_l, x_uw, x_us]),
        train=True,
        mutable=["batch_stats"],
    )
    logits_l, logits_uw, logits_us = jnp.split(logits, [num_l, num_l + num_u])
    adjusted_l = logits_l if logit_adjustment is None else logits_l + logit_adjustment
    labeled_loss = _cross_entropy(adjusted_l, labels).mean()
    probs_uw = jax.nn.softmax(jax.lax.stop_gradient(logits_uw))
    pseudo_labels = jnp.argmax(probs_uw, axis=-1)
    mask = (jnp.max(probs_uw, axis=-1) >= threshold).astype(jnp.float32)
    unlabeled_loss = jnp.mean(mask * _cross_entropy(logits_us, pseudo_labels))
    loss = labeled_loss + unlabeled_weight * unlabeled_loss
    aux = {
        "loss": loss,
        "labeled_loss": labeled_loss,
        "unlabeled_loss": unlabeled_loss,
        "mask_rate": mask.mean(),
    }
    return loss, (aux, updates["batch_stats"])

  (_, (metrics, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  grads = jax.lax.pmean(grads, axis_name)
  batch_stats = jax.lax.pmean(batch_stats, axis_name)
  state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
  if state.ema_params is not None:
    state = state.replace(
        ema_params=_ema(ema_decay, state.ema_params, state.params),
        ema_batch_stats=_ema(ema_decay, state.ema_batch_stats, state.batch_stats),
    )
  return state, jax.lax.pmean(metrics, axis_name)


# BatchNorm statistics a SelMix training pass may normalise by (`selmix_step(bn_stats=...)`).
BN_STATS_MODES = ("batch", "running")


def selmix_step(
    state: train_state.TrainState,
    batch: dict[str, jax.Array],
    key: jax.Array,
    *,
    preprocess_fn: Preprocess,
    mix_weight_min: float = 0.6,
    fuse_passes: bool = False,
    bn_stats: str = "batch",
    axis_name: str = "batch",
) -> tuple[train_state.TrainState, dict[str, jax.Array]]:
  """One SelMix fine-tuning step: CE of the head on mixed features, labelled y1 (SPEC §6).

  Features of x1 and x2 come from separate passes with BatchNorm normalising by each pass's
  own batch statistics (`bn_stats='batch'`, SPEC §6) or by the frozen running statistics that
  evaluation uses (`bn_stats='running'`); the running statistics are NOT updated
  (`state.batch_stats` is returned unchanged). `mix_weight ~ U[mix_weight_min, 1]` per pair;
  the mixed feature `w g(x1) + (1 - w) g(x2)` goes through the head. The optimiser is
  `state.tx` (normally `optim.make_selmix_optimizer`: head lr, backbone lr/10, BatchNorm
  frozen).

  Pairs are drawn with replacement, so the same example may occur twice in a batch; keys are
  therefore derived from (stream, dataset index, global position in the batch), the latter
  assuming the global batch is split over devices in contiguous blocks (`reshape(n, B/n)`).

  Args:
    state: replicated TrainState.
    batch: {'images1' uint8 [b, ...], 'labels1' [b], 'index1' [b], 'images2' uint8 [b, ...],
      'index2' [b]}.
    key: base PRNG key.
    preprocess_fn: `(images, keys) -> float32 images`.
    mix_weight_min: lower end of the uniform mix weight (a float, or a traced scalar when the
      step is `vmap`ped over runs that differ in it).
    fuse_passes: compute both passes in one `vmap`ped call over a stacked [2, b] batch
      (BatchNorm statistics still per pass); same numbers, one larger convolution per layer.
    bn_stats: 'batch' (each pass's own statistics) or 'running' (the frozen running
      statistics, as in evaluation: a batch concentrated on a few classes by P is then
      normalised exactly as at test time).
    axis_name: the device axis.

  Returns:
    The new state and {'loss', 'accuracy', 'mix_weight'} device means.
  """
  if bn_stats not in BN_STATS_MODES:
    raise ValueError(f"bn_stats={bn_stats!r}; expected one of {BN_STATS_MODES}.")
  local_batch = batch["labels1"].shape[0]
  position = jax.lax.axis_index(axis_name) * local_batch + jnp.arange(local_batch)

  def keys(stream, index):
    return jax.vmap(jax.random.fold_in)(_keys(key, state.step, stream, index), position)

  x1 = preprocess_fn(batch["images1"], keys(_STREAM_X1, batch["index1"]))
  x2 = preprocess_fn(batch["images2"], keys(_STREAM_X2, batch["index2"]))
  mix_keys = _keys(key, state.step, _STREAM_MIX, position)
  mix_weight = jax.vmap(
      lambda k: jax.random.uniform(k, (), minval=mix_weight_min, maxval=1.0)
  )(mix_keys)
  labels = batch["labels1"]

  def loss_fn(params):
    variables = {"params": params, "batch_stats": state.batch_stats}

    def features(x):
      if bn_stats == "running":
        return state.apply_fn(variables, x, train=False, method="features")
      # Batch-statistics mode; the running-statistics update is discarded.
      f, _ = state.apply_fn(
          variables, x, train=True, method="features", mutable=["batch_stats"]
      )
      return f

    if fuse_passes:
      f1, f2 = jax.vmap(features)(jnp.stack([x1, x2]))
    else:
      f1, f2 = features(x1), features(x2)
    w = mix_weight[:, None]
    logits = state.apply_fn(variables, w * f1 + (1.0 - w) * f2, method="classify")
    return _cross_entropy(logits, labels).mean(), logits

  (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  grads = jax.lax.pmean(grads, axis_name)
  state = state.apply_gradients(grads=grads)
  metrics = {
      "loss": loss,
      "accuracy": _accuracy(logits, labels),
      "mix_weight": mix_weight.mean(),
  }
  return state, jax.lax.pmean(metrics, axis_name)


def device_selmix_step(
    state: train_state.TrainState,
    run: dict[str, jax.Array],
    pools: dict[str, Any],
    table: dict[str, jax.Array],
    *,
    batch_size: int,
    axis_name: str = "batch",
    **selmix_kwargs,
) -> tuple[train_state.TrainState, dict[str, jax.Array]]:
  """`selmix_step` on device-resident pools: the pairs are drawn, gathered and augmented here.

  This device draws its `batch_size` pairs from `table` (`data.device.sample_pairs`) with the
  key `fold_in(fold_in(fold_in(key, step), stream), device index)`, so a resumed run draws the
  same batches; the images come from this device's copy of the pools.

  Args:
    state: this device's TrainState.
    run: `{'seed': int32 [], 'mix_weight_min': float32 []}` of the run (arrays, so the step can
      be `vmap`ped over runs that differ in them); the base key is `key(seed + 2)`, as on the
      host path.
    pools: `{'first': DeviceSplit, 'second': DeviceSplit}` without the device axis (x1's pool,
      whose labels are kept, and the partner pool).
    table: the run's `data.device.pair_table` arrays.
    batch_size: pairs per device.
    axis_name: the device axis.
    **selmix_kwargs: the rest of `selmix_step`'s keyword arguments (`preprocess_fn`,
      `bn_stats`, `fuse_passes`).

  Returns:
    What `selmix_step` returns.
  """
  key = jax.random.key(run["seed"] + 2)
  pair_key = jax.random.fold_in(
      jax.random.fold_in(jax.random.fold_in(key, state.step), _STREAM_PAIRS),
      jax.lax.axis_index(axis_name),
  )
  pos1, pos2 = device_lib.sample_pairs(table, pair_key, batch_size)
  first, second = pools["first"], pools["second"]
  batch = {
      "images1": first.images[pos1],
      "labels1": first.labels[pos1],
      "index1": first.index[pos1],
      "images2": second.images[pos2],
      "index2": second.index[pos2],
  }
  return selmix_step(
      state, batch, key, mix_weight_min=run["mix_weight_min"], axis_name=axis_name,
      **selmix_kwargs,
  )


def eval_step(
    state_or_variables: train_state.TrainState | dict[str, Any],
    batch: dict[str, jax.Array],
    *,
    num_classes: int,
    preprocess_fn: Callable[[jax.Array], jax.Array] | None = None,
    apply_fn: Callable[..., Any] | None = None,
    axis_name: str = "batch",
    use_ema: bool = False,
    psum_features: bool = True,
) -> dict[str, jax.Array]:
  """Evaluation counts for one (padded) batch, with BatchNorm on its running statistics.

  Args:
    state_or_variables: a TrainState, or a `{'params', 'batch_stats'}` dict (then `apply_fn`
      is required).
    batch: {'images' [b, ...], 'labels' int [b], 'mask' bool [b]} (mask False = padding).
    num_classes: K.
    preprocess_fn: `images -> float32 images` (e.g. normalise uint8); None if already float.
    apply_fn: `model.apply`, needed only with a variables dict.
    axis_name: the device axis.
    use_ema: evaluate the state's EMA parameters and statistics.
    psum_features: psum the feature sums too; False leaves them per device, so a caller can
      add them up in a fixed device order (float sums then do not depend on how devices are
      spread over processes; the integer counts are exact either way).

  Returns:
    psum'd over devices: 'confusion' [K, K] int32 (rows = true class), 'class_counts' [K]
    int32 and (if `psum_features`) 'feature_sums' [K, D] float32 (per-class sums of g(x));
    per device (not reduced): 'preds' [b] int32 and 'max_prob' [b] float32.
  """
  if isinstance(state_or_variables, train_state.TrainState):
    state = state_or_variables
    apply_fn = state.apply_fn
    variables = state.eval_variables(use_ema=use_ema)
  else:
    if apply_fn is None:
      raise ValueError("eval_step needs apply_fn when given a variables dict.")
    variables = state_or_variables
  images = batch["images"] if preprocess_fn is None else preprocess_fn(batch["images"])
  features = apply_fn(variables, images, train=False, method="features")
  logits = apply_fn(variables, features, method="classify")
  probs = jax.nn.softmax(logits)
  preds = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  labels, mask = batch["labels"], batch["mask"]
  confusion = confusion_lib.confusion_matrix(labels, preds, num_classes, mask=mask)
  onehot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32) * mask[:, None]
  counts = {
      "confusion": confusion,
      # Full precision: on TPU the default matmul precision would round features to bf16.
      "feature_sums": jnp.einsum(
          "bk,bd->kd", onehot, features.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST
      ),
      "class_counts": onehot.sum(axis=0).astype(jnp.int32),
  }
  reduced = {k: v for k, v in counts.items() if psum_features or k != "feature_sums"}
  counts.update(jax.lax.psum(reduced, axis_name))
  return {**counts, "preds": preds, "max_prob": probs.max(axis=-1)}
