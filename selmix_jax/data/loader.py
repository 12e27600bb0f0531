"""Streaming input: each step's batch loaded ahead by grain and put on the devices before use.

A `Feed` hands out the device batches of a range of steps `[start, stop)`. Its element for step
t is `load(t)`: a pure function of t (the index draw — `pipeline.uniform_indices`, a pair
strategy's `sample` — happens inside it, then the gather or decode), so a feed yields the same
batches whatever its number of workers and however far ahead it reads, and a resumed run draws
what an uninterrupted one draws:

  with loader.Feed(load, start, stop, options=loader.Options(num_workers=8)) as feed:
    for step in range(start, stop):
      batch = feed.next(step)      # on the local devices, laid out as pmap places its inputs

The pipeline is grain's (no TensorFlow on the training path):
  host:   `grain.MapDataset.range(start, stop).map(load)`; with `num_workers > 0` whole batches
          are loaded in that many worker processes (`mp_prefetch`: worker w loads steps
          w, w + W, ...; grain keeps the order and returns arrays through shared memory), else
          in a background thread. Workers pay off for decode-on-access sources (JPEG decoding
          and resizing hold the GIL between PIL calls); in-memory gathers only need the thread.
  device: `grain.experimental.device_put` transfers batch t+1 (up to `prefetch` batches) while
          step t runs.

Callers open one feed per stretch of steps whose `load` is fixed: the whole run for
pre-training, one refresh interval for SelMix (its pair distribution changes at every refresh, so
a feed never reads past the next refresh), one pass for an evaluation. With workers, `load` and
what it holds (sources, samplers) are pickled into each worker when the feed opens.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any, Self

import grain
import jax
from absl import flags

from selmix_jax import train_state

Batch = Any


@dataclasses.dataclass(frozen=True)
class Options:
  """How a feed loads.

  Attributes:
    num_workers: worker processes for decode-on-access sources; 0 = load in a background thread
      of this process; -1 = `default_workers()`. Feeds of in-memory sources always use the
      thread (`Feed(..., decodes=False)`).
    prefetch: batches transferred to the devices ahead of the one in use (>= 1).
  """

  num_workers: int = 0
  prefetch: int = 2

  @classmethod
  def from_config(cls, data_config) -> Options:
    """From the `num_workers` and `prefetch` fields of `config.data`."""
    return cls(num_workers=int(data_config.num_workers), prefetch=int(data_config.prefetch))


def default_workers() -> int:
  """Workers when `num_workers = -1`: every CPU but one for the training process, at most 32."""
  return max(1, min(32, (os.cpu_count() or 2) - 1))


def _allow_unparsed_absl_flags() -> None:
  # grain's worker processes read absl flags; outside an absl app (tests, benchmarks, notebooks)
  # nothing parsed them, and grain would fail on the first read. Their defaults are what we want.
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


class Feed:
  """Device batches `load(t)` for `t` in `[start, stop)`, loaded and transferred ahead.

  Use as a context manager or call `close()`: worker processes, threads and shared memory are
  released there (grain also releases them when the iterator is garbage-collected, which
  CPython does not promise to do promptly).
  """

  def __init__(
    self,
    load: Callable[[int], Batch],
    start: int,
    stop: int,
    *,
    options: Options | None = None,
    decodes: bool = True,
    sharding: jax.sharding.Sharding | None = None,
  ):
    """Opens the feed; loading starts at once.

    Args:
      load: `step -> batch`, a pytree of NumPy arrays with a leading local-device axis; picklable
        when workers are used.
      start: first step.
      stop: one past the last step.
      options: workers and prefetch depth (None = `Options()`: a thread, prefetch 2).
      decodes: whether `load` decodes images (then `options.num_workers` workers are used);
        False for in-memory sources, which are loaded in a thread whatever the options say.
      sharding: where batches go (default `train_state.local_sharding()`).
    """
    options = options or Options()
    if options.prefetch < 1:
      raise ValueError(f"prefetch must be >= 1, got {options.prefetch}.")
    self.next_step = start
    self.stop = stop
    workers = options.num_workers if decodes else 0
    if workers < 0:
      workers = default_workers()
    self.num_workers = workers
    dataset = grain.MapDataset.range(start, stop).map(load)
    if workers:
      _allow_unparsed_absl_flags()
      # Each worker loads whole batches in order; its buffer of one keeps memory at W batches.
      stream = dataset.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=1))
      stream = stream.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
    else:
      # Loaded synchronously by the thread of the CPU stage below.
      stream = dataset.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=0))
    stream = grain.experimental.device_put(
      stream,
      sharding or train_state.local_sharding(),
      cpu_buffer_size=options.prefetch,
      device_buffer_size=options.prefetch,
    )
    self._iterator = iter(stream)

  def next(self, step: int) -> Batch:
    """The batch of `step`, which must be the next step of the feed."""
    if step != self.next_step:
      raise ValueError(f"This feed's next step is {self.next_step}, not {step}.")
    if step >= self.stop:
      raise ValueError(f"This feed ends before step {self.stop}; asked for step {step}.")
    batch = next(self._iterator)
    self.next_step += 1
    return batch

  def __iter__(self):
    while self.next_step < self.stop:
      yield self.next(self.next_step)

  def close(self) -> None:
    """Stops loading and releases the workers and threads (idempotent)."""
    if self._iterator is not None:
      self._iterator.close()
      self._iterator = None

  def __enter__(self) -> Self:
    return self

  def __exit__(self, *exc) -> None:
    self.close()
