"""The trainer's building blocks: pair strategies, the loop skeleton, SelMix state, conversions."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from selmix_jax import gains
from selmix_jax import loop
from selmix_jax import objectives
from selmix_jax import pairs
from selmix_jax import sampling
from selmix_jax import selmix_state
from selmix_jax import train_state

K = 4


def _labels():
  return np.array([0, 0, 0, 1, 1, 2, 2, 2, 3, 1, 0, 3])


# --------------------------------------------------------------------- pair strategies


def test_gain_strategy_samples_what_the_pair_sampler_samples():
  labels = _labels()
  probs = np.random.default_rng(0).random((K, K))
  strategy = pairs.get("gain")(labels, labels, num_classes=K).refreshed(probs, labels)
  sampler = sampling.PairSampler(labels, labels, num_classes=K)
  idx1, idx2 = strategy.sample(32, seed=3, step=7)
  want1, want2, _, _ = sampler.sample(sampler.prepare(probs), 32, seed=3, step=7)
  np.testing.assert_array_equal(idx1, want1)
  np.testing.assert_array_equal(idx2, want2)
  assert pairs.get("gain").uses_pair_probs


def test_uniform_strategy_ignores_pair_probs():
  labels = _labels()
  peaked = np.zeros((K, K))
  peaked[0, 1] = 1.0
  uniform = pairs.get("uniform")(labels, labels, num_classes=K)
  a = uniform.refreshed(peaked, labels).sample(64, seed=0, step=1)
  b = uniform.refreshed(np.ones((K, K)), labels).sample(64, seed=0, step=1)
  np.testing.assert_array_equal(a[0], b[0])
  assert not pairs.get("uniform").uses_pair_probs
  # A P concentrated on (0, 1) would draw x1 of class 0 only; the control draws every class.
  assert len(np.unique(labels[a[0]])) == K


def test_instance_strategy_is_uniform_over_examples_and_deterministic():
  labels, partner = _labels(), np.arange(5) % K
  strategy = pairs.get("instance")(labels, partner, num_classes=K).refreshed(None, partner)
  idx1, idx2 = strategy.sample(1000, seed=1, step=2)
  assert idx1.max() < len(labels) and idx2.max() < len(partner)
  assert set(idx1) == set(range(len(labels))) and set(idx2) == set(range(len(partner)))
  again = strategy.sample(1000, seed=1, step=2)
  np.testing.assert_array_equal(idx1, again[0])
  assert not np.array_equal(idx1, strategy.sample(1000, seed=1, step=3)[0])


def test_refreshed_with_new_partner_labels_draws_partners_of_the_new_classes():
  labels = _labels()
  probs = np.zeros((K, K))
  probs[0, 3] = 1.0
  strategy = pairs.get("gain")(labels, labels, num_classes=K, floor=0.0)
  partner = np.array([3, 3, 0, 0, 1, 2])  # only positions 0 and 1 are class 3
  _, idx2 = strategy.refreshed(probs, partner).sample(50, seed=0, step=0)
  assert set(idx2) <= {0, 1}


class _DiagonalPairs(pairs.PairStrategy):
  """A user strategy: x2 always of x1's class (no mixing across classes)."""

  def refreshed(self, pair_probs, partner_labels):
    del pair_probs
    self._sampler = sampling.PairSampler(self.labels, partner_labels, num_classes=self.num_classes)
    self._table = self._sampler.prepare(np.eye(self.num_classes), floor=0.0)
    return self

  def sample(self, batch_size, *, seed, step):
    idx1, idx2, _, _ = self._sampler.sample(self._table, batch_size, seed=seed, step=step)
    return idx1, idx2


def test_user_registered_strategy(registries):
  del registries  # Its registrations are undone after the test.
  pairs.register("test_diagonal", _DiagonalPairs, overwrite=True)
  labels = _labels()
  strategy = pairs.get("test_diagonal")(labels, labels, num_classes=K).refreshed(None, labels)
  idx1, idx2 = strategy.sample(40, seed=0, step=0)
  np.testing.assert_array_equal(labels[idx1], labels[idx2])
  with pytest.raises(ValueError, match="already registered"):
    pairs.register("test_diagonal", _DiagonalPairs)
  with pytest.raises(TypeError, match="PairStrategy subclass"):
    pairs.register("not_a_strategy", object, overwrite=True)
  with pytest.raises(ValueError, match="config.selmix.pairs='nope'.*gain, uniform, instance"):
    pairs.get("nope")


# ------------------------------------------------------------------------- the loop


