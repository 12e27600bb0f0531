"""Predicted (first-order gain) vs realised change of the objective between SelMix refreshes.

For a `min_recall` run: at refresh t the gain matrix G_t predicts that the next
`refresh_every` steps change psi_t(C) = sum_i lambda_t,i r_i by
`sum_s lr_s * E_{(i,j) ~ P_t with floor}[G_t,ij]`; the realised change is
`sum_i lambda_t,i (r_{t+1,i} - r_t,i)` on the validation recalls of the next refresh (multipliers
held at lambda_t). Reads `<workdir>/selmix_history/*.npz` and `<workdir>/summary.json`.

  python benchmarks/gain_vs_realised.py <selmix workdir>
"""

import json
import os
import sys

import numpy as np

from selmix_jax import reporting
from selmix_jax import optim
from selmix_jax import sampling


def main(workdir):
  config = json.load(open(os.path.join(workdir, "summary.json")))["config"]["selmix"]
  history = reporting.load_history(workdir)
  schedule = optim.cosine_schedule(config["learning_rate"], config["num_steps"])
  rows = []
  for now, nxt in zip(history[:-1], history[1:]):
    probs = sampling.with_floor(now["pair_probs"], config.get("floor"))
    lr_sum = sum(float(schedule(s)) for s in range(int(now["step"]), int(nxt["step"])))
    predicted = lr_sum * float(np.sum(probs * now["gain"]))
    realised = float(np.dot(now["multipliers"], nxt["val_recalls"] - now["val_recalls"]))
    rows.append((int(now["step"]), predicted, realised))
  print("| refresh step | predicted Δψ | realised Δψ (val) |")
  print("|---:|---:|---:|")
  for step, p, r in rows:
    print(f"| {step} | {p:+.4f} | {r:+.4f} |")
  p, r = np.array([x[1] for x in rows]), np.array([x[2] for x in rows])
  print(f"\nmean predicted {p.mean():+.4f}, mean realised {r.mean():+.4f}, "
        f"correlation {np.corrcoef(p, r)[0, 1]:.2f}, realised > 0 in {np.mean(r > 0):.0%} "
        f"of {len(rows)} intervals")


if __name__ == "__main__":
  main(sys.argv[1])
