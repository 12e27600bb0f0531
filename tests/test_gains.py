"""Tests for `selmix_jax.gains`: finite differences, a K⁴ loop oracle, closed forms."""

import functools
import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from selmix_jax import gains
from selmix_jax import objectives


# Local objectives (independent of `selmix_jax.objectives`). Priors are recomputed from C,
# as a user's plain function of C would.
def _recalls(confusion):
  priors = confusion.sum(axis=-1)
  safe = jnp.where(priors > 0, priors, 1.0)
  return jnp.where(priors > 0, jnp.diagonal(confusion, axis1=-2, axis2=-1) / safe, 0.0)


def _mean_recall(confusion, multipliers=None):
  del multipliers
  return _recalls(confusion).mean(axis=-1)


def _min_recall(confusion, multipliers):
  return jnp.sum(multipliers * _recalls(confusion), axis=-1)


def _hmean(confusion, multipliers=None):
  del multipliers
  recalls = _recalls(confusion)
  return recalls.shape[-1] / jnp.sum(1.0 / recalls, axis=-1)


def _gmean(confusion, multipliers=None):
  del multipliers
  return jnp.exp(jnp.mean(jnp.log(_recalls(confusion)), axis=-1))


OBJECTIVE_NAMES = objectives.names()


def _objective(name, num_classes, confusion):
  """Returns `(value_fn(confusion, multipliers), multipliers)` for `name`."""
  obj = objectives.get(name)
  multipliers = obj.init_multipliers(num_classes)
  multipliers = obj.update_multipliers(multipliers, confusion)
  return obj.value, multipliers


def _problem(num_classes, dim, seed, dtype=None):
  """Random prototypes Z, head (W, b), non-uniform priors (default float dtype)."""
  rng = np.random.default_rng(seed)
  prototypes = rng.normal(size=(num_classes, dim))
  kernel = 0.5 * rng.normal(size=(dim, num_classes))
  bias = 0.3 * rng.normal(size=(num_classes,))
  priors = rng.dirichlet(np.full(num_classes, 2.0))
  return tuple(jnp.asarray(x, dtype) for x in (prototypes, kernel, bias, priors))


def _soft_confusion(prototypes, kernel, bias, priors):
  return priors[:, None] * jax.nn.softmax(prototypes @ kernel + bias, axis=-1)


@pytest.fixture
def x64():
  with jax.enable_x64(True):
    yield


@pytest.mark.parametrize("name", OBJECTIVE_NAMES)
def test_gain_matches_finite_difference_of_sgd_step(x64, name):
  """G_ij == (ψ(C') - ψ(C)) / η after a real SGD step of the head, all pairs."""
  del x64
  num_classes, dim, mix_weight, lr = 5, 4, 0.8, 1e-5
  prototypes, kernel, bias, priors = _problem(num_classes, dim, seed=1)
  confusion = _soft_confusion(prototypes, kernel, bias, priors)
  value_fn, multipliers = _objective(name, num_classes, confusion)
  assert np.isfinite(float(value_fn(confusion, multipliers)))

  def measured_change(i, j, train_bias):
    mixed = mix_weight * prototypes[i] + (1 - mix_weight) * prototypes[j]

    def loss(kernel, bias):
      return -jax.nn.log_softmax(mixed @ kernel + bias)[i]

    grad_kernel, grad_bias = jax.grad(loss, argnums=(0, 1))(kernel, bias)
    new_kernel = kernel - lr * grad_kernel
    new_bias = bias - lr * grad_bias if train_bias else bias
    new_confusion = _soft_confusion(prototypes, new_kernel, new_bias, priors)
    return (value_fn(new_confusion, multipliers) - value_fn(confusion, multipliers)) / lr

  @jax.jit  # One compilation per objective for both bias settings, forms and algorithms.
  def predicted_and_measured():
    idx = jnp.arange(num_classes)
    out = {}
    for train_bias in (False, True):
      measure = functools.partial(measured_change, train_bias=train_bias)
      measured = jax.vmap(jax.vmap(measure, (None, 0)), (0, None))(idx, idx)
      for algorithm in gains.ALGORITHMS:
        out[train_bias, algorithm] = [measured] + [
          gains.gain_matrix(
            confusion,
            prototypes,
            kernel,
            bias,
            multipliers,
            value_fn=value_fn,
            mix_weight=mix_weight,
            form=form,
            train_bias=train_bias,
            chunk_size=2,
            algorithm=algorithm,
          )
          for form in ("exact", "reference")
        ]
    return out

  for (train_bias, algorithm), (measured, exact, reference) in predicted_and_measured().items():
    scale = float(jnp.max(jnp.abs(measured)))
    assert scale > 1e-6, "degenerate test problem"
    np.testing.assert_allclose(
      exact, measured, rtol=1e-3, atol=1e-3 * scale, err_msg=f"{train_bias=} {algorithm=}"
    )
    # The check has teeth: the reference form misses (1-λ̄) <z_j - z_i, z_q> D_qi.
    assert float(jnp.max(jnp.abs(reference - measured))) > 1e-2 * scale


