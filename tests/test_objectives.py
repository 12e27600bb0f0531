"""Tests for selmix_jax.objectives against independent NumPy versions of SPEC §3."""

import dataclasses

import jax
import jax.numpy as jnp
from jax import test_util as jtu
import numpy as np
import pytest

import conftest  # tests/conftest.py

from selmix_jax import gains
from selmix_jax import metrics
from selmix_jax import objectives

SPEC_NAMES = [  # Registry names; the SPEC's `gmean` and `hmean` are aliases.
  "mean_recall",
  "min_recall",
  "min_head_tail_recall",
  "gmean_recall",
  "hmean_recall",
  "mean_recall_min_coverage",
  "hmean_min_coverage",
  "mean_recall_head_tail_coverage",
  "hmean_head_tail_coverage",
]
CONSTRAINED = [n for n in SPEC_NAMES if "coverage" in n]
K = 10
HEAD = np.arange(K) < 9  # The default mask for K = 10.


# ---------------------------------------------------------------- NumPy references


def np_recalls(cm):
  cm = np.asarray(cm, np.float64)
  return np.diag(cm) / cm.sum(1)


def np_coverages(cm):
  cm = np.asarray(cm, np.float64)
  return cm.sum(0) / cm.sum()


def np_head_tail(x, head=HEAD):
  return np.array([x[head].mean(), x[~head].mean()])


def np_hmean(r):
  return 0.0 if (r == 0).any() else len(r) / np.sum(1.0 / r)


def np_min_recall_update(multipliers, cm, *, omega, beta):
  r = np_recalls(cm)
  new = np.array([m**beta * np.exp(-omega * ri) for m, ri in zip(multipliers, r, strict=True)])
  return new / new.sum()


def np_coverage_update(cov, *, alpha, tau, lmax, num_classes):
  out = []
  for c in cov:
    with np.errstate(over="ignore"):
      out.append(max(0.0, lmax * (1.0 - np.exp((c - alpha / num_classes) / tau))))
  return np.array(out)


def np_value(name, cm, multipliers, *, alpha=0.95, smoothing=1e-3):
  """SPEC §3 psi, written out independently (all classes present); G-/H-mean use the
  smoothed recalls `r + smoothing` of the module docstring."""
  cm = np.asarray(cm, np.float64)
  c = cm / cm.sum()
  prior = c.sum(1)
  r = np_recalls(cm)
  cov = np_coverages(cm)
  num_classes = len(c)
  base = np.mean(r) if name.startswith("mean_recall") else np_hmean(r + smoothing)
  if name == "mean_recall":
    return sum(c[i, i] / prior[i] for i in range(num_classes)) / num_classes
  if name == "min_recall":
    return float(np.dot(multipliers, r))
  if name == "min_head_tail_recall":
    return float(np.dot(multipliers, np_head_tail(r)))
  if name == "gmean_recall":
    return np.prod(r + smoothing) ** (1.0 / num_classes)
  if name == "hmean_recall":
    return np_hmean(r + smoothing)
  if name.endswith("min_coverage"):
    gaps = cov - alpha / num_classes
  else:
    gaps = np_head_tail(cov) - alpha / num_classes
  return (base + np.dot(multipliers, gaps)) / (1.0 + np.max(multipliers))


def random_confusion(seed, num_classes=K, diag=30):
  rng = np.random.default_rng(seed)
  cm = rng.integers(0, 8, (num_classes, num_classes)) + np.diag(rng.integers(1, diag, num_classes))
  return cm.astype(np.int32)


# --------------------------------------------------------------------- registry


def test_names_cover_spec():
  assert objectives.names()[: len(SPEC_NAMES)] == SPEC_NAMES


def test_objective_names_are_metric_names_with_spec_aliases():
  assert objectives.aliases() == {"gmean": "gmean_recall", "hmean": "hmean_recall"}
  summary_keys = set(metrics.summary(np.eye(3)))
  for name in SPEC_NAMES[:5]:
    assert name in summary_keys  # Each unconstrained objective reports the metric it names.
  for alias, name in objectives.aliases().items():
    assert objectives.get(alias) is objectives.get(name)
    assert objectives.get(alias).name == name
    assert objectives.canonical_name(alias) == name
    # Listed once, under the registry name; `in` accepts the alias (configs check it).
    assert alias not in objectives.names() and objectives.is_known(alias)
  assert not objectives.is_known("gmean_recal")
  assert objectives.canonical_name("min_recall") == "min_recall"


