"""Doubt without ground truth (pipeline.algorithms.doubt) on hand-made labels, and its place in a
version's index (ranked within the version; null for rows labelled before it existed)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from pipeline import ledger
from pipeline.algorithms import doubt
from pipeline.io import tables


def _square(size=32, box=(8, 24, 8, 24)):
    mask = np.zeros((size, size), bool)
    mask[box[0]:box[1], box[2]:box[3]] = True
    return mask


def test_labels_that_follow_the_cam_and_a_boundary_are_doubted_less():
    mask = _square()
    semantic = mask.astype(np.uint8)
    cams = np.zeros((1, 8, 8), np.float32)
    cams[0, 2:6, 2:6] = 1.0  # hot exactly where the object is (stride 4)
    boundary = np.zeros((8, 8), np.float32)
    boundary[2:6, 2:6] = 1.0
    boundary[3:5, 3:5] = 0.0  # a ring of boundary along the object's outline
    good = doubt.image_signals(semantic, mask[None], np.array([0.9]), cams, [1], boundary)
    assert good["weak_outline"] == 0.0 and good["cam_outside"] == 0.0 and good["fragments"] == 0.0
    assert abs(good["low_score"] - 0.1) < 1e-6 and good["count_mismatch"] == 0.0
    # The labels cover half the hot area, end where IRNet sees no boundary, and score low.
    half = _square(box=(8, 16, 8, 24))
    bad = doubt.image_signals(half.astype(np.uint8), half[None], np.array([0.3]), cams, [1], np.zeros((8, 8)))
    assert bad["cam_outside"] == 0.5 and bad["weak_outline"] == 1.0 and bad["low_score"] > good["low_score"]
    # Tags without any instance: nothing to trust.
    empty = doubt.image_signals(np.zeros((32, 32), np.uint8), np.zeros((0, 32, 32), bool), np.zeros(0), cams, [1],
                                boundary)
    assert empty["low_score"] == 1.0 and empty["cam_outside"] == 1.0


def test_a_fragmented_instance_is_doubted():
    mask = _square(box=(2, 6, 2, 6)) | _square(box=(20, 28, 20, 28))
    doubts, weak, fragmented = doubt.instance_doubt(np.stack([mask, _square()]), np.array([0.8, 0.8]), None)
    assert fragmented.tolist() == [1.0, 0.0] and doubts[0] > doubts[1]


def test_version_doubt_ranks_within_the_version():
    signals = np.zeros((4, len(doubt.SIGNALS)))
    for name, column in zip(doubt.COMBINED, ([0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1], [0.0, 0.0, 0.5, 0.9])):
        signals[:, doubt.SIGNALS.index(name)] = column
    ranked = doubt.version_doubt(signals)
    assert ranked.argmax() == 3 and np.all((ranked >= 0) & (ranked <= 1))
    signals[1, 0] = np.nan  # a row without signals gets no doubt and does not count
    again = doubt.version_doubt(signals)
    assert np.isnan(again[1]) and not np.isnan(again[[0, 2, 3]]).any()


def test_rows_labelled_before_doubt_existed_conform_with_null_doubt():
    old = pa.table({"image_id": ["a"], "key": ["k"]})
    conformed = tables.conform(old, ledger.INDEX_SCHEMA)
    assert conformed.schema == ledger.INDEX_SCHEMA and conformed.column("doubt").to_pylist() == [None]
