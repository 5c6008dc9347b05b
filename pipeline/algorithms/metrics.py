"""Evaluation of pseudo labels: semantic mIoU and VOC-style instance mask AP (AP^r).

Semantic: a confusion matrix over background + C classes accumulated over images, then per-class
IoU. Instance: detections of one class over all images ranked by score, matched greedily to ground
truth masks of that class, and the area under the interpolated precision-recall curve (the VOC
2010+ "all points" rule), as the paper's Table 1 and 3 report it (AP^r at IoU 0.5 and 0.7).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["confusion", "mean_iou", "mask_iou", "average_precision", "mask_ap"]


def confusion(pred, gt, num_classes: int) -> np.ndarray:
    """Confusion matrix of one label map (sum the results to accumulate over images).

    Args:
        pred: int [...] predicted labels (any shape equal to ``gt``).
        gt: int [...] ground truth labels; 255 (and any other value outside 0..num_classes−1)
            is ignored.
        num_classes: number of labels including background (C + 1 for VOC: 21).

    Returns:
        int64 [num_classes, num_classes], entry [g, p] = number of pixels with gt g predicted p.
        Pixels whose prediction is outside 0..num_classes−1 are ignored as well.
    """
    pred = np.asarray(pred).astype(np.int64).ravel()
    gt = np.asarray(gt).astype(np.int64).ravel()
    if pred.shape != gt.shape:
        raise ValueError(f"pred and gt differ in size: {pred.size} vs {gt.size}")
    valid = (gt >= 0) & (gt < num_classes) & (pred >= 0) & (pred < num_classes)
    counts = np.bincount(gt[valid] * num_classes + pred[valid], minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def mean_iou(confusion_matrix) -> dict:
    """Per-class IoU and their mean from a confusion matrix (rows = gt, columns = pred).

    IoU_c = TP_c / (GT_c + Pred_c − TP_c). A class that appears in neither the ground truth nor the
    predictions has no IoU (None in the list) and is left out of the mean; every other class counts,
    including classes only predicted (IoU 0). With no class present at all the mean is NaN.

    Returns:
        {"per_class": list of length num_classes of float in [0, 1] or None, "mean": float}.
    """
    matrix = np.asarray(confusion_matrix, dtype=np.float64)
    tp = np.diag(matrix)
    union = matrix.sum(0) + matrix.sum(1) - tp
    present = union > 0
    iou = np.divide(tp, union, out=np.zeros_like(tp), where=present)
    per_class = [float(v) if p else None for v, p in zip(iou, present)]
    mean = float(iou[present].mean()) if present.any() else float("nan")
    return {"per_class": per_class, "mean": mean}


def mask_iou(masks_a, masks_b) -> np.ndarray:
    """Pairwise IoU of two sets of binary masks via one matrix product.

    Args:
        masks_a: bool [N, H, W]; masks_b: bool [M, H, W].

    Returns:
        float64 [N, M] in [0, 1] (0 where both masks are empty).
    """
    a = np.asarray(masks_a, dtype=bool)
    b = np.asarray(masks_b, dtype=bool)
    if a.shape[1:] != b.shape[1:]:
        raise ValueError(f"mask sizes differ: {a.shape[1:]} vs {b.shape[1:]}")
    flat_a = a.reshape(a.shape[0], -1).astype(np.float64)
    flat_b = b.reshape(b.shape[0], -1).astype(np.float64)
    inter = flat_a @ flat_b.T
    union = flat_a.sum(1)[:, None] + flat_b.sum(1)[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def average_precision(is_tp, num_gt: int) -> float:
    """Area under the interpolated precision-recall curve ("all points", VOC 2010+).

    Args:
        is_tp: bool [D], detections already sorted by decreasing score, True = true positive.
        num_gt: number of ground truth instances (> 0).

    Returns:
        AP in [0, 1]: Σ over recall steps of (r_i − r_{i−1}) · max precision at recall ≥ r_i.
    """
    hits = np.asarray(is_tp, dtype=np.float64)
    tp = np.cumsum(hits)
    fp = np.cumsum(1.0 - hits)
    recall = np.concatenate([[0.0], tp / num_gt, [1.0]])
    precision = np.concatenate([[0.0], tp / np.maximum(tp + fp, np.finfo(np.float64).eps), [0.0]])
    precision = np.maximum.accumulate(precision[::-1])[::-1]
    steps = np.flatnonzero(recall[1:] != recall[:-1])
    return float(np.sum((recall[steps + 1] - recall[steps]) * precision[steps + 1]))


def mask_ap(
    pred_masks: Sequence,
    pred_classes: Sequence,
    pred_scores: Sequence,
    gt_masks: Sequence,
    gt_classes: Sequence,
    *,
    iou_threshold: float = 0.5,
) -> dict:
    """VOC-style instance mask AP (AP^r) over a set of images.

    Detections of each class over all images are ranked by decreasing score (ties keep input
    order). Each detection is compared with the ground truth masks of its class in its image; as in
    the VOC devkit (and chainercv, which the official evaluation uses), it is a true positive when
    the ground truth with the highest IoU reaches ``iou_threshold`` and has not been matched by a
    higher-ranked detection; otherwise (IoU too low, or that ground truth already taken) it is a
    false positive. Every argument is a list with one entry per image.

    Args:
        pred_masks: per image bool [N, H, W].
        pred_classes: per image int [N] class ids.
        pred_scores: per image float [N].
        gt_masks: per image bool [M, H, W] (same H, W as the image's predictions).
        gt_classes: per image int [M] class ids.
        iou_threshold: minimum mask IoU of a true positive (0.5 for AP^r_50, 0.7 for AP^r_70).

    Returns:
        {"per_class": {class_id: AP in [0, 1]} for every class with at least one ground truth
        instance (classes only predicted are left out), "mean": mean of those APs (NaN if none)}.
    """
    n_images = len(pred_masks)
    if not all(len(seq) == n_images for seq in (pred_classes, pred_scores, gt_masks, gt_classes)):
        raise ValueError("mask_ap arguments must be lists of equal length (one entry per image)")
    accumulator = MaskAPAccumulator(iou_thresholds=(iou_threshold,))
    for image in range(n_images):
        accumulator.add(pred_masks[image], pred_classes[image], pred_scores[image], gt_masks[image],
                        gt_classes[image])
    return accumulator.result()[iou_threshold]


def image_records(pred_masks, pred_classes, pred_scores, gt_masks, gt_classes, *,
                  iou_thresholds: Sequence[float]) -> tuple[list[int], list[tuple[float, int, tuple[int, ...]]]]:
    """What AP needs of one image: its ground-truth classes, and per detection (score, class, and
    per IoU threshold the best same-class ground truth it reaches, or -1)."""
    classes = np.asarray(pred_classes, dtype=np.int64).reshape(-1)
    scores = np.asarray(pred_scores, dtype=np.float64).reshape(-1)
    truth = np.asarray(gt_classes, dtype=np.int64).reshape(-1)
    best_per_threshold = [np.full(classes.shape[0], -1, dtype=np.int64) for _ in iou_thresholds]
    if classes.size and truth.size:
        iou = mask_iou(pred_masks, gt_masks)
        iou = np.where(classes[:, None] == truth[None, :], iou, -1.0)
        best, best_iou = iou.argmax(axis=1), iou.max(axis=1)
        best_per_threshold = [np.where(best_iou < t, -1, best) for t in iou_thresholds]
    detections = [(float(scores[d]), int(classes[d]), tuple(int(b[d]) for b in best_per_threshold))
                  for d in range(classes.shape[0])]
    return [int(c) for c in truth], detections


class MaskAPAccumulator:
    """Streaming form of :func:`mask_ap`: add one image at a time, keep only per-detection records.

    Memory is O(detections), not O(pixels), so a whole evaluation set can stream through it; one
    pass serves several IoU thresholds.
    """

    def __init__(self, *, iou_thresholds: Sequence[float] = (0.5,)):
        self.thresholds = tuple(float(t) for t in iou_thresholds)
        self.gt_count: dict[int, int] = {}
        # Per detection: (score, class, image index, best same-class gt per threshold or -1).
        self.detections: list[tuple[float, int, int, tuple[int, ...]]] = []
        self.images = 0

    def add(self, pred_masks, pred_classes, pred_scores, gt_masks, gt_classes) -> None:
        """One image: pred bool [N, H, W], int [N], float [N]; gt bool [M, H, W], int [M]."""
        self.extend(*image_records(pred_masks, pred_classes, pred_scores, gt_masks, gt_classes,
                                   iou_thresholds=self.thresholds))

    def extend(self, gt_classes: list[int], detections: list[tuple[float, int, tuple[int, ...]]]) -> None:
        """One image's :func:`image_records` (computed anywhere, e.g. in a worker)."""
        for cls in gt_classes:
            self.gt_count[int(cls)] = self.gt_count.get(int(cls), 0) + 1
        for score, cls, hits in detections:
            self.detections.append((float(score), int(cls), self.images, tuple(int(h) for h in hits)))
        self.images += 1

    def result(self) -> dict[float, dict]:
        """{iou_threshold: {"per_class": {class_id: AP}, "mean": float}} as in :func:`mask_ap`."""
        out = {}
        for t_index, threshold in enumerate(self.thresholds):
            per_class = {}
            for cls in sorted(self.gt_count):
                mine = [det for det in self.detections if det[1] == cls]
                order = np.argsort([-det[0] for det in mine], kind="stable")
                matched: set[tuple[int, int]] = set()
                is_tp = np.zeros(len(mine), dtype=bool)
                for rank, pos in enumerate(order):
                    _, _, image, hits = mine[pos]
                    target = hits[t_index]
                    if target >= 0 and (image, target) not in matched:
                        matched.add((image, target))
                        is_tp[rank] = True
                per_class[cls] = average_precision(is_tp, self.gt_count[cls])
            mean = float(np.mean(list(per_class.values()))) if per_class else float("nan")
            out[threshold] = {"per_class": per_class, "mean": mean}
        return out


def classification_map(scores, targets) -> dict:
    """Multi-label classification mAP: per-class AP of ranking images by score.

    Args:
        scores: float [N, C] class scores (any monotone scale, e.g. sigmoid outputs).
        targets: {0, 1} [N, C] ground-truth tags.
    Returns: {"per_class": [AP or None (class never present)], "mean": mean over present classes}.
    """
    scores = np.asarray(scores, dtype=np.float64)
    targets = np.asarray(targets).astype(bool)
    per_class = []
    for c in range(scores.shape[1]):
        positives = int(targets[:, c].sum())
        if positives == 0:
            per_class.append(None)
            continue
        order = np.argsort(-scores[:, c], kind="stable")
        per_class.append(average_precision(targets[order, c], positives))
    present = [ap for ap in per_class if ap is not None]
    return {"per_class": per_class, "mean": float(np.mean(present)) if present else float("nan")}