def test_loop_runs_actions_when_due_and_stops_early():
  calls = []

  def refresh(step):
    calls.append(("refresh", step))
    return loop.STOP if step == 6 else None

  def checkpoint(step):
    calls.append(("checkpoint", step))

  step, stopped = loop.run(
      start_step=1,
      num_steps=10,
      train_step=lambda step: calls.append(("step", step)),
      before_step=[loop.Periodic(3, refresh)],
      after_step=[loop.Periodic(4, checkpoint, at_end=True)],
  )
  assert (step, stopped) == (6, True)
  assert calls == [
      ("step", 1), ("step", 2), ("refresh", 3), ("step", 3), ("checkpoint", 4), ("step", 4),
      ("step", 5), ("refresh", 6), ("checkpoint", 6),
  ]  # fmt: skip


def test_loop_at_end_action_runs_once_at_the_last_step():
  saved = []
  step, stopped = loop.run(
      start_step=0,
      num_steps=5,
      train_step=lambda step: None,
      after_step=[loop.Periodic(5, saved.append, at_end=True), loop.Periodic(2, saved.append)],
  )
  assert (step, stopped) == (5, False)
  assert saved == [2, 4, 5]


def test_loop_with_nothing_left_to_run_does_nothing():
  saved = []
  step, stopped = loop.run(
      start_step=5, num_steps=5, train_step=lambda s: 1 / 0,
      after_step=[loop.Periodic(1, saved.append, at_end=True)],
  )  # fmt: skip
  assert (step, stopped, saved) == (5, False, [])


def test_progress_counts_completed_steps_on_a_fake_clock(monkeypatch):
  """Steps per second after the first (compiling) step, reported every `every_secs` and at the
  last step, each report after blocking on the outputs of the step it reports. The clock is a
  fake one that the test advances: exact, whatever the machine's load."""
  now = [100.0]
  monkeypatch.setattr(loop, "time", types.SimpleNamespace(monotonic=lambda: now[0]))
  blocked, logged, written = [], [], []
  monkeypatch.setattr(loop.jax, "block_until_ready", lambda x: blocked.append(x) or x)
  monkeypatch.setattr(loop.logging, "info", lambda msg, *args: logged.append(msg % args))
  writer = types.SimpleNamespace(scalars=lambda step, values: written.append((step, values)))
  progress = loop.Progress(num_steps=12, writer=writer, every_secs=1.0)
  now[0] = 105.0  # Step 1 (with 5 s of compilation) completes: the clock starts here.
  progress(1, "outputs 1")
  for step in range(2, 13):
    now[0] += 0.25  # Each later step takes 0.25 s: 4 steps/s.
    progress(step, f"outputs {step}")
  assert logged == [
      "Step 5/12: 4 steps/s, ETA 0m02s.",  # 1 s after the clock started; (12 - 5) / 4 s left.
      "Step 9/12: 4 steps/s, ETA 0m01s.",
      "Step 12/12: 4 steps/s, ETA 0m00s.",  # The last step is always reported.
  ]
  assert blocked == ["outputs 1", "outputs 5", "outputs 9", "outputs 12"]
  assert written == [(5, {"steps_per_sec": 4.0}), (9, {"steps_per_sec": 4.0}),
                     (12, {"steps_per_sec": 4.0})]


class _FakeManager:
  directory = "/runs/x/checkpoints"

  def __init__(self, latest):
    self.latest = latest

  def wait_until_finished(self):
    pass

  def latest_step(self):
    return self.latest


def test_all_finite_reads_float_leaves_of_one_replica():
  tree = {"w": jnp.ones((3, 2)), "step": jnp.asarray(4), "b": np.zeros(2, np.float32)}
  assert loop.all_finite(train_state.replicate(tree))
  assert loop.all_finite(tree) and loop.all_finite({})
  tree["b"] = np.array([0.0, np.inf], np.float32)
  assert not loop.all_finite(train_state.replicate(tree))
  mesh = jax.sharding.Mesh(np.array(jax.local_devices()), ("batch",))
  everywhere = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  assert not loop.all_finite(jax.device_put(jnp.asarray(jnp.nan), everywhere))  # 0-d, replicated


def test_divergence_guard_names_stage_step_learning_rate_and_last_checkpoint():
  guard = loop.DivergenceGuard(
      "Pre-training", schedule=lambda count: 0.5 / (1 + count),
      lr_field="config.pretrain.learning_rate=0.5", manager=_FakeManager(6),
  )
  state = train_state.replicate({"w": jnp.ones(3)})
  guard(9, state, train_state.replicate({"loss": jnp.asarray(2.0)}))  # finite: no error
  with pytest.raises(loop.Diverged) as caught:
    guard(9, state, train_state.replicate({"loss": jnp.asarray(jnp.nan)}))
  message = str(caught.value)
  assert "Pre-training diverged at step 9: the training loss is nan" in message
  assert "learning rate 0.05556 at that step; config.pretrain.learning_rate=0.5" in message
  assert "last good checkpoint, step 6 in /runs/x/checkpoints, is kept" in message
  assert caught.value.step == 9 and caught.value.last_good_step == 6
  nan_state = train_state.replicate({"w": jnp.asarray([1.0, jnp.nan, 0.0])})
  guard.manager = _FakeManager(None)
  with pytest.raises(loop.Diverged,
                     match="NaN or inf values, at training loss 1 .* No checkpoint had"):
    guard(3, nan_state, train_state.replicate({"loss": jnp.asarray(1.0)}))


