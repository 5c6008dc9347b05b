"""Tests for pipeline.stages.coco: a hand-built labels version exported and read by pycocotools."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from pipeline.io.layout import part_name
from pipeline.stages.coco import export_coco
from pipeline.stages.synthesis import IMAGE_SCHEMA, INSTANCE_SCHEMA

CLASSES = ["cat", "dog", "car"]


def _masks() -> dict[str, list[tuple[int, float, np.ndarray]]]:
    """image_id -> [(class_id, score, bool mask [H, W])]; img-c has no instances."""
    a1 = np.zeros((10, 14), bool)
    a1[2:6, 3:9] = True
    a2 = np.zeros((10, 14), bool)
    a2[5:10, 10:14] = True
    a2[0, 0] = True  # two components: one instance need not be connected
    b1 = np.zeros((12, 9), bool)
    b1[1:11, 4] = True
    b1[6, :] = True
    return {"img-a": [(1, 0.9, a1), (3, 0.25, a2)], "img-b": [(2, 0.5, b1)], "img-c": []}


def _rows(image_id: str, instances) -> tuple[dict, list[dict]]:
    size = (10, 14) if image_id == "img-a" else (12, 9) if image_id == "img-b" else (8, 8)
    image = {"image_id": image_id, "uri": f"/data/{image_id}.jpg", "height": size[0], "width": size[1],
             "num_instances": len(instances)}
    rows = []
    for i, (class_id, score, mask) in enumerate(instances):
        rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        rows.append({"image_id": image_id, "instance_id": i + 1, "class_id": class_id, "score": score,
                     "area": int(mask.sum()), "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                     "rle_counts": rle["counts"].decode("ascii"), "height": size[0], "width": size[1]})
    return image, rows


def _write_labels(root, groups: list[list[str]], *, reverse_rows: bool = False) -> str:
    """A labels dir with one images shard and one instances shard (same name) per group."""
    masks = _masks()
    for group in groups:
        images, instances = [], []
        for image_id in group:
            image, rows = _rows(image_id, masks[image_id])
            images.append(image)
            instances += rows[::-1] if reverse_rows else rows
        name = part_name(group)
        for sub, rows, schema in (("instances", instances, INSTANCE_SCHEMA), ("images", images, IMAGE_SCHEMA)):
            (root / sub).mkdir(parents=True, exist_ok=True)
            pq.write_table(pa.Table.from_pylist(rows, schema=schema), str(root / sub / name))
    return str(root)


def test_export_coco_round_trips_through_pycocotools(tmp_path):
    labels = _write_labels(tmp_path / "v1", [["img-b", "img-a"], ["img-c"]])
    summary = export_coco(labels, CLASSES)
    assert summary == {"uri": f"{labels}/coco.json", "num_images": 3, "num_annotations": 3, "num_categories": 3}

    coco = COCO(summary["uri"])
    assert [(im["id"], im["file_name"], im["height"], im["width"]) for im in coco.dataset["images"]] == [
        (1, "img-a", 10, 14), (2, "img-b", 12, 9), (3, "img-c", 8, 8)]
    assert [(c["id"], c["name"]) for c in coco.loadCats(coco.getCatIds())] == [(1, "cat"), (2, "dog"), (3, "car")]
    assert coco.getAnnIds(imgIds=[3]) == []
    by_name = {im["file_name"]: im["id"] for im in coco.dataset["images"]}
    for image_id, instances in _masks().items():
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[by_name[image_id]]))
        assert len(anns) == len(instances)
        for ann, (class_id, score, mask) in zip(anns, instances):
            np.testing.assert_array_equal(coco.annToMask(ann), mask.astype(np.uint8))
            assert ann["category_id"] == class_id and ann["score"] == score and ann["iscrowd"] == 0
            assert ann["area"] == mask.sum()
            ys, xs = np.nonzero(mask)
            assert ann["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
    assert [a["id"] for a in coco.dataset["annotations"]] == [1, 2, 3]


def test_export_coco_bytes_do_not_depend_on_shards(tmp_path):
    first = export_coco(_write_labels(tmp_path / "a", [["img-b", "img-a"], ["img-c"]]), CLASSES)
    second = export_coco(_write_labels(tmp_path / "b", [["img-c", "img-a"], ["img-b"]], reverse_rows=True), CLASSES,
                         out_uri=str(tmp_path / "out" / "b.json"))
    assert second["uri"] == str(tmp_path / "out" / "b.json")
    assert (tmp_path / "a" / "coco.json").read_bytes() == (tmp_path / "out" / "b.json").read_bytes()
    assert first["num_annotations"] == second["num_annotations"] == 3


def test_export_coco_ignores_instances_of_unfinished_batches(tmp_path):
    labels = _write_labels(tmp_path / "v", [["img-a"], ["img-b", "img-c"]])
    # A crashed batch: its instances shard exists (another batching of img-a) but no images shard.
    _, rows = _rows("img-a", _masks()["img-a"])
    pq.write_table(pa.Table.from_pylist(rows[:1], schema=INSTANCE_SCHEMA),
                   str(tmp_path / "v" / "instances" / part_name(["img-a", "img-x"])))
    summary = export_coco(labels, CLASSES)
    assert summary["num_annotations"] == 3
    data = json.loads((tmp_path / "v" / "coco.json").read_text())
    assert [a["image_id"] for a in data["annotations"]] == [1, 1, 2]


def test_export_coco_rejects_inconsistent_labels(tmp_path):
    labels = _write_labels(tmp_path / "v", [["img-a", "img-b", "img-c"]])
    with pytest.raises(ValueError, match="class_id 3"):
        export_coco(labels, CLASSES[:2])
    (tmp_path / "v" / "instances" / part_name(["img-a", "img-b", "img-c"])).unlink()
    with pytest.raises(ValueError, match="img-a"):
        export_coco(labels, CLASSES)
