"""COCO instance annotations of a labels version (``<labels>/coco.json``, DESIGN §3), by streaming.

Synthesis writes, beside each ``instances/part-*.parquet`` shard, its *COCO part*
(``part-*.coco.tsv``): one line per annotation, ``image_id<TAB>{annotation JSON without its ids}``,
formatted by the parallel tasks that labelled the images. ``coco.json`` is then one streamed
concatenation (:func:`write_coco`): the images come from the version's index, the annotations from
the parts of the shards the index names, with ids assigned on the way. Memory stays at one part;
no part is ever rewritten, so a new version costs one pass over existing parts and no new parts
except those of the images it labelled.

Order: images sorted by (instance shard, image_id), ids 1..N in that order; annotations grouped by
image in the same order, by instance id, ids 1..M. The same index gives byte-identical JSON.
``file_name`` is the image_id; masks are COCO compressed RLE; every annotation has its ``score``,
so the file also serves as a detection-results file.
"""

from __future__ import annotations

import json
import logging
import posixpath
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline import label_tables
from pipeline.data.classes import Vocabulary
from pipeline.io import layout, storage, tables

log = logging.getLogger(__name__)
PART_SUFFIX = ".coco.tsv"


def _f32(value: float) -> float:
    """A float32 value as the shortest decimal that round-trips (0.9, not 0.8999999761581421)."""
    return float(str(np.float32(value)))


def annotation_body(row: dict[str, Any]) -> str:
    """The JSON of one instance row as a COCO annotation, without "id" and "image_id"."""
    return json.dumps({
        "category_id": int(row["class_id"]),
        "segmentation": {"size": [int(row["height"]), int(row["width"])], "counts": row["rle_counts"]},
        "area": int(row["area"]), "bbox": [_f32(v) for v in row["bbox"]], "iscrowd": 0,
        "score": _f32(row["score"]),
    })


def coco_part(instances: list[dict[str, Any]]) -> bytes:
    """The COCO part of an instances shard: ``image_id<TAB>annotation body`` per instance row, in
    (image_id, instance_id) order."""
    rows = sorted(instances, key=lambda r: (r["image_id"], r["instance_id"]))
    return "".join(f"{r['image_id']}\t{annotation_body(r)}\n" for r in rows).encode("utf-8")


def part_uri(labels_dir: str, instances_uri: str) -> str:
    """Where the COCO part of the shard an index row names (relative to ``labels_dir``) lives."""
    return storage.resolve(instances_uri.removesuffix(".parquet") + PART_SUFFIX, labels_dir)


def _read_part(uri: str) -> dict[str, list[str]]:
    bodies: dict[str, list[str]] = {}
    for line in storage.read_text(uri).splitlines():
        image_id, _, body = line.partition("\t")
        bodies.setdefault(image_id, []).append(body)
    return bodies


class _Text:
    """Text writes into a binary stream, encoded as UTF-8 (the stream stays open)."""

    def __init__(self, raw):
        self.raw = raw

    def write(self, text: str) -> None:
        self.raw.write(text.encode("utf-8"))


def image_file_name(image_id: str, uri: str) -> str:
    """``<image_id><extension of the source>`` (``a.jpg`` for ``s3://b/x/a.jpg``)."""
    ext = posixpath.splitext(uri.rsplit("/", 1)[-1])[1].lower()
    return image_id + (ext if ext and len(ext) <= 5 else "")


def write_coco(labels_dir: str, classes: list[str], index: pa.Table | None = None,
               out_uri: str | None = None, *, file_names: str = "id") -> dict[str, Any]:
    """Stream ``coco.json`` of the labels version at ``labels_dir`` from its index and COCO parts.

    ``file_names``: "id" (``file_name`` is the image_id) or "id+ext" (the image_id plus the
    source image's extension, as an export with images names the copied files).

    Raises ValueError when a part lists another number of annotations for an image than its index
    row says (a part that does not belong to the labels).
    Returns {"uri", "num_images", "num_annotations", "num_categories", "annotations_per_category"}.
    """
    out_uri = out_uri or layout.coco_file(labels_dir)
    index = label_tables.read_index(labels_dir) if index is None else index
    index = tables.conform(index, label_tables.INDEX_SCHEMA)
    index = index.select(["image_id", "uri", "height", "width", "num_instances", "instances_uri", "source"]).sort_by(
        [("instances_uri", "ascending"), ("image_id", "ascending")])
    rows = index.to_pylist()
    annotations, per_category = 0, [0] * (len(classes) + 1)
    with storage.open_output(out_uri) as raw:
        out = _Text(raw)
        out.write('{"images": [')
        for number, row in enumerate(rows, start=1):
            out.write(",\n" if number > 1 else "\n")
            name = row["image_id"] if file_names == "id" else image_file_name(row["image_id"], row["uri"])
            out.write(json.dumps({"id": number, "file_name": name, "height": row["height"], "width": row["width"],
                                  "source": row["source"] or "irnet"}))
        out.write('\n],\n"annotations": [')
        shard, bodies = None, {}
        for number, row in enumerate(rows, start=1):
            if row["num_instances"] == 0:
                continue
            if row["instances_uri"] != shard:
                shard = row["instances_uri"]
                bodies = _read_part(part_uri(labels_dir, shard))
            mine = bodies.get(row["image_id"], [])
            if len(mine) != row["num_instances"]:
                raise ValueError(f"image {row['image_id']!r}: its index row lists {row['num_instances']} instances, "
                                 f"the COCO part of {shard} has {len(mine)}")
            for body in mine:
                per_category[int(body[len('{"category_id": '):body.index(",")])] += 1
                annotations += 1
                out.write(",\n" if annotations > 1 else "\n")
                out.write(f'{{"id": {annotations}, "image_id": {number}, {body[1:]}')
        out.write('\n],\n"categories": [')
        for category in Vocabulary(classes).categories():
            out.write(",\n" if category["id"] > 1 else "\n")
            out.write(json.dumps(category))
        out.write("\n]}\n")
    log.info("wrote %s: %d images, %d annotations", out_uri, len(rows), annotations)
    return {"uri": out_uri, "num_images": len(rows), "num_annotations": annotations, "num_categories": len(classes),
            "annotations_per_category": dict(zip(classes, per_category[1:]))}
