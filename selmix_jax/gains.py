"""SelMix gain matrix and pair distribution (SPEC §4).

For every ordered class pair `(i, j)` the *gain* `G_ij` is the first-order change of an
objective `ψ(C)` when the linear head takes one SGD step on a feature-mixup example
`z̃_ij = λ̄ z_i + (1 - λ̄) z_j` labelled `i`, predicted on the class prototypes `z_q`.

Sign and scale convention: one SGD step with learning rate `η` on the cross-entropy
`CE(z̃_ij W + b, i)` moves the prototype logits by
`ΔA_ql = η S_ijq (δ_il - p_ijl)` (`S_ijq = <z̃_ij, z_q>`, plus 1 if the bias is trained),
i.e. it raises logit `i`. `G_ij` is defined so that `ψ(C') - ψ(C) = η G_ij + O(η²)`:
it is the change of `ψ` *per unit learning rate*, with no other factor, and `G_ij > 0`
means the step helps. `tests/test_gains.py` checks this against a real SGD step.

Computation (`O(K³ + K² d)` time, `O(K² + chunk · K²)` memory): with the Gram matrix
`Γ = Z Zᵀ` (+1) and `H = Γ D` (`H_il = Σ_q Γ_iq D_ql`), `S_ijq = λ̄ Γ_iq + (1-λ̄) Γ_jq`, so

  G_ij = λ̄ H_ii + (1-λ̄) H_ji - Σ_l p_ijl (λ̄ H_il + (1-λ̄) H_jl),

and the logits of a mixed prototype are the mix of the prototype logits,
`z̃_ij W + b = λ̄ A_i + (1-λ̄) A_j`. The `K⁴` tensor `L_ijql` of the SPEC is never built.
The last term needs the `[K, K, K]` softmax `p_ijl`; two algorithms compute it:

* `"factorised"` (default): with `Ā = A - rowmax(A)`, the softmax numerator factorises,
  `exp(λ̄ Ā_il + (1-λ̄) Ā_jl) = E1_il · E2_jl` (`E1 = exp(λ̄ Ā)`, `E2 = exp((1-λ̄) Ā)`),
  so the term is `(λ̄ (E1∘H) E2ᵀ + (1-λ̄) E1 (E2∘H)ᵀ) / (E1 E2ᵀ)`: three K×K×K matrix
  products (BLAS). Where the denominator of a pair is below `sqrt(tiny)` (about 1e-19 in
  float32: rows `i` and `j` whose large logits sit on different classes, with logit
  ranges of a few hundred), float32 underflow could lose terms, so every block of rows
  holding such a pair is recomputed with the exact softmax below (a `lax.cond` per
  block, free when nothing is flagged; under `vmap` a `cond` runs both branches).
* `"softmax"`: the `[chunk, K, K]` softmax for a block of rows `i` at a time, fused with
  the contraction by XLA.

At K = 1000, d = 128 on a 2-core CPU the factorised gain took 26 ms against 283 ms for the
softmax path in the same run, with 23 MiB of XLA temporaries (benchmarks/README.md,
gain_bench).

Typical use (build the jitted function once; multipliers are an array argument, so a
refresh with new values does not retrace):

  refresh = gains.make_gain_fn(obj.value, mix_weight=0.8, temperature=0.1)
  gain, pair_probs = refresh(confusion, prototypes, kernel, bias, multipliers)

An invalid validation confusion matrix (a negative, NaN or infinite entry) gives all-NaN
gains and an all-NaN pair distribution, never a plausible uniform one; check with
`np.isfinite` (or `metrics.check_counts` on the matrix) on the host.

This module imports only jax and numpy (and `selmix_jax.metrics`).
"""

import functools
import math
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from selmix_jax import metrics

_HIGHEST = jax.lax.Precision.HIGHEST
# Default block size bound: a block of rows holds at most this many [i, j, l] entries
# (16M floats = 64 MB in float32 per temporary).
_AUTO_BLOCK_ENTRIES = 1 << 24

FORMS = ("exact", "reference")
ALGORITHMS = ("factorised", "softmax")


def _call(value_fn, confusion, multipliers):
  if multipliers is None:
    return value_fn(confusion)
  return value_fn(confusion, multipliers)


