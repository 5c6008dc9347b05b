"""Tests for pipeline.algorithms.metrics: confusion/mIoU and VOC-style mask AP."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.algorithms.metrics import average_precision, confusion, mask_ap, mask_iou, mean_iou


def test_confusion_counts_and_ignores():
    gt = np.array([[0, 0, 1, 1], [2, 2, 255, 1]])
    pred = np.array([[0, 1, 1, 1], [2, 0, 2, 7]])  # 7: outside range, ignored
    matrix = confusion(pred, gt, 3)
    assert matrix.dtype == np.int64
    np.testing.assert_array_equal(matrix, [[1, 1, 0], [0, 2, 0], [1, 0, 1]])


def test_mean_iou_of_known_confusion():
    matrix = np.array([[3, 1, 0, 0], [0, 2, 0, 0], [0, 0, 0, 0], [0, 0, 2, 0]])
    result = mean_iou(matrix)
    # class 0: TP 3, gt 4, pred 3 -> 3 / 4; class 1: TP 2, gt 2, pred 3 -> 2 / 3;
    # class 2: only predicted (2 pixels of gt 3) -> 0 / 2 = 0; class 3: gt 2, never right -> 0.
    assert result["per_class"] == pytest.approx([0.75, 2 / 3, 0.0, 0.0])
    assert result["mean"] == pytest.approx((0.75 + 2 / 3) / 4)
    # Absent from both gt and prediction: no IoU, not in the mean.
    result = mean_iou(np.array([[3, 1, 0], [0, 2, 0], [0, 0, 0]]))
    assert result["per_class"][2] is None
    assert result["mean"] == pytest.approx((0.75 + 2 / 3) / 2)
    assert math.isnan(mean_iou(np.zeros((2, 2)))["mean"])


def test_mask_iou_by_hand():
    a = np.zeros((2, 4, 4), bool)
    a[0, :2, :2] = True  # 4 pixels
    a[1] = True  # 16 pixels
    b = np.zeros((1, 4, 4), bool)
    b[0, :2, :] = True  # 8 pixels, overlaps a[0] by 4 and a[1] by 8
    np.testing.assert_allclose(mask_iou(a, b), [[4 / 8], [8 / 16]])


def _block(row, col, size=(2, 2), shape=(8, 8)):
    mask = np.zeros(shape, bool)
    mask[row:row + size[0], col:col + size[1]] = True
    return mask


def test_mask_ap_known_ranking():
    # Class 1 has 4 ground truth instances: A, B in image 0 and C, D in image 1.
    # Detections by score: 0.9 = A (TP), 0.8 = empty place (FP), 0.7 = C (TP),
    # 0.6 = A again (duplicate, FP), 0.5 = B (TP); D is never found.
    # precision 1/1, 1/2, 2/3, 2/4, 3/5 at recall .25, .25, .50, .50, .75.
    # Interpolated precision (max at recall ≥ r): 1 at .25, max(2/3, 2/4, 3/5) = 2/3 at .50,
    # 3/5 at .75, and 0 for recall (.75, 1]. AP = .25·1 + .25·2/3 + .25·3/5 = 0.5666...
    A, B, C, D = _block(0, 0), _block(4, 4), _block(0, 4), _block(6, 0)
    nothing = _block(2, 2)
    gt_masks = [np.stack([A, B]), np.stack([C, D])]
    gt_classes = [np.array([1, 1]), np.array([1, 1])]
    pred_masks = [np.stack([A, nothing, A, B]), np.stack([C])]
    pred_classes = [np.array([1, 1, 1, 1]), np.array([1])]
    pred_scores = [np.array([0.9, 0.8, 0.6, 0.5]), np.array([0.7])]
    result = mask_ap(pred_masks, pred_classes, pred_scores, gt_masks, gt_classes)
    expected = 0.25 * 1 + 0.25 * 2 / 3 + 0.25 * 3 / 5
    assert result["per_class"] == {1: pytest.approx(expected)}
    assert result["mean"] == pytest.approx(expected)


def test_mask_ap_classes_and_threshold():
    gt_mask = _block(0, 0, size=(4, 5))  # 20 pixels
    partial = _block(0, 0, size=(4, 3))  # 12 pixels inside it: IoU 0.6
    gt_masks = [np.stack([gt_mask, _block(6, 6)])]
    gt_classes = [np.array([2, 3])]  # class 3 is never detected -> AP 0
    # A class-4 detection has no ground truth: excluded from per_class and the mean.
    # A class-3 detection on the class-2 object does not match (classes differ).
    pred_masks = [np.stack([partial, _block(6, 6), gt_mask])]
    pred_classes = [np.array([2, 4, 3])]
    pred_scores = [np.array([0.9, 0.8, 0.7])]
    args = (pred_masks, pred_classes, pred_scores, gt_masks, gt_classes)
    at_50 = mask_ap(*args, iou_threshold=0.5)
    assert at_50["per_class"] == {2: 1.0, 3: 0.0}
    assert at_50["mean"] == pytest.approx(0.5)
    at_70 = mask_ap(*args, iou_threshold=0.7)
    assert at_70["per_class"] == {2: 0.0, 3: 0.0}


def test_mask_ap_images_without_predictions_or_gt():
    empty = np.zeros((0, 8, 8), bool)
    result = mask_ap(
        [empty, np.stack([_block(0, 0)])], [np.zeros(0, int), np.array([1])], [np.zeros(0), np.array([0.3])],
        [np.stack([_block(0, 0)]), empty], [np.array([1]), np.zeros(0, int)],
    )
    assert result["per_class"] == {1: 0.0}  # the only detection is in the wrong image
    assert math.isnan(mask_ap([], [], [], [], [])["mean"])


def test_average_precision_edges():
    assert average_precision([True, True], 2) == pytest.approx(1.0)
    assert average_precision([], 3) == 0.0
    # FP first, then TP: precision 1/2 at recall 1.
    assert average_precision([False, True], 1) == pytest.approx(0.5)


def test_streaming_accumulator_matches_mask_ap_at_every_threshold():
    from pipeline.algorithms.metrics import MaskAPAccumulator, mask_ap

    rng = np.random.default_rng(5)
    images = []
    for _ in range(4):
        gt = rng.random((3, 12, 12)) > 0.6
        pred = np.concatenate([gt[:2] ^ (rng.random((2, 12, 12)) > 0.8), rng.random((2, 12, 12)) > 0.5])
        images.append((pred, rng.integers(1, 3, 4), rng.random(4), gt, rng.integers(1, 3, 3)))
    acc = MaskAPAccumulator(iou_thresholds=(0.3, 0.5, 0.7))
    for image in images:
        acc.add(*image)
    result = acc.result()
    for threshold in (0.3, 0.5, 0.7):
        expected = mask_ap(*[list(x) for x in zip(*images)], iou_threshold=threshold)
        assert result[threshold]["per_class"] == expected["per_class"]
    assert result[0.3]["mean"] >= result[0.7]["mean"]


def test_classification_map_of_a_known_ranking():
    from pipeline.algorithms.metrics import classification_map

    scores = np.array([[0.9, 0.1], [0.8, 0.7], [0.3, 0.2], [0.1, 0.9]])
    targets = np.array([[1, 0], [0, 1], [1, 0], [0, 0]])
    # Class 0 ranking: TP, FP, TP -> AP = (1/2)*1 + (1/2)*(2/3) = 0.8333.
    # Class 1 ranking: FP (0.9), TP (0.7) -> AP = 1 * (1/2) = 0.5.
    result = classification_map(scores, targets)
    assert np.allclose(result["per_class"], [5 / 6, 0.5]) and np.isclose(result["mean"], (5 / 6 + 0.5) / 2)
    assert classification_map(scores, np.zeros((4, 2)))["per_class"] == [None, None]