def test_unknown_name_lists_known_names():
  with pytest.raises(ValueError, match="Unknown objective 'worst_recall'.*min_recall"):
    objectives.get("worst_recall")
  with pytest.raises(ValueError, match=r"aliases: gmean -> gmean_recall"):
    objectives.canonical_name("g_mean")


def test_get_is_cached_on_normalised_hyperparameters():
  assert objectives.get("min_recall") is objectives.get("min_recall", omega=50)
  assert objectives.get("min_recall", omega=50.0) is objectives.get("min_recall", omega=50)
  assert objectives.get("min_recall", omega=10.0) is not objectives.get("min_recall")
  head = np.arange(K) < 7
  obj = objectives.get("min_head_tail_recall", head_mask=head)
  assert obj is objectives.get("min_head_tail_recall", head_mask=list(head))
  assert obj is objectives.get("min_head_tail_recall", head_mask=tuple(head.tolist()))
  assert obj is objectives.get("min_head_tail_recall", head_mask=jnp.asarray(head))
  assert obj is not objectives.get("min_head_tail_recall", head_mask=np.arange(K) < 8)
  assert obj is not objectives.get("min_head_tail_recall")
  # The cached objective keeps its own copy: changing the caller's array changes nothing.
  cm = random_confusion(21)
  before = obj.target(cm)["target"]
  head[:] = True
  np.testing.assert_array_equal(obj.target(cm)["target"], before)
  r = np_recalls(cm)
  np.testing.assert_allclose(before, min(r[:7].mean(), r[7:].mean()), rtol=1e-6)
  with pytest.raises(ValueError, match="head_mask"):
    objectives.get("min_head_tail_recall", head_mask=np.ones((2, 5), bool))


def _gain_inputs(seed=0):
  rng = np.random.default_rng(seed)
  prototypes = rng.normal(size=(K, 4)).astype(np.float32)
  kernel = rng.normal(size=(4, K)).astype(np.float32)
  return jnp.asarray(random_confusion(seed), jnp.float32), prototypes, kernel, np.zeros(K)


def test_repeated_get_and_gain_matrix_compile_once(registry):
  del registry
  traces = []

  def counted(confusion, *, weights):
    traces.append(1)  # Runs once per trace, not per call.
    return (jnp.asarray(weights) * metrics.recalls(confusion, absent_value=0.0)).sum()

  objectives.register("counted", counted)
  for seed in range(3):  # A loop that calls `get` at every refresh, with an array hparam.
    obj = objectives.get("counted", weights=np.linspace(0, 1, K))
    gain = gains.gain_matrix(*_gain_inputs(seed), value_fn=obj.value)
    assert np.isfinite(gain).all() and np.abs(gain).max() > 0
  assert len(traces) == 1
  # A built-in with a head mask: one new compilation of gain_matrix for three refreshes.
  before = gains.gain_matrix._cache_size()  # pylint: disable=protected-access
  for seed in range(3):
    obj = objectives.get("min_head_tail_recall", omega=5, head_mask=np.arange(K) < 6)
    multipliers = obj.update_multipliers(obj.init_multipliers(K), _gain_inputs(seed)[0])
    gains.gain_matrix(*_gain_inputs(seed), multipliers, value_fn=obj.value)
  assert gains.gain_matrix._cache_size() == before + 1  # pylint: disable=protected-access


def test_unhashable_hyperparameter_is_a_clear_error(registry):
  del registry
  objectives.register("with_dict", lambda c, *, table: metrics.mean_recall(c))
  with pytest.raises(TypeError, match="table=.*'with_dict'.*static"):
    objectives.get("with_dict", table={"a": 1})


def test_unknown_hparam_is_an_error():
  with pytest.raises(ValueError, match="omgea"):
    objectives.get("min_recall", omgea=3.0)