def _loop_gain(value_fn, multipliers, confusion, prototypes, kernel, bias, mix_weight, train_bias):
  """Slow oracle: explicit D and the K⁴ tensor L_ijql with Python loops."""
  confusion, prototypes, kernel, bias = (
    np.asarray(x, np.float64) for x in (confusion, prototypes, kernel, bias)
  )
  sens = np.asarray(jax.grad(value_fn)(jnp.asarray(confusion), multipliers))  # M
  num_classes = confusion.shape[0]
  priors = confusion.sum(axis=1)
  rate = np.zeros((num_classes, num_classes))
  for q in range(num_classes):
    row_total = sum(sens[q, b] * confusion[q, b] for b in range(num_classes))
    for l in range(num_classes):
      rate[q, l] = sens[q, l] * confusion[q, l] - confusion[q, l] / priors[q] * row_total
  extra = 1.0 if train_bias else 0.0
  shape = (num_classes,) * 4
  exact, reference = np.zeros(shape), np.zeros(shape)
  for i in range(num_classes):
    for j in range(num_classes):
      mixed = mix_weight * prototypes[i] + (1 - mix_weight) * prototypes[j]
      logits = mixed @ kernel + bias
      probs = np.exp(logits - logits.max())
      probs /= probs.sum()
      for q in range(num_classes):
        s_exact = mixed @ prototypes[q] + extra
        s_ref = prototypes[i] @ prototypes[q] + extra
        for l in range(num_classes):
          delta = float(i == l)
          exact[i, j, q, l] = s_exact * (delta - probs[l])
          reference[i, j, q, l] = s_ref * delta - s_exact * probs[l]
  return (np.einsum("ijql,ql->ij", exact, rate), np.einsum("ijql,ql->ij", reference, rate))


@pytest.mark.parametrize("train_bias", [False, True])
def test_gain_matches_loop_oracle_both_forms(x64, train_bias):
  del x64
  num_classes, dim, mix_weight = 4, 3, 0.7
  prototypes, kernel, bias, priors = _problem(num_classes, dim, seed=2)
  confusion = _soft_confusion(prototypes, kernel, bias, priors)
  multipliers = jnp.asarray([0.1, 0.4, 0.2, 0.3])
  want_exact, want_ref = _loop_gain(
    _min_recall, multipliers, confusion, prototypes, kernel, bias, mix_weight, train_bias
  )
  for (form, want), algorithm in itertools.product(
    (("exact", want_exact), ("reference", want_ref)), gains.ALGORITHMS
  ):
    got = gains.gain_matrix(
      confusion,
      prototypes,
      kernel,
      bias,
      multipliers,
      value_fn=_min_recall,
      mix_weight=mix_weight,
      form=form,
      train_bias=train_bias,
      algorithm=algorithm,
    )
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12, err_msg=algorithm)
  # The two forms differ by (1-λ̄) Σ_q <z_j - z_i, z_q> D_qi.
  assert np.abs(want_exact - want_ref).max() > 1e-6


