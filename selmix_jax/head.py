"""SelMix for a linear head over fixed features, as one library call: `head.fit`.

For a JAX project with its own encoder (CLIP, a sentence or audio model, a frozen image backbone):
give it the embeddings and labels of a long-tailed training set and a validation set, and it
returns the head `{'kernel': [D, K], 'bias': [K]}` fine-tuned for a non-decomposable objective,
and the run's history:

  from selmix_jax import head
  result = head.fit(train_x, train_y, val_x, val_y, objective="min_recall")
  logits = test_x @ result.params["kernel"] + result.params["bias"]
  result.history["val_target"]        # [R] the objective on validation, at every refresh

Without `init_params` the head is first pre-trained with logit-adjusted cross-entropy
(`logit_adjust_tau=0`: plain CE). Then SelMix (SPEC §4-§6): every `refresh_every` steps the
validation confusion matrix and the class prototypes (per-class mean validation features) give
the gain matrix G and the pair distribution P (`selmix_state.make_refresh_fn`, the same jitted
refresh as the trainer's), and each step mixes `w x1 + (1 - w) x2` of pairs of classes drawn
from P (with the uniform floor, SPEC §5) and takes an SGD step of the head on CE with x1's label.
`pairs='uniform'` / `'instance'` are the two controls (uniform class pairs; uniform examples,
which with `mix_weight_min=1` is plain CE fine-tuning).

Why a separate implementation, not `train.train_and_evaluate` on a features data set
(`data.name='features'`, which runs the general trainer and is what `configs/features.py` uses):
the general trainer is built for images — host-side batch assembly, a `loader.Feed` thread,
`pmap`, Orbax checkpoints, a workdir, evaluation passes in batches — and for a linear head that
machinery costs about as much CPU as the matmuls. Here everything lives on the device: features
and labels are device arrays, a refresh interval is ONE jitted `lax.scan` (pair sampling from P
by inverse CDF, gather, mix, SGD), and only the [K, K] P and a few scalars cross to the host per
refresh. Measured at K = 1,000, D = 2,048, 100k vectors with the features config's schedule
(600 + 300 steps of 256) on the project's shared 2-core CPU: 39 s of CPU time here against 70 s
for the config path (`benchmarks/features_k1000.py`; benchmarks/README.md, "Frozen features at
K = 1,000"). The general trainer stays the path for runs that need resuming, plots and tables;
this is the path for a library call. What is shared with the trainer is everything but the loop:
the objectives, `selmix_state`'s refresh (gains and P), `optim`'s optimisers and `confusion`'s
counts. No checkpointing: a head-only run takes seconds to a minute.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from selmix_jax import confusion as confusion_lib
from selmix_jax import objectives
from selmix_jax import optim
from selmix_jax import sampling
from selmix_jax import selmix_state
from selmix_jax import steps

PAIRS = ("gain", "uniform", "instance")


@dataclasses.dataclass(frozen=True)
class FitResult:
  """What `fit` returns.

  Attributes:
    params: the fine-tuned head, `{'kernel': [D, K], 'bias': [K]}` float32 NumPy arrays.
    pretrained_params: the head SelMix started from (pre-trained here, or `init_params`).
    history: per refresh r (R of them), NumPy arrays: 'step' [R], 'val_target' [R] (the
      objective's target on validation, before that refresh's steps), 'val_mean_recall' [R],
      'val_min_recall' [R], 'max_gain' [R] (largest entry of G), 'effective_pairs' [R]
      (exp(entropy) of P) and 'top1_mass' [R] (mass of P's likeliest pair); gains and P are
      computed only for `pairs='gain'` (NaN otherwise).
    final: the returned head on validation: 'val_target', 'val_mean_recall', 'val_min_recall'.
  """

  params: dict[str, np.ndarray]
  pretrained_params: dict[str, np.ndarray]
  history: dict[str, np.ndarray]
  final: dict[str, float]


def _check(name: str, x, y, num_classes: int | None, dim: int | None):
  x, y = np.asarray(x), np.asarray(y)
  if x.ndim != 2 or not len(x) or x.dtype.kind not in "fiu":
    raise ValueError(f"{name}_features must be real [N, D] with N >= 1, got {x.dtype} {x.shape}.")
  if dim is not None and x.shape[1] != dim:
    raise ValueError(f"{name}_features has D = {x.shape[1]}, but the training features {dim}.")
  if y.shape != (len(x),) or y.dtype.kind not in "iu":
    raise ValueError(
        f"{name}_labels must be integers [N] = [{len(x)}], got {y.dtype} {y.shape}."
    )
  if not np.isfinite(x).all():
    raise ValueError(f"{name}_features hold NaN or inf in {int((~np.isfinite(x)).any(1).sum())} "
                     "row(s); features must be finite.")
  if y.min() < 0 or (num_classes is not None and y.max() >= num_classes):
    raise ValueError(f"{name}_labels must lie in [0, {num_classes}), got [{y.min()}, {y.max()}].")
  return np.asarray(x, np.float32), np.asarray(y, np.int32)


def fit(
    features,
    labels,
    val_features,
    val_labels,
    *,
    objective: str = "min_recall",
    objective_hparams: dict[str, Any] | None = None,
    num_classes: int | None = None,
    init_params: dict[str, Any] | None = None,
    pretrain_steps: int = 600,
    pretrain_learning_rate: float = 0.1,
    logit_adjust_tau: float = 1.0,
    num_steps: int = 300,
    refresh_every: int = 30,
    batch_size: int = 256,
    learning_rate: float = 1e-2,
    weight_decay: float = 5e-4,
    mix_weight_min: float = 0.6,
    temperature: float = 0.1,
    temperature_scale: str = "absolute",
    floor: float | None = None,
    pairs: str = "gain",
    seed: int = 0,
) -> FitResult:
  """Pre-trains (unless `init_params`) and SelMix-fine-tunes a linear head on fixed features.

  Args:
    features: [N, D] training features (any real dtype; used as float32).
    labels: [N] integer class ids in [0, K); every class needs a training example.
    val_features: [M, D] validation features (balanced is best: SelMix optimises the objective
      measured here).
    val_labels: [M] integer class ids.
    objective: an objective name (`objectives.names()`), e.g. 'min_recall', 'hmean_recall',
      'mean_recall_min_coverage'.
    objective_hparams: its hyperparameters (`objectives.get(name, **hparams)`), e.g.
      `{'alpha': 0.95}`.
    num_classes: K; None = `max(labels) + 1`.
    init_params: `{'kernel': [D, K], 'bias': [K]}` to start SelMix from (no pre-training).
    pretrain_steps: SGD steps of (logit-adjusted) CE pre-training, batches of `batch_size`.
    pretrain_learning_rate: its peak learning rate (Nesterov momentum 0.9, cosine decay).
    logit_adjust_tau: tau of the logit adjustment `tau * log(prior)`; 0 = plain CE.
    num_steps: SelMix steps.
    refresh_every: steps between refreshes of G and P.
    batch_size: pairs per SelMix step (and examples per pre-training step).
    learning_rate: SelMix's peak learning rate (plain SGD, cosine decay).
    weight_decay: L2 on the kernel, both stages.
    mix_weight_min: the mix weight w ~ U[mix_weight_min, 1] (label of x1 kept).
    temperature: of P ∝ exp(G / T).
    temperature_scale: 'absolute' or 'max_gain' (`gains.pair_distribution`).
    floor: uniform floor mixed into P (None = 1/K).
    pairs: 'gain' (SelMix) or a control: 'uniform' (class pairs uniform), 'instance' (examples
      uniform; with `mix_weight_min=1`, CE fine-tuning).
    seed: every random draw derives from it.

  Returns:
    A `FitResult`: the head, the starting head, the per-refresh history and final metrics.

  Raises:
    ValueError: malformed inputs (shapes, non-finite features, labels out of range, a class
      without training examples) or an unknown objective or `pairs`.
  """
  if pairs not in PAIRS:
    raise ValueError(f"pairs={pairs!r}; expected one of {PAIRS}.")
  if num_steps <= 0 or refresh_every <= 0 or batch_size <= 0:
    raise ValueError("num_steps, refresh_every and batch_size must be positive.")
  obj = objectives.get(objective, **(objective_hparams or {}))
  labels_np = np.asarray(labels)
  if num_classes is None and labels_np.dtype.kind in "iu" and labels_np.size:
    num_classes = int(labels_np.max()) + 1
  x, y = _check("train", features, labels, num_classes, None)
  val_x, val_y = _check("val", val_features, val_labels, num_classes, x.shape[1])
  k = int(num_classes)
  counts = np.bincount(y, minlength=k)
  if (counts == 0).any():
    raise ValueError(f"labels: class {int(np.argmin(counts))} has no training example "
                     f"({int((counts == 0).sum())} of {k} classes absent).")
  key = jax.random.key(seed)
  x, y, val_x, val_y = map(jnp.asarray, (x, y, val_x, val_y))

  if init_params is None:
    adjustment = steps.logit_adjustment(counts, logit_adjust_tau)
    init = {"kernel": jnp.zeros((x.shape[1], k)), "bias": jnp.zeros((k,))}
    start = _pretrain(
        init, x, y, jax.random.fold_in(key, 0),
        adjustment=None if adjustment is None else jnp.asarray(adjustment),
        num_steps=pretrain_steps, batch_size=batch_size, learning_rate=pretrain_learning_rate,
        weight_decay=weight_decay,
    )
  else:
    start = {n: jnp.asarray(init_params[n], jnp.float32) for n in ("kernel", "bias")}

  # SelMix. Prototypes are per-class mean validation features: fixed, the features are.
  sums, val_counts = confusion_lib.class_feature_sums(val_y, val_x, k)
  prototypes = confusion_lib.prototypes(sums, val_counts)
  refresh = selmix_state.make_refresh_fn(
      obj, mix_weight=(mix_weight_min + 1.0) / 2.0, temperature=temperature,
      temperature_scale=temperature_scale,
  )
  sel = selmix_state.init(obj, k, np.asarray(y), history_length=num_steps // refresh_every + 1)
  schedule = optim.cosine_schedule(learning_rate, num_steps)
  tx = optim.make_selmix_optimizer(
      {"head": start}, learning_rate=schedule, backbone_lr_mult=0.0, weight_decay=weight_decay
  )
  params = {"head": start}
  opt_state = tx.init(params)
  order = jnp.argsort(y, stable=True)  # Examples grouped by class, for sampling within one.
  offsets = jnp.asarray(np.concatenate([[0], np.cumsum(counts)[:-1]]), jnp.int32)
  class_counts = jnp.asarray(counts, jnp.int32)
  interval = functools.partial(
      _selmix_interval, tx=tx, batch_size=batch_size, mix_weight_min=mix_weight_min,
      instance=pairs == "instance",
  )
  rows = []
  for step in range(0, num_steps, refresh_every):
    confusion = _val_confusion(params["head"], val_x, val_y, k)
    row = {"step": step, **_val_metrics(obj, confusion)}
    if pairs == "gain":
      head = params["head"]
      sel = refresh(sel, confusion.astype(jnp.float32), prototypes, head["kernel"], head["bias"],
                    sel.partner_labels)
      pair_probs = np.asarray(sel.pair_probs)
      if not np.isfinite(pair_probs).all():
        raise FloatingPointError(f"Step {step}: the gains are not finite (max {sel.max_gain}).")
      spread = sampling.concentration(pair_probs)
      row.update(max_gain=sel.max_gain, effective_pairs=spread["effective_pairs"],
                 top1_mass=spread["top1_mass"])
      table = sampling.with_floor(pair_probs, floor)
    else:
      row.update(max_gain=np.nan, effective_pairs=np.nan, top1_mass=np.nan)
      table = np.full((k, k), 1.0 / k**2)
    rows.append(row)
    cdf = jnp.asarray(np.cumsum(table.reshape(-1)) / table.sum(), jnp.float32)
    length = min(refresh_every, num_steps - step)
    params, opt_state = interval(
        params, opt_state, x, y, order, offsets, class_counts, cdf,
        jax.random.fold_in(key, 1), jnp.asarray(step), length=length,
    )
  history = {name: np.asarray([r[name] for r in rows]) for name in rows[0]}
  final = _val_metrics(obj, _val_confusion(params["head"], val_x, val_y, k))
  host = lambda p: {n: np.asarray(v) for n, v in p.items()}  # noqa: E731
  return FitResult(host(params["head"]), host(start), history, final)


def _val_metrics(obj, confusion) -> dict[str, float]:
  c = jnp.asarray(confusion, jnp.float32)
  recalls = np.asarray(jnp.diag(c) / jnp.maximum(c.sum(axis=1), 1.0))
  return {
      "val_target": float(obj.target(c)["target"]),
      "val_mean_recall": float(recalls.mean()),
      "val_min_recall": float(recalls.min()),
  }


@functools.partial(jax.jit, static_argnums=(3,))
def _val_confusion(head, val_x, val_y, num_classes):
  preds = jnp.argmax(val_x @ head["kernel"] + head["bias"], axis=-1)
  return confusion_lib.confusion_matrix(val_y, preds, num_classes)


@functools.partial(
    jax.jit, static_argnames=("num_steps", "batch_size", "learning_rate", "weight_decay")
)
def _pretrain(init, x, y, key, *, adjustment, num_steps, batch_size, learning_rate,
              weight_decay):
  """(Logit-adjusted) CE by SGD with Nesterov momentum and cosine decay, one `lax.scan`."""
  tx = optim.make_pretrain_optimizer(
      learning_rate=optim.cosine_schedule(learning_rate, num_steps), weight_decay=weight_decay
  )

  def loss_fn(params, idx):
    logits = x[idx] @ params["kernel"] + params["bias"]
    if adjustment is not None:
      logits = logits + adjustment
    return optax.softmax_cross_entropy_with_integer_labels(logits, y[idx]).mean()

  def body(carry, t):
    params, opt_state = carry
    idx = jax.random.randint(jax.random.fold_in(key, t), (batch_size,), 0, x.shape[0])
    grads = jax.grad(loss_fn)(params, idx)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), None

  (params, _), _ = jax.lax.scan(body, (init, tx.init(init)), jnp.arange(num_steps))
  return params


@functools.partial(
    jax.jit, static_argnames=("tx", "length", "batch_size", "mix_weight_min", "instance")
)
def _selmix_interval(params, opt_state, x, y, order, offsets, class_counts, cdf, key, start, *,
                     tx, length, batch_size, mix_weight_min, instance):
  """`length` SelMix steps from `start` with pairs from one P (`cdf` over its K² entries)."""
  k = class_counts.shape[0]

  def within(c, u):  # An example of class c, uniformly.
    return order[offsets[c] + jnp.minimum((u * class_counts[c]).astype(jnp.int32),
                                          class_counts[c] - 1)]

  def body(carry, t):
    params, opt_state = carry
    k_pair, k1, k2, k_mix = jax.random.split(jax.random.fold_in(key, start + t), 4)
    if instance:
      idx1 = jax.random.randint(k1, (batch_size,), 0, x.shape[0])
      idx2 = jax.random.randint(k2, (batch_size,), 0, x.shape[0])
    else:
      u = jax.random.uniform(k_pair, (batch_size,))
      pair = jnp.minimum(jnp.searchsorted(cdf, u, side="right"), k * k - 1)
      idx1 = within(pair // k, jax.random.uniform(k1, (batch_size,)))
      idx2 = within(pair % k, jax.random.uniform(k2, (batch_size,)))
    w = jax.random.uniform(k_mix, (batch_size, 1), minval=mix_weight_min, maxval=1.0)
    mixed = w * x[idx1] + (1.0 - w) * x[idx2]

    def loss_fn(p):
      logits = mixed @ p["head"]["kernel"] + p["head"]["bias"]
      return optax.softmax_cross_entropy_with_integer_labels(logits, y[idx1]).mean()

    grads = jax.grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), None

  (params, opt_state), _ = jax.lax.scan(body, (params, opt_state), jnp.arange(length))
  return params, opt_state
