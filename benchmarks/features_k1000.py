r"""Features at ImageNet scale on a CPU: K = 1,000 classes, D = 2,048, 100k training vectors.

  python benchmarks/features_k1000.py [--workdir=/tmp/features_k1000] [--objective=min_recall]
      [--num_train=100000] [--num_classes=1000] [--dim=2048]

Draws a synthetic long-tailed Gaussian mixture (class means at random directions, unit-variance
noise; training counts n_k = n_max * rho^(-k/(K-1)), rho = 100, scaled to `num_train`; balanced
val 10 and test 20 per class), writes it as a features `.npz`, and runs `configs/features.py`
as it ships (pre-training of the linear head with logit-adjusted CE, then a SelMix run of the
config's default length) through `train.train_and_evaluate`, then the same schedule through
`head.fit` (all on the device). Prints wall and CPU times and the before/after table;
`benchmarks/README.md` records them.
"""

import argparse
import json
import os
import shutil
import time

import numpy as np

from selmix_jax import head
from selmix_jax import train
from selmix_jax.configs import features as features_config
from selmix_jax.data import features


def long_tailed_mixture(num_train, num_classes, dim, *, rho=100.0, separation=12.0, val=10,
                        test=20, seed=0):
  """Synthetic features: `{split}_features` float32, `{split}_labels` int32, train long-tailed.

  Class means are `separation` * (random unit vectors); the noise is N(0, I_D).
  """
  rng = np.random.default_rng(seed)
  means = rng.standard_normal((num_classes, dim), dtype=np.float32)
  means *= separation / np.linalg.norm(means, axis=1, keepdims=True)
  profile = rho ** (-np.arange(num_classes) / max(num_classes - 1, 1))
  counts = np.maximum(1, np.floor(profile * num_train / profile.sum())).astype(np.int64)
  out = {}
  for split, per_class in (("train", counts), ("val", np.full(num_classes, val)),
                           ("test", np.full(num_classes, test))):
    labels = np.repeat(np.arange(num_classes), per_class).astype(np.int32)
    x = rng.standard_normal((len(labels), dim), dtype=np.float32)
    x += means[labels]
    out[f"{split}_features"], out[f"{split}_labels"] = x, labels
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", default="/tmp/features_k1000")
  # Min recall (and H-mean) over 1,000 classes with 10 validation examples each is 0 for any
  # head here; mean recall and the head/tail split still move.
  parser.add_argument("--objective", default="mean_recall")
  parser.add_argument("--num_train", type=int, default=100_000)
  parser.add_argument("--num_classes", type=int, default=1000)
  parser.add_argument("--dim", type=int, default=2048)
  parser.add_argument("--separation", type=float, default=12.0)
  args = parser.parse_args()

  shutil.rmtree(args.workdir, ignore_errors=True)
  os.makedirs(args.workdir)
  t0 = time.time()
  arrays = long_tailed_mixture(args.num_train, args.num_classes, args.dim,
                               separation=args.separation)
  path = os.path.join(args.workdir, "features.npz")
  features.save(path, **arrays)
  del arrays
  t_data = time.time() - t0

  config = features_config.get_config()
  config.data.path = path
  config.objective.name = args.objective
  t0, c0 = time.time(), time.process_time()
  result = train.train_and_evaluate(config, os.path.join(args.workdir, "run"))
  total, cpu = time.time() - t0, time.process_time() - c0
  with open(os.path.join(args.workdir, "run", "pretrain", "summary.json")) as f:
    pre = json.load(f)["wall_time_s"]
  with open(os.path.join(args.workdir, "run", "results.md")) as f:
    table = f.read()

  # The same schedule through the library call (everything on the device, no workdir).
  arrays = features_config_arrays(path)
  cfg = config.selmix
  t0, c0 = time.time(), time.process_time()
  fitted = head.fit(
      arrays["train_features"], arrays["train_labels"], arrays["val_features"],
      arrays["val_labels"], objective=args.objective, pretrain_steps=config.pretrain.num_steps,
      pretrain_learning_rate=config.pretrain.learning_rate,
      logit_adjust_tau=config.pretrain.logit_adjust_tau, num_steps=cfg.num_steps,
      refresh_every=cfg.refresh_every, batch_size=cfg.batch_size,
      learning_rate=cfg.learning_rate, weight_decay=cfg.weight_decay,
      mix_weight_min=cfg.mix_weight_min, temperature=cfg.temperature,
      temperature_scale=cfg.temperature_scale,
  )
  fit_wall, fit_cpu = time.time() - t0, time.process_time() - c0
  test = {name: _recalls(p, arrays["test_features"], arrays["test_labels"])
          for name, p in (("pre-trained", fitted.pretrained_params), ("SelMix", fitted.params))}

  print(
      f"\nK = {args.num_classes}, D = {args.dim}, {args.num_train:,} training vectors "
      f"(synthetic long-tailed mixture, written in {t_data:.1f} s), {os.cpu_count()} CPUs, "
      f"load average {os.getloadavg()[0]:.1f} at the end.\n\n"
      f"configs/features.py (train.train_and_evaluate): pre-training "
      f"{config.pretrain.num_steps} steps x {config.pretrain.batch_size}: {pre:.1f} s; SelMix "
      f"({args.objective}) {result['steps']} steps x {cfg.batch_size}, refresh every "
      f"{cfg.refresh_every}: {result['wall_time_s']:.1f} s; whole invocation (data load, both "
      f"stages, every evaluation, checkpoints): {total:.1f} s wall, {cpu:.1f} s CPU.\n"
      f"head.fit, same schedule: {fit_wall:.1f} s wall, {fit_cpu:.1f} s CPU; test mean recall "
      f"{100 * test['pre-trained'].mean():.2f} -> {100 * test['SelMix'].mean():.2f}, min recall "
      f"{100 * test['pre-trained'].min():.2f} -> {100 * test['SelMix'].min():.2f}.\n"
  )
  print(table)


def features_config_arrays(path):
  with np.load(path) as z:
    return {k: z[k] for k in z.files}


def _recalls(params, x, y):
  preds = np.argmax(x @ params["kernel"] + params["bias"], axis=1)
  k = params["bias"].shape[0]
  return np.bincount(y, preds == y, k) / np.maximum(np.bincount(y, minlength=k), 1)


if __name__ == "__main__":
  main()
