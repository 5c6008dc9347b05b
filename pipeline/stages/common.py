"""Plumbing shared by the Ray stages: tasks, datasets from planned tables, progress, status rows."""

from __future__ import annotations

import logging
from typing import Any, Callable

import numpy as np

from pipeline.io import storage
from pipeline.progress import StageProgress

log = logging.getLogger(__name__)


def run_task(fn: Callable, *args: Any, num_cpus: float = 1.0, num_gpus: float = 0, num_returns: int | str = 1,
             **kwargs: Any):
    """Run ``fn(*args, **kwargs)`` as a Ray task (off the driver); returns its ObjectRef(s)."""
    import ray

    return ray.remote(fn).options(num_cpus=num_cpus, num_gpus=num_gpus, num_returns=num_returns).remote(*args, **kwargs)


def get(ref):
    import ray

    return ray.get(ref)


MAX_BLOCKS = 10_000  # object references the driver holds for one dataset, at most


def _split(table, rows_per_block: int):
    """Task (streaming returns): ``table`` cut into blocks. Returned, not put: the driver owns
    them, so a block lost with a node is rebuilt from lineage."""
    rows = max(rows_per_block, -(-table.num_rows // MAX_BLOCKS), 1)
    for start in range(0, max(table.num_rows, 1), rows):
        yield table.slice(start, rows)


def dataset(table_ref, rows_per_block: int):
    """A Ray Dataset over the Arrow table behind ``table_ref`` (made by a task, never fetched to
    the driver), in blocks of ``rows_per_block`` rows (more when that would exceed MAX_BLOCKS), so
    work spreads over the workers and a lost worker costs only its block. No task of the dataset
    itself needs a CPU, so it also streams into Ray Train workers that hold every CPU."""
    import ray.data

    return ray.data.from_arrow_refs(list(run_task(_split, table_ref, rows_per_block, num_cpus=0.1,
                                                  num_returns="streaming")))


def shard_batch(shard_rows: int, block_rows: int) -> int:
    """Rows per shard-writing batch: ``shard_rows`` rounded up to whole upstream blocks, so batches
    are not cut into a full shard and a fragment."""
    return max(block_rows, -(-shard_rows // block_rows) * block_rows)


def summarise(ds, progress: StageProgress) -> dict[str, int]:
    """Drive a stage's dataset to completion; only per-image status rows reach the driver."""
    counts: dict[str, int] = {}
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        statuses = batch["status"]
        for status in statuses:
            counts[str(status)] = counts.get(str(status), 0) + 1
        progress.add(len(statuses))
    return counts


def status_batch(statuses: list[str]) -> dict[str, np.ndarray]:
    return {"status": np.array(statuses, dtype=object)}


def object_array(values: list) -> np.ndarray:
    """A 1-D object array of ``values`` (arrays of different shapes stay separate objects)."""
    array = np.empty(len(values), dtype=object)
    array[:] = values
    return array


def finish_stage(*directories: str) -> None:
    """After a stage's dataset completed: drop temporary files left by workers killed mid-write."""
    removed = sum(storage.remove_temp_files(d) for d in directories)
    if removed:
        log.warning("removed %d temporary files left by interrupted writers", removed)
