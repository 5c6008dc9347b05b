"""Doubt without ground truth (pipeline.algorithms.doubt) on hand-made labels, and its place in a
version's index (ranked within the version; null for rows labelled before it existed)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from pipeline import label_tables
from pipeline.algorithms import doubt
from pipeline.io import tables


def _square(size=32, box=(8, 24, 8, 24)):
    mask = np.zeros((size, size), bool)
    mask[box[0]:box[1], box[2]:box[3]] = True
    return mask


def _scores(semantic, winner=0.9, runner_up=0.25):
    """Class scores [2, H, W] that ``semantic`` (one class, id 1) is the argmax of."""
    labelled = semantic == 1
    return np.stack([np.full(semantic.shape, 0.25, np.float32),
                     np.where(labelled, winner, runner_up * 0.5).astype(np.float32)])


def test_labels_that_follow_the_cam_and_a_boundary_are_doubted_less():
    mask = _square()
    semantic = mask.astype(np.uint8)
    cams = np.zeros((1, 8, 8), np.float32)
    cams[0, 2:6, 2:6] = 1.0  # hot exactly where the object is (stride 4)
    boundary = np.zeros((8, 8), np.float32)
    boundary[2:6, 2:6] = 1.0
    boundary[3:5, 3:5] = 0.0  # a ring of boundary along the object's outline
    good = doubt.image_signals(semantic, mask[None], np.array([0.9]), cams, [1], boundary, _scores(semantic))
    assert good["weak_outline"] == 0.0 and good["cam_outside"] == 0.0 and good["fragments"] == 0.0
    assert good["walk_margin"] == pytest.approx(1 - (0.9 - 0.25))
    assert abs(good["low_score"] - 0.1) < 1e-6 and good["count_mismatch"] == 0.0
    # The labels cover half the hot area, end where IRNet sees no boundary, and score low.
    half = _square(box=(8, 16, 8, 24))
    bad = doubt.image_signals(half.astype(np.uint8), half[None], np.array([0.3]), cams, [1], np.zeros((8, 8)),
                              _scores(half.astype(np.uint8), winner=0.3))
    assert bad["cam_outside"] == 0.5 and bad["weak_outline"] == 1.0 and bad["low_score"] > good["low_score"]
    # Tags without any instance: nothing to trust.
    nothing = np.zeros((32, 32), np.uint8)
    empty = doubt.image_signals(nothing, np.zeros((0, 32, 32), bool), np.zeros(0), cams, [1], boundary,
                                _scores(nothing))
    assert empty["low_score"] == 1.0 and empty["cam_outside"] == 1.0 and empty["walk_margin"] == 1.0
    assert set(empty) == set(doubt.SIGNALS) and bad["walk_margin"] > good["walk_margin"]


def test_walk_margin_reads_the_runner_up_on_labelled_pixels_only():
    semantic = np.array([[1, 1, 2, 2],
                         [1, 1, 2, 2],
                         [0, 0, 255, 255]], np.uint8)
    scores = np.zeros((3, 3, 4), np.float32)  # background, class 1, class 2
    scores[0] = 0.25
    scores[1, :2, :2], scores[2, :2, :2] = 0.9, 0.4  # class 1 by 0.5
    scores[2, :2, 2:], scores[1, :2, 2:] = 0.5, 0.45  # class 2 by 0.05 over class 1
    scores[1, 2] = 0.0  # background rows (margin 0.25) and ignored pixels do not count
    assert doubt.walk_margin(semantic, scores) == pytest.approx(1 - (0.5 + 0.05) / 2)
    scores[0, 0, 0] = 0.85  # background becomes the runner-up on one pixel
    assert doubt.walk_margin(semantic, scores) == pytest.approx(1 - (3 * 0.5 + 0.05 + 4 * 0.05) / 8)
    assert doubt.walk_margin(np.zeros((3, 4), np.uint8), scores) == 1.0


def test_a_fragmented_instance_is_doubted():
    mask = _square(box=(2, 6, 2, 6)) | _square(box=(20, 28, 20, 28))
    doubts, weak, fragmented = doubt.instance_doubt(np.stack([mask, _square()]), np.array([0.8, 0.8]), None)
    assert fragmented.tolist() == [1.0, 0.0] and doubts[0] > doubts[1]


def test_version_doubt_ranks_within_the_version():
    combined = ("low_score", "weak_outline", "cam_outside")
    signals = np.zeros((4, len(doubt.SIGNALS)))
    for name, column in zip(combined, ([0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1], [0.0, 0.0, 0.5, 0.9])):
        signals[:, doubt.SIGNALS.index(name)] = column
    ranked = doubt.version_doubt(signals, combined=combined)
    # Percentile ranks (0, 1/3, 2/3, 1), (1, 2/3, 1/3, 0), (1/6, 1/6, 2/3, 1) (a tie shares its mean).
    np.testing.assert_allclose(ranked, [7 / 18, 7 / 18, 5 / 9, 2 / 3])
    assert np.all((doubt.version_doubt(signals) >= 0) & (doubt.version_doubt(signals) <= 1))
    # A row labelled before a signal existed is ranked on the signals it has; the others rank
    # that signal among themselves.
    signals[1, doubt.SIGNALS.index("low_score")] = np.nan
    again = doubt.version_doubt(signals, combined=combined)
    assert again[1] == pytest.approx((2 / 3 + 1 / 6) / 2) and again[3] == pytest.approx(2 / 3)
    signals[1] = np.nan  # a row without any signal gets no doubt
    again = doubt.version_doubt(signals, combined=combined)
    assert np.isnan(again[1]) and not np.isnan(again[[0, 2, 3]]).any()


def test_rows_labelled_before_doubt_existed_conform_with_null_doubt():
    old = pa.table({"image_id": ["a"], "key": ["k"]})
    conformed = tables.conform(old, label_tables.INDEX_SCHEMA)
    assert conformed.schema == label_tables.INDEX_SCHEMA and conformed.column("doubt").to_pylist() == [None]
