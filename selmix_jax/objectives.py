"""Non-decomposable objectives `psi(C; multipliers)` of SPEC §3, behind one registry.

Usage::

  obj = objectives.get("min_recall", omega=50.0)
  multipliers = obj.init_multipliers(num_classes)            # [K] here; (0,) if none
  multipliers = obj.update_multipliers(multipliers, val_confusion)   # at each refresh
  gain_weights = jax.grad(obj.value)(val_confusion, multipliers)     # M = d psi / d C
  obj.target(val_confusion)  # {'target': min recall}

`value(confusion, multipliers=None)`: an objective without multipliers (`mean_recall`,
G-/H-mean, a plain registered function; `obj.has_multipliers` is False) may be called
without them, or with its `(0,)` array; one with multipliers raises a `ValueError` when
they are missing (a silent default would optimise a different objective).

Names: the registry names are those of the reported metrics (`metrics.summary`):
`mean_recall`, `min_recall`, `min_head_tail_recall`, `gmean_recall`, `hmean_recall` and
the constrained objectives below. The SPEC's short names `gmean` and `hmean` are aliases
(`aliases()`): `get("gmean")` is `get("gmean_recall")`, whose `name` is `gmean_recall`.
`names()` lists registry names only; `name in names()` also accepts an alias.

`get` caches: equal `(name, hyperparameters)` give the same `Objective` object, so code
jitted with `obj.value` as a static argument compiles once however often `get` is called.

`value` is the differentiable `psi` the gain module differentiates (multipliers held
fixed); `target` is the reported metric, plus constraint status for constrained
objectives: `constraint_satisfied` (bool, one per constraint), `all_constraints_satisfied`
(bool scalar) and `constraint_gap` = min over constraints of (coverage - alpha / K)
(>= 0 iff all hold). Every method is a pure jnp function, callable inside `jit`;
hyperparameters are Python floats captured in closures. `confusion` may be counts or
fractions: `value` normalises it to fractions (sum 1) first, so its gradient is that of
`psi` at the fraction matrix, divided by the total count.

Recalls follow the absent-class rule of `selmix_jax.metrics` (a class without
validation examples is left out of recall aggregates, and gets multiplier 0 in
`min_recall`; a head/tail group without present classes gets multiplier 0 and
contributes 0 to psi). Coverage constraints apply to every class. An all-zero
confusion matrix leaves the multipliers unchanged. An *invalid* matrix (a negative, NaN
or infinite entry; see `selmix_jax.metrics`) makes `value`, the updated multipliers and
the `target` numbers NaN (constraint flags False), for every objective `get` returns.

G-mean and H-mean are exactly 0, with zero gradient, while some present class has zero
validation recall (the true gradient is infinite there), which would make every gain 0
exactly when SelMix is most needed. So the `psi` of `gmean_recall`, `hmean_recall` and
the H-mean coverage objectives uses recalls smoothed as `r_i + recall_smoothing`
(default 1e-3, far below one validation example's share of a class): a zero-recall
class then gets the largest weight in `dpsi/dC`, as the limit suggests. `target` reports the exact
metric.

A new objective is one function of the confusion matrix::

  objectives.register("accuracy", metrics.accuracy)
  obj = objectives.get("accuracy")

Hyperparameters given to `get` for a registered function are passed to it as keyword
arguments. `get` accepts the shared hyperparameter names (`omega`, `beta`, `alpha`,
`tau`, `multiplier_max`, `head_mask`) for every built-in objective, so a trainer can pass
one config block whatever the objective; names a built-in does not use are ignored.
"""

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from selmix_jax import metrics

Array = jax.Array

DEFAULT_HPARAMS = {
  "omega": 50.0,
  "beta": 0.0,
  "alpha": 0.95,
  "tau": 0.01,
  "multiplier_max": 100.0,
  "head_mask": None,
  "recall_smoothing": 1e-3,
}


# The range of each shared hyperparameter: (predicate on a finite float, what it must be).
HPARAM_RANGES = {
  "omega": (lambda v: v >= 0, ">= 0"),
  "beta": (lambda v: True, "a finite number"),
  "alpha": (lambda v: 0 < v <= 1, "in (0, 1]"),
  "tau": (lambda v: v > 0, "> 0"),
  "multiplier_max": (lambda v: v >= 0, ">= 0"),
  "recall_smoothing": (lambda v: v >= 0, ">= 0"),
}


