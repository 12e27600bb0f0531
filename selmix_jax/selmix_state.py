"""SelMix's own state and the pure refresh that advances it (SPEC §4-§6).

Between refreshes a SelMix run carries one small pytree, `SelMixState`: the pair distribution P,
the gain G it came from, the objective's multipliers, the labels of the partner pool (pseudo-labels
when semi-supervised), the max-gain history of the early-stop rule and the refresh count. It is
what the fine-tuning checkpoint stores beside the TrainState (`train_state.to_checkpoint` gives its
dict form), so a resumed run continues with the same P.

A refresh is one pure, jitted function of that state and the validation pass's counts, in the
style of `optax.GradientTransformation.update`:

  refresh = selmix_state.make_refresh_fn(objective, mix_weight=0.8, temperature=0.1)
  state = selmix_state.init(objective, num_classes, partner_labels, history_length=201)
  state = refresh(state, val_confusion, val_prototypes, head_kernel, head_bias, partner_labels)

It is built on `gains.make_gain_fn` and compiled once per run (every changing value is an array).
"""

from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

from selmix_jax import gains
from selmix_jax import objectives


@flax.struct.dataclass
class SelMixState:
  """What SelMix carries between refreshes.

  Attributes:
    pair_probs: `[K, K]` float32 P (row = class of x1, the kept label; column = class of x2).
    gain: `[K, K]` float32 gain G of the last refresh.
    multipliers: `[M]` float32 objective multipliers (`M = 0` for objectives without).
    partner_labels: `[N2]` int32 labels of the partner pool (pseudo-labels when semi-supervised).
    max_gain_history: `[R]` float32 max gain of refresh r (early stop; `R` = refreshes planned).
    num_refreshes: `[]` int32 refreshes done.
  """

  pair_probs: jax.Array
  gain: jax.Array
  multipliers: jax.Array
  partner_labels: jax.Array
  max_gain_history: jax.Array
  num_refreshes: jax.Array

  @property
  def max_gains(self) -> np.ndarray:
    """Host copy of the max gains of the refreshes done so far, in order."""
    n = min(int(self.num_refreshes), len(self.max_gain_history))
    return np.asarray(self.max_gain_history[:n])

  @property
  def max_gain(self) -> float:
    """Largest gain of the last refresh."""
    return float(np.max(self.gain))


def init(
    objective: objectives.Objective,
    num_classes: int,
    partner_labels: np.ndarray,
    *,
    history_length: int,
) -> SelMixState:
  """The state before the first refresh: P uniform, G 0, the objective's initial multipliers.

  Args:
    objective: the objective whose multipliers are carried.
    num_classes: K.
    partner_labels: `[N2]` initial labels of the partner pool.
    history_length: number of refreshes the run can make (`num_steps // refresh_every + 1`).
  """
  k = num_classes
  return SelMixState(
      pair_probs=np.full((k, k), 1.0 / k**2, np.float32),
      gain=np.zeros((k, k), np.float32),
      multipliers=np.asarray(objective.init_multipliers(k), np.float32),
      partner_labels=np.asarray(partner_labels, np.int32),
      max_gain_history=np.zeros((history_length,), np.float32),
      num_refreshes=np.asarray(0, np.int32),
  )


def make_refresh_fn(
    objective: objectives.Objective,
    *,
    mix_weight: float,
    temperature: float,
    temperature_scale: str = "absolute",
    form: str = "exact",
    train_bias: bool = False,
    chunk_size: int | None = None,
    jit: bool = True,
):
  """The jitted refresh `(state, confusion, prototypes, kernel, bias, partner_labels) -> state`.

  Normalises the validation confusion, applies the objective's multiplier rule, computes G and
  P with `gains.make_gain_fn`, appends the max gain to the history and counts the refresh.

  Args:
    objective: the objective (its `value` is differentiated, its multiplier rule applied).
    mix_weight: `λ̄ = (mix_weight_min + 1) / 2` of the gain estimate.
    temperature: temperature of P.
    temperature_scale: 'absolute' (SPEC: P ∝ exp(G / T)) or 'max_gain' (T relative to the
      largest positive gain); see `gains.pair_distribution`.
    form: gain form, 'exact' (SPEC) or 'reference' (the authors' release).
    train_bias: whether the gain's SGD step also moves the head bias.
    chunk_size: row block of the gain's softmax (None = automatic).
    jit: False returns the pure function unjitted, to compile it into a larger program (the
      device-resident refresh: validation pass + refresh in one program).

  Returns:
    The jitted function. Arguments: `state` a `SelMixState`; `confusion` `[K, K]` validation
    counts; `prototypes` `[K, D]`; `kernel` `[D, K]`, `bias` `[K]` of the head; `partner_labels`
    `[N2]` int32 (pass `state.partner_labels` to keep them).
  """
  gain_fn = gains.make_gain_fn(
      objective.value,
      mix_weight=mix_weight,
      temperature=temperature,
      temperature_scale=temperature_scale,
      form=form,
      train_bias=train_bias,
      chunk_size=chunk_size,
  )

  def refresh(state, confusion, prototypes, kernel, bias, partner_labels):
    confusion = confusion / jnp.sum(confusion)
    multipliers = objective.update_multipliers(state.multipliers, confusion)
    gain, pair_probs = gain_fn(confusion, prototypes, kernel, bias, multipliers)
    n = state.num_refreshes
    slot = jnp.minimum(n, state.max_gain_history.shape[0] - 1)
    return SelMixState(
        pair_probs=pair_probs,
        gain=gain,
        multipliers=multipliers,
        partner_labels=jnp.asarray(partner_labels, jnp.int32),
        max_gain_history=state.max_gain_history.at[slot].set(jnp.max(gain)),
        num_refreshes=n + 1,
    )

  return jax.jit(refresh) if jit else refresh


def should_stop(max_gains: Any, *, window: int, tol: float) -> bool:
  """Early stop (SPEC §6): after >= `window` refreshes, the latest max gain is within `tol`
  (relative) of the mean of the last `window`."""
  max_gains = np.asarray(max_gains)
  if len(max_gains) < window:
    return False
  recent = max_gains[-window:]
  return bool(abs(recent[-1] - recent.mean()) <= tol * abs(recent.mean()))


def to_host(state: SelMixState) -> SelMixState:
  """The state with NumPy leaves (for host-side sampling, logging and checkpointing)."""
  return jax.tree.map(np.asarray, state)
