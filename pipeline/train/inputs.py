"""Training inputs: decoded once per run when the set is small, streamed when it is not.

Each network's samples are made in two steps by a *sample maker*:
``decode(row)`` reads and decodes a row's files into arrays (or returns None, with a warning,
when they are unusable), and ``augment(arrays, rng)`` draws the random resize / flip / crop of
one epoch. ``collate(samples, device)`` stacks them into the batch the loss takes.

* Small sets (at most ``run.decode_once_max_images`` training images): one Ray Data pass of
  tasks decodes every image (in the table's order), the decoded arrays are materialised in Ray's
  object store, and the training workers augment them every epoch (:func:`augmented_batches`).
  Nothing is read or decoded again, no CPU actor runs during training, so training can hold every
  CPU.
* Larger sets stream: decode + augment run in a CPU actor pool every epoch
  (:class:`AugmentBatch`), so memory stays bounded whatever the set's size.
"""

from __future__ import annotations

import logging
from typing import Any, Iterator

import numpy as np
import torch

from pipeline.tasks import dataset, object_array

log = logging.getLogger(__name__)


def rows_of(batch: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    """A Ray Data batch (columns) as a list of rows."""
    return [{k: batch[k][i] for k in batch} for i in range(len(next(iter(batch.values()))))]


def decode_rows(maker, batch: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    """The decoded arrays of every usable row of a Ray Data batch."""
    return [d for d in (maker.decode(row) for row in rows_of(batch)) if d is not None]


def columns(samples: list[dict[str, np.ndarray]], keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Per-sample arrays as one object column per key (arrays of different shapes stay apart)."""
    return {k: object_array([s[k] for s in samples]) for k in keys}


def decode_batch(batch: dict[str, np.ndarray], *, maker) -> dict[str, np.ndarray]:
    """Ray Data map: rows -> the maker's decoded arrays (one pass per run, before training), in
    Ray tasks: pooled worker processes, no actor to start for a pass that runs once."""
    return columns(decode_rows(maker, batch), maker.decoded_keys)


class AugmentBatch:
    """Ray Data map: rows -> augmented samples (or plain ones, ``augment=False``), decoded again
    every epoch (streaming)."""

    def __init__(self, *, maker, augment: bool = True, seed: int | None = None):
        self.maker, self.augment = maker, augment
        self.rng = np.random.default_rng(seed)  # None: fresh draws in every actor and epoch

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        decoded = decode_rows(self.maker, batch)
        samples = [self.maker.augment(d, self.rng) if self.augment else self.maker.plain(d) for d in decoded]
        return columns(samples, self.maker.sample_keys)


def decodes_once(num_images: int, max_images: int) -> bool:
    """Whether a training set of ``num_images`` is decoded once per run (``run.decode_once_max_images``)."""
    return num_images <= max_images


def training_dataset(table_ref, maker, *, decode_once: bool, augment: bool = True, rows_per_block: int = 16,
                     actor_cpus: float = 0.5):
    """The rows behind ``table_ref`` for ``maker``: decoded and materialised (``decode_once``), or
    a stream of augmented samples (plain ones with ``augment=False``)."""
    import ray.data

    source = dataset(table_ref, rows_per_block)
    if decode_once:
        decoded = source.map_batches(decode_batch, fn_kwargs={"maker": maker}, batch_size=8, batch_format="numpy",
                                     num_cpus=actor_cpus)
        # The table's order, whichever task finishes first: the workers' shards and the epochs'
        # shuffles (seeded) then draw the same samples on every run.
        decoded.context.execution_options.preserve_order = True
        return decoded.materialize()
    compute = ray.data.ActorPoolStrategy(min_size=1, max_size=2)
    if augment:
        source = source.randomize_block_order()
    return source.map_batches(AugmentBatch, fn_constructor_kwargs={"maker": maker, "augment": augment},
                              batch_size=8, batch_format="numpy", compute=compute, num_cpus=actor_cpus)


def augmented_batches(maker, shard, batch_size: int, seed: int, device: torch.device, *, decoded: bool,
                      drop_last: bool = False, augment: bool = True) -> Iterator[dict[str, Any]]:
    """Training batches of a worker's shard: augmented here from decoded arrays (``decoded``), or
    already augmented by :class:`AugmentBatch`; ``augment=False`` gives the maker's plain inputs."""
    rng = np.random.default_rng(seed)
    shuffle = {"local_shuffle_buffer_size": 4 * batch_size, "local_shuffle_seed": seed} if augment else {}
    for batch in shard.iter_batches(batch_size=batch_size, batch_format="numpy", drop_last=drop_last, **shuffle):
        rows = rows_of(batch)
        if decoded:
            rows = [maker.augment(r, rng) if augment else maker.plain(r) for r in rows]
        if rows:
            yield maker.collate(rows, device)


def stack(rows: list[dict[str, np.ndarray]], key: str, device: torch.device, dtype=None) -> torch.Tensor:
    return torch.as_tensor(np.stack([np.asarray(r[key], dtype) for r in rows]), device=device)