def hparam_problem(key: str, value: Any) -> str | None:
  """What is wrong with shared hyperparameter `key=value` ('must be > 0'), or None if fine."""
  if key not in HPARAM_RANGES:
    return None
  ok, expected = HPARAM_RANGES[key]
  try:
    number = float(value)
  except (TypeError, ValueError):
    return f"must be a number {expected}"
  if not (np.isfinite(number) and ok(number)):
    return f"must be {expected}"
  return None


@dataclasses.dataclass(frozen=True)
class Objective:
  """An objective: pure callables plus its name.

  Attributes:
    name: registry name.
    value: `(confusion [K, K], multipliers=None) -> scalar` differentiable psi;
      `multipliers` may be omitted (None) only when `has_multipliers` is False.
    target: `confusion [K, K] -> dict` with the reported `target` scalar (and
      constraint status for constrained objectives).
    init_multipliers: `num_classes -> array`, shape `(0,)` when there are none.
    update_multipliers: `(multipliers, confusion) -> array`, the refresh rule.
    has_multipliers: whether `value` needs multipliers.
  """

  name: str
  value: Callable[..., Array]
  target: Callable[[Array], dict[str, Array]]
  init_multipliers: Callable[[int], Array]
  update_multipliers: Callable[[Array, Array], Array]
  has_multipliers: bool = False


@dataclasses.dataclass(frozen=True)
class _Factory:
  """A registry entry: `normalise(**hparams) -> dict` checks the hyperparameters and puts
  them in canonical form (the cache key is made of it); `build(**normalised) -> Objective`."""

  normalise: Callable[..., dict[str, Any]]
  build: Callable[..., Objective]


_FACTORIES: dict[str, _Factory] = {}
_ALIASES: dict[str, str] = {}  # alias -> registry name
_CACHE: dict[tuple[Any, ...], Objective] = {}


def names() -> list[str]:
  """Registry names (`Objective.name`), built-ins first in SPEC order; no aliases.

  `get` also accepts the aliases of `aliases()`; `is_known(name)` checks either.
  """
  return list(_FACTORIES)


def is_known(name: str) -> bool:
  """Whether `get(name)` knows `name` (a registry name or an alias)."""
  return name in _FACTORIES or name in _ALIASES


def from_config(config) -> Objective:
  """The objective of a `config.objective` section: `name`, and the `hparams` that are set.

  `config` is a ConfigDict or a plain mapping (e.g. the config stored in a `summary.json`).
  Hyperparameters left at None take the objective's default (and are not passed to a user
  objective at all).
  """
  hparams = {k: v for k, v in dict(config.get("hparams", {})).items() if v is not None}
  return get(config["name"], **hparams)


def aliases() -> dict[str, str]:
  """Other accepted names: `{alias: registry name}`, e.g. `{'gmean': 'gmean_recall'}`."""
  return dict(_ALIASES)


def canonical_name(name: str) -> str:
  """The registry name of `name` (itself, or what an alias points to).

  Raises:
    ValueError: unknown name; the message lists the known names and aliases.
  """
  name = _ALIASES.get(name, name)
  if name not in _FACTORIES:
    known = ", ".join(_FACTORIES)
    alias_list = ", ".join(f"{a} -> {n}" for a, n in _ALIASES.items())
    raise ValueError(
      f"Unknown objective {name!r}; known objectives: {known} (aliases: {alias_list})."
    )
  return name


