"""The quarantine: the images a stage could not use, each with its reason, never silently dropped.

Stages append rows to ``quarantine/`` of the run root (one atomic shard per batch; a log whose rows
count while the image's key and uri are the ones they record); each labels version writes the
rows of the manifest's images it lacks to its ``quarantine.parquet``. Which rows a version lists
is ``pipeline.ledger``'s rule (``version_quarantine``); this module only knows the files.
"""

from __future__ import annotations

import pyarrow as pa

from pipeline.io import codecs, layout, storage
from pipeline.io.tables import read_shards

QUARANTINE_SCHEMA = pa.schema([("image_id", pa.string()), ("uri", pa.string()), ("stage", pa.string()),
                               ("reason", pa.string()), ("key", pa.string())])


def write_quarantine(root: str, stage: str, records: list[dict[str, str]]) -> None:
    """Quarantine rows (image_id, uri, reason, key) of ``stage`` as one atomic shard."""
    if not records:
        return
    name = layout.part_name([r["image_id"] + "\0" + r["reason"] + "\0" + (r.get("key") or "") for r in records],
                            prefix=stage)
    rows = [{"image_id": r["image_id"], "uri": r["uri"], "stage": stage, "reason": r["reason"],
             "key": r.get("key")} for r in records]
    codecs.write_parquet(storage.join(layout.quarantine_dir(root), name),
                         pa.Table.from_pylist(rows, schema=QUARANTINE_SCHEMA))


def quarantine_files(root: str, stage: str) -> list[str]:
    """The quarantine shards ``stage`` wrote in this run root."""
    return [u for u in storage.list_files(layout.quarantine_dir(root), ".parquet")
            if u.rsplit("/", 1)[-1].startswith(f"{stage}-")]


def quarantined(root: str, stage: str, columns: tuple[str, ...] = ("image_id", "uri", "key")) -> pa.Table:
    """``columns`` of the quarantine rows ``stage`` wrote in this run root (a log: a row counts
    while the image's key and uri are the ones it records)."""
    return read_shards(quarantine_files(root, stage), list(columns))


def read_quarantine(labels_dir: str) -> pa.Table:
    """The images of a version's manifest that it lacks, with the reason (``quarantine.parquet``)."""
    uri = storage.join(labels_dir, "quarantine.parquet")
    return codecs.read_parquet(uri) if storage.exists(uri) else QUARANTINE_SCHEMA.empty_table()