@pytest.mark.parametrize("name", SPEC_NAMES)
def test_shared_hparams_accepted_everywhere_and_used_where_they_apply(name):
  """Every objective takes every shared hyperparameter; the ones it uses change its multipliers
  and value as the NumPy references say, the others change nothing."""
  shared = dict(omega=10.0, beta=0.5, alpha=0.9, tau=0.05, multiplier_max=10.0)
  obj = objectives.get(name, **shared)
  assert obj.name == name
  cm = random_confusion(23)
  init = np.asarray(obj.init_multipliers(K), np.float64)
  m = np.asarray(obj.update_multipliers(obj.init_multipliers(K), cm), np.float64)
  if name == "min_recall":
    expected = np_min_recall_update(init, cm, omega=10.0, beta=0.5)
  elif name == "min_head_tail_recall":
    logits = -10.0 * np_head_tail(np_recalls(cm))
    expected = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
  elif "coverage" in name:
    cov = np_coverages(cm) if name.endswith("min_coverage") else np_head_tail(np_coverages(cm))
    expected = np_coverage_update(cov, alpha=0.9, tau=0.05, lmax=10.0, num_classes=K)
  else:
    expected = np.zeros(0)
  np.testing.assert_allclose(m, expected, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(
    obj.value(cm, jnp.asarray(m, jnp.float32)),
    np_value(name, cm, m if m.size else None, alpha=0.9), rtol=1e-5,
  )


@pytest.mark.parametrize("name", SPEC_NAMES)
def test_init_multipliers(name):
  m = objectives.get(name).init_multipliers(K)
  assert isinstance(m, jax.Array)
  expected = {
    "min_recall": np.full(K, 1 / K),
    "min_head_tail_recall": np.array([0.5, 0.5]),
    "mean_recall_min_coverage": np.zeros(K),
    "hmean_min_coverage": np.zeros(K),
    "mean_recall_head_tail_coverage": np.zeros(2),
    "hmean_head_tail_coverage": np.zeros(2),
  }.get(name, np.zeros(0))
  np.testing.assert_allclose(m, expected, rtol=1e-6)


# ------------------------------------------------------------ multiplier updates


@pytest.mark.parametrize("beta", [0.0, 0.5])
def test_min_recall_update_matches_numpy_loop(beta):
  obj = objectives.get("min_recall", omega=5.0, beta=beta)
  update = jax.jit(obj.update_multipliers)
  m, m_np = obj.init_multipliers(K), np.full(K, 1 / K)
  for step in range(4):  # Several refreshes, each from a different validation matrix.
    cm = random_confusion(step)
    m = update(m, cm)
    m_np = np_min_recall_update(m_np, cm, omega=5.0, beta=beta)
    np.testing.assert_allclose(m, m_np, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(float(m.sum()), 1.0, rtol=1e-5)


def test_min_recall_default_concentrates_on_worst_class():
  cm = random_confusion(7)
  obj = objectives.get("min_recall")  # omega = 50.
  m = obj.update_multipliers(obj.init_multipliers(K), cm)
  r = np_recalls(cm)
  np.testing.assert_allclose(
    m, np_min_recall_update(np.full(K, 0.1), cm, omega=50, beta=0), rtol=1e-4, atol=1e-7
  )
  assert int(np.argmax(m)) == int(np.argmin(r))
  np.testing.assert_allclose(obj.target(cm)["target"], r.min(), rtol=1e-6)


def test_min_recall_absent_class_gets_zero_multiplier():
  cm = random_confusion(8)
  cm[3] = 0
  obj = objectives.get("min_recall")
  m = obj.update_multipliers(obj.init_multipliers(K), cm)
  assert float(m[3]) == 0.0
  np.testing.assert_allclose(float(m.sum()), 1.0, rtol=1e-5)
  present = np.arange(K) != 3
  r = np.diag(cm)[present] / cm[present].sum(1)
  expected = np.exp(-50 * (r - r.min()))
  np.testing.assert_allclose(m[present], expected / expected.sum(), rtol=1e-4, atol=1e-7)


def test_head_tail_update_matches_numpy():
  cm = random_confusion(9)
  for omega in (1.0, 50.0):
    obj = objectives.get("min_head_tail_recall", omega=omega)
    m = obj.update_multipliers(obj.init_multipliers(K), cm)
    logits = -omega * np_head_tail(np_recalls(cm))
    expected = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    np.testing.assert_allclose(m, expected, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("name", CONSTRAINED)
def test_coverage_update_matches_numpy_loop(name):
  # Class 9 is rarely predicted, class 0 over-predicted: some constraints bind.
  cm = random_confusion(10)
  cm[:, 0] += 20
  cm[:, 9] = 0
  cm[9, 9] = 1
  for alpha, tau, lmax in ((0.95, 0.01, 100.0), (0.5, 0.1, 10.0)):
    obj = objectives.get(name, alpha=alpha, tau=tau, multiplier_max=lmax)
    m = jax.jit(obj.update_multipliers)(obj.init_multipliers(K), cm)
    cov = np_coverages(cm)
    if "head_tail" in name:
      cov = np_head_tail(cov)
    expected = np_coverage_update(cov, alpha=alpha, tau=tau, lmax=lmax, num_classes=K)
    np.testing.assert_allclose(m, expected, rtol=1e-4, atol=1e-4)
    assert (np.asarray(m) >= 0).all() and (np.asarray(m) <= lmax).all()
    assert float(m[-1]) > 0  # The starved tail class (or tail group) is penalised.


# ------------------------------------------------------------------ value / target


@pytest.mark.parametrize("name", SPEC_NAMES)
def test_value_matches_spec_formula(name):
  obj = objectives.get(name)
  cm = random_confusion(11)
  cm[:, 9] = 1  # Some coverage constraints bind, so multipliers are non-zero.
  rng = np.random.default_rng(0)
  m = obj.init_multipliers(K)
  if m.size:  # Arbitrary non-negative multipliers, not only the update's fixed point.
    m = jnp.asarray(rng.random(m.shape) * (3.0 if name in CONSTRAINED else 1.0), jnp.float32)
  value = jax.jit(obj.value)
  expected = np_value(name, cm, np.asarray(m, np.float64))
  np.testing.assert_allclose(value(cm, m), expected, rtol=1e-5)
  # Counts and fractions give the same psi.
  np.testing.assert_allclose(value(cm / cm.sum(), m), expected, rtol=1e-5)


@pytest.mark.parametrize("name", SPEC_NAMES)
def test_target(name):
  cm = random_confusion(12)
  cm[:, 9] = 0
  cm[9, 9] = 1
  out = jax.jit(objectives.get(name).target)(cm)
  r, cov = np_recalls(cm), np_coverages(cm)
  base = {
    "mean_recall": r.mean(),
    "min_recall": r.min(),
    "min_head_tail_recall": np_head_tail(r).min(),
    "gmean_recall": np.prod(r) ** (1 / K),
    "hmean_recall": np_hmean(r),
  }
  if name in CONSTRAINED:
    expected = r.mean() if name.startswith("mean_recall") else np_hmean(r)
    gaps = (cov if name.endswith("min_coverage") else np_head_tail(cov)) - 0.95 / K
    np.testing.assert_array_equal(out["constraint_satisfied"], gaps >= 0)
    assert bool(out["all_constraints_satisfied"]) == bool((gaps >= 0).all())
    np.testing.assert_allclose(out["constraint_gap"], gaps.min(), rtol=1e-5, atol=1e-7)
    assert float(out["constraint_gap"]) < 0  # Class 9 is predicted once in ~500.
  else:
    expected = base[name]
    assert set(out) == {"target"}
  np.testing.assert_allclose(out["target"], expected, rtol=1e-5)


def test_satisfied_constraints():
  cm = np.eye(K, dtype=np.int32) * 10  # Uniform coverage 1/K >= 0.95/K.
  for name in CONSTRAINED:
    obj = objectives.get(name)
    out = obj.target(cm)
    assert bool(out["all_constraints_satisfied"]), name
    np.testing.assert_allclose(out["constraint_gap"], 0.05 / K, rtol=1e-4)
    m = obj.update_multipliers(obj.init_multipliers(K), cm)
    np.testing.assert_array_equal(m, np.zeros_like(m))
    # Zero multipliers; H-mean variants use recalls + 1e-3 (recall_smoothing) in psi.
    np.testing.assert_allclose(obj.value(cm, m), 1.0, rtol=1.5e-3)


@jax.jit
def _refresh_all(cm):
  """Multipliers and `d psi / d C` of every built-in objective (one compilation)."""
  out = {}
  for name in SPEC_NAMES:
    obj = objectives.get(name)
    m = obj.update_multipliers(obj.init_multipliers(K), cm)
    out[name] = (m, jax.grad(obj.value)(cm, m))
  return out


def test_gradients_finite_on_degenerate_confusions():
  absent = random_confusion(13).astype(np.float32)
  absent[4] = 0  # Class without validation examples.
  zero_recall = random_confusion(14).astype(np.float32)
  zero_recall[5, 5] = 0  # Present class never right.
  zero_recall[:, 9] = 0  # Never predicted.
  for cm in (absent, zero_recall, np.zeros((K, K), np.float32)):  # Empty: multipliers kept.
    for name, (m, grad) in _refresh_all(cm).items():
      assert np.isfinite(np.asarray(m)).all(), name
      assert np.isfinite(np.asarray(grad)).all(), name


@jax.jit
def _invalid_refresh_all(cm):
  """`value`, its gradient, updated multipliers and target of every built-in objective."""
  out = {}
  for name in SPEC_NAMES:
    obj = objectives.get(name)
    m = jnp.asarray(np.random.default_rng(0).random(obj.init_multipliers(K).shape), jnp.float32)
    out[name] = (obj.value(cm, m), jax.grad(obj.value)(cm, m), obj.update_multipliers(m, cm),
                 obj.target(cm))  # fmt: skip
  return out


@pytest.mark.parametrize("bad", [np.nan, np.inf, -2.0])
def test_invalid_confusion_gives_nan_objectives(bad):
  cm = random_confusion(23).astype(np.float32)
  cm[3, 4] = bad
  for name, (value, grad, multipliers, target) in _invalid_refresh_all(cm).items():
    assert np.isnan(value), name
    np.testing.assert_array_equal(grad, 0.0, err_msg=name)  # Finite: the matrix is masked.
    assert np.isnan(multipliers).all(), name
    assert np.isnan(target["target"]), name
    if name in CONSTRAINED:
      assert not np.asarray(target["constraint_satisfied"]).any(), name
      assert not bool(target["all_constraints_satisfied"]) and np.isnan(target["constraint_gap"])
  # The same compiled function on a valid matrix: finite everywhere.
  valid = np.nan_to_num(cm, posinf=5.0).clip(0, 5)
  for name, (value, grad, multipliers, target) in _invalid_refresh_all(valid).items():
    assert np.isfinite(value) and np.isfinite(grad).all() and np.isfinite(multipliers).all(), name


def test_check_grads_of_value():
  # Every entry >= 1: the finite differences (eps = 0.1) must stay in the valid domain,
  # outside which (a negative entry) every objective is NaN.
  cm = jnp.asarray(random_confusion(15) + 1, jnp.float32)
  names = ("mean_recall", "hmean_recall", "min_recall", "mean_recall_min_coverage")
  objs = [objectives.get(name, tau=0.1) for name in names]
  mults = [obj.update_multipliers(obj.init_multipliers(K), cm) for obj in objs]

  def values(c):  # One check (random cotangents) covers every objective.
    return jnp.stack([obj.value(c, m) for obj, m in zip(objs, mults, strict=True)])

  jtu.check_grads(values, (cm,), order=1, modes=("rev",), eps=1e-1, atol=1e-4, rtol=2e-2)


def test_value_inside_jit_with_multipliers_as_arguments():
  """One trace serves every refresh (the multipliers are arguments), and what it computes is
  the NumPy references': the multiplier update, psi's gradient (central differences of
  `np_value`) and the target."""
  obj = objectives.get("hmean_min_coverage")
  traces = []

  @jax.jit
  def refresh(multipliers, cm):
    traces.append(1)
    multipliers = obj.update_multipliers(multipliers, cm)
    return multipliers, jax.grad(obj.value)(cm, multipliers), obj.target(cm)

  for seed in (16, 17):
    cm = random_confusion(seed)
    previous = np.full(K, 0.5, np.float32) if seed == 17 else obj.init_multipliers(K)
    multipliers, grad, target = refresh(previous, jnp.asarray(cm, jnp.float32))
    expected = np_coverage_update(np_coverages(cm), alpha=0.95, tau=0.01, lmax=100.0,
                                  num_classes=K)
    np.testing.assert_allclose(multipliers, expected, rtol=1e-5, atol=1e-6)
    eps, numeric = 1e-3, np.zeros((K, K))
    for i in range(K):
      for j in range(K):
        step = np.zeros((K, K))
        step[i, j] = eps
        numeric[i, j] = (np_value(obj.name, cm + step, expected)
                         - np_value(obj.name, cm - step, expected)) / (2 * eps)
    np.testing.assert_allclose(grad, numeric, rtol=2e-3, atol=2e-6)
    gaps = np_coverages(cm) - 0.95 / K
    np.testing.assert_allclose(target["target"], np_hmean(np_recalls(cm)), rtol=1e-5)
    np.testing.assert_allclose(target["constraint_gap"], gaps.min(), rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(target["constraint_satisfied"], gaps >= 0)
    assert bool(target["all_constraints_satisfied"]) == bool((gaps >= 0).all())
  assert len(traces) == 1


# ---------------------------------------------------------------------- register


@pytest.fixture
def registry(registries):
  """Registrations made in a test are undone afterwards (conftest's `registries`)."""
  del registries


def test_register_plain_function(registry):
  del registry

  def weighted_recall(confusion, *, weight=1.0):
    r = metrics.recalls(confusion, absent_value=0.0)
    return r[0] * weight + r[1:].mean()

  objectives.register("weighted_recall", weighted_recall)
  assert "weighted_recall" in objectives.names()
  cm = random_confusion(17)
  obj = objectives.get("weighted_recall", weight=3.0)
  r = np_recalls(cm)
  m = obj.init_multipliers(K)
  assert m.shape == (0,)
  np.testing.assert_allclose(obj.value(cm, m), 3 * r[0] + r[1:].mean(), rtol=1e-5)
  np.testing.assert_allclose(obj.target(cm)["target"], 3 * r[0] + r[1:].mean(), rtol=1e-5)
  assert obj.update_multipliers(m, cm).shape == (0,)
  grad = jax.grad(obj.value)(jnp.asarray(cm, jnp.float32), m)
  assert np.isfinite(grad).all() and np.abs(grad).sum() > 0


def test_register_with_target_and_multipliers(registry):
  del registry
  objectives.register(
    "weighted_min",
    lambda c, m: (m * metrics.recalls(c, absent_value=0.0)).sum(),
    target_fn=metrics.min_recall,
    init_multipliers_fn=lambda k: jnp.ones((k,)) / k,
    update_multipliers_fn=lambda m, c: jax.nn.softmax(-metrics.recalls(c, absent_value=0.0)),
  )
  obj = objectives.get("weighted_min")
  cm = random_confusion(18)
  m = obj.update_multipliers(obj.init_multipliers(K), cm)
  r = np_recalls(cm)
  np.testing.assert_allclose(obj.value(cm, m), np.dot(np.asarray(m), r), rtol=1e-5)
  np.testing.assert_allclose(obj.target(cm)["target"], r.min(), rtol=1e-6)


def test_register_errors(registry):
  del registry
  with pytest.raises(ValueError, match="already registered"):
    objectives.register("min_recall", metrics.min_recall)
  with pytest.raises(ValueError, match="alias of objective 'gmean_recall'"):
    objectives.register("gmean", metrics.gmean_recall)
  objectives.register("acc", metrics.accuracy)
  accuracy_objective = objectives.get("acc")
  with pytest.raises(ValueError, match="already registered"):
    objectives.register("acc", metrics.accuracy)
  objectives.register("acc", metrics.mean_recall, overwrite=True)
  cm = random_confusion(22)  # Overwriting drops the cached objective of the old function.
  assert objectives.get("acc") is not accuracy_objective
  np.testing.assert_allclose(objectives.get("acc").target(cm)["target"], np_recalls(cm).mean(),
                             rtol=1e-6)  # fmt: skip
  with pytest.raises(ValueError, match="target_fn"):
    objectives.register("mult", lambda c, m: 0.0, init_multipliers_fn=jnp.zeros,
                        update_multipliers_fn=lambda m, c: m)  # fmt: skip
  with pytest.raises(ValueError, match="both"):
    objectives.register("half", metrics.accuracy, init_multipliers_fn=jnp.zeros)


def test_the_registries_fixture_undoes_registrations():
  builtin = objectives.get("min_recall")
  with conftest.isolated_registries():
    objectives.register("acc", metrics.accuracy)
    assert objectives.get("acc").name == "acc" and "acc" in objectives.names()
    assert any(key[0] == "acc" for key in objectives._CACHE)  # pylint: disable=protected-access
  assert "acc" not in objectives.names() and not objectives.is_known("acc")
  assert not any(key[0] == "acc" for key in objectives._CACHE)  # pylint: disable=protected-access
  assert objectives.get("min_recall") is builtin  # What was there before stays.


@pytest.mark.parametrize("name", SPEC_NAMES)
def test_multipliers_are_optional_only_without_multipliers(name):
  obj = objectives.get(name)
  cm = random_confusion(19)
  m = obj.init_multipliers(K)
  assert obj.has_multipliers == (m.size > 0)
  if obj.has_multipliers:
    with pytest.raises(ValueError, match=f"Objective '{name}' needs multipliers"):
      obj.value(cm)
    with pytest.raises(ValueError, match="needs multipliers"):
      jax.grad(obj.value)(jnp.asarray(cm, jnp.float32))
  else:
    np.testing.assert_allclose(obj.value(cm), np_value(name, cm, None), rtol=1e-5)
    np.testing.assert_allclose(obj.value(cm), obj.value(cm, m), rtol=1e-7)
    np.testing.assert_allclose(
      jax.grad(obj.value)(jnp.asarray(cm, jnp.float32)),
      jax.grad(obj.value)(jnp.asarray(cm, jnp.float32), m),
      rtol=1e-7,
    )


def test_registered_objective_multipliers_are_optional_only_without_multipliers(registry):
  del registry
  objectives.register("plain", metrics.mean_recall)
  objectives.register(
    "with_m",
    lambda c, m: (m * metrics.recalls(c, absent_value=0.0)).sum(),
    target_fn=metrics.min_recall,
    init_multipliers_fn=lambda k: jnp.ones((k,)) / k,
    update_multipliers_fn=lambda m, c: m,
  )
  cm = random_confusion(20)
  assert not objectives.get("plain").has_multipliers and objectives.get("with_m").has_multipliers
  np.testing.assert_allclose(objectives.get("plain").value(cm), np_recalls(cm).mean(), rtol=1e-5)
  with pytest.raises(ValueError, match="'with_m' needs multipliers"):
    objectives.get("with_m").value(cm)


def test_objective_is_frozen():
  obj = objectives.get("gmean")
  with pytest.raises(dataclasses.FrozenInstanceError):
    obj.name = "other"  # type: ignore[misc]


@pytest.mark.parametrize("name", ["gmean_recall", "hmean_recall", "hmean_min_coverage"])
def test_zero_recall_class_still_gets_the_largest_gain_weight(name):
  # Class 2 has examples but is never predicted correctly: the exact G-/H-mean is 0 with zero
  # gradient; the smoothed psi must point at raising class 2's recall.
  cm = np.array([[8, 1, 1], [1, 7, 2], [3, 3, 0]], np.float32)
  obj = objectives.get(name)
  multipliers = obj.update_multipliers(obj.init_multipliers(3), cm)
  assert float(obj.target(cm)["target"]) == 0.0
  grad = np.asarray(jax.grad(obj.value)(jnp.asarray(cm), multipliers))
  assert np.all(np.isfinite(grad))
  diag = np.diag(grad)
  assert diag[2] > 0 and diag[2] > 10 * max(diag[0], diag[1])


def test_smoothing_is_negligible_when_recalls_are_positive():
  cm = random_confusion(3)
  for name, exact in (("gmean", metrics.gmean_recall), ("hmean", metrics.hmean_recall)):
    value = float(objectives.get(name).value(cm, jnp.zeros((0,))))
    np.testing.assert_allclose(value, float(exact(cm)), atol=2e-3)
    assert float(objectives.get(name, recall_smoothing=0.0).value(cm, jnp.zeros((0,)))) == (
      pytest.approx(float(exact(cm)), rel=1e-5)
    )