def test_gain_float32_close_to_float64():
  num_classes, dim = 6, 5
  with jax.enable_x64(True):
    problem64 = [np.asarray(x) for x in _problem(num_classes, dim, seed=3)]
  with jax.enable_x64(True):
    problem = [jnp.asarray(x) for x in problem64]
    want = gains.gain_matrix(_soft_confusion(*problem), *problem[:3], value_fn=_hmean)
  problem = [jnp.asarray(x, jnp.float32) for x in problem64]
  got = gains.gain_matrix(_soft_confusion(*problem), *problem[:3], value_fn=_hmean)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4 * np.abs(want).max())


def _closed_form_rate(sens, confusion):
  priors = confusion.sum(axis=1, keepdims=True)
  return sens * confusion - confusion / priors * np.sum(sens * confusion, axis=1, keepdims=True)


def test_gain_rate_equals_closed_form_mean_and_min_recall(x64):
  del x64
  num_classes = 5
  prototypes, kernel, bias, priors = _problem(num_classes, 3, seed=4)
  confusion = _soft_confusion(prototypes, kernel, bias, priors)
  conf_np, pri_np = np.asarray(confusion), np.asarray(priors)
  # SPEC M (priors held fixed): mean recall M_ql = δ_ql / (K π_q).
  sens_mean = np.diag(1.0 / (num_classes * pri_np))
  # Min recall ψ = Σ λ_q r_q: M_ql = δ_ql λ_q / π_q.
  multipliers = np.array([0.3, 0.1, 0.25, 0.15, 0.2])
  sens_min = np.diag(multipliers / pri_np)
  cases = [(_mean_recall, None, sens_mean), (_min_recall, jnp.asarray(multipliers), sens_min)]
  mean_obj, min_obj = objectives.get("mean_recall"), objectives.get("min_recall")
  cases += [
    (mean_obj.value, mean_obj.init_multipliers(num_classes), sens_mean),
    (min_obj.value, jnp.asarray(multipliers), sens_min),
  ]
  for value_fn, mult, sens in cases:
    got = gains.gain_rate(value_fn, confusion, mult)
    np.testing.assert_allclose(got, _closed_form_rate(sens, conf_np), rtol=1e-12, atol=1e-14)
    # The rate's rows sum to zero (softmax invariance to a shift of the logits).
    np.testing.assert_allclose(np.asarray(got).sum(axis=1), 0.0, atol=1e-14)


def test_gain_rate_counts_equal_fractions():
  confusion = jnp.asarray([[30, 5, 0], [2, 8, 0], [1, 1, 3]], jnp.int32)
  from_counts = gains.gain_rate(_hmean, confusion)
  from_fractions = gains.gain_rate(_hmean, confusion / confusion.sum())
  assert from_counts.dtype == jnp.float32
  np.testing.assert_allclose(from_counts, from_fractions, rtol=1e-5, atol=1e-7)


def test_absent_class_and_zero_entries_are_finite():
  confusion = jnp.asarray([[0.3, 0.1, 0.0], [0.0, 0.0, 0.0], [0.05, 0.0, 0.55]])
  rate = gains.gain_rate(_mean_recall, confusion)
  assert np.all(np.isfinite(rate))
  np.testing.assert_array_equal(rate[1], 0.0)  # absent class
  assert rate[0, 2] == 0.0 and rate[2, 1] == 0.0  # zero entries stay put
  prototypes, kernel, bias, _ = _problem(3, 4, seed=5, dtype=np.float32)
  gain = gains.gain_matrix(confusion, prototypes, kernel, bias, value_fn=_mean_recall, chunk_size=2)
  assert np.all(np.isfinite(gain))