def get(name: str, **hparams: Any) -> Objective:
  """The objective `name` with keyword hyperparameters, built once and cached.

  Two calls with the same name (or an alias of it) and equal hyperparameters return the
  *same* `Objective` (the same `value` function object), so functions jitted with
  `value` as a static argument (`gains.gain_matrix`, `gains.make_gain_fn`) do not
  recompile when a loop calls `get` again. Hyperparameters are compared after
  normalisation: defaults filled in, numbers as floats for built-ins, and arrays or lists
  (e.g. `head_mask`) as tuples, so `head_mask=np.array([...])` and the equal list hit the
  same entry. Hyperparameters are static configuration, not traced values.

  Args:
    name: a registry name (see `names()`) or an alias (see `aliases()`).
    **hparams: for built-ins, any of `omega`, `beta`, `alpha`, `tau`,
      `multiplier_max`, `head_mask`, `recall_smoothing` (defaults from SPEC §3, unused
      ones ignored); for a registered function, keyword arguments bound to it (numbers,
      strings, or arrays/lists/tuples of them).

  Returns:
    The `Objective` (its `name` is the registry name, also when `name` is an alias).

  Raises:
    ValueError: unknown name or, for a built-in, an unknown hyperparameter or one out of its
      range (`HPARAM_RANGES`: omega >= 0, alpha in (0, 1], tau > 0, multiplier_max >= 0,
      recall_smoothing >= 0, all finite).
    TypeError: a hyperparameter that cannot be compared (e.g. a dict or a traced array).
  """
  name = canonical_name(name)
  factory = _FACTORIES[name]
  normalised = factory.normalise(**hparams)
  key = (name, *sorted((k, _hashable(name, k, v)) for k, v in normalised.items()))
  if key not in _CACHE:
    _CACHE[key] = _with_validity_rule(factory.build(**normalised))
  return _CACHE[key]


def _with_validity_rule(obj: Objective) -> Objective:
  """`obj` under the invalid-matrix rule of `selmix_jax.metrics`.

  A confusion matrix with a negative, NaN or infinite entry gives a NaN `value`, NaN
  multipliers from `update_multipliers`, and a `target` of NaN numbers and False
  constraint flags (never a plausible psi, which would yield plausible gains). The
  functions see zeros instead of the invalid matrix, so gradients stay finite.
  """

  def value(confusion, multipliers=None):
    confusion, valid = metrics.zero_if_invalid(confusion)
    return metrics.mask_invalid(obj.value(confusion, multipliers), valid)

  def target(confusion):
    confusion, valid = metrics.zero_if_invalid(confusion)
    return metrics.mask_invalid(obj.target(confusion), valid)

  def update_multipliers(multipliers, confusion):
    confusion, valid = metrics.zero_if_invalid(confusion)
    return metrics.mask_invalid(obj.update_multipliers(multipliers, confusion), valid)

  return dataclasses.replace(
    obj, value=value, target=target, update_multipliers=update_multipliers
  )


def _hashable(name: str, key: str, value: Any) -> Any:
  """A hashable stand-in for a hyperparameter value (arrays and lists as tuples)."""
  try:
    if isinstance(value, (np.ndarray, jax.Array, list, tuple)):
      array = np.asarray(value)
      value = (array.dtype.str, array.shape, tuple(array.ravel().tolist()))
    hash(value)
  except TypeError as error:
    raise TypeError(
      f"Hyperparameter {key}={value!r} of objective {name!r} cannot be used as a cache key "
      "(hyperparameters must be static: numbers, strings, or arrays/lists of them)."
    ) from error
  return value


def register(
  name: str,
  value_fn: Callable[..., Array],
  *,
  target_fn: Callable[..., Array] | None = None,
  init_multipliers_fn: Callable[[int], Array] | None = None,
  update_multipliers_fn: Callable[[Array, Array], Array] | None = None,
  overwrite: bool = False,
) -> None:
  """Registers a user objective.

  Without multiplier functions, `value_fn(confusion, **hparams) -> scalar` is a plain
  function of the fraction matrix and the objective has no multipliers. With them,
  `value_fn(confusion, multipliers, **hparams)` and the two functions define the
  multiplier state.

  Args:
    name: new registry name.
    value_fn: the psi to differentiate (receives fractions, `sum C = 1`).
    target_fn: `confusion -> scalar` (or a dict with a `target` key), the reported
      target; default `value_fn` (required when there are multipliers).
    init_multipliers_fn: `num_classes -> array`.
    update_multipliers_fn: `(multipliers, confusion) -> array`.
    overwrite: allow replacing an existing name.

  Raises:
    ValueError: duplicate name (unless `overwrite`), only one multiplier function, or
      multipliers without a `target_fn`.
  """
  if name in _ALIASES:
    raise ValueError(f"{name!r} is an alias of objective {_ALIASES[name]!r}; pick another name.")
  if name in _FACTORIES and not overwrite:
    raise ValueError(
      f"Objective {name!r} is already registered; pick another name or pass overwrite=True."
    )
  if (init_multipliers_fn is None) != (update_multipliers_fn is None):
    raise ValueError("Give both init_multipliers_fn and update_multipliers_fn, or neither.")
  has_multipliers = init_multipliers_fn is not None
  if has_multipliers and target_fn is None:
    raise ValueError(f"Objective {name!r} has multipliers, so it needs a target_fn.")

  def build(**hparams):
    fn = functools.partial(value_fn, **hparams)
    if has_multipliers:
      init, update = init_multipliers_fn, update_multipliers_fn
    else:
      init, update = _no_multipliers, _keep_multipliers
    report = target_fn or fn

    def target(c):
      out = report(_normalise(c))
      return dict(out) if isinstance(out, dict) else {"target": out}

    psi = fn if has_multipliers else lambda c, m: fn(c)
    value = _value(name, psi, has_multipliers)
    return Objective(name, value, target, init, update, has_multipliers=has_multipliers)

  _FACTORIES[name] = _Factory(normalise=lambda **hparams: hparams, build=build)
  _clear_cache(name)


