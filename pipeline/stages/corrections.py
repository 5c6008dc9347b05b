"""Human corrections of labels: read, validated whole, stored immutably under ``corrections/``.

A correction file is a COCO JSON (the form ``jobs.export --format coco`` and ``jobs.review`` write:
``file_name`` is the image id, with or without the image's extension; segmentations as RLE or
polygons; categories by name) or a VOC folder (``SegmentationClass/<id>.png`` with class ids and
``SegmentationObject/<id>.png`` with instance ids, 255 ignored). An image present in the file has
all of its instances there; an image with none is background.

Everything is checked before anything is stored: an image id the run's manifest does not list, a
class the run does not have, a mask that leaves its image or a size that is not the image's, a
malformed or truncated file: :class:`CorrectionError` names the entry, and nothing is written.
A valid file becomes ``corrections/<stamp>-<key>/`` (key: a hash of its content): the PNGs, the
instance rows, then ``images.parquet``, which commits it. Images equal to their current
correction are left out (:func:`unchanged`; a file with nothing new stores nothing). Nothing there
is ever rewritten; the newest correction of an image wins (plan.current_corrections); the next
labelling run's version carries it verbatim (label_tables.apply_corrections).
"""

from __future__ import annotations

import calendar
import hashlib
import json
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pycocotools import mask as mask_utils

from pipeline import label_tables, ledger, plan
from pipeline.data.classes import Vocabulary
from pipeline.data.images import image_size, read_label
from pipeline.io import codecs, layout, storage
from pipeline.stages import coco

IGNORE = 255


class CorrectionError(ValueError):
    """A correction file that cannot be taken; the message names the entry and what is wrong."""


@dataclass
class Corrected:
    """One image's human labels: semantic class ids [H, W] (0 background, 255 ignored) and
    instances (masks bool [N, H, W], class ids [N])."""

    image_id: str
    semantic: np.ndarray
    masks: np.ndarray
    classes: np.ndarray


def _sizes(root: str) -> dict[str, tuple[int, str]]:
    """{image_id: uri} of the run's manifest (the latest run's validated rows)."""
    state = json.loads(storage.read_text(layout.run_json(root)))
    manifest = plan.read_manifest(layout.manifest_dir(root, state["manifest"]["stamp"]), ["image_id", "uri"])
    return dict(zip(manifest.column("image_id").to_pylist(), manifest.column("uri").to_pylist()))


def _image_id(file_name: str, known: dict[str, str], where: str) -> str:
    base = file_name.rsplit("/", 1)[-1]
    for candidate in (base, os.path.splitext(base)[0]):
        if candidate in known:
            return candidate
    raise CorrectionError(f"{where}: image {file_name!r} is not in the run's manifest")


def _decode_segmentation(segmentation: Any, height: int, width: int, where: str) -> np.ndarray:
    if isinstance(segmentation, list):  # polygons [[x1, y1, ...], ...] on pixel edges
        for polygon in segmentation:
            if not isinstance(polygon, list) or len(polygon) < 6 or len(polygon) % 2:
                raise CorrectionError(f"{where}: a polygon needs at least 3 (x, y) points")
            xy = np.asarray(polygon, np.float64).reshape(-1, 2)
            if xy.min() < 0 or (xy[:, 0] > width).any() or (xy[:, 1] > height).any():
                raise CorrectionError(f"{where}: polygon leaves the {width}x{height} image")
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation, dict) and "counts" in segmentation and "size" in segmentation:
        if list(segmentation["size"]) != [height, width]:
            raise CorrectionError(f"{where}: RLE of size {segmentation['size']} on a {height}x{width} image")
        rle = (mask_utils.frPyObjects(segmentation, height, width) if isinstance(segmentation["counts"], list)
               else {"size": [height, width], "counts": segmentation["counts"].encode()
                     if isinstance(segmentation["counts"], str) else segmentation["counts"]})
    else:
        raise CorrectionError(f"{where}: segmentation must be polygons or an RLE")
    try:
        return mask_utils.decode(rle).astype(bool)
    except Exception as err:  # noqa: BLE001 - a malformed RLE string
        raise CorrectionError(f"{where}: RLE does not decode ({err})") from None


def _compose(image_id: str, height: int, width: int, masks: list[np.ndarray], classes: list[int]) -> Corrected:
    """Instances drawn largest first, so a smaller one on top keeps its pixels."""
    order = sorted(range(len(masks)), key=lambda i: -int(masks[i].sum()))
    semantic = np.zeros((height, width), np.uint8)
    stacked = np.zeros((len(masks), height, width), bool)
    for rank, i in enumerate(order):
        semantic[masks[i]] = classes[i]
        stacked[:rank] &= ~masks[i]
        stacked[rank] = masks[i]
    keep = stacked.reshape(len(masks), -1).any(axis=1) if len(masks) else np.zeros(0, bool)
    return Corrected(image_id, semantic, stacked[keep], np.array([classes[i] for i in order], np.int64)[keep])