# ------------------------------------------------------------------------ SelMix state


def test_refresh_is_the_gain_function_plus_multipliers_and_history():
  obj = objectives.get("min_recall")
  rng = np.random.default_rng(0)
  confusion = rng.integers(1, 30, (K, K)).astype(np.float32)
  prototypes = rng.normal(size=(K, 6)).astype(np.float32)
  kernel = rng.normal(size=(6, K)).astype(np.float32)
  bias = rng.normal(size=(K,)).astype(np.float32)
  partner = np.arange(10) % K
  state = selmix_state.init(obj, K, partner, history_length=3)
  refresh = selmix_state.make_refresh_fn(obj, mix_weight=0.8, temperature=0.1)
  new = refresh(state, confusion, prototypes, kernel, bias, partner[::-1].copy())

  fractions = confusion / confusion.sum()
  multipliers = obj.update_multipliers(state.multipliers, fractions)
  gain, probs = gains.make_gain_fn(obj.value, mix_weight=0.8, temperature=0.1)(
      fractions, prototypes, kernel, bias, multipliers
  )
  # exp(-50 r) amplifies float32 rounding of the recalls (jit vs eager).
  np.testing.assert_allclose(new.multipliers, multipliers, rtol=1e-4)
  np.testing.assert_allclose(new.gain, gain, rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(new.pair_probs, probs, rtol=1e-4, atol=1e-8)
  np.testing.assert_array_equal(new.partner_labels, partner[::-1])
  assert int(new.num_refreshes) == 1
  np.testing.assert_allclose(new.max_gains, [np.max(gain)], rtol=1e-4)
  # The history keeps its length: later refreshes overwrite the last slot.
  for _ in range(4):
    new = refresh(new, confusion, prototypes, kernel, bias, partner)
  assert new.max_gain_history.shape == (3,) and int(new.num_refreshes) == 5


def test_early_stop_rule():
  assert not selmix_state.should_stop([1.0] * 9, window=10, tol=0.05)  # fewer than 10 refreshes
  assert selmix_state.should_stop([5.0, 4.0] + [1.0] * 10, window=10, tol=0.05)  # plateaued
  assert not selmix_state.should_stop([1.0] * 9 + [2.0], window=10, tol=0.05)  # still moving


# ------------------------------------------------------------------------ conversions


def test_checkpoint_round_trip_of_both_states():
  obj = objectives.get("mean_recall_min_coverage")
  sel = selmix_state.init(obj, K, np.arange(7) % K, history_length=5)
  sel = sel.replace(pair_probs=np.random.default_rng(1).random((K, K)).astype(np.float32))
  stored = train_state.to_checkpoint(sel)
  assert set(stored) == {
      "pair_probs", "gain", "multipliers", "partner_labels", "max_gain_history", "num_refreshes"
  }  # fmt: skip
  assert all(isinstance(v, np.ndarray) for v in stored.values())
  back = train_state.from_checkpoint(selmix_state.init(obj, K, np.zeros(7), history_length=5),
                                     stored)
  jax.tree.map(np.testing.assert_array_equal, back, sel)


def test_replicate_and_unreplicate():
  tree = {"a": np.arange(3.0), "b": {"c": np.float32(2.0)}}
  repl = train_state.replicate(tree)
  assert repl["a"].shape == (jax.local_device_count(), 3)
  assert len(repl["a"].sharding.device_set) == jax.local_device_count() > 1
  jax.tree.map(np.testing.assert_array_equal, train_state.unreplicate(repl), tree)


# ------------------------------------------------------------------------- pictures


def test_recall_plot_stays_readable_at_large_k(tmp_path):
  import PIL.Image  # pylint: disable=g-import-not-at-top

  from selmix_jax import reporting  # pylint: disable=g-import-not-at-top

  k = 200
  before = np.linspace(0.9, 0.3, k)
  after = before.copy()
  after[[5, 150, 190]] = [0.01, 0.02, 0.03]  # the three worst classes after fine-tuning
  after[7] = np.nan  # an absent class is not "worst"
  names = [f"class_{i:03d}" for i in range(k)]
  shown = reporting.plot_recalls(
      str(tmp_path / "r.png"), {"before": before, "after": after}, class_names=names
  )
  assert shown[:3] == ["class_005 (head)", "class_150 (head)", "class_190 (tail)"]
  assert len(shown) == 20
  width, height = PIL.Image.open(tmp_path / "r.png").size
  assert width <= 1600 and height <= 700  # was 12,240 x 420 px at K = 200
  few = reporting.plot_recalls(str(tmp_path / "f.png"), {"a": before[:10]}, class_names=names[:10])
  assert few == names[:10]
