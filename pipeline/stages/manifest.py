"""Stage: read and validate the manifest as a Ray Dataset (DESIGN §3).

Parquet manifests are checked one row group per task, CSV and JSON Lines one file per task
(streamed line by line). Each row is validated where it is read (``pipeline.data.manifest``) and
written, with its row number and any error, under ``manifest/<stamp>/checked/``. One task then
finds duplicate ids (the first row wins) and the class list in columnar form, writes the valid
rows to ``manifest/<stamp>/valid/`` and every rejected row to ``quarantine/manifest.parquet``.
Only counts and the class list reach the driver.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline import tasks
from pipeline.config import Config
from pipeline.data.manifest import (
    MANIFEST_SCHEMA,
    iter_manifest_records,
    manifest_format,
    row_from_record,
)
from pipeline.io import codecs, layout, storage, tables
from pipeline.progress import StageProgress
from pipeline.quarantine import QUARANTINE_SCHEMA

CHECKED_SCHEMA = pa.schema(list(MANIFEST_SCHEMA) + [pa.field("row", pa.int64()), pa.field("error", pa.string())])
VALID_SCHEMA = pa.schema(list(MANIFEST_SCHEMA) + [pa.field("row", pa.int64()), pa.field("held_out", pa.bool_())])
PART_ROWS = 50_000


def manifest_items(uri: str) -> list[dict[str, Any]]:
    """Units of work: one per Parquet row group (with its first row number), else the whole file."""
    if manifest_format(uri) != "parquet":
        return [{"uri": uri, "row_group": -1, "first_row": 0}]
    import pyarrow.parquet as pq

    with storage.open_input(uri) as f:
        meta = pq.ParquetFile(f).metadata
    items, first = [], 0
    for group in range(meta.num_row_groups):
        items.append({"uri": uri, "row_group": group, "first_row": first})
        first += meta.row_group(group).num_rows
    return items or [{"uri": uri, "row_group": -1, "first_row": 0}]


def check_rows(records, first_row: int, base_dir: str, classes: list[str]) -> list[dict[str, Any]]:
    """Validated rows of CHECKED_SCHEMA; a row that cannot be used keeps its ids and an ``error``."""
    known = set(classes)
    out = []
    for number, record in enumerate(records, start=first_row + 1):
        row, reason = row_from_record(record, base_dir)
        if row is not None and known:
            unknown = sorted((set(row.labels) | set(row.gt_instance_classes)) - known)
            if unknown:
                row, reason = None, f"unknown class(es) {unknown}; known: data.classes"
        if row is None:
            image_id = record.get("image_id")
            out.append({"image_id": str(image_id) if image_id is not None else "",
                        "uri": str(record.get("uri") or ""), "labels": [], "gt_instance_classes": [],
                        "row": number, "error": f"row {number}: {reason}"})
        else:
            out.append({**vars(row), "row": number, "error": ""})
    return out


def check_chunk(batch: dict[str, np.ndarray], *, out_dir: str, classes: list[str]) -> dict[str, np.ndarray]:
    """Task: validate one manifest item, writing ``checked/`` parts of PART_ROWS rows."""
    for uri, group, first in zip(batch["uri"], batch["row_group"], batch["first_row"]):
        uri, group, first = str(uri), int(group), int(first)
        records = iter_manifest_records(uri, row_group=None if group < 0 else group)
        base_dir = storage.parent(uri)
        part, chunk, number = 0, [], first
        while True:
            chunk = [r for _, r in zip(range(PART_ROWS), records)]
            if not chunk:
                break
            rows = check_rows(chunk, number, base_dir, classes)
            number += len(chunk)
            name = f"part-{max(group, 0):06d}-{part:04d}.parquet"
            codecs.write_parquet(storage.join(out_dir, "checked", name), pa.Table.from_pylist(rows, schema=CHECKED_SCHEMA))
            part += 1
    return tasks.status_batch(["checked"] * len(batch["uri"]))


def held_out(table: pa.Table, *, by_split: bool, fraction: float) -> pa.Array:
    """Rows the CAM classifier is measured on and no network trains on: split 'val' when the
    manifest marks any, else the rows whose image_id hashes below ``fraction`` (the same ids stay
    held out as the set grows)."""
    if by_split:
        return pc.equal(pc.fill_null(table.column("split"), ""), "val")
    limit = int(fraction * 2**64)
    return pa.array([int.from_bytes(hashlib.blake2b(i.encode(), digest_size=8).digest(), "big") < limit
                     for i in table.column("image_id").to_pylist()], pa.bool_())


def finish_manifest(out_dir: str, quarantine_uri: str, classes: list[str], held_out_fraction: float) -> dict[str, Any]:
    """Task: duplicates (first row wins), class list, valid parts and the manifest's quarantine."""
    checked = storage.list_files(storage.join(out_dir, "checked"), ".parquet")
    if not checked:
        return {"valid": 0, "held_out": 0, "ground_truth": 0, "quarantined": 0, "classes": classes,
                "ground_truth_digest": None}
    keys = tables.read_shards(checked, ["image_id", "row", "error", "labels", "split"])
    valid = keys.filter(pc.equal(keys.column("error"), ""))
    by_split = bool(pc.any(pc.equal(pc.fill_null(valid.column("split"), ""), "val")).as_py())
    first = valid.group_by("image_id").aggregate([("row", "min")])
    with_first = valid.select(["image_id", "row"]).join(first, keys="image_id")
    duplicates = with_first.filter(pc.not_equal(with_first.column("row"), with_first.column("row_min")))
    duplicate_rows = duplicates.column("row").combine_chunks()
    if not classes:
        kept = valid.filter(pc.invert(pc.is_in(valid.column("row"), duplicate_rows)))
        flat = pc.list_flatten(kept.column("labels"))
        classes = sorted(pc.unique(flat).to_pylist()) if len(flat) else []
    quarantine, counts = [], {"valid": 0, "held_out": 0, "ground_truth": 0}
    first_of = dict(zip(duplicates.column("row").to_pylist(), duplicates.column("row_min").to_pylist()))
    gt_digest = hashlib.sha256()
    for number, uri in enumerate(checked):
        table = codecs.read_parquet(uri)
        is_dup = pc.is_in(table.column("row"), duplicate_rows)
        bad = pc.or_(pc.not_equal(table.column("error"), ""), is_dup)
        for row in table.filter(bad).select(["image_id", "uri", "row", "error"]).to_pylist():
            reason = row["error"] or (f"row {row['row']}: duplicate image_id (first used by manifest row "
                                      f"{first_of[row['row']]})")
            quarantine.append({"image_id": row["image_id"], "uri": row["uri"], "reason": reason})
        good = table.filter(pc.invert(bad)).drop_columns(["error"])
        good = good.append_column("held_out", held_out(good, by_split=by_split, fraction=held_out_fraction))
        codecs.write_parquet(storage.join(out_dir, "valid", f"part-{number:06d}.parquet"), good.cast(VALID_SCHEMA))
        counts["valid"] += good.num_rows
        counts["held_out"] += int(pc.sum(good.column("held_out")).as_py() or 0)
        has_gt = pc.or_(pc.not_equal(good.column("gt_semantic_uri"), ""), pc.not_equal(good.column("gt_instance_uri"), ""))
        gt = good.filter(has_gt)
        counts["ground_truth"] += gt.num_rows
        for image_id in sorted(gt.column("image_id").to_pylist()):
            gt_digest.update(image_id.encode() + b"\0")
    quarantine.sort(key=lambda r: r["reason"])
    if quarantine:
        table = pa.Table.from_pylist([{**r, "stage": "manifest", "key": None} for r in quarantine],
                                     schema=QUARANTINE_SCHEMA)
        codecs.write_parquet(quarantine_uri, table)
    else:
        storage.remove(quarantine_uri)
    storage.remove(storage.join(out_dir, "checked"), recursive=True)
    return {**counts, "quarantined": len(quarantine), "classes": classes, "ground_truth_digest": gt_digest.hexdigest()[:16]}