def read_coco(data: bytes, known: dict[str, str], vocabulary: Vocabulary, size_of) -> list[Corrected]:
    """The corrected images of a COCO JSON document."""
    try:
        document = json.loads(data)
    except (ValueError, UnicodeDecodeError) as err:
        raise CorrectionError(f"not a JSON document ({err})") from None
    if not isinstance(document, dict) or not isinstance(document.get("images"), list):
        raise CorrectionError("not a COCO document: no 'images' list")
    categories = {}
    for category in document.get("categories", []):
        class_id = vocabulary.get(str(category.get("name")))
        if class_id is None:
            raise CorrectionError(f"category {category.get('name')!r} (id {category.get('id')}) is not a class of "
                                  f"this run ({', '.join(vocabulary.names)})")
        categories[category.get("id")] = class_id
    images: dict[Any, tuple[str, int, int]] = {}
    for entry in document["images"]:
        where = f"image {entry.get('id')} ({entry.get('file_name')!r})"
        image_id = _image_id(str(entry.get("file_name", "")), known, where)
        height, width = size_of(image_id)
        if (entry.get("height"), entry.get("width")) not in ((None, None), (height, width)):
            raise CorrectionError(f"{where}: says {entry.get('width')}x{entry.get('height')}, the image is "
                                  f"{width}x{height}")
        images[entry.get("id")] = (image_id, height, width)
    found: dict[Any, tuple[list[np.ndarray], list[int]]] = {key: ([], []) for key in images}
    for number, annotation in enumerate(document.get("annotations", []), start=1):
        where = f"annotation {annotation.get('id', number)}"
        if annotation.get("image_id") not in images:
            raise CorrectionError(f"{where}: image_id {annotation.get('image_id')} is not in 'images'")
        if annotation.get("category_id") not in categories:
            raise CorrectionError(f"{where}: category_id {annotation.get('category_id')} is not in 'categories'")
        image_id, height, width = images[annotation["image_id"]]
        mask = _decode_segmentation(annotation.get("segmentation"), height, width, f"{where} on {image_id}")
        if mask.any():
            found[annotation["image_id"]][0].append(mask)
            found[annotation["image_id"]][1].append(categories[annotation["category_id"]])
    return [_compose(images[key][0], images[key][1], images[key][2], *found[key]) for key in images]


def read_voc(folder: str, known: dict[str, str], vocabulary: Vocabulary, size_of) -> list[Corrected]:
    """The corrected images of a VOC folder (SegmentationClass + SegmentationObject)."""
    out = []
    for uri in storage.list_files(storage.join(folder, "SegmentationClass"), ".png"):
        where = uri.rsplit("/", 1)[-1]
        image_id = _image_id(where, known, f"SegmentationClass/{where}")
        try:
            semantic = codecs.decode_label_png(storage.read_bytes(uri))
            objects = codecs.decode_label_png(storage.read_bytes(storage.join(folder, "SegmentationObject", where)))
        except FileNotFoundError:
            raise CorrectionError(f"SegmentationObject/{where} is missing") from None
        except Exception as err:  # noqa: BLE001 - an unreadable PNG
            raise CorrectionError(f"{where}: not a label PNG ({err})") from None
        height, width = size_of(image_id)
        for name, array in (("SegmentationClass", semantic), ("SegmentationObject", objects)):
            if array.shape != (height, width):
                raise CorrectionError(f"{name}/{where}: {array.shape[1]}x{array.shape[0]}, the image is "
                                      f"{width}x{height}")
        unknown = sorted(set(np.unique(semantic).tolist()) - {0, IGNORE} - set(range(1, len(vocabulary) + 1)))
        if unknown:
            raise CorrectionError(f"SegmentationClass/{where}: class ids {unknown} are not classes of this run")
        masks, classes = [], []
        for object_id in sorted(set(np.unique(objects).tolist()) - {0, IGNORE}):
            mask = objects == object_id
            values, counts = np.unique(semantic[mask & (semantic != 0) & (semantic != IGNORE)], return_counts=True)
            if not len(values):
                raise CorrectionError(f"SegmentationObject/{where}: object {object_id} covers no class pixel")
            masks.append(mask)
            classes.append(int(values[counts.argmax()]))
        corrected = _compose(image_id, height, width, masks, classes)
        corrected.semantic = semantic.astype(np.uint8)  # the person's class map, as drawn
        out.append(corrected)
    if not out:
        raise CorrectionError(f"{folder}: no SegmentationClass/*.png")
    return out


def read_corrections(root: str, source: str, classes: list[str]) -> list[Corrected]:
    """The corrections in ``source`` (a COCO JSON file or a VOC folder), validated against the run."""
    known = _sizes(root)
    version = ledger.latest_version(root)
    index = {}
    if version is not None:
        rows = label_tables.read_index(layout.labels_dir(root, version), ["image_id", "height", "width"]).to_pylist()
        index = {r["image_id"]: (r["height"], r["width"]) for r in rows}

    def size_of(image_id: str) -> tuple[int, int]:
        return index.get(image_id) or image_size(storage.read_bytes(known[image_id]))

    vocabulary = Vocabulary(classes)
    if storage.exists(storage.join(source, "SegmentationClass")):
        found = read_voc(source, known, vocabulary, size_of)
    else:
        try:
            data = storage.read_bytes(source)
        except FileNotFoundError:
            raise CorrectionError(f"{source} does not exist") from None
        found = read_coco(data, known, vocabulary, size_of)
    ids = [c.image_id for c in found]
    if len(ids) != len(set(ids)):
        raise CorrectionError(f"image {next(i for i in ids if ids.count(i) > 1)!r} appears twice")
    return found


