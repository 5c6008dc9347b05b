"""Stage: COCO instance annotations of a labels version (``<labels>/coco.json``, DESIGN §3).

Reads what the synthesis stage wrote (``images/part-*.parquet``, ``instances/part-*.parquet``)
one shard at a time and writes one COCO JSON file that ``pycocotools.coco.COCO`` loads:
``file_name`` is the image_id, masks stay as the compressed RLE strings synthesis produced, and
every instance carries its ``score`` so the file also serves as a detection-results file.

Ids are ranks: images get 1..N in sorted image_id order, annotations 1..M in (image_id,
instance_id) order, so the same labels give byte-identical JSON whatever the shard names or order.
An instance shard counts only together with the images shard of the same name: synthesis writes
instances first and the images row last, so instances without it are leftovers of a crashed batch
(the retried batch rewrote them, possibly under another shard name).
"""

from __future__ import annotations

import io
import json
import logging
import posixpath
from typing import Any, NamedTuple

import numpy as np

from pipeline.io import codecs, storage

log = logging.getLogger(__name__)


class _Image(NamedTuple):
    shard: str  # file name of the images shard that lists the image
    height: int
    width: int
    num_instances: int


def _f32(value: float) -> float:
    """A float32 value as the shortest decimal that round-trips (0.9, not 0.8999999761581421)."""
    return float(str(np.float32(value)))


def _read_images(labels_dir: str) -> dict[str, _Image]:
    """image_id -> _Image for every labelled image; ValueError if an image is listed twice."""
    images: dict[str, _Image] = {}
    for uri in storage.list_files(storage.join(labels_dir, "images"), ".parquet"):
        shard = posixpath.basename(uri)
        table = codecs.read_parquet_columns(uri, ["image_id", "height", "width", "num_instances"])
        for row in table.to_pylist():
            if row["image_id"] in images:
                raise ValueError(f"image {row['image_id']!r} is listed twice (in {shard} and "
                                 f"{images[row['image_id']].shard})")
            images[row["image_id"]] = _Image(shard, row["height"], row["width"], row["num_instances"])
    return images


def _annotation_tails(labels_dir: str, images: dict[str, _Image],
                      num_classes: int) -> dict[str, list[tuple[int, str]]]:
    """image_id -> [(instance_id, JSON text of the annotation after its "id" and "image_id")].

    Holding the JSON text, not the rows, keeps memory at the size of the output file.
    """
    tails: dict[str, list[tuple[int, str]]] = {image_id: [] for image_id in images}
    for uri in storage.list_files(storage.join(labels_dir, "instances"), ".parquet"):
        shard = posixpath.basename(uri)
        skipped = 0
        for row in codecs.read_parquet(uri).to_pylist():
            image = images.get(row["image_id"])
            if image is None or image.shard != shard:
                skipped += 1
                continue
            if not 1 <= row["class_id"] <= num_classes:
                raise ValueError(f"{shard}: class_id {row['class_id']} of {row['image_id']!r} is not in "
                                 f"1..{num_classes}")
            if (row["height"], row["width"]) != (image.height, image.width):
                raise ValueError(f"{shard}: mask of {row['image_id']!r} is {row['height']}x{row['width']}, "
                                 f"the image {image.height}x{image.width}")
            body = json.dumps({
                "category_id": row["class_id"],
                "segmentation": {"size": [row["height"], row["width"]], "counts": row["rle_counts"]},
                "area": int(row["area"]), "bbox": [_f32(v) for v in row["bbox"]], "iscrowd": 0,
                "score": _f32(row["score"]),
            })
            tails[row["image_id"]].append((row["instance_id"], body[1:]))  # drop the opening "{"
        if skipped:
            log.warning("%s: %d instance rows without an images row in the same shard ignored", uri, skipped)
    for image_id, rows in tails.items():
        ids = [instance_id for instance_id, _ in rows]
        if len(set(ids)) != len(ids) or len(ids) != images[image_id].num_instances:
            raise ValueError(f"image {image_id!r}: {images[image_id].num_instances} instances listed, "
                             f"found instance ids {sorted(ids)} in {images[image_id].shard}")
    return tails


def _write_coco(buf: io.StringIO, images: dict[str, _Image], tails: dict[str, list[tuple[int, str]]],
                classes: list[str]) -> int:
    """Write the COCO document into ``buf`` piece by piece; returns the number of annotations."""
    order = sorted(images)
    buf.write('{"images": [')
    for number, image_id in enumerate(order, start=1):
        image = images[image_id]
        buf.write(",\n" if number > 1 else "\n")
        buf.write(json.dumps({"id": number, "file_name": image_id, "height": image.height, "width": image.width}))
    buf.write('\n],\n"annotations": [')
    count = 0
    for number, image_id in enumerate(order, start=1):
        for _, tail in sorted(tails[image_id]):
            count += 1
            buf.write(",\n" if count > 1 else "\n")
            buf.write(f'{{"id": {count}, "image_id": {number}, {tail}')
    buf.write('\n],\n"categories": [')
    for class_id, name in enumerate(classes, start=1):
        buf.write(",\n" if class_id > 1 else "\n")
        buf.write(json.dumps({"id": class_id, "name": name, "supercategory": "object"}))
    buf.write("\n]}\n")
    return count


def export_coco(labels_dir: str, classes: list[str], out_uri: str | None = None) -> dict[str, Any]:
    """Write the COCO instance annotations of the labels version at ``labels_dir``.

    Args:
        labels_dir: URI of a labels version holding ``images/`` and ``instances/`` Parquet shards
            (IMAGE_SCHEMA, INSTANCE_SCHEMA of :mod:`pipeline.stages.synthesis`).
        classes: the C class names; class id c in 1..C is ``classes[c - 1]``.
        out_uri: where to write; default ``<labels_dir>/coco.json``. Written atomically.
    Returns: {"uri", "num_images", "num_annotations", "num_categories"}.
    Raises: ValueError if an image is listed twice, an instance's class is outside 1..C, a mask
        size differs from its image, or an image's instances do not match its num_instances.
    """
    out_uri = out_uri or storage.join(labels_dir, "coco.json")
    images = _read_images(labels_dir)
    tails = _annotation_tails(labels_dir, images, len(classes))
    buf = io.StringIO()
    count = _write_coco(buf, images, tails, classes)
    del tails  # the annotations now live in buf; free them before the bytes copy
    storage.write_bytes(out_uri, buf.getvalue().encode("utf-8"))
    log.info("wrote %s: %d images, %d annotations", out_uri, len(images), count)
    return {"uri": out_uri, "num_images": len(images), "num_annotations": count, "num_categories": len(classes)}
