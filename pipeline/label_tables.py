"""What a labels version's files hold: the schemas of its index, instance rows and the
corrections it applies; the commit of a labelled batch; reading an index; a correction applied.

The rules that decide which rows a version takes (keys, reuse, when a version is needed) are
``pipeline.ledger``'s; this module only knows the tables.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.algorithms import doubt
from pipeline.io import codecs, layout, storage
from pipeline.io.tables import conform, join_rows

URI_COLUMNS = ("semantic_uri", "instance_uri", "instances_uri")
# One row per labelled image; in a version's images/ shards (commit records of the images it
# labelled) and in its index.parquet (every image of the version). URIs are relative to the
# version's directory, and may point into an earlier version (../<V>/...).
INDEX_SCHEMA = pa.schema([
    ("image_id", pa.string()), ("key", pa.string()), ("uri", pa.string()), ("height", pa.int32()),
    ("width", pa.int32()), ("class_ids", pa.list_(pa.int32())), ("num_instances", pa.int32()),
    ("semantic_uri", pa.string()), ("instance_uri", pa.string()), ("instances_uri", pa.string()),
    ("fg_fraction", pa.float32()), ("cam_fraction", pa.float32()),
    # How much to doubt the image's labels (pipeline.algorithms.doubt): each signal, and their
    # combination ranked within the version (null in rows labelled before doubt existed).
    *[(f"doubt_{name}", pa.float32()) for name in doubt.SIGNALS], ("doubt", pa.float32()),
    # Who made the labels: "irnet", or "human" (a correction, named in ``correction``, applied
    # verbatim; null in rows written before corrections existed: read as "irnet").
    ("source", pa.string()), ("correction", pa.string()),
])
# One row per corrected image of a correction (``corrections/<name>/images.parquet``, its commit
# record; pipeline.stages.corrections writes it). URIs are relative to the correction's directory.
CORRECTION_SCHEMA = pa.schema([
    ("image_id", pa.string()), ("height", pa.int32()), ("width", pa.int32()), ("class_ids", pa.list_(pa.int32())),
    ("num_instances", pa.int32()), ("semantic_uri", pa.string()), ("instance_uri", pa.string()),
    ("instances_uri", pa.string()), ("stamp", pa.string()), ("note", pa.string()), ("source", pa.string()),
    ("fg_fraction", pa.float32()),
])
# The corrections a version applies (plan.version_corrections): the newest correction of each image
# of the manifest, with the image's uri and URIs relative to the version's directory.
CORRECTION_ROWS = pa.schema([("image_id", pa.string()), ("uri", pa.string()), ("correction", pa.string()),
                             *[CORRECTION_SCHEMA.field(c) for c in ("height", "width", "class_ids", "num_instances",
                                                                    "fg_fraction", *URI_COLUMNS)]])
INSTANCE_SCHEMA = pa.schema([
    ("image_id", pa.string()), ("instance_id", pa.int32()), ("class_id", pa.int32()),
    ("score", pa.float32()), ("area", pa.int64()), ("bbox", pa.list_(pa.float32(), 4)),
    ("rle_counts", pa.string()), ("height", pa.int32()), ("width", pa.int32()),
    ("doubt", pa.float32()),  # pipeline.algorithms.doubt.instance_doubt
])


def commit_labels(labels_dir: str, images: list[dict[str, Any]], instances: list[dict[str, Any]],
                  coco_part: bytes) -> None:
    """Commit a batch of labelled images whose PNGs are written: the instance rows and their COCO
    part (pipeline.stages.coco) first, then the images rows, which name that instance shard and
    make the images count."""
    if not images:
        return
    name = layout.part_name([r["image_id"] + "\0" + r["key"] for r in images])
    for row in images:
        row["instances_uri"] = f"instances/{name}"
    instances_dir = storage.join(labels_dir, "instances")
    codecs.write_parquet(storage.join(instances_dir, name), pa.Table.from_pylist(instances, schema=INSTANCE_SCHEMA))
    storage.write_bytes(storage.join(instances_dir, name.removesuffix(".parquet") + ".coco.tsv"), coco_part)
    codecs.write_parquet(storage.join(labels_dir, "images", name), pa.Table.from_pylist(images, schema=INDEX_SCHEMA))


def labelled_rows(labels_dir: str) -> pa.Table:
    """The committed images rows of a version directory (the images it labelled itself)."""
    uris = storage.list_files(storage.join(labels_dir, "images"), ".parquet")
    if not uris:
        return INDEX_SCHEMA.empty_table()
    return pa.concat_tables([conform(codecs.read_parquet(u), INDEX_SCHEMA) for u in uris])


def read_index(labels_dir: str, columns: list[str] | None = None) -> pa.Table:
    """A published version's index (or an empty one when the directory has none); columns an
    older index lacks are null."""
    uri = layout.index_file(labels_dir)
    schema = INDEX_SCHEMA if columns is None else pa.schema([INDEX_SCHEMA.field(c) for c in columns])
    if not storage.exists(uri):
        return schema.empty_table()
    table = codecs.read_parquet(uri) if columns is None else codecs.read_parquet_columns(uri, columns, missing_ok=True)
    return conform(table, schema)


def relative_to_sibling(uris: pa.Array, version: str) -> pa.Array:
    """URIs relative to ``labels/<version>/`` rewritten relative to a sibling version directory
    (``semantic/x.png`` -> ``../<version>/semantic/x.png``; ``../v0/...`` stays)."""
    values = uris.to_pylist()
    return pa.array([u if u.startswith("../") else f"../{version}/{u}" for u in values], pa.string())


def apply_corrections(index: pa.Table, corrections: pa.Table) -> pa.Table:
    """``index`` (INDEX_SCHEMA) with every corrected image's row replaced by its correction,
    verbatim: source "human", the correction's PNGs and instance rows, no doubt. An image that
    IRNet did not label (its CAMs failed) gets a row too; the row keeps IRNet's label key, so a
    nightly run still knows IRNet's labels of the image are current. Other rows get source "irnet".
    Sorted by image_id."""
    index = index.set_column(index.schema.get_field_index("source"), "source",
                             pc.fill_null(index.column("source"), "irnet"))
    if corrections.num_rows == 0:
        return index.sort_by("image_id")
    kept = join_rows(index, corrections, ["image_id"], "left anti")
    labelled = join_rows(index, corrections, ["image_id"], "inner", extra=[])
    carried = {r["image_id"]: r for r in labelled.select(["image_id", "key", "cam_fraction"]).to_pylist()}
    rows = []
    for row in corrections.to_pylist():
        own = carried.get(row["image_id"], {})
        rows.append({**{c: row[c] for c in CORRECTION_ROWS.names if c != "correction"},
                     "key": own.get("key"), "cam_fraction": own.get("cam_fraction"), "source": "human",
                     "correction": row["correction"], "doubt": 0.0,
                     **{f"doubt_{name}": 0.0 for name in doubt.SIGNALS}})
    human = pa.Table.from_pylist(rows, schema=INDEX_SCHEMA)
    return pa.concat_tables([kept, human]).sort_by("image_id")


def corrections_changed(base_index: pa.Table, corrections: pa.Table) -> int:
    """How many images the ``corrections`` (CORRECTION_ROWS) label otherwise than the base
    version's index does: corrected since, or by a newer correction."""
    applied = conform(base_index, INDEX_SCHEMA).select(["image_id", "correction"])
    return join_rows(corrections, applied, ["image_id", "correction"], "left anti").num_rows


def rank_doubt(index: pa.Table) -> pa.Table:
    """``index`` with its ``doubt`` column: each image's signals ranked among the version's images
    that IRNet labelled (``doubt.version_doubt``); a person's labels (``source`` human) are not in
    doubt (0)."""
    human = pc.equal(index.column("source"), "human").to_numpy(zero_copy_only=False).astype(bool)
    signals = np.stack([index.column(f"doubt_{name}").to_numpy(zero_copy_only=False).astype(np.float64)
                        for name in doubt.SIGNALS], axis=1) if index.num_rows else np.zeros((0, len(doubt.SIGNALS)))
    ranked = np.zeros(index.num_rows)
    ranked[~human] = doubt.version_doubt(signals[~human])
    return index.set_column(index.schema.get_field_index("doubt"), "doubt",
                            pa.array(ranked, pa.float32(), mask=np.isnan(ranked)))