def _as_float(x):
  """Integers -> default float; floats below float32 (bf16 features) -> float32."""
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    return x.astype(jnp.result_type(float))
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


@functools.partial(jax.jit, static_argnums=0)
def gain_rate(
    value_fn: Callable[..., jax.Array],
    confusion: jax.Array,
    multipliers: Optional[Any] = None,
) -> jax.Array:
  """Sensitivity `D = ∂ψ/∂A` of the objective to the prototype logits (SPEC §4 step 1).

  Jitted with `value_fn` static (hashable; keep the same object to avoid retracing).
  Differentiates `A ↦ ψ(π ⊙ softmax(A))` (row-wise softmax, `π = rowsum(C)` held fixed)
  at the logits where `softmax(A_q) = C_q / π_q`, i.e. the empirical confusion. The
  softmax is written as `π_q · C_q e^{A_q} / Σ_b C_qb e^{A_qb}` around `A = 0`, which is
  the same function of the logits shifted by `log(C_q / π_q)` but keeps zero entries and
  absent classes (`π_q = 0`) finite: their rows of `D` are exactly 0.

  The result equals the closed form `D_ql = M_ql C_ql - (C_ql/π_q) Σ_b M_qb C_qb` with
  `M = ∂ψ/∂C`; only `ψ` is supplied, the calculus is `jax.grad`'s. Adding a constant to a
  row of `M` does not change `D`, so it does not matter whether `ψ` treats the priors as
  fixed or recomputes them from `C`.

  Args:
    value_fn: differentiable `ψ`; called as `value_fn(confusion)` if `multipliers` is
      None, else `value_fn(confusion, multipliers)` (multipliers held fixed).
    confusion: `[K, K]` confusion matrix, rows = true class, counts or fractions.
    multipliers: optional pytree of arrays passed through to `value_fn`.

  Returns:
    `[K, K]` float array `D`, in the float dtype of `confusion` (at least float32; the
    default float for integer counts). All NaN for an invalid confusion matrix (a
    negative, NaN or infinite entry; `metrics.is_valid`), whatever `value_fn` does with
    it: an objective that masks such a matrix has zero gradient there, which would
    otherwise pass for "no pair helps".
  """
  confusion = _as_float(confusion)
  valid = metrics.is_valid(confusion)
  priors = confusion.sum(axis=-1, keepdims=True)
  present = priors > 0

  def objective_of_logit_shift(shift):
    weighted = confusion * jnp.exp(shift)
    norm = weighted.sum(axis=-1, keepdims=True)
    # Double-where: absent rows get scale 0 with a finite gradient.
    scale = jnp.where(present, priors / jnp.where(present, norm, 1.0), 0.0)
    return _call(value_fn, weighted * scale, multipliers)

  rate = jax.grad(objective_of_logit_shift)(jnp.zeros_like(confusion))
  return jnp.where(valid, rate, jnp.nan)