def _clear_cache(name: str) -> None:
  for key in [key for key in _CACHE if key[0] == name]:
    del _CACHE[key]


def _register_builtin(name, aliases=()):
  """Decorator for a built-in factory taking the shared keyword hyperparameters."""

  def normalise(**hparams):
    unknown = set(hparams) - set(DEFAULT_HPARAMS)
    if unknown:
      raise ValueError(
        f"Unknown hyperparameters {sorted(unknown)} for objective {name!r}; "
        f"known: {sorted(DEFAULT_HPARAMS)}."
      )
    merged = {**DEFAULT_HPARAMS, **hparams}
    for key in HPARAM_RANGES:
      problem = hparam_problem(key, merged[key])
      if problem:
        raise ValueError(f"Objective {name!r}: {key}={merged[key]!r} {problem}.")
      merged[key] = float(merged[key])
    if merged["head_mask"] is not None:  # A constant tuple: hashable, and not the caller's.
      head_mask = np.asarray(merged["head_mask"], dtype=bool)
      if head_mask.ndim != 1:
        raise ValueError(f"head_mask must be a [K] boolean mask, got shape {head_mask.shape}.")
      merged["head_mask"] = tuple(head_mask.tolist())
    return merged

  def decorate(build):
    _FACTORIES[name] = _Factory(normalise=normalise, build=functools.partial(build, name))
    _ALIASES.update((alias, name) for alias in aliases)
    return build

  return decorate


# --------------------------------------------------------------------------- helpers


def _normalise(confusion: Array) -> Array:
  """Counts or fractions -> fractions summing to 1 (all zeros for an empty matrix)."""
  confusion = jnp.asarray(confusion)
  confusion = confusion.astype(jnp.result_type(confusion.dtype, jnp.float32))
  return metrics.safe_div(confusion, confusion.sum((-2, -1), keepdims=True), 0.0)


def _value(name: str, psi: Callable[[Array, Array], Array], has_multipliers: bool):
  """`value(confusion, multipliers=None)`: `psi(fractions, multipliers)`, None checked."""

  def value(confusion, multipliers=None):
    if multipliers is None and has_multipliers:
      raise ValueError(
        f"Objective {name!r} needs multipliers: pass "
        "obj.update_multipliers(obj.init_multipliers(K), confusion) (or the trainer's "
        "current ones) as value(confusion, multipliers)."
      )
    return psi(_normalise(confusion), multipliers)

  return value


def _no_multipliers(num_classes: int) -> Array:
  del num_classes
  return jnp.zeros((0,), jnp.float32)


def _keep_multipliers(multipliers: Array, confusion: Array) -> Array:
  del confusion
  return multipliers


def _zero_if_nan(x: Array) -> Array:
  """Replaces an undefined (NaN) aggregate by 0, with zero gradient there."""
  return jnp.where(jnp.isnan(x), 0.0, x)


def _masked_softmax(logits: Array, where: Array) -> Array:
  """Softmax over the last axis restricted to `where`; 0 elsewhere."""
  logits = jnp.where(where, logits, -jnp.inf)
  shift = jnp.where(where.any(-1, keepdims=True), logits.max(-1, keepdims=True), 0.0)
  weights = jnp.where(where, jnp.exp(logits - shift), 0.0)
  return metrics.safe_div(weights, weights.sum(-1, keepdims=True), 0.0)


