"""The images of a labels version most in doubt, packaged for a person to correct them.

``write_review`` writes to a folder (local or s3://):

* ``ranking.csv``: every image of the version, most in doubt first (ties by id): image_id, source
  (irnet | human), doubt and each signal of pipeline.algorithms.doubt (empty for images labelled
  before doubt existed, which rank last; images people corrected come after all others);
* the ``worst`` first images' labels (never a corrected one) as pre-annotations an annotation tool loads as they are:
  ``coco``: ``annotations.json`` in COCO 1.0 form (CVAT's "COCO 1.0" import): ``file_name`` is
  ``<image_id><ext>`` as ``jobs.export --format coco --with-images`` names the images, one polygon
  annotation per instance with its score and doubt; ``labelstudio``: ``tasks.json``, one task per
  image with its labels as a prediction of polygons (percent coordinates, the tool's convention),
  for a labelling config with ``<Image name="image">`` and ``<PolygonLabels name="label">``;
* with ``with_images``, the images themselves under ``images/`` (by ``file_name``).
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
from pycocotools import mask as mask_utils

from pipeline import label_tables
from pipeline.algorithms import doubt
from pipeline.algorithms.polygons import mask_to_polygons
from pipeline.data.classes import Vocabulary
from pipeline.io import codecs, layout, storage, tables
from pipeline.stages.coco import image_file_name

FORMATS = ("coco", "labelstudio")
SIGNAL_COLUMNS = [f"doubt_{name}" for name in doubt.SIGNALS]


def ranking(labels_dir: str) -> pa.Table:
    """The version's index, most in doubt first; ties (and rows without a doubt) by image id; the
    images people corrected last. Columnar: a version of 10^7 images is sorted without a Python
    object per row."""
    index = tables.conform(codecs.read_parquet(layout.index_file(labels_dir)), label_tables.INDEX_SCHEMA)
    index = index.set_column(index.schema.get_field_index("source"), "source",
                             pc.fill_null(index.column("source"), "irnet"))
    human = pc.equal(index.column("source"), "human")
    return index.append_column("__human", human).sort_by(
        [("__human", "ascending"), ("doubt", "descending", "at_end"), ("image_id", "ascending", "at_end")]
    ).drop_columns(["__human"])


def _write_ranking_csv(ranked: pa.Table, uri: str) -> None:
    """``ranking.csv``: image_id, source, doubt and the signals (4 decimals), streamed out in batches."""
    columns = {"image_id": ranked.column("image_id"), "source": ranked.column("source")}
    for name, column in zip(["doubt", *doubt.SIGNALS], ["doubt", *SIGNAL_COLUMNS]):
        values = ranked.column(column).cast(pa.float64())
        columns[name] = pc.if_else(pc.is_null(values), "", pc.cast(pc.round(values, 4), pa.string()))
    with storage.open_output(uri) as f:
        pa_csv.write_csv(pa.table(columns), f, pa_csv.WriteOptions(quoting_style="needed"))


def _instances(labels_dir: str, rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """The instance rows of ``rows``' images, by image id, in instance id order."""
    wanted: dict[str, list[str]] = {}
    for row in rows:
        wanted.setdefault(storage.resolve(row["instances_uri"], labels_dir), []).append(row["image_id"])
    found: dict[str, list[dict[str, Any]]] = {}
    for uri, ids in wanted.items():
        for instance in codecs.read_parquet(uri, filters=[("image_id", "in", ids)]).to_pylist():
            found.setdefault(instance["image_id"], []).append(instance)
    return {k: sorted(v, key=lambda r: r["instance_id"]) for k, v in found.items()}


def _polygons(instance: dict[str, Any]) -> list[np.ndarray]:
    """(x, y) polygons of an instance row's mask, on pixel edges (COCO's and the tools' convention)."""
    mask = mask_utils.decode({"size": [instance["height"], instance["width"]],
                              "counts": instance["rle_counts"].encode()}).astype(bool)
    return [xy + 0.5 for xy in mask_to_polygons(mask)]


