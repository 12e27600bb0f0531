"""Data layer: long-tailed splits, image sources, augmentation and batching.

Modules: `splits` (per-class counts, index splits), `sources` (in-memory and
random-access image sources and their loaders), `augment` (weak/strong augmentation
in JAX), `pipeline` (host-side batches and `build(config)`). The trainer's entry
points are re-exported: `selmix_jax.data.build(config.data)`, `selmix_jax.data.names()`.
"""

from selmix_jax.data import pipeline

build = pipeline.build
names = pipeline.names
Datasets = pipeline.Datasets
Split = pipeline.Split