def unchanged(root: str, corrected: list[Corrected]) -> set[str]:
    """The ids of the images of ``corrected`` whose labels equal their current stored correction
    (the semantic map, the instance map and the instance count): storing them again would change
    nothing but the correction's name, which makes a new version and retrains IRNet. An annotation
    tool's export taken again each night is stored once."""
    from pipeline.stages.synthesis import instance_id_map

    stored = plan.current_corrections(root)
    mine = pc.is_in(stored.column("image_id"), pa.array([c.image_id for c in corrected], pa.string()))
    current = {r["image_id"]: r for r in stored.filter(mine).to_pylist()}  # rows of this file's images only

    def same(c: Corrected) -> bool:
        row = current.get(c.image_id)
        if row is None or row["num_instances"] != len(c.masks):
            return False
        directory = layout.correction_dir(root, row["correction"])
        semantic = read_label(storage.resolve(row["semantic_uri"], directory))
        if not np.array_equal(semantic, c.semantic):
            return False
        instances = read_label(storage.resolve(row["instance_uri"], directory))
        return np.array_equal(instances, instance_id_map(c.masks, np.ones(len(c.masks)), c.semantic.shape))

    with ThreadPoolExecutor(16) as pool:  # one or two GETs per image that has a correction
        return {c.image_id for c, equal in zip(corrected, pool.map(same, corrected)) if equal}


STAMP = "%Y%m%dT%H%M%SZ"


def _next_stamp(root: str) -> str:
    """Now (UTC, to the second), or one second past the newest stored correction's stamp when now
    is not later: names sort in the order they were stored, so the newest wins even for two
    corrections within one second or a writer whose clock is behind."""
    now = calendar.timegm(time.gmtime())
    names = [d.rstrip("/").rsplit("/", 1)[-1] for d in storage.list_dirs(layout.corrections_root(root))]
    stamps = [name.split("-", 1)[0] for name in names]
    stored = [calendar.timegm(time.strptime(s, STAMP)) for s in stamps if re.fullmatch(r"\d{8}T\d{6}Z", s)]
    return time.strftime(STAMP, time.gmtime(max([now, *(t + 1 for t in stored)])))


def store_corrections(root: str, corrected: list[Corrected], *, note: str = "", source: str = "") -> str:
    """Write ``corrected`` as one immutable correction ``corrections/<stamp>-<key>/``; its name.
    The caller holds the run root's lease (the stamp is chosen after every stored one)."""
    # Here, not at the top: the synthesis stage imports torch (seconds), which checking a file does not need.
    from pipeline.stages.synthesis import instance_id_map, instance_rows

    pngs = {c.image_id: (codecs.encode_semantic_png(c.semantic),
                         codecs.encode_instance_png(instance_id_map(c.masks, np.ones(len(c.masks)), c.semantic.shape)))
            for c in corrected}
    digest = hashlib.sha256()
    for image_id in sorted(pngs):
        digest.update(image_id.encode() + b"\0" + pngs[image_id][0] + pngs[image_id][1])
    stamp = _next_stamp(root)
    name = f"{stamp}-{digest.hexdigest()[:12]}"
    directory = layout.correction_dir(root, name)
    instances, images = [], []
    for c in corrected:
        semantic_png, instance_png = pngs[c.image_id]
        storage.write_bytes(storage.join(directory, "semantic", f"{c.image_id}.png"), semantic_png)
        storage.write_bytes(storage.join(directory, "instance", f"{c.image_id}.png"), instance_png)
        # instance k of the PNG is mask k - 1 (instance_id_map draws ids in mask order)
        instances += instance_rows(c.image_id, c.masks, c.classes, np.ones(len(c.masks)), np.zeros(len(c.masks)))
        images.append({"image_id": c.image_id, "height": c.semantic.shape[0], "width": c.semantic.shape[1],
                       "class_ids": sorted(set(int(k) for k in c.classes)), "num_instances": len(c.masks),
                       "semantic_uri": f"semantic/{c.image_id}.png", "instance_uri": f"instance/{c.image_id}.png",
                       "instances_uri": "instances.parquet", "stamp": stamp, "note": note, "source": source,
                       "fg_fraction": float(((c.semantic != 0) & (c.semantic != IGNORE)).mean())})
    codecs.write_parquet(storage.join(directory, "instances.parquet"),
                         pa.Table.from_pylist(instances, schema=label_tables.INSTANCE_SCHEMA))
    storage.write_bytes(storage.join(directory, "instances" + coco.PART_SUFFIX), coco.coco_part(instances))
    codecs.write_parquet(storage.join(directory, "images.parquet"),  # commits the correction
                         pa.Table.from_pylist(images, schema=label_tables.CORRECTION_SCHEMA))
    return name