def test_no_bias_head():
  prototypes, kernel, _, priors = _problem(4, 3, seed=6, dtype=np.float32)
  confusion = _soft_confusion(prototypes, kernel, 0.0, priors)
  got = gains.gain_matrix(confusion, prototypes, kernel, None, value_fn=_gmean)
  want = gains.gain_matrix(confusion, prototypes, kernel, jnp.zeros(4), value_fn=_gmean)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  # bfloat16 features are promoted to float32.
  low = gains.gain_matrix(confusion, prototypes.astype(jnp.bfloat16), kernel, None,
                          value_fn=_gmean)
  assert low.dtype == jnp.float32


@pytest.mark.parametrize("form", ["exact", "reference"])
def test_chunked_matches_unchunked(form):
  num_classes = 7
  prototypes, kernel, bias, priors = _problem(num_classes, 5, seed=7, dtype=np.float32)
  confusion = _soft_confusion(prototypes, kernel, bias, priors)
  chunk_sizes = (num_classes, 1, 3, 4, 100, None)

  @jax.jit  # One compilation for all chunk sizes; the factorised gain is compared too.
  def run_all(*args):
    return [
      gains.gain_matrix(
        *args, value_fn=_gmean, form=form, train_bias=True, chunk_size=chunk_size,
        algorithm="softmax",
      )
      for chunk_size in chunk_sizes
    ] + [gains.gain_matrix(*args, value_fn=_gmean, form=form, train_bias=True)]

  want, *others = run_all(confusion, prototypes, kernel, bias)
  for chunk_size, got in zip(chunk_sizes[1:] + ("factorised",), others, strict=True):
    np.testing.assert_allclose(
      got, want, rtol=1e-5, atol=1e-6 * np.abs(want).max(), err_msg=f"chunk_size={chunk_size}"
    )


def _refresh_inputs(seed, num_classes=6, dim=4):
  prototypes, kernel, bias, priors = _problem(num_classes, dim, seed, dtype=np.float32)
  confusion = _soft_confusion(prototypes, kernel, bias, priors)
  multipliers = jax.nn.softmax(
    jnp.asarray(np.random.default_rng(seed).normal(size=num_classes), jnp.float32)
  )
  return confusion, prototypes, kernel, bias, multipliers


def test_no_retracing_across_refreshes():
  chex.clear_trace_counter()

  def gain_fn(confusion, prototypes, kernel, bias, multipliers):
    return gains.gain_matrix(
      confusion,
      prototypes,
      kernel,
      bias,
      multipliers,
      value_fn=_min_recall,
      chunk_size=4,
      train_bias=True,
    )

  jitted = jax.jit(chex.assert_max_traces(gain_fn, n=1))
  outputs = [jitted(*_refresh_inputs(seed)) for seed in range(3)]
  assert not np.allclose(outputs[0], outputs[1])

  # The factory: the objective is traced once however often the refresh runs.
  value_fn = chex.assert_max_traces(_min_recall, n=1)
  refresh = gains.make_gain_fn(value_fn, mix_weight=0.8, temperature=0.1, chunk_size=4)
  for seed in range(3):
    inputs = _refresh_inputs(seed)
    gain, probs = refresh(*inputs)
    np.testing.assert_allclose(
      gain, gains.gain_matrix(*inputs, value_fn=_min_recall, chunk_size=4), rtol=1e-5, atol=1e-7
    )
    np.testing.assert_allclose(
      probs, gains.pair_distribution(gain, temperature=0.1), rtol=1e-6, atol=1e-8
    )
  assert refresh._cache_size() == 1  # pylint: disable=protected-access


