"""Data layer: long-tailed splits, image sources, augmentation and batching.

Modules: `datasets` (the registry: one entry per data set with its loader, statistics and split
defaults), `splits` (per-class counts, index splits), `sources` (in-memory and random-access image
sources and their loaders), `augment` (weak/strong augmentation in JAX), `pipeline` (host-side
batches, `default_config()` and `build(config)`), `loader` (batches streamed through grain: worker
processes for decoding sources, transfer to the devices ahead of the step). The trainer's entry
points are re-exported: `selmix_jax.data.build(config.data)`, `selmix_jax.data.names()`,
`selmix_jax.data.default_config()`.
"""

from selmix_jax.data import datasets
from selmix_jax.data import pipeline

build = pipeline.build
names = pipeline.names
default_config = pipeline.default_config
register = datasets.register
DatasetSpec = datasets.DatasetSpec
Datasets = pipeline.Datasets
Split = pipeline.Split