def _auto_chunk_size(num_classes: int) -> int:
  return max(1, min(num_classes, _AUTO_BLOCK_ENTRIES // max(1, num_classes * num_classes)))


@functools.partial(
    jax.jit, static_argnames=("value_fn", "form", "train_bias", "chunk_size", "algorithm"))
def gain_matrix(
    confusion: jax.Array,
    prototypes: jax.Array,
    kernel: jax.Array,
    bias: Optional[jax.Array],
    multipliers: Optional[Any] = None,
    *,
    value_fn: Callable[..., jax.Array],
    mix_weight: float = 0.8,
    form: str = "exact",
    train_bias: bool = False,
    chunk_size: Optional[int] = None,
    algorithm: str = "factorised",
) -> jax.Array:
  """Gain `G_ij` of one SGD step of the head on an `(i, j)` prototype mixup (SPEC §4).

  Pure and jitted; `value_fn`, `form`, `train_bias`, `chunk_size` and `algorithm` are
  static arguments (so `value_fn` must be hashable; functions are), everything else is
  traced, including `mix_weight`. Keep `value_fn` the same object across refreshes (e.g.
  `objectives.get(name).value`, which `get` caches) and pass changing multipliers as
  `multipliers`: a closure over new multiplier values is a new function and forces a
  retrace. It can also be bound with `functools.partial` and wrapped in the caller's own
  `jax.jit`/`pmap`.

  Args:
    confusion: `[K, K]` validation confusion (rows = true class), counts or fractions.
    prototypes: `[K, D]` per-class mean features `z_k` of the validation set.
    kernel: `[D, K]` head kernel (Flax Dense convention, logits = z @ kernel + bias).
    bias: `[K]` head bias, or None for a head without bias.
    multipliers: optional pytree passed to `value_fn` as its second argument.
    value_fn: differentiable objective `ψ(confusion[, multipliers]) -> scalar`.
    mix_weight: `λ̄`, weight of the x1 feature in the mixed prototype (may be traced).
    form: `"exact"` (default) or `"reference"`, which uses `<z_i, z_q>` instead of
      `S_ijq` in the `δ_il` term as the authors' release does.
    train_bias: whether the SGD step also moves the bias (adds 1 to `S`).
    chunk_size: rows `i` per block of the `[chunk, K, K]` softmax (the `softmax`
      algorithm, and the rows the `factorised` one recomputes). None picks the largest
      block with at most 2^24 entries (64 MB in float32); a value `>= K` processes all
      rows at once. The result does not depend on it.
    algorithm: how the `Σ_l p_ijl (...)` term is computed (module docstring):
      `"factorised"` (default; K×K×K matrix products, with the exact softmax for the
      rows where float32 would underflow) or `"softmax"` (the `[K, K, K]` softmax in
      blocks of rows). They agree to float32 rounding; factorised is ~10x faster at
      K = 1000.

  Returns:
    `[K, K]` gain, row = class `i` of x1 (the kept label), column = class `j` of x2.
  """
  if form not in FORMS:
    raise ValueError(f"form must be one of {FORMS}, got {form!r}")
  if algorithm not in ALGORITHMS:
    raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
  prototypes = _as_float(prototypes)
  kernel = jnp.asarray(kernel, prototypes.dtype)
  num_classes = prototypes.shape[0]
  if kernel.shape != (prototypes.shape[1], num_classes):
    raise ValueError(
        f"kernel shape {kernel.shape} does not match prototypes {prototypes.shape}")

  rate = gain_rate(value_fn, confusion, multipliers).astype(prototypes.dtype)  # D
  logits = jnp.matmul(prototypes, kernel, precision=_HIGHEST)  # A, [K, K]
  if bias is not None:
    logits = logits + jnp.asarray(bias, prototypes.dtype)
  gram = jnp.matmul(prototypes, prototypes.T, precision=_HIGHEST)  # Γ, [K, K]
  if train_bias:
    gram = gram + 1.0
  h = jnp.matmul(gram, rate, precision=_HIGHEST)  # H = Γ D, [K, K]
  lam = jnp.asarray(mix_weight, prototypes.dtype)

  # δ_il term: Σ_q S_ijq D_qi.
  h_diag = jnp.diagonal(h)[:, None]
  if form == "exact":
    direct = lam * h_diag + (1.0 - lam) * h.T
  else:
    direct = jnp.broadcast_to(h_diag, (num_classes, num_classes))

  # p_ij term: T_ij = Σ_l p_ijl (λ̄ H_il + (1-λ̄) H_jl).
  chunk = _auto_chunk_size(num_classes) if chunk_size is None else int(chunk_size)
  if chunk < 1:
    raise ValueError(f"chunk_size must be positive, got {chunk_size}")
  if algorithm == "softmax":
    softmax_term = _by_row_blocks(
        functools.partial(_softmax_block, logits=logits, h=h, lam=lam), (logits, h), chunk)
  else:
    softmax_term = _factorised_term(logits, h, lam, chunk)
  return direct - softmax_term


def _softmax_block(rows, *, logits, h, lam):
  """`T_ij` for a block of rows `i` from the `[c, K, K]` softmax `p_ijl`."""
  logits_i, h_i = rows[:2]  # [c, K(l)] each
  mixed = lam * logits_i[:, None, :] + (1.0 - lam) * logits[None, :, :]  # [c, K(j), K(l)]
  probs = jax.nn.softmax(mixed, axis=-1)
  return jnp.sum(probs * (lam * h_i[:, None, :] + (1.0 - lam) * h[None, :, :]), axis=-1)


def _by_row_blocks(fn, rows, chunk):
  """`fn` over blocks of `chunk` rows of the `[K, ...]` arrays `rows` -> `[K, K]`."""
  num_classes = rows[0].shape[0]
  if chunk >= num_classes:
    return fn(rows)
  num_blocks = -(-num_classes // chunk)
  pad = num_blocks * chunk - num_classes
  blocks = tuple(
      jnp.pad(x, ((0, pad),) + ((0, 0),) * (x.ndim - 1)).reshape(num_blocks, chunk, *x.shape[1:])
      for x in rows)
  return jax.lax.map(fn, blocks).reshape(-1, num_classes)[:num_classes]


def _factorised_term(logits, h, lam, chunk):
  """`T_ij` as three `K×K×K` matrix products, exact softmax where float32 underflows.

  See the module docstring. Every factor of `E1`, `E2` is in (0, 1]; a pair whose
  denominator `E1 E2ᵀ` is below `sqrt(tiny)` flags its row, and a block of rows with a
  flagged row is recomputed by `_softmax_block`.
  """
  shifted = logits - jnp.max(logits, axis=1, keepdims=True)  # <= 0
  e1 = jnp.exp(lam * shifted)  # [K(i), K(l)]
  e2 = jnp.exp((1.0 - lam) * shifted)  # [K(j), K(l)]
  matmul = functools.partial(jnp.matmul, precision=_HIGHEST)
  den = matmul(e1, e2.T)
  num = lam * matmul(e1 * h, e2.T) + (1.0 - lam) * matmul(e1, (e2 * h).T)
  ok = den >= jnp.sqrt(jnp.finfo(den.dtype).tiny)  # False for NaN as well.
  term = num / jnp.where(ok, den, 1.0)
  flagged = ~jnp.all(ok, axis=1)  # [K(i)]

  def block(rows):
    term_i, flagged_i = rows[2:]
    return jax.lax.cond(
        jnp.any(flagged_i),
        lambda: _softmax_block(rows, logits=logits, h=h, lam=lam),
        lambda: term_i)

  return jax.lax.cond(
      jnp.any(flagged),
      lambda: _by_row_blocks(block, (logits, h, term, flagged), chunk),
      lambda: term)


TEMPERATURE_SCALES = ("absolute", "max_gain")


def _static_temperature(temperature, temperature_scale: str) -> float:
  """`temperature` as a positive finite Python float; clear errors otherwise."""
  if temperature_scale not in TEMPERATURE_SCALES:
    raise ValueError(
        f"temperature_scale must be one of {TEMPERATURE_SCALES}, got {temperature_scale!r}")
  if isinstance(temperature, jax.core.Tracer):
    raise TypeError(
        "temperature must be a static Python float (it is checked to be positive), but it "
        "is a traced value; pass a number, or mark it static in your jax.jit "
        "(static_argnames='temperature').")
  try:
    value = float(temperature)
  except TypeError:
    raise TypeError(f"temperature must be a number, got {temperature!r}") from None
  if not (value > 0 and math.isfinite(value)):
    raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")
  return value


def pair_distribution(
    gain: jax.Array,
    *,
    temperature: float = 0.1,
    temperature_scale: str = "absolute",
) -> jax.Array:
  """SelMix pair distribution `P_ij ∝ exp(G_ij / T) · 1[G_ij > 0]` (SPEC §4 step 5).

  A softmax over all `K²` pairs restricted to positive gains, shifted by the maximum for
  stability; uniform over all pairs if no gain is positive. Jitted, with `temperature`
  and `temperature_scale` static (Python values, checked here), so it can be called
  inside a user's `jit` with a number from the config.

  Temperature scales:
    * `'absolute'` (SPEC): `P ∝ exp(G / T)`. How concentrated P is depends on the size of
      the gains, which scales with the feature norm, the objective and K.
    * `'max_gain'`: `T` is relative to the largest positive gain,
      `P ∝ exp(G / (T · max⁺G))`: the best pair has `e^{1/T}` times the weight of a pair
      with gain 0⁺, at any gain scale (`P(c · G) = P(G)` for `c > 0`).

  Non-finite gains: if any gain is NaN or ±inf (e.g. from an invalid confusion matrix),
  every entry of the result is NaN, so that a host-side check (`np.isfinite`) can stop
  the run instead of mixing uniformly at random (as counting NaN as "not positive"
  would).

  Args:
    gain: `[K, K]` gain matrix.
    temperature: softmax temperature `T > 0` (a static Python number).
    temperature_scale: `'absolute'` (default) or `'max_gain'`, see above.

  Returns:
    `[K, K]` probabilities summing to 1, or all NaN if a gain is not finite.

  Raises:
    ValueError: `temperature` is not positive and finite, or an unknown
      `temperature_scale`.
    TypeError: `temperature` is a traced value.
  """
  temperature = _static_temperature(temperature, temperature_scale)
  return _pair_distribution(gain, temperature=temperature, temperature_scale=temperature_scale)


@functools.partial(jax.jit, static_argnames=("temperature", "temperature_scale"))
def _pair_distribution(gain, *, temperature, temperature_scale):
  gain = _as_float(gain)
  finite = jnp.all(jnp.isfinite(gain))
  positive = gain > 0
  any_positive = jnp.any(positive)
  top = jnp.where(any_positive, jnp.max(jnp.where(positive, gain, 0.0)), 1.0)  # max⁺G
  scale = temperature * top if temperature_scale == "max_gain" else temperature
  weights = jnp.where(positive, jnp.exp(jnp.where(positive, gain - top, 0.0) / scale), 0.0)
  total = jnp.sum(weights)
  probs = weights / jnp.where(any_positive, total, 1.0)
  probs = jnp.where(any_positive, probs, jnp.full_like(gain, 1.0 / gain.size))
  return jnp.where(finite, probs, jnp.nan)


@functools.cache
def make_gain_fn(
    value_fn: Callable[..., jax.Array],
    *,
    mix_weight: float = 0.8,
    temperature: float = 0.1,
    temperature_scale: str = "absolute",
    form: str = "exact",
    train_bias: bool = False,
    chunk_size: Optional[int] = None,
    algorithm: str = "factorised",
) -> Callable[..., tuple[jax.Array, jax.Array]]:
  """Returns a jitted `fn(confusion, prototypes, kernel, bias, multipliers=None)`.

  `fn` returns `(gain, pair_probs)`, both `[K, K]`. It traces once per input
  shape/dtype and not again when the values change between refreshes. `mix_weight` and
  `temperature` are baked in as constants. Cached: equal arguments (the same `value_fn`
  object, e.g. `objectives.get(name).value`, which `get` caches) return the same
  function, so a loop that calls `make_gain_fn` at every refresh compiles once.

  Args:
    value_fn: objective `ψ(confusion[, multipliers])`, e.g. `objectives.get(name).value`.
    mix_weight: `λ̄ = (λ_min + 1) / 2`.
    temperature: temperature of `pair_distribution` (positive).
    temperature_scale: see `pair_distribution`.
    form: see `gain_matrix`.
    train_bias: see `gain_matrix`.
    chunk_size: see `gain_matrix`.
    algorithm: see `gain_matrix`.

  Returns:
    The jitted refresh function.

  Raises:
    ValueError: an unknown `form`, `algorithm` or `temperature_scale`, or a non-positive
      temperature.
  """
  if form not in FORMS:
    raise ValueError(f"form must be one of {FORMS}, got {form!r}")
  if algorithm not in ALGORITHMS:
    raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
  temperature = _static_temperature(temperature, temperature_scale)

  def refresh(confusion, prototypes, kernel, bias, multipliers=None):
    gain = gain_matrix(
        confusion, prototypes, kernel, bias, multipliers, value_fn=value_fn,
        mix_weight=mix_weight, form=form, train_bias=train_bias, chunk_size=chunk_size,
        algorithm=algorithm)
    probs = pair_distribution(
        gain, temperature=temperature, temperature_scale=temperature_scale)
    return gain, probs

  return jax.jit(refresh)


__all__ = [
    "ALGORITHMS", "FORMS", "TEMPERATURE_SCALES", "gain_rate", "gain_matrix", "pair_distribution",
    "make_gain_fn",
]