def coco_document(rows: list[dict[str, Any]], instances: dict[str, list[dict[str, Any]]],
                  classes: list[str]) -> dict[str, Any]:
    images, annotations = [], []
    for number, row in enumerate(rows, start=1):
        images.append({"id": number, "file_name": image_file_name(row["image_id"], row["uri"]),
                       "width": row["width"], "height": row["height"]})
        for instance in instances.get(row["image_id"], []):
            polygons = [xy.ravel().round(2).tolist() for xy in _polygons(instance) if len(xy) >= 3]
            if not polygons:
                continue
            annotations.append({"id": len(annotations) + 1, "image_id": number, "category_id": instance["class_id"],
                                "segmentation": polygons, "area": float(instance["area"]),
                                "bbox": [round(float(v), 2) for v in instance["bbox"]], "iscrowd": 0,
                                "score": round(float(instance["score"]), 4),
                                "attributes": {"doubt": None if instance.get("doubt") is None
                                               else round(float(instance["doubt"]), 4)}})
    return {"images": images, "annotations": annotations, "categories": Vocabulary(classes).categories()}


def labelstudio_tasks(rows: list[dict[str, Any]], instances: dict[str, list[dict[str, Any]]], classes: list[str],
                      version: str, image_url: str) -> list[dict[str, Any]]:
    """Label Studio tasks with the labels as predictions; ``image_url`` is formatted with
    ``file_name`` (where the tool finds the image)."""
    vocabulary, tasks = Vocabulary(classes), []
    for row in rows:
        height, width = row["height"], row["width"]
        results = []
        for instance in instances.get(row["image_id"], []):
            for part, xy in enumerate(_polygons(instance)):
                if len(xy) < 3:
                    continue
                points = [[round(100 * x / width, 3), round(100 * y / height, 3)] for x, y in xy]
                results.append({"id": f"{row['image_id']}-{instance['instance_id']}-{part}", "type": "polygonlabels",
                                "from_name": "label", "to_name": "image", "original_width": width,
                                "original_height": height, "score": round(float(instance["score"]), 4),
                                "value": {"points": points,
                                          "polygonlabels": [vocabulary.name(instance["class_id"])]}})
        file_name = image_file_name(row["image_id"], row["uri"])
        doubt_value = None if row["doubt"] is None else round(float(row["doubt"]), 4)
        tasks.append({"data": {"image": image_url.format(file_name=file_name), "image_id": row["image_id"],
                               "doubt": doubt_value},
                      "predictions": [{"model_version": version, "result": results,
                                       "score": None if doubt_value is None else round(1 - doubt_value, 4)}]})
    return tasks


def write_review(root: str, version: str, out: str, *, worst: int, fmt: str, classes: list[str],
                 with_images: bool = False, image_url: str = "/data/local-files/?d=images/{file_name}") -> dict:
    """Write the review package of ``version`` to ``out``; returns what was written."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown review format {fmt!r}; formats: {', '.join(FORMATS)}")
    labels_dir = layout.labels_dir(root, version)
    ranked = ranking(labels_dir)
    _write_ranking_csv(ranked, storage.join(out, "ranking.csv"))
    labelled_by_irnet = ranked.num_rows - (pc.sum(pc.equal(ranked.column("source"), "human")).as_py() or 0)
    chosen = ranked.slice(0, min(worst, labelled_by_irnet)).to_pylist()  # corrected images are not in doubt
    instances = _instances(labels_dir, chosen)
    if fmt == "coco":
        document = coco_document(chosen, instances, classes)
        storage.write_text(storage.join(out, "annotations.json"), json.dumps(document))
        annotations = len(document["annotations"])
    else:
        tasks = labelstudio_tasks(chosen, instances, classes, version, image_url)
        storage.write_text(storage.join(out, "tasks.json"), json.dumps(tasks))
        annotations = sum(len(t["predictions"][0]["result"]) for t in tasks)
    if with_images:
        for row in chosen:
            storage.copy(row["uri"], storage.join(out, "images", image_file_name(row["image_id"], row["uri"])))
    doubts = [r["doubt"] for r in chosen if r["doubt"] is not None]
    return {"version": version, "images": len(chosen), "ranked": ranked.num_rows, "annotations": annotations,
            "doubt_range": (min(doubts), max(doubts)) if doubts else (math.nan, math.nan)}
