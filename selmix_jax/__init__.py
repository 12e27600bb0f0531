"""selmix-jax: SelMix (selective mixup fine-tuning) in JAX/Flax.

The numerical core (`confusion`, `metrics`, `objectives`, `gains`) imports with only
jax and numpy; training, data and checkpoint modules are imported on demand.
"""

__version__ = "0.1.0"