def _coverage_multipliers(coverage: Array, *, threshold: float, tau: float, lmax: float):
  """`max(0, lmax (1 - exp((cov - threshold) / tau)))`, overflow-free."""
  arg = jnp.minimum((coverage - threshold) / tau, 0.0)  # arg > 0 gives <= 0 anyway.
  return lmax * jnp.maximum(-jnp.expm1(arg), 0.0)


def _head_tail_coverage_fn(head_mask):
  """`confusion [..., K, K] -> [..., 2]` mean coverage of the head and of the tail classes."""

  def coverage_fn(confusion):
    head = metrics.resolve_head_mask(confusion.shape[-1], head_mask)
    cov = metrics.coverages(confusion)
    means = [metrics.safe_div((cov * g).sum(-1), g.sum(-1), jnp.nan) for g in (head, ~head)]
    return jnp.stack(means, axis=-1)

  return coverage_fn


def _unconstrained(name, base_fn, init, update, value_fn=None):
  value_fn = value_fn or (lambda c, m: base_fn(c))
  has_multipliers = init is not _no_multipliers
  return Objective(
    name=name,
    value=_value(name, value_fn, has_multipliers),
    target=lambda c: {"target": base_fn(_normalise(c))},
    init_multipliers=init,
    update_multipliers=update,
    has_multipliers=has_multipliers,
  )


# ------------------------------------------------------------------------- built-ins


@_register_builtin("mean_recall")
def _mean_recall(name, **unused):
  del unused
  return _unconstrained(name, metrics.mean_recall, _no_multipliers, _keep_multipliers)


@_register_builtin("min_recall")
def _min_recall(name, *, omega, beta, **unused):
  """psi = sum_i lambda_i r_i; lambda_i ∝ lambda_i^beta exp(-omega r_i) on the simplex."""
  del unused

  def init(num_classes):
    return jnp.full((num_classes,), 1.0 / num_classes, jnp.float32)

  def update(multipliers, confusion):
    present = metrics.present_classes(confusion)
    logits = -omega * metrics.recalls(confusion, absent_value=0.0)
    if beta != 0.0:
      positive = multipliers > 0
      log_m = jnp.log(jnp.where(positive, multipliers, 1.0))
      logits = jnp.where(positive, logits + beta * log_m, -jnp.inf)
      present &= positive
    new = _masked_softmax(logits, present)
    return jnp.where(present.any(-1, keepdims=True), new, multipliers)

  def value(c, multipliers):
    return (multipliers * metrics.recalls(c, absent_value=0.0)).sum(-1)

  return _unconstrained(name, metrics.min_recall, init, update, value)


@_register_builtin("min_head_tail_recall")
def _min_head_tail_recall(name, *, omega, head_mask, **unused):
  """psi = lambda_H mean_H r + lambda_T mean_T r; lambda = softmax(-omega means)."""
  del unused

  def means(c):
    return jnp.stack(metrics.head_tail_recalls(c, head_mask=head_mask), axis=-1)

  def init(num_classes):
    del num_classes
    return jnp.full((2,), 0.5, jnp.float32)

  def update(multipliers, confusion):
    m = means(confusion)
    defined = ~jnp.isnan(m)
    new = _masked_softmax(-omega * _zero_if_nan(m), defined)
    return jnp.where(defined.any(-1, keepdims=True), new, multipliers)

  def value(c, multipliers):
    return (multipliers * _zero_if_nan(means(c))).sum(-1)

  base = functools.partial(metrics.min_head_tail_recall, head_mask=head_mask)
  return _unconstrained(name, base, init, update, value)


def _smoothed_recalls(c: Array, smoothing: float) -> tuple[Array, Array]:
  """`(r + smoothing, present)`: recalls of the present classes, shifted away from 0."""
  present = metrics.present_classes(c)
  return metrics.recalls(c, absent_value=1.0) + smoothing, present


def _smoothed_gmean(smoothing: float):
  """G-mean of `r_i + smoothing` over present classes (the gain's psi for `gmean_recall`)."""

  def fn(c):
    r, present = _smoothed_recalls(c, smoothing)
    mean_log = metrics.safe_div(jnp.where(present, jnp.log(r), 0.0).sum(-1), present.sum(-1), 0.0)
    return jnp.exp(mean_log)

  return fn


