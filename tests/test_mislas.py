"""MiSLAS pre-training: loss pieces against NumPy oracles, its sampler, both stages end to end."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from selmix_jax.configs import default
from selmix_jax import checkpointing
from selmix_jax import mislas
from selmix_jax import models
from selmix_jax import pretrain
from selmix_jax import train
from selmix_jax import train_state


# ------------------------------------------------------------------ loss pieces


def test_label_aware_smoothing_follows_the_concave_formula():
  counts = np.array([100, 10, 55, 100, 32])
  eps = mislas.label_aware_smoothing(counts, smooth_head=0.3, smooth_tail=0.0)
  # By hand: (n - 10) / 90 of the way from tail to head along sin(pi t / 2).
  expected = [0.3, 0.0, 0.3 * np.sin(np.pi / 4), 0.3, 0.3 * np.sin(np.pi * 22 / 180)]
  np.testing.assert_allclose(eps, expected, rtol=1e-6, atol=1e-7)
  lin = mislas.label_aware_smoothing(counts, smooth_head=0.4, smooth_tail=0.1, shape="linear")
  np.testing.assert_allclose(lin, 0.1 + 0.3 * (counts - 10) / 90, rtol=1e-6)
  convex = mislas.label_aware_smoothing(counts, smooth_head=0.4, smooth_tail=0.1, shape="convex")
  np.testing.assert_allclose(convex[[0, 1]], [0.4, 0.1], atol=1e-7)
  assert np.all(convex <= lin + 1e-7) and np.all(eps >= 0.3 * (counts - 10) / 90 - 1e-7)
  flat = mislas.label_aware_smoothing([7, 7], smooth_head=0.3, smooth_tail=0.0)
  np.testing.assert_allclose(flat, [0.3, 0.3])


def test_smoothed_cross_entropy_matches_a_numpy_loop():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(6, 4)).astype(np.float32) * 3
  labels = np.array([0, 3, 1, 1, 2, 0])
  smoothing = np.array([0.3, 0.2, 0.05, 0.0], np.float32)
  got = mislas.smoothed_cross_entropy(jnp.asarray(logits), jnp.asarray(labels), smoothing)
  for i, (row, y) in enumerate(zip(logits.astype(np.float64), labels)):
    logp = row - np.log(np.sum(np.exp(row - row.max()))) - row.max()
    target = np.full(4, smoothing[y] / 4)
    target[y] += 1 - smoothing[y]  # The smoothed one-hot: (1 - eps) e_y + eps / K.
    np.testing.assert_allclose(got[i], -np.sum(target * logp), rtol=1e-5)


def test_lws_fold_gives_the_scaled_logits():
  rng = np.random.default_rng(1)
  head = {"kernel": rng.normal(size=(5, 3)), "bias": rng.normal(size=3)}
  scale = rng.uniform(0.5, 2.0, size=3)
  feats = rng.normal(size=(4, 5))
  folded = mislas.fold_lws(jax.tree.map(jnp.asarray, head), jnp.asarray(scale))
  want = scale * (feats @ head["kernel"] + head["bias"])
  np.testing.assert_allclose(feats @ folded["kernel"] + folded["bias"], want, rtol=1e-5)
  # With a leading device axis, as on replicated states.
  stacked = mislas.fold_lws(jax.tree.map(lambda x: jnp.stack([x, x]), head),
                            jnp.stack([scale, scale]))
  np.testing.assert_allclose(stacked["kernel"][1], folded["kernel"], rtol=1e-6)


def test_class_balanced_stream_is_their_class_aware_sampler():
  labels = np.array([0] * 9 + [1] * 5 + [2] * 2)  # long-tailed: 9, 5, 2
  b, spc = 12, 4
  draws = np.concatenate([
      mislas.class_balanced_positions(labels, b, seed=3, step=s, samples_per_class=spc)
      for s in range(30)
  ])
  classes = labels[draws]
  # Each cycle of 3 classes x 4 draws holds every class 4 times, in runs of 4.
  for cycle in classes.reshape(-1, 3 * spc):
    assert sorted(np.bincount(cycle, minlength=3)) == [4, 4, 4]
  runs = classes.reshape(-1, spc)
  assert np.all(runs == runs[:, :1])
  # Within a class, every lap over its examples takes each exactly once.
  for k, n_k in ((0, 9), (1, 5), (2, 2)):
    stream = draws[classes == k]
    for lap in stream[: len(stream) // n_k * n_k].reshape(-1, n_k):
      assert sorted(lap) == list(np.flatnonzero(labels == k))
  # A pure function of (seed, step).
  again = mislas.class_balanced_positions(labels, b, seed=3, step=7, samples_per_class=spc)
  np.testing.assert_array_equal(again, draws[7 * b: 8 * b])


def test_epoch_schedules_are_theirs():
  s = mislas.epoch_schedule(0.1, 10, 200, kind="step")
  for epoch, lr in ((0, 0.02), (4, 0.1), (5, 0.1), (159, 0.1), (160, 0.01), (179, 0.01),
                    (180, 0.001), (199, 0.001)):
    np.testing.assert_allclose(s(epoch * 10), lr, rtol=1e-6)
    np.testing.assert_allclose(s(epoch * 10 + 9), lr, rtol=1e-6)
  c = mislas.epoch_schedule(0.1, 7, 10, kind="cosine")
  for epoch in range(10):
    np.testing.assert_allclose(
        c(epoch * 7 + 3), 0.05 * (1 + np.cos(epoch / 10 * np.pi)), rtol=1e-5)


def test_mixup_step_matches_a_numpy_oracle():
  model = models.get("cnn_small", num_classes=3, width=4)
  tx = optax.sgd(0.1)
  state = train_state.create(model, jax.random.key(0), (8, 8, 1), tx)
  rng = np.random.default_rng(2)
  images = rng.integers(0, 256, size=(6, 8, 8, 1), dtype=np.uint8)
  labels = np.array([0, 1, 2, 2, 1, 0], np.int32)
  batch = {"images": images, "labels": labels, "index": np.arange(6)}
  to_float = lambda x, keys: x.astype(jnp.float32) / 255.0
  key = jax.random.key(5)
  body = lambda st, bt: mislas.mixup_step(st, bt, key, preprocess_fn=to_float, alpha=1.0)
  stacked = jax.tree.map(lambda x: jnp.asarray(x)[None], (state, batch))
  new_state, metrics = jax.jit(jax.vmap(body, axis_name="batch"))(*stacked)
  w, perm = mislas.mixup_draws(key, 0, 6, alpha=1.0, device_index=0)
  w, perm = float(w), np.asarray(perm)
  assert 0 < w < 1 and sorted(perm) == list(range(6))
  x = images.astype(np.float64) / 255.0
  mixed = w * x + (1 - w) * x[perm]

  def oracle_loss(params):
    logits, _ = model.apply({"params": params, "batch_stats": state.batch_stats},
                            jnp.asarray(mixed, jnp.float32), train=True, mutable=["batch_stats"])
    logp = jax.nn.log_softmax(logits)
    per_a = [-logp[i, labels[i]] for i in range(6)]
    per_b = [-logp[i, labels[perm[i]]] for i in range(6)]
    return w * sum(per_a) / 6 + (1 - w) * sum(per_b) / 6

  loss, grads = jax.jit(jax.value_and_grad(oracle_loss))(state.params)
  np.testing.assert_allclose(metrics["loss"][0], loss, rtol=1e-5)
  np.testing.assert_allclose(metrics["mix_weight"][0], w, rtol=1e-6)
  jax.tree.map(
      lambda new, old, g: np.testing.assert_allclose(new[0], old - 0.1 * g, rtol=1e-4, atol=1e-6),
      new_state.params, state.params, grads,
  )


# ------------------------------------------------------------------ both stages, end to end


def _config():
  config = default.get_config("tiny")
  with config.unlocked():
    config.mode = "pretrain"
    config.pretrain.method = "mislas"
    config.pretrain.batch_size = 64
    config.pretrain.eval_every = 0
    config.pretrain.checkpoint_every = 3
    config.pretrain.log_every = 3
    m = config.pretrain.mislas
    m.stage1_epochs, m.warmup_epochs, m.decay_epochs = 2, 1, (1,)
    m.stage2_epochs = 1
  return config


def _restore(directory):
  manager = ocp.CheckpointManager(directory)
  step = manager.latest_step()
  tree = manager.restore(step, args=ocp.args.StandardRestore())
  manager.close()
  return step, tree["state"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("mislas"))
  return workdir, train.train_and_evaluate(_config(), workdir)


def test_both_stages_write_the_final_plain_model(uninterrupted):
  workdir, result = uninterrupted
  summary = json.load(open(os.path.join(workdir, "summary.json")))
  s1, s2 = summary["stages"]["stage1"], summary["stages"]["stage2"]
  assert s1["steps"] == 2 * s2["steps"] > 0 and summary["steps"] == s1["steps"] + s2["steps"]
  assert s1["wall_time_s"] > 0 and s2["wall_time_s"] > 0
  step1, stage1 = _restore(os.path.join(workdir, "stage1", "checkpoints"))
  step2, stage2 = _restore(os.path.join(workdir, "stage2", "checkpoints"))
  step, final = _restore(os.path.join(workdir, "checkpoints"))
  assert step1 == s1["steps"] and step == step2 == s2["steps"]
  # Backbone and BN statistics untouched by stage 2 (shift_bn False), bit for bit.
  jax.tree.map(np.testing.assert_array_equal, final["params"]["backbone"],
               stage1["params"]["backbone"])
  jax.tree.map(np.testing.assert_array_equal, final["batch_stats"], stage1["batch_stats"])
  # The head moved and holds the folded scales.
  scale = stage2["params"]["lws_scale"]
  assert not np.allclose(scale, 1.0)
  np.testing.assert_allclose(final["params"]["head"]["kernel"],
                             stage2["params"]["head"]["kernel"] * scale, rtol=1e-6)
  np.testing.assert_allclose(final["params"]["head"]["bias"],
                             stage2["params"]["head"]["bias"] * scale, rtol=1e-6)
  # The final model reproduces the reported metrics and is what SelMix loads.
  variables, _ = train_state.pretrained_variables({"state": final}, use_ema=False)
  model = models.from_config(_config().model, 10)
  template = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)),
                                               train=False))
  checkpointing.check_compatible(variables, dict(template), where="final")  # What SelMix checks.
  assert np.asarray(result["test"]["confusion"]).sum() > 0


def test_each_stage_resumes_bit_identically(uninterrupted, tmp_path, monkeypatch, caplog):
  """Killed in stage 1, then killed in stage 2, then finished: the same model, bit for bit."""
  full_dir, _ = uninterrupted
  workdir = str(tmp_path)

  class _Killed(Exception):
    pass

  original_step = pretrain._Run.train_step

  def killed_step(self, step):
    if step == 4:  # After stage 1's checkpoint at step 3.
      raise _Killed()
    return original_step(self, step)

  original_save = train_state.save

  def save_then_kill(manager, step, trees):
    original_save(manager, step, trees)
    if os.path.basename(os.path.dirname(str(manager.directory))) == "stage2" and step == 3:
      manager.wait_until_finished()
      raise _Killed()

  caplog.set_level("INFO")
  monkeypatch.setattr(pretrain._Run, "train_step", killed_step)
  with pytest.raises(_Killed):
    train.train_and_evaluate(_config(), workdir)
  monkeypatch.undo()
  monkeypatch.setattr(train_state, "save", save_then_kill)
  with pytest.raises(_Killed):
    train.train_and_evaluate(_config(), workdir)
  monkeypatch.undo()
  train.train_and_evaluate(_config(), workdir)
  assert "Resumed pre-training from step 3." in caplog.text
  assert "Resumed MiSLAS stage 2 from step 3." in caplog.text
  for sub in ("stage1", "stage2", ""):
    step_a, a = _restore(os.path.join(full_dir, sub, "checkpoints"))
    step_b, b = _restore(os.path.join(workdir, sub, "checkpoints"))
    assert step_a == step_b
    jax.tree.map(np.testing.assert_array_equal, a["params"], b["params"])
    jax.tree.map(np.testing.assert_array_equal, a["batch_stats"], b["batch_stats"])


def test_shift_bn_reestimates_statistics_only():
  model = models.get("cnn_small", num_classes=3, width=4)
  stage1 = train_state.create(model, jax.random.key(0), (8, 8, 1), optax.sgd(0.1))
  variables = {"params": stage1.params, "batch_stats": stage1.batch_stats}
  tx = mislas.stage2_optimizer(lambda c: 0.1, head_lr_factor=0.5, momentum=0.9,
                               weight_decay=2e-4)
  state = mislas.make_stage2_state(model, variables, tx)
  rng = np.random.default_rng(4)
  batch = {"images": rng.integers(0, 256, size=(6, 8, 8, 1), dtype=np.uint8),
           "labels": np.array([0, 1, 2, 2, 1, 0], np.int32), "index": np.arange(6)}
  to_float = lambda x, keys: x.astype(jnp.float32) / 255.0
  stacked = jax.tree.map(lambda x: jnp.asarray(x)[None], (state, batch))
  for shift_bn in (True, False):
    body = lambda st, bt: mislas.stage2_step(
        st, bt, jax.random.key(1), preprocess_fn=to_float,
        smoothing=jnp.array([0.3, 0.1, 0.0]), shift_bn=shift_bn)
    new, metrics = jax.jit(jax.vmap(body, axis_name="batch"))(*stacked)
    assert np.isfinite(metrics["loss"][0])
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a[0], b), new.frozen, state.frozen)
    same_stats = jax.tree.leaves(jax.tree.map(
        lambda a, b: np.array_equal(a[0], b), new.batch_stats, state.batch_stats))
    assert all(same_stats) != shift_bn  # Re-estimated with shift_bn, untouched without.
    assert not np.array_equal(new.params["lws_scale"][0], state.params["lws_scale"])
    assert not np.array_equal(new.params["head"]["kernel"][0], state.params["head"]["kernel"])
    assert int(new.step[0]) == 1


@pytest.mark.parametrize("field,value,match", [
    ("smooth_head", 1.0, r"config.pretrain.mislas.smooth_head=1.0: must be in \[0, 1\)"),
    ("alpha", 0.0, r"config.pretrain.mislas.alpha=0.0: must be > 0"),
    ("schedule", "linear", r"config.pretrain.mislas.schedule='linear'"),
    ("stage2_epochs", 0, r"config.pretrain.mislas.stage2_epochs=0"),
])
def test_mislas_config_errors_name_the_field(field, value, match):
  config = _config()
  with config.unlocked():
    config.pretrain.mislas[field] = value
  with pytest.raises(train.ConfigError, match=match):
    train.validate(config)


def test_mislas_variants_carry_the_release_yamls():
  from selmix_jax.configs import cifar10_lt_cpu, cifar10_lt_sup, cifar100_lt_sup, imagenet_lt_sup

  def check(module, arg):
    config = module.get_config(arg)
    try:
      train.validate(config)
    except train.ConfigPathError:
      pass  # The data zip / a checkpoint may be absent here.
    return config

  c10 = check(cifar10_lt_sup, "pretrain,mislas")
  m = c10.pretrain.mislas
  assert c10.pretrain.method == "mislas" and c10.mode == "pretrain"
  assert (c10.pretrain.batch_size, c10.pretrain.learning_rate, c10.pretrain.weight_decay) == (
      128, 0.1, 2e-4)
  assert (m.stage1_epochs, m.alpha, m.schedule, m.warmup_epochs, tuple(m.decay_epochs)) == (
      200, 1.0, "step", 5, (160, 180))
  assert (m.stage2_epochs, m.smooth_head, m.smooth_tail, m.shift_bn, m.head_lr_factor) == (
      10, 0.3, 0.0, False, 0.5)
  c100 = check(cifar100_lt_sup, "pretrain,mislas").pretrain.mislas
  assert (c100.smooth_head, c100.smooth_tail, c100.shift_bn, c100.head_lr_factor) == (
      0.4, 0.1, True, 0.2)
  inet = check(imagenet_lt_sup, "pretrain,mislas")
  mi = inet.pretrain.mislas
  assert (inet.pretrain.batch_size, inet.pretrain.learning_rate, inet.pretrain.weight_decay) == (
      256, 0.1, 5e-4)
  assert (mi.stage1_epochs, mi.alpha, mi.schedule, mi.shift_bn, mi.head_lr_factor) == (
      180, 0.2, "cosine", True, 0.05)
  cpu = check(cifar10_lt_cpu, "min_recall,mislas")
  assert cpu.model.name == "resnet32" and cpu.mode == "selmix"
  assert check(cifar10_lt_sup, "pretrain").pretrain.method == "supervised"  # LA-CE stays default
  with pytest.raises(ValueError, match="'<variant>,mislas'"):
    cifar10_lt_sup.get_config("pretrain,mixup")


def test_optimizers_decay_every_parameter_with_their_rates():
  from selmix_jax import optim

  params = {"backbone": {"bn": {"scale": jnp.full(2, 2.0), "bias": jnp.ones(2)}},
            "head": {"kernel": jnp.ones((2, 3)), "bias": jnp.full(3, 3.0)}}
  zeros = jax.tree.map(jnp.zeros_like, params)
  tx = optim.make_pretrain_optimizer(learning_rate=0.1, nesterov=False, weight_decay=0.01,
                                     decay_all=True)
  updates, _ = tx.update(zeros, tx.init(params), params)
  jax.tree.map(lambda u, p: np.testing.assert_allclose(u, -0.1 * 0.01 * p, rtol=1e-6),
               updates, params)  # Decay on BatchNorm and bias leaves too, as torch's SGD.
  stage2 = {"head": params["head"], "lws_scale": jnp.full(3, 1.5)}
  tx2 = mislas.stage2_optimizer(lambda c: 0.1, head_lr_factor=0.5, momentum=0.9,
                                weight_decay=0.01)
  grads = jax.tree.map(jnp.ones_like, stage2)
  updates, opt = tx2.update(grads, tx2.init(stage2), stage2)
  np.testing.assert_allclose(updates["lws_scale"], -0.1 * (1 + 0.01 * 1.5), rtol=1e-6)
  np.testing.assert_allclose(updates["head"]["bias"], -0.05 * (1 + 0.01 * 3.0), rtol=1e-6)
  np.testing.assert_allclose(updates["head"]["kernel"], -0.05 * (1 + 0.01), rtol=1e-6)
  # Momentum 0.9 (torch form: buf = 0.9 buf + g, step lr * buf) on a second identical step.
  updates, _ = tx2.update(grads, opt, stage2)
  np.testing.assert_allclose(updates["lws_scale"], -0.1 * 1.9 * (1 + 0.01 * 1.5), rtol=1e-6)
