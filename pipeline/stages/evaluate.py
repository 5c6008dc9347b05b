"""Evaluation of a labels directory against the manifest's ground truth (DESIGN §4 "Evaluation").

Semantic: confusion over background + C classes (GT 255 ignored) -> mIoU. Instance: VOC-style mask
AP at each IoU threshold. Images stream through one at a time; only the confusion matrix and the
per-detection match records are kept.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from pipeline.algorithms.metrics import MaskAPAccumulator, confusion, mean_iou
from pipeline.data.manifest import ManifestRow
from pipeline.io import codecs, layout, storage

log = logging.getLogger(__name__)


def _predicted_instances(labels_dir: str, image_ids: set[str]) -> dict[str, list[dict[str, Any]]]:
    """Instance rows of ``image_ids`` from the labels' instance shards, grouped by image."""
    grouped: dict[str, list[dict[str, Any]]] = defaultdict(list)
    committed = {u.rsplit("/", 1)[-1] for u in storage.list_files(storage.join(labels_dir, "images"), ".parquet")}
    for uri in storage.list_files(storage.join(labels_dir, "instances"), ".parquet"):
        if uri.rsplit("/", 1)[-1] not in committed:
            continue  # left by a batch that died before its images shard: not part of the labels
        for row in codecs.read_parquet(uri).to_pylist():
            if row["image_id"] in image_ids:
                grouped[row["image_id"]].append(row)
    return grouped


def decode_instances(rows: list[dict[str, Any]], size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Instance rows (COCO RLE) -> masks bool [N, H, W], class ids int [N], scores float [N]."""
    if not rows:
        return np.zeros((0,) + size, bool), np.zeros(0, np.int64), np.zeros(0, np.float32)
    masks = np.stack([mask_utils.decode({"size": [r["height"], r["width"]], "counts": r["rle_counts"].encode()})
                      .astype(bool) for r in rows])
    return masks, np.array([r["class_id"] for r in rows]), np.array([r["score"] for r in rows], np.float32)


def gt_instances(row: ManifestRow, classes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Ground-truth masks bool [M, H, W] and class ids [M] (instance id i has class i-1 in the list)."""
    ids = codecs.decode_label_png(storage.read_bytes(row.gt_instance_uri))
    index = {name: i + 1 for i, name in enumerate(classes)}
    masks, class_ids = [], []
    for instance_id, name in enumerate(row.gt_instance_classes, start=1):
        mask = ids == instance_id
        if mask.any() and name in index:
            masks.append(mask)
            class_ids.append(index[name])
    if not masks:
        return np.zeros((0,) + ids.shape, bool), np.zeros(0, np.int64)
    return np.stack(masks), np.array(class_ids)


def evaluate_labels(labels_dir: str, rows: list[ManifestRow], classes: list[str], *,
                    iou_thresholds: list[float]) -> dict[str, Any]:
    """mIoU and mask AP of the labels in ``labels_dir`` on the rows that have ground truth."""
    rows = [r for r in rows if r.has_ground_truth]
    predicted = _predicted_instances(labels_dir, {r.image_id for r in rows})
    matrix = np.zeros((len(classes) + 1, len(classes) + 1), np.int64)
    ap = MaskAPAccumulator(iou_thresholds=iou_thresholds)
    semantic_images = instance_images = missing = 0
    for row in rows:
        semantic_uri = layout.semantic_png(labels_dir, row.image_id)
        if not storage.exists(semantic_uri):
            missing += 1  # quarantined or not labelled: reported, not scored
            continue
        pred = codecs.decode_label_png(storage.read_bytes(semantic_uri))
        if row.gt_semantic_uri:
            gt = codecs.decode_label_png(storage.read_bytes(row.gt_semantic_uri))
            if gt.shape != pred.shape:
                log.warning("%s: ground truth %s and labels %s differ in size; skipped", row.image_id,
                            gt.shape, pred.shape)
                continue
            matrix += confusion(pred, gt, len(classes) + 1)
            semantic_images += 1
        if row.gt_instance_uri:
            gt_masks, gt_classes = gt_instances(row, classes)
            ap.add(*decode_instances(predicted.get(row.image_id, []), pred.shape), gt_masks, gt_classes)
            instance_images += 1
    iou = mean_iou(matrix)
    ap_result = ap.result()
    return {
        "images": {"semantic": semantic_images, "instance": instance_images, "missing_labels": missing},
        "miou": iou["mean"] if semantic_images else None,
        "per_class_iou": {name: iou["per_class"][i] for i, name in enumerate(["background", *classes])}
        if semantic_images else {},
        "ap": {f"{t:g}": (ap_result[t]["mean"] if instance_images else None) for t in iou_thresholds},
        "per_class_ap": {f"{t:g}": {classes[c - 1]: v for c, v in ap_result[t]["per_class"].items()}
                         for t in iou_thresholds} if instance_images else {},
    }


def cam_classification_map(root: str, rows: list[ManifestRow], classes: list[str], *, max_images: int) -> dict[str, Any] | None:
    """Classification mAP of the trained CAM network on held-out (split 'val') images, or None."""
    from pipeline.algorithms.metrics import classification_map
    from pipeline.data.images import ImageDecodeError, decode_image
    from pipeline.train.cam import multi_hot, predict_scores
    from pipeline.train.common import load_trained

    held_out = [r for r in rows if r.split == "val"][:max_images]
    if not held_out:
        return None
    net = load_trained(root, "cam", num_classes=len(classes))
    images, targets = [], []
    for row in held_out:
        try:
            images.append(decode_image(storage.read_bytes(row.uri)))
        except (ImageDecodeError, OSError):
            continue  # quarantined by the CAM stage
        targets.append(multi_hot(row.labels, classes))
    if not images:
        return None
    result = classification_map(predict_scores(net, images), np.stack(targets))
    chance = float(np.mean([t.mean() for t in np.stack(targets).T]))
    return {"images": len(images), "map": result["mean"], "chance": chance,
            "per_class": dict(zip(classes, result["per_class"]))}
