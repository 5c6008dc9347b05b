"""Plumbing shared by the per-image Ray Data stages: inputs, shards, quarantine, completion."""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any, Iterator

import numpy as np
import pyarrow as pa

from pipeline.data.manifest import QUARANTINE_SCHEMA
from pipeline.io import codecs, layout, storage

log = logging.getLogger(__name__)


def blocks(table: pa.Table, rows_per_block: int = 16):
    """A Ray Dataset over ``table`` in blocks of ``rows_per_block`` rows.

    Small blocks let a slow or dead worker cost only its own block (Ray retries it) and spread
    work over the actor pool; building them needs no all-to-all tasks.
    """
    import ray.data

    slices = [table.slice(i, rows_per_block) for i in range(0, table.num_rows, rows_per_block)]
    return ray.data.from_arrow(slices or [table])


def read_column(directory: str, column: str, *, suffix: str = ".parquet") -> Iterator[str]:
    """Values of ``column`` over every shard in ``directory`` (one shard in memory at a time)."""
    for uri in storage.list_files(directory, suffix):
        yield from codecs.read_parquet_columns(uri, [column]).column(column).to_pylist()


def read_class_ids(directory: str) -> dict[str, tuple[int, ...] | None]:
    """image_id -> the class ids (tags) each row of the shards in ``directory`` was made for
    (None in shards written before they were recorded)."""
    found = {}
    for uri in storage.list_files(directory, ".parquet"):
        table = codecs.read_parquet_columns(uri, ["image_id", "class_ids"], missing_ok=True)
        ids = table.column("image_id").to_pylist()
        class_ids = table.column("class_ids").to_pylist() if "class_ids" in table.column_names else [None] * len(ids)
        found.update((i, None if c is None else tuple(c)) for i, c in zip(ids, class_ids))
    return found


def drop_rows(directory: str, image_ids: set[str], *, prefix: str = "") -> int:
    """Rewrite the shards of ``directory`` (names starting with ``prefix``) without ``image_ids``.

    Each shard is replaced atomically (or removed when nothing is left), so an interrupted call
    leaves every shard either as it was or without those rows. Returns the rows dropped.
    """
    dropped = 0
    if not image_ids:  # nothing to drop: do not read every shard to find that out
        return 0
    for uri in storage.list_files(directory, ".parquet"):
        if not uri.rsplit("/", 1)[-1].startswith(prefix):
            continue
        ids = codecs.read_parquet_columns(uri, ["image_id"]).column("image_id").to_pylist()
        keep = [image_id not in image_ids for image_id in ids]
        if all(keep):
            continue
        dropped += keep.count(False)
        if any(keep):
            codecs.write_parquet(uri, codecs.read_parquet(uri).filter(pa.array(keep, pa.bool_())))
        else:
            storage.remove(uri)
    return dropped


def quarantined_ids(root: str, stage: str) -> set[str]:
    """Image ids quarantined by ``stage`` in this run root."""
    return set(quarantined_uris(root, stage))


def quarantined_uris(root: str, stage: str) -> dict[str, str]:
    """image_id -> uri of the images quarantined by ``stage`` in this run root."""
    found = {}
    for uri in storage.list_files(layout.quarantine_dir(root), ".parquet"):
        if uri.rsplit("/", 1)[-1].startswith(f"{stage}-"):
            table = codecs.read_parquet_columns(uri, ["image_id", "uri"])
            found.update(zip(table.column("image_id").to_pylist(), table.column("uri").to_pylist()))
    return found


def write_quarantine(root: str, stage: str, records: list[dict[str, str]]) -> None:
    """Write quarantine rows (image_id, uri, stage, reason) as one atomic shard."""
    if not records:
        return
    name = layout.part_name([r["image_id"] + "\0" + r["reason"] for r in records], prefix=stage)
    table = pa.Table.from_pylist([{**r, "stage": stage} for r in records], schema=QUARANTINE_SCHEMA)
    codecs.write_parquet(storage.join(layout.quarantine_dir(root), name), table)


def fingerprint(values: dict[str, Any]) -> str:
    """Stable short hash of the inputs that determine a stage's outputs."""
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:16]


# Settings that change how a stage runs, not what it computes: left out of the stage keys, so
# moving a run root to GPUs or changing parallelism does not redo finished work.
EXECUTION_ONLY = {"num_workers", "use_gpu", "cpus_per_worker", "max_failures", "num_actors", "cpus_per_actor",
                  "gpus_per_actor", "cpus_per_task", "max_tasks", "keep_high_res"}


def settings(section: Any, *, inference: bool = False) -> dict[str, Any]:
    """The fields of a config section that determine its outputs (for stage keys)."""
    drop = EXECUTION_ONLY | ({"batch_size"} if inference else set())
    return {k: v for k, v in vars(section).items() if k not in drop}


def file_fingerprint(uri: str) -> str:
    """Content hash of a (model) file, so retraining invalidates what was computed from it."""
    return hashlib.sha256(storage.read_bytes(uri)).hexdigest()[:16]


def prepare_stage_dir(directory: str, key: str) -> None:
    """Make ``directory`` hold outputs of ``key``: outputs of another key are removed first."""
    marker = storage.join(directory, "_stage.json")
    if storage.exists(marker):
        if json.loads(storage.read_text(marker)).get("key") == key:
            return
        log.warning("inputs of %s changed; discarding its previous outputs", directory)
        storage.remove(directory, recursive=True)
    storage.write_text(marker, json.dumps({"key": key}))


def summarise(ds) -> dict[str, int]:
    """Drive a stage's dataset to completion; only per-image status rows reach the driver."""
    counts: dict[str, int] = {}
    for batch in ds.iter_batches(batch_size=256, batch_format="numpy"):
        for status in batch["status"]:
            counts[str(status)] = counts.get(str(status), 0) + 1
    return counts


def finish_stage(*directories: str) -> None:
    """After a stage's dataset completed: drop temporary files left by workers killed mid-write."""
    removed = sum(storage.remove_temp_files(d) for d in directories)
    if removed:
        log.warning("removed %d temporary files left by interrupted writers", removed)


def status_batch(statuses: list[str]) -> dict[str, np.ndarray]:
    return {"status": np.array(statuses, dtype=object)}