@pytest.mark.parametrize("name", ["mean_recall", "gmean", "hmean"])
def test_objective_without_multipliers_needs_none(name):
  confusion, prototypes, kernel, bias, _ = _refresh_inputs(seed=9)
  obj = objectives.get(name)
  got = gains.gain_matrix(confusion, prototypes, kernel, bias, value_fn=obj.value)
  want = gains.gain_matrix(
    confusion, prototypes, kernel, bias, obj.init_multipliers(6), value_fn=obj.value
  )
  assert np.abs(np.asarray(want)).max() > 0
  np.testing.assert_allclose(got, want, rtol=1e-6)
  gain, _ = gains.make_gain_fn(obj.value)(confusion, prototypes, kernel, bias)
  np.testing.assert_allclose(gain, want, rtol=1e-6)


def test_objective_with_multipliers_missing_is_an_error():
  confusion, prototypes, kernel, bias, _ = _refresh_inputs(seed=9)
  with pytest.raises(ValueError, match="'min_recall' needs multipliers"):
    gains.gain_matrix(
      confusion, prototypes, kernel, bias, value_fn=objectives.get("min_recall").value
    )


def test_invalid_form_and_algorithm():
  args = (jnp.eye(2),) * 3 + (None,)
  with pytest.raises(ValueError, match="form must be one of"):
    gains.gain_matrix(*args, value_fn=_mean_recall, form="paper")
  with pytest.raises(ValueError, match="algorithm must be one of"):
    gains.gain_matrix(*args, value_fn=_mean_recall, algorithm="fast")
  with pytest.raises(ValueError, match="algorithm must be one of"):
    gains.make_gain_fn(_mean_recall, algorithm="fast")


def _spread_problem(num_classes=6, spread=(0, 1, 4), scale=1000.0):
  """Prototype logits `A = diag(s) + bias` with `s = scale` for the `spread` classes, 1 else.

  Mixed-logit exponents of a pair of spread classes are <= -(1-λ̄) scale = -200 for every
  l, so float32 `E1 E2ᵀ` underflows to 0 on those pairs; rows of other classes keep
  denominators far above the fallback threshold.
  """
  rng = np.random.default_rng(14)
  prototypes = np.eye(num_classes) + 0.01 * rng.normal(size=(num_classes, num_classes))
  kernel = np.diag(np.where(np.isin(np.arange(num_classes), spread), scale, 1.0))
  bias = 0.1 * rng.normal(size=num_classes)
  logits = (prototypes @ kernel + bias).astype(np.float32)
  probs = np.exp(logits - logits.max(1, keepdims=True))
  probs /= probs.sum(1, keepdims=True)
  confusion = (0.7 * np.eye(num_classes) + 0.3 * probs) / num_classes  # Every class right 70%+.
  return [jnp.asarray(x, jnp.float32) for x in (confusion, prototypes, kernel, bias)], logits


@pytest.mark.parametrize("chunk_size", [None, 1, 2, 4])
def test_factorised_falls_back_to_softmax_where_float32_underflows(chunk_size):
  (confusion, prototypes, kernel, bias), logits = _spread_problem()
  # The test has teeth: without the fallback, these pairs would divide 0 by 0.
  shifted = logits - logits.max(1, keepdims=True)
  den = np.exp(0.8 * shifted) @ np.exp(0.2 * shifted).T
  spread = np.isin(np.arange(6), (0, 1, 4))
  assert (den[np.ix_(spread, spread)][~np.eye(3, dtype=bool)] == 0).all()
  assert (den[~spread] > 1e-18).all()  # Above sqrt(tiny): these rows keep the products.
  kwargs = {"value_fn": objectives.get("hmean_recall").value, "chunk_size": chunk_size}
  multipliers = None
  got = gains.gain_matrix(confusion, prototypes, kernel, bias, multipliers, **kwargs)
  want = gains.gain_matrix(
    confusion, prototypes, kernel, bias, multipliers, **kwargs, algorithm="softmax"
  )
  assert np.isfinite(got).all() and np.abs(np.asarray(want)).max() > 0
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * np.abs(want).max())
  # The same in float64 against the K⁴ loop oracle (min recall, fixed multipliers).
  with jax.enable_x64(True):
    args64 = [jnp.asarray(x, jnp.float64) for x in (confusion, prototypes, kernel, bias)]
    mult = jnp.full((6,), 1 / 6, jnp.float64)
    want64, _ = _loop_gain(_min_recall, mult, *args64, 0.8, False)
  got32 = gains.gain_matrix(
    confusion, prototypes, kernel, bias, jnp.full((6,), 1 / 6), value_fn=_min_recall,
    chunk_size=chunk_size,
  )  # fmt: skip
  np.testing.assert_allclose(got32, want64, rtol=1e-3, atol=1e-4 * np.abs(want64).max())


