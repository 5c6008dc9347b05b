"""COCO export by streaming: hand-built labels versions (committed as synthesis commits them)
written by pipeline.stages.coco.write_coco and read back by pycocotools."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from pipeline import label_tables
from pipeline.io import codecs, layout, storage
from pipeline.stages.coco import coco_part, write_coco
from pipeline.stages.synthesis import instance_rows

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


SIZES = {"img-a": (10, 14), "img-b": (12, 9), "img-c": (8, 8)}


def _commit(labels_dir: str, group: list[str], *, reverse: bool = False) -> list[dict]:
    """Commit ``group`` as one synthesis batch; returns its images rows."""
    images, instances = [], []
    for image_id in group:
        masks = _masks()[image_id]
        stack = np.stack([m for _, _, m in masks]) if masks else np.zeros((0,) + SIZES[image_id], bool)
        rows = instance_rows(image_id, stack, np.array([c for c, _, _ in masks]), np.array([s for _, s, _ in masks]))
        instances += rows[::-1] if reverse else rows
        images.append({"image_id": image_id, "key": f"k-{image_id}", "uri": f"/data/{image_id}.jpg",
                       "height": SIZES[image_id][0], "width": SIZES[image_id][1], "class_ids": [],
                       "num_instances": len(masks), "semantic_uri": f"semantic/{image_id}.png",
                       "instance_uri": f"instance/{image_id}.png", "instances_uri": None,
                       "fg_fraction": 0.0, "cam_fraction": 0.0})
    label_tables.commit_labels(labels_dir, images, instances, coco_part(instances))
    return images


def _version(tmp_path, name: str, groups: list[list[str]], **kwargs) -> str:
    labels_dir = str(tmp_path / name)
    for group in groups:
        _commit(labels_dir, group, **kwargs)
    index = label_tables.labelled_rows(labels_dir).sort_by("image_id")
    codecs.write_parquet(layout.index_file(labels_dir), index)
    return labels_dir


def test_write_coco_round_trips_through_pycocotools(tmp_path):
    labels = _version(tmp_path, "v1", [["img-b", "img-a"], ["img-c"]])
    summary = write_coco(labels, CLASSES)
    assert summary["num_images"] == 3 and summary["num_annotations"] == 3 and summary["num_categories"] == 3
    assert summary["annotations_per_category"] == {"cat": 1, "dog": 1, "car": 1}
    coco = COCO(summary["uri"])
    assert sorted((im["file_name"], im["height"], im["width"]) for im in coco.dataset["images"]) == [
        ("img-a", 10, 14), ("img-b", 12, 9), ("img-c", 8, 8)]
    assert sorted(im["id"] for im in coco.dataset["images"]) == [1, 2, 3]
    assert [(c["id"], c["name"]) for c in coco.loadCats(coco.getCatIds())] == [(1, "cat"), (2, "dog"), (3, "car")]
    by_name = {im["file_name"]: im["id"] for im in coco.dataset["images"]}
    assert coco.getAnnIds(imgIds=[by_name["img-c"]]) == []
    for image_id, instances in _masks().items():
        anns = sorted(coco.loadAnns(coco.getAnnIds(imgIds=[by_name[image_id]])), key=lambda a: a["id"])
        assert len(anns) == len(instances)
        for ann, (class_id, score, mask) in zip(anns, instances):
            np.testing.assert_array_equal(coco.annToMask(ann), mask.astype(np.uint8))
            assert ann["category_id"] == class_id and ann["score"] == score and ann["iscrowd"] == 0
            assert ann["area"] == mask.sum()
            ys, xs = np.nonzero(mask)
            assert ann["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
    assert sorted(a["id"] for a in coco.dataset["annotations"]) == [1, 2, 3]


def test_write_coco_bytes_do_not_depend_on_row_order_within_shards(tmp_path):
    first = write_coco(_version(tmp_path, "a", [["img-b", "img-a", "img-c"]]), CLASSES)
    labels_b = _version(tmp_path, "b", [["img-c", "img-a", "img-b"]], reverse=True)
    second = write_coco(labels_b, CLASSES, out_uri=str(tmp_path / "out" / "b.json"))
    assert second["uri"] == str(tmp_path / "out" / "b.json")
    assert (tmp_path / "a" / "coco.json").read_bytes() == (tmp_path / "out" / "b.json").read_bytes()
    assert first["num_annotations"] == second["num_annotations"] == 3


def test_a_version_that_references_an_earlier_one_reads_its_parts(tmp_path):
    v1 = _version(tmp_path, "v1", [["img-a", "img-b"]])
    v2 = str(tmp_path / "v2")
    _commit(v2, ["img-c"])
    reused = label_tables.read_index(v1)
    for column in label_tables.URI_COLUMNS:
        reused = reused.set_column(reused.schema.get_field_index(column), column,
                                   label_tables.relative_to_sibling(reused.column(column), "v1"))
    index = pa.concat_tables([reused, label_tables.labelled_rows(v2)]).sort_by("image_id")
    codecs.write_parquet(layout.index_file(v2), index)
    assert index.column("semantic_uri").to_pylist() == ["../v1/semantic/img-a.png", "../v1/semantic/img-b.png",
                                                        "semantic/img-c.png"]
    summary = write_coco(v2, CLASSES)
    assert summary["num_images"] == 3 and summary["num_annotations"] == 3
    coco = COCO(summary["uri"])
    assert sorted(im["file_name"] for im in coco.dataset["images"]) == ["img-a", "img-b", "img-c"]
    assert not storage.list_files(str(tmp_path / "v2" / "semantic"))  # nothing was copied


def test_file_names_with_extensions_for_exports_with_images(tmp_path):
    labels = _version(tmp_path, "v1", [["img-a"]])
    write_coco(labels, CLASSES, out_uri=str(tmp_path / "c.json"), file_names="id+ext")
    assert [im["file_name"] for im in json.loads((tmp_path / "c.json").read_text())["images"]] == ["img-a.jpg"]


def test_write_coco_rejects_a_part_that_does_not_match_the_index(tmp_path):
    labels = _version(tmp_path, "v", [["img-a", "img-b", "img-c"]])
    (part,) = [u for u in storage.list_files(str(tmp_path / "v" / "instances")) if u.endswith(".coco.tsv")]
    lines = storage.read_text(part).splitlines()
    storage.write_text(part, "\n".join(line for line in lines if not line.startswith("img-a")) + "\n")
    with pytest.raises(ValueError, match="img-a"):
        write_coco(labels, CLASSES)
    assert not (tmp_path / "v" / "coco.json").exists()  # a failed stream leaves no file behind


def test_rle_in_parts_decodes_to_the_masks():
    rows = instance_rows("x", np.stack([_masks()["img-a"][0][2]]), np.array([1]), np.array([0.5]))
    image_id, body = coco_part(rows).decode().rstrip("\n").split("\t")
    ann = json.loads(body)
    mask = mask_utils.decode({"size": ann["segmentation"]["size"], "counts": ann["segmentation"]["counts"].encode()})
    assert image_id == "x" and np.array_equal(mask.astype(bool), _masks()["img-a"][0][2])
