"""selmix-jax: SelMix (selective mixup fine-tuning) in JAX/Flax.

The numerical core (`confusion`, `metrics`, `objectives`, `gains`, `sampling`) imports
with only jax and numpy; `clu_metrics` adds clu and flax; training, data and checkpoint
modules are imported on demand.
"""

__version__ = "0.1.0"
