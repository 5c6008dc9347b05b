"""jobs.review on the session's labelled run: every image ranked by doubt, the worst ones' labels
as pre-annotations that pycocotools (COCO 1.0, as CVAT imports it) and Label Studio's task format
read back into the same masks."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from scipy import ndimage

from jobs import review
from pipeline import label_tables, ledger
from pipeline.algorithms import doubt
from pipeline.io import codecs, layout, storage

pytestmark = pytest.mark.slow


def _version(root: str) -> tuple[str, list[dict]]:
    version = ledger.latest_version(root)
    return version, label_tables.read_index(layout.labels_dir(root, version)).to_pylist()


def _instance_masks(root: str, version: str, image_id: str) -> dict[int, np.ndarray]:
    labels_dir = layout.labels_dir(root, version)
    (row,) = [r for r in label_tables.read_index(labels_dir).to_pylist() if r["image_id"] == image_id]
    rows = codecs.read_parquet(storage.resolve(row["instances_uri"], labels_dir),
                               filters=[("image_id", "==", image_id)])
    return {r["instance_id"]: mask_utils.decode({"size": [r["height"], r["width"]], "counts": r["rle_counts"].encode()})
            .astype(bool) for r in rows.to_pylist()}


def test_the_ranking_and_coco_pre_annotations_of_the_worst_images(labelled, tmp_path):
    root = labelled["root"]
    version, index = _version(root)
    assert all(r["doubt"] is not None and 0 <= r["doubt"] <= 1 for r in index)
    assert all(r[f"doubt_{name}"] is not None for r in index for name in doubt.SIGNALS)
    out = tmp_path / "review"
    summary = review.main(["--root", root, "--worst", "3", "--out", str(out), "--with-images"])
    with open(out / "ranking.csv") as f:
        ranked = list(csv.DictReader(f))
    order = [(-float(r["doubt"]), r["image_id"]) for r in ranked]
    assert order == sorted(order) and len(ranked) == len(index)  # most in doubt first, ties by id
    assert list(ranked[0]) == ["image_id", "source", "doubt", *doubt.SIGNALS]
    coco = COCO(str(out / "annotations.json"))
    images = coco.dataset["images"]
    assert [im["file_name"].rsplit(".", 1)[0] for im in images] == [r["image_id"] for r in ranked[:3]]
    assert summary["images"] == 3 and summary["annotations"] == len(coco.dataset["annotations"])
    for image in images:
        assert (out / "images" / image["file_name"]).exists()
        masks = _instance_masks(root, version, image["file_name"].rsplit(".", 1)[0])
        annotations = coco.loadAnns(coco.getAnnIds(imgIds=[image["id"]]))
        assert len(annotations) == len(masks)
        for annotation, mask in zip(annotations, masks.values()):
            drawn = coco.annToMask(annotation).astype(bool)
            # Polygons simplified by <= 0.5 px: every pixel they get wrong touches the mask's outline.
            outline = ndimage.binary_dilation(mask) & ~ndimage.binary_erosion(mask)
            assert not ((drawn ^ mask) & ~outline).any()
            if mask.sum() >= 100:
                assert (drawn & mask).sum() / (drawn | mask).sum() > 0.85


def test_label_studio_tasks_hold_the_labels_as_polygon_predictions(labelled, tmp_path):
    root = labelled["root"]
    version, _ = _version(root)
    review.main(["--root", root, "--worst", "2", "--out", str(tmp_path), "--format", "labelstudio"])
    tasks = json.loads((tmp_path / "tasks.json").read_text())
    assert len(tasks) == 2
    for task in tasks:
        (prediction,) = task["predictions"]
        assert prediction["model_version"] == version and 0 <= prediction["score"] <= 1
        masks = _instance_masks(root, version, task["data"]["image_id"])
        for result in prediction["result"]:
            assert result["type"] == "polygonlabels" and result["from_name"] == "label"
            points = np.array(result["value"]["points"])
            assert points.min() >= 0 and points.max() <= 100 and len(points) >= 3
        assert {r["id"].rsplit("-", 2)[1] for r in prediction["result"]} <= {str(i) for i in masks}
    with pytest.raises(SystemExit):
        review.main(["--root", root, "--worst", "0", "--out", str(tmp_path / "x")])