def ingest_manifest(cfg: Config, stamp: str) -> dict[str, Any]:
    """Validate ``data.manifest`` into ``manifest/<stamp>/valid/``; returns counts and classes."""
    import ray.data

    root = cfg.run.root
    out_dir = layout.manifest_dir(root, stamp)
    storage.remove(out_dir, recursive=True)  # a run that died while ingesting left a partial one
    items = manifest_items(cfg.data.manifest)
    check = {"out_dir": out_dir, "classes": cfg.data.classes}
    if len(items) == 1:  # one file or row group: one task, without a dataset's start-up cost
        tasks.get(tasks.run_task(check_chunk, {k: [v] for k, v in items[0].items()}, num_cpus=cfg.run.io_cpus,
                                   **check))
    else:
        ds = ray.data.from_items(items).map_batches(check_chunk, batch_size=1, batch_format="numpy",
                                                    num_cpus=cfg.run.io_cpus, fn_kwargs=check)
        tasks.summarise(ds, StageProgress("manifest", len(items), unit="parts",
                                           every_seconds=cfg.run.progress_seconds))
    quarantine_uri = storage.join(layout.quarantine_dir(root), "manifest.parquet")
    summary = tasks.get(tasks.run_task(finish_manifest, out_dir, quarantine_uri, list(cfg.data.classes),
                                         cfg.data.held_out_fraction, num_cpus=cfg.run.io_cpus))
    # Manifests of earlier runs are superseded by this one.
    for old in storage.list_dirs(layout.manifest_root(root)):
        if old.rstrip("/").rsplit("/", 1)[-1] != stamp:
            storage.remove(old, recursive=True)
    return summary