def test_factorised_matches_softmax_at_k_300():
  confusion, prototypes, kernel, bias, multipliers = _refresh_inputs(seed=15, num_classes=300)
  kernel = 3.0 * kernel  # Logit ranges of ~50: no fallback, the products alone.
  value_fn = objectives.get("min_recall").value
  multipliers = objectives.get("min_recall").update_multipliers(multipliers, confusion)
  got, want = (
    gains.gain_matrix(
      confusion, prototypes, kernel, bias, multipliers, value_fn=value_fn, algorithm=algorithm
    )
    for algorithm in gains.ALGORITHMS
  )
  scale = np.abs(np.asarray(want)).max()
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * scale)


def test_pair_distribution_masks_non_positive_gains():
  gain = jnp.asarray([[0.2, -0.1], [0.0, 0.1]])
  probs = gains.pair_distribution(gain, temperature=0.1)
  e = np.exp([2.0, 1.0])
  np.testing.assert_allclose(probs, [[e[0] / e.sum(), 0.0], [0.0, e[1] / e.sum()]], rtol=1e-6)
  np.testing.assert_allclose(float(probs.sum()), 1.0, rtol=1e-6)


def test_pair_distribution_uniform_fallback():
  for gain in (jnp.asarray([[-1.0, 0.0, -3.0]] * 3), jnp.zeros((3, 3))):
    np.testing.assert_allclose(gains.pair_distribution(gain), np.full((3, 3), 1 / 9), rtol=1e-6)


def test_pair_distribution_temperature_and_stability():
  gain = jnp.asarray(np.random.default_rng(8).normal(size=(5, 5)), jnp.float32)
  hot = gains.pair_distribution(gain, temperature=10.0)
  cold = gains.pair_distribution(gain, temperature=0.01)
  positive = np.asarray(gain) > 0
  # High temperature: nearly uniform over the positive pairs; low: all mass on the max.
  np.testing.assert_allclose(hot[positive], 1 / positive.sum(), rtol=0.2)
  assert float(cold.max()) > 0.99 and int(cold.argmax()) == int(gain.argmax())
  # Huge gains do not overflow.
  big = gains.pair_distribution(1e6 * gain, temperature=0.1)
  assert np.all(np.isfinite(big)) and abs(float(big.sum()) - 1.0) < 1e-6
  np.testing.assert_array_equal(np.asarray(big)[~positive], 0.0)
  jitted = jax.jit(gains.pair_distribution, static_argnames="temperature")(gain, temperature=0.5)
  np.testing.assert_allclose(jitted, gains.pair_distribution(gain, temperature=0.5), rtol=1e-6)
  inside = jax.jit(lambda g: gains.pair_distribution(2.0 * g, temperature=0.5))(gain)
  np.testing.assert_allclose(inside, gains.pair_distribution(2 * gain, temperature=0.5), rtol=1e-6)


@pytest.mark.parametrize("temperature", [0.0, -0.1, float("nan"), float("inf")])
def test_pair_distribution_rejects_a_non_positive_temperature(temperature):
  gain = jnp.ones((2, 2))
  with pytest.raises(ValueError, match="temperature must be a positive finite number"):
    gains.pair_distribution(gain, temperature=temperature)
  with pytest.raises(ValueError, match="temperature must be a positive finite number"):
    gains.make_gain_fn(_mean_recall, temperature=temperature)


