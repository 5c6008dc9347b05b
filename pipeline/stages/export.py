"""Materialise a labels version as a plain folder, and delete versions no one keeps.

``export_version`` writes a VOC-style folder (``SegmentationClass/``, ``SegmentationObject/``,
``ImageSets/Segmentation/all.txt``, and ``coco.json``), a COCO folder (``coco.json`` and, with
images, ``images/``) or a YOLO segmentation folder (``labels/<id>.txt`` polygons, ``data.yaml``,
``images/``); each with ``sources.csv`` (which images carry people's corrections). Files are
written by Ray tasks (copied server-side on object stores), so the driver only plans. ``retain`` deletes published versions older than the last K and every output of them
that no kept version's index references.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import yaml

from pipeline import label_tables, ledger, tasks
from pipeline.algorithms.polygons import mask_to_polygons
from pipeline.io import codecs, layout, storage
from pipeline.progress import StageProgress
from pipeline.stages.coco import image_file_name, write_coco

log = logging.getLogger(__name__)
FORMATS = ("voc", "coco", "yolo")


def voc_object_png(instance_png: bytes) -> bytes:
    """A 16-bit instance-id PNG as VOC's SegmentationObject: 8-bit palette PNG, 0 background,
    instance k as index k. More than 254 instances cannot be written this way."""
    ids = codecs.decode_label_png(instance_png)
    if ids.size and int(ids.max()) > 254:
        raise ValueError(f"{int(ids.max())} instances do not fit an 8-bit VOC SegmentationObject PNG")
    return codecs.encode_semantic_png(ids.astype(np.uint8))


def export_rows(batch: dict[str, np.ndarray], *, labels_dir: str, out: str, fmt: str,
                with_images: bool) -> dict[str, np.ndarray]:
    """Task: write one block of index rows into the export folder."""
    statuses = []
    for image_id, uri, semantic_uri, instance_uri in zip(batch["image_id"], batch["uri"], batch["semantic_uri"],
                                                         batch["instance_uri"]):
        image_id = str(image_id)
        if fmt == "voc":
            storage.copy(storage.resolve(str(semantic_uri), labels_dir),
                         storage.join(out, "SegmentationClass", f"{image_id}.png"))
            instance = storage.read_bytes(storage.resolve(str(instance_uri), labels_dir))
            storage.write_bytes(storage.join(out, "SegmentationObject", f"{image_id}.png"), voc_object_png(instance))
        if with_images:
            folder = "JPEGImages" if fmt == "voc" else "images"  # coco, yolo
            storage.copy(str(uri), storage.join(out, folder, image_file_name(image_id, str(uri))))
        statuses.append("exported")
    return tasks.status_batch(statuses)


def yolo_lines(instances: list[dict], height: int, width: int, *, tolerance: float = 0.5) -> str:
    """YOLO segmentation label text of an image's instance rows: one line per connected part of
    each instance, ``class x1 y1 x2 y2 ...`` with 0-based class and coordinates in [0, 1] of the
    image's width/height (pixel edges; holes are kept by a zero-width cut, see
    pipeline.algorithms.polygons)."""
    from pycocotools import mask as mask_utils

    lines = []
    for row in sorted(instances, key=lambda r: r["instance_id"]):
        mask = mask_utils.decode({"size": [row["height"], row["width"]], "counts": row["rle_counts"].encode()})
        for xy in mask_to_polygons(mask.astype(bool), tolerance=tolerance):
            coords = np.column_stack([(xy[:, 0] + 0.5) / width, (xy[:, 1] + 0.5) / height]).clip(0, 1).ravel()
            lines.append(f"{row['class_id'] - 1} " + " ".join(f"{v:.6f}" for v in coords))
    return "".join(line + "\n" for line in lines)


def export_yolo_shard(batch: dict[str, np.ndarray], *, labels_dir: str, out: str) -> dict[str, np.ndarray]:
    """Task per instance shard: the YOLO label files of its images."""
    statuses = []
    for shard, ids, heights, widths in zip(batch["instances_uri"], batch["image_id_list"], batch["height_list"],
                                           batch["width_list"]):
        rows = codecs.read_parquet(storage.resolve(str(shard), labels_dir), filters=[("image_id", "in", list(ids))])
        by_image: dict[str, list[dict]] = {}
        for row in rows.to_pylist():
            by_image.setdefault(row["image_id"], []).append(row)
        for image_id, height, width in zip(ids, heights, widths):
            storage.write_text(storage.join(out, "labels", f"{image_id}.txt"),
                               yolo_lines(by_image.get(str(image_id), []), int(height), int(width)))
            statuses.append("exported")
    return tasks.status_batch(statuses)


def _index_columns(labels_dir: str) -> tuple[pa.Table, int]:
    table = label_tables.read_index(labels_dir, ["image_id", "uri", "semantic_uri", "instance_uri"])
    return table, table.num_rows


def _yolo_groups(labels_dir: str) -> pa.Table:
    index = label_tables.read_index(labels_dir, ["image_id", "instances_uri", "height", "width"])
    return index.group_by("instances_uri").aggregate([("image_id", "list"), ("height", "list"), ("width", "list")])


def export_version(root: str, version: str, out: str, *, fmt: str, classes: list[str], with_images: bool = False,
                   io_cpus: float = 0.25) -> dict[str, Any]:
    """Write labels version ``version`` of ``root`` to the folder ``out`` in format ``fmt``."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; formats: {', '.join(FORMATS)}")
    labels_dir = layout.labels_dir(root, version)
    if not storage.exists(layout.index_file(labels_dir)):
        raise FileNotFoundError(f"labels version {version!r} has no index in {root} (not published?)")
    rows_ref, count_ref = tasks.run_task(_index_columns, labels_dir, num_returns=2, num_cpus=io_cpus)
    total = tasks.get(count_ref)
    if fmt == "voc" or with_images:
        ds = tasks.dataset(rows_ref, 64).map_batches(
            export_rows, batch_size=64, batch_format="numpy", num_cpus=io_cpus,
            fn_kwargs={"labels_dir": labels_dir, "out": out, "fmt": fmt, "with_images": with_images})
        tasks.summarise(ds, StageProgress(f"export {fmt}", total))
    tasks.get(tasks.run_task(_write_sources, labels_dir, out, num_cpus=io_cpus))
    if fmt == "voc":
        tasks.get(tasks.run_task(_write_image_set, rows_ref, out, num_cpus=io_cpus))
    if fmt == "yolo":
        ds = tasks.dataset(tasks.run_task(_yolo_groups, labels_dir, num_cpus=io_cpus), 1).map_batches(
            export_yolo_shard, batch_size=1, batch_format="numpy", num_cpus=1,
            fn_kwargs={"labels_dir": labels_dir, "out": out})
        tasks.summarise(ds, StageProgress("export yolo labels", total))
        storage.write_text(storage.join(out, "data.yaml"), yaml.safe_dump(
            {"path": out, "train": "images", "val": "images", "names": dict(enumerate(classes))}, sort_keys=False))
        return {"images": total, "annotations": None, "out": out, "format": fmt}
    names = "id+ext" if with_images else "id"
    coco = tasks.get(tasks.run_task(write_coco, labels_dir, classes, out_uri=storage.join(out, "coco.json"),
                                      file_names=names, num_cpus=io_cpus))
    return {"images": total, "annotations": coco["num_annotations"], "out": out, "format": fmt}