def _smoothed_hmean(smoothing: float):
  """H-mean of `r_i + smoothing` over present classes (the gain's psi for `hmean_recall`)."""

  def fn(c):
    r, present = _smoothed_recalls(c, smoothing)
    inverse_sum = jnp.where(present, 1.0 / r, 0.0).sum(-1)
    return metrics.safe_div(present.sum(-1).astype(r.dtype), inverse_sum, 0.0)

  return fn


@_register_builtin("gmean_recall", aliases=("gmean",))
def _gmean(name, *, recall_smoothing, **unused):
  del unused
  psi = _smoothed_gmean(recall_smoothing)
  return _unconstrained(
    name, metrics.gmean_recall, _no_multipliers, _keep_multipliers, lambda c, m: psi(c)
  )


@_register_builtin("hmean_recall", aliases=("hmean",))
def _hmean(name, *, recall_smoothing, **unused):
  del unused
  psi = _smoothed_hmean(recall_smoothing)
  return _unconstrained(
    name, metrics.hmean_recall, _no_multipliers, _keep_multipliers, lambda c, m: psi(c)
  )


def _constrained(
  name, base_fn, coverage_fn, num_constraints, *, alpha, tau, multiplier_max, psi_base_fn=None
):
  """`(base + sum_k lambda_k (cov_k - alpha/K)) / (1 + max lambda)` for cov_k in coverage_fn.

  `psi_base_fn` (default `base_fn`) replaces `base_fn` inside `value` (smoothed H-mean).
  """
  psi_base_fn = psi_base_fn or base_fn

  def threshold(c):
    return alpha / c.shape[-1]

  def init(num_classes):
    return jnp.zeros((num_constraints(num_classes),), jnp.float32)

  def update(multipliers, confusion):
    cov = coverage_fn(_normalise(confusion))
    new = _coverage_multipliers(cov, threshold=threshold(confusion), tau=tau, lmax=multiplier_max)
    return jnp.where(jnp.isnan(cov), multipliers, new)  # An empty matrix changes nothing.

  def psi(c, multipliers):
    gaps = coverage_fn(c) - threshold(c)
    total = psi_base_fn(c) + (multipliers * gaps).sum(-1)
    return total / (1.0 + multipliers.max(-1, initial=0.0))

  def target(confusion):
    c = _normalise(confusion)
    gaps = coverage_fn(c) - threshold(c)
    satisfied = gaps >= 0
    return {
      "target": base_fn(c),
      "constraint_satisfied": satisfied,
      "all_constraints_satisfied": satisfied.all(-1),
      "constraint_gap": gaps.min(-1),
    }

  return Objective(name, _value(name, psi, True), target, init, update, has_multipliers=True)


@_register_builtin("mean_recall_min_coverage")
def _mean_recall_min_coverage(name, *, alpha, tau, multiplier_max, **unused):
  del unused
  return _constrained(
      name, metrics.mean_recall, metrics.coverages, lambda k: k,
      alpha=alpha, tau=tau, multiplier_max=multiplier_max,
  )  # fmt: skip


@_register_builtin("hmean_min_coverage")
def _hmean_min_coverage(name, *, alpha, tau, multiplier_max, recall_smoothing, **unused):
  del unused
  return _constrained(
      name, metrics.hmean_recall, metrics.coverages, lambda k: k,
      alpha=alpha, tau=tau, multiplier_max=multiplier_max,
      psi_base_fn=_smoothed_hmean(recall_smoothing),
  )  # fmt: skip


@_register_builtin("mean_recall_head_tail_coverage")
def _mean_recall_head_tail_coverage(name, *, alpha, tau, multiplier_max, head_mask, **unused):
  del unused
  return _constrained(
      name, metrics.mean_recall, _head_tail_coverage_fn(head_mask), lambda k: 2,
      alpha=alpha, tau=tau, multiplier_max=multiplier_max,
  )  # fmt: skip


@_register_builtin("hmean_head_tail_coverage")
def _hmean_head_tail_coverage(
  name, *, alpha, tau, multiplier_max, head_mask, recall_smoothing, **unused
):
  del unused
  return _constrained(
      name, metrics.hmean_recall, _head_tail_coverage_fn(head_mask), lambda k: 2,
      alpha=alpha, tau=tau, multiplier_max=multiplier_max,
      psi_base_fn=_smoothed_hmean(recall_smoothing),
  )  # fmt: skip