def test_pair_distribution_argument_errors():
  gain = jnp.ones((2, 2))
  with pytest.raises(TypeError, match="temperature must be a static Python float"):
    jax.jit(gains.pair_distribution)(gain, temperature=0.1)
  with pytest.raises(ValueError, match="temperature_scale must be one of"):
    gains.pair_distribution(gain, temperature_scale="relative")
  with pytest.raises(ValueError, match="temperature_scale must be one of"):
    gains.make_gain_fn(_mean_recall, temperature_scale="relative")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_pair_distribution_of_non_finite_gains_is_all_nan(bad):
  gain = np.asarray([[0.2, -0.1], [0.0, 0.1]], np.float32)
  gain[1, 0] = bad  # Counted as "not positive", NaN used to leave a plausible P.
  for scale in gains.TEMPERATURE_SCALES:
    probs = gains.pair_distribution(gain, temperature=0.1, temperature_scale=scale)
    assert np.isnan(probs).all(), scale


def test_invalid_confusion_gives_nan_gains_and_pair_probs():
  confusion, prototypes, kernel, bias, _ = _refresh_inputs(seed=10)
  confusion = confusion.at[2, 3].set(-0.01)
  gain, probs = gains.make_gain_fn(objectives.get("mean_recall").value)(
    confusion, prototypes, kernel, bias
  )
  assert np.isnan(gain).all() and np.isnan(probs).all()


def test_pair_distribution_max_gain_scale():
  gain = jnp.asarray([[0.2, -0.1], [0.0, 0.1]])
  # T = 0.5 relative to max⁺G = 0.2 is T = 0.1 absolute: P ∝ exp([2, 1]) on the positives.
  probs = gains.pair_distribution(gain, temperature=0.5, temperature_scale="max_gain")
  e = np.exp([2.0, 1.0])
  np.testing.assert_allclose(probs, [[e[0] / e.sum(), 0.0], [0.0, e[1] / e.sum()]], rtol=1e-6)
  # The same relative T concentrates P the same way at any gain scale; absolute T does not.
  random_gain = jnp.asarray(np.random.default_rng(11).normal(size=(6, 6)), jnp.float32)
  want = gains.pair_distribution(random_gain, temperature=0.2, temperature_scale="max_gain")
  for factor in (1e-4, 1e4):
    got = gains.pair_distribution(
      factor * random_gain, temperature=0.2, temperature_scale="max_gain"
    )
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-8)
    absolute = gains.pair_distribution(factor * random_gain, temperature=0.2)
    assert np.abs(np.asarray(absolute) - np.asarray(want)).max() > 0.05
  # No positive gain: uniform, as with the absolute scale.
  uniform = gains.pair_distribution(-jnp.ones((3, 3)), temperature_scale="max_gain")
  np.testing.assert_allclose(uniform, np.full((3, 3), 1 / 9), rtol=1e-6)


def test_make_gain_fn_plumbs_the_temperature_scale_and_is_cached():
  inputs = _refresh_inputs(seed=12)
  value_fn = objectives.get("min_recall").value
  refresh = gains.make_gain_fn(value_fn, temperature=0.3, temperature_scale="max_gain")
  gain, probs = refresh(*inputs)
  want = gains.pair_distribution(gain, temperature=0.3, temperature_scale="max_gain")
  np.testing.assert_allclose(probs, want, rtol=1e-6, atol=1e-9)
  assert not np.allclose(probs, gains.pair_distribution(gain, temperature=0.3), atol=1e-3)
  # Equal arguments give the same jitted function: no recompilation in a refresh loop.
  again = gains.make_gain_fn(
    objectives.get("min_recall").value, temperature=0.3, temperature_scale="max_gain"
  )
  assert again is refresh
  again(*_refresh_inputs(seed=13))
  assert refresh._cache_size() == 1  # pylint: disable=protected-access