def _write_sources(labels_dir: str, out: str) -> None:
    """``sources.csv``: image_id, source (irnet | human) and the correction of every image."""
    index = label_tables.read_index(labels_dir, ["image_id", "source", "correction"])
    index = index.set_column(1, "source", pc.fill_null(index.column("source"), "irnet"))
    with storage.open_output(storage.join(out, "sources.csv")) as f:
        pa_csv.write_csv(index, f)


def _write_image_set(rows: pa.Table, out: str) -> None:
    ids = rows.column("image_id").to_pylist()
    storage.write_text(storage.join(out, "ImageSets", "Segmentation", "all.txt"), "".join(f"{i}\n" for i in ids))


def _referenced(kept_dirs: list[str], version: str) -> set[str]:
    """Paths (relative to ``labels/<version>/``) that the indexes of the kept versions use."""
    used: set[str] = set()
    prefix = f"../{version}/"
    for directory in kept_dirs:
        index = label_tables.read_index(directory, list(label_tables.URI_COLUMNS))
        own = directory.rstrip("/").rsplit("/", 1)[-1] == version
        for column in label_tables.URI_COLUMNS:
            for uri in index.column(column).to_pylist():
                if uri.startswith(prefix):
                    used.add(uri[len(prefix):])
                elif own and not uri.startswith("../"):
                    used.add(uri)
    # An instance shard is used with its COCO part.
    used |= {u.removesuffix(".parquet") + ".coco.tsv" for u in used if u.startswith("instances/")}
    return used


def delete_unreferenced(root: str, version: str, kept: list[str]) -> int:
    """Task: delete the files of ``labels/<version>/`` that no kept version references; their count."""
    directory = layout.labels_dir(root, version)
    used = _referenced([layout.labels_dir(root, v) for v in kept], version)
    doomed = []
    for sub in ("", "semantic", "instance", "instances", "images"):
        for uri in storage.list_files(storage.join(directory, sub) if sub else directory):
            relative = uri[len(directory):].lstrip("/")
            if relative not in used:
                doomed.append(uri)
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(storage.remove, doomed))
    if not used:
        storage.remove(directory, recursive=True)
    return len(doomed)


def retain(state: ledger.RunState, root: str, keep: int, *, io_cpus: float = 0.25) -> dict[str, Any]:
    """Keep the last ``keep`` published versions (LATEST always), delete older published versions'
    unreferenced outputs and every abandoned unpublished version; returns what was removed."""
    if keep < 1:
        raise ValueError("keep must be >= 1: LATEST is always kept")
    published = sorted(state.labels["versions"])
    latest = ledger.latest_version(root)
    kept = [v for v in published[-keep:]]
    if latest and latest not in kept:
        kept.append(latest)
    pending = (state.labels.get("pending") or {}).get("name")
    on_disk = [d.rstrip("/").rsplit("/", 1)[-1] for d in storage.list_dirs(layout.labels_root(root))]
    doomed = [v for v in on_disk if v not in kept and v != pending]
    removed = {}
    for version in doomed:
        removed[version] = tasks.get(tasks.run_task(delete_unreferenced, root, version, kept, num_cpus=io_cpus))
        state.labels["versions"].pop(version, None)
        state.save()
    return {"kept": kept, "removed_files": removed}
