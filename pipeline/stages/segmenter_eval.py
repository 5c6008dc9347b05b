"""Evaluation of a trained segmenter on the held-out images with ground truth (paper Tables 3-4).

DeepLab: mIoU with the paper's multi-scale + flip inference (scales 0.5, 1.0, 1.5, 2.0; the
softmax of the image and its flip at every scale, resized to the image and averaged). Mask R-CNN:
the project's VOC-style mask AP at each IoU threshold (as the labels are scored) and COCO's mask AP
(pycocotools COCOeval, AP@[.5:.95], AP50, AP75). Runs in one Ray task: evaluation sets are small.
"""

from __future__ import annotations

import contextlib
import io
import json
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils

from pipeline.algorithms.metrics import MaskAPAccumulator, confusion, mean_iou
from pipeline.data.classes import Vocabulary
from pipeline.data.images import UNREADABLE, read_inputs, unreadable_reason
from pipeline.data.segmentation import instance_masks
from pipeline.data.transforms import normalize
from pipeline.models.store import load_segmenter


@torch.no_grad()
def multiscale_flip_probs(net: torch.nn.Module, image: np.ndarray, scales: list[float],
                          device: torch.device | None = None) -> torch.Tensor:
    """Class probabilities float [C + 1, H, W] of one image (uint8 [H, W, 3]): softmax of the image
    and of its flipped-back flip at every scale, bilinearly resized to H x W, averaged."""
    height, width = image.shape[:2]
    x = torch.from_numpy(normalize(image))[None].to(device or torch.device("cpu"))
    total = None
    for scale in scales:
        size = (max(1, round(height * scale)), max(1, round(width * scale)))
        scaled = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        logits = net(torch.cat([scaled, scaled.flip(-1)]))["out"]
        logits = F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False)
        probs = logits.softmax(dim=1)
        probs = probs[0] + probs[1].flip(-1)
        total = probs if total is None else total + probs
    return total / (2 * len(scales))


def _coco_ap(gt_images: list[dict], gt_annotations: list[dict], detections: list[dict], classes: list[str],
             ) -> dict[str, float]:
    """COCO mask AP (AP@[.5:.95], AP50, AP75) of ``detections`` against the ground truth."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if not detections or not gt_annotations:
        return {"coco_ap": 0.0, "coco_ap50": 0.0, "coco_ap75": 0.0}
    gt = COCO()
    gt.dataset = {"images": gt_images, "annotations": gt_annotations,
                  "categories": Vocabulary(classes).categories()}
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        evaluation = COCOeval(gt, gt.loadRes([dict(d) for d in detections]), "segm")  # loadRes adds keys
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    stats = [max(0.0, float(v)) for v in evaluation.stats[:3]]  # -1 means "no ground truth here"
    return {"coco_ap": stats[0], "coco_ap50": stats[1], "coco_ap75": stats[2]}


def _rle(mask: np.ndarray) -> dict[str, Any]:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}


@torch.no_grad()
def evaluate_segmenter(model_uri: str, rows: list[dict[str, Any]], classes: list[str], *, scales: list[float],
                       mask_threshold: float, iou_thresholds: list[float], max_pixels: int,
                       threads: int = 1) -> dict[str, Any]:
    """Task: the metrics of the exported segmenter at ``model_uri`` on ``rows`` (uri, semantic_uri
    and instance_uri of the ground truth, instance_classes JSON), on a GPU when the task has one,
    else with ``threads`` torch threads (the CPUs the task holds).
    An image whose files do not decode or whose ground truth differs in size is skipped and counted."""
    torch.set_num_threads(max(1, threads))  # a reused Ray worker keeps the thread count it started with
    net, meta = load_segmenter(model_uri)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    net = net.to(device)
    model = meta["network"]
    matrix = np.zeros((len(classes) + 1, len(classes) + 1), np.int64)
    ap = MaskAPAccumulator(iou_thresholds=iou_thresholds)
    gt_images, gt_annotations, detections, skipped = [], [], [], []
    for number, row in enumerate(rows, start=1):
        try:
            image, gt = read_inputs(row["uri"], row["semantic_uri" if model == "deeplab" else "instance_uri"],
                                    max_pixels=max_pixels, label_name="ground truth")
        except UNREADABLE as err:
            skipped.append(f"{row['uri']}: {unreadable_reason(err)}")
            continue
        if model == "deeplab":
            pred = multiscale_flip_probs(net, image, scales, device).argmax(dim=0).cpu().numpy().astype(np.uint8)
            matrix += confusion(pred, gt, len(classes) + 1)
            continue
        gt_masks, gt_classes = instance_masks(gt, {int(k): v for k, v in json.loads(row["instance_classes"]).items()})
        x = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).to(device).float() / 255.0
        out = {k: v.cpu() for k, v in net([x])[0].items()}
        masks = (out["masks"][:, 0] > mask_threshold).numpy()
        labels, scores = out["labels"].numpy(), out["scores"].numpy()
        ap.add(masks, labels, scores, gt_masks, gt_classes)
        gt_images.append({"id": number, "height": image.shape[0], "width": image.shape[1]})
        for mask, cls in zip(gt_masks, gt_classes):
            rle = _rle(mask)
            gt_annotations.append({"id": len(gt_annotations) + 1, "image_id": number, "category_id": int(cls),
                                   "segmentation": rle, "area": float(mask.sum()), "iscrowd": 0,
                                   "bbox": [float(v) for v in mask_utils.toBbox(mask_utils.encode(
                                       np.asfortranarray(mask.astype(np.uint8))))]})
        detections += [{"image_id": number, "category_id": int(c), "segmentation": _rle(m), "score": float(s)}
                       for m, c, s in zip(masks, labels, scores)]
    counts = {"images": len(rows) - len(skipped), "skipped": skipped}
    if model == "deeplab":
        iou = mean_iou(matrix)
        return {**counts, "miou": iou["mean"], "per_class_iou": dict(zip(["background", *classes], iou["per_class"]))}
    result = ap.result()
    return {**counts, **{f"ap{int(round(100 * t))}": result[t]["mean"] for t in iou_thresholds},
            **_coco_ap(gt_images, gt_annotations, detections, classes)}
