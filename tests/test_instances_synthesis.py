"""Tests for pipeline.algorithms.instances (Eq. 10, 14, 15) and .synthesis (Sec. 5, Table 1)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.algorithms import synthesis
from pipeline.algorithms.instances import density_groups, instance_groups, refine_centroids
from pipeline.algorithms.propagation import random_walk
from pipeline.algorithms.synthesis import (
    cam_boundary_instance_labels,
    cam_instance_labels,
    cam_semantic_labels,
    cam_semantic_scores,
    instance_labels,
    semantic_labels,
    semantic_scores,
)


def _field_to_centres(height, width, centres, split_x):
    """Displacement [2, h, w] pointing every pixel with x < split_x at centres[0], others at
    centres[1] (D(p) = c − p, so one step lands exactly on the centre)."""
    ys, xs = np.mgrid[:height, :width].astype(np.float32)
    left = xs < split_x
    cy = np.where(left, centres[0][0], centres[1][0])
    cx = np.where(left, centres[0][1], centres[1][1])
    return np.stack([cy - ys, cx - xs]).astype(np.float32)


def test_refine_centroids_reaches_the_centres():
    field = _field_to_centres(12, 20, [(5, 4), (6, 15)], split_x=10)
    centroids = refine_centroids(field)
    assert centroids.dtype == np.int64 and centroids.shape == (2, 12, 20)
    assert np.all(centroids[0, :, :10] == 5) and np.all(centroids[1, :, :10] == 4)
    assert np.all(centroids[0, :, 10:] == 6) and np.all(centroids[1, :, 10:] == 15)
    # Zero iterations: every pixel is its own centroid.
    ys, xs = np.mgrid[:12, :20]
    np.testing.assert_array_equal(refine_centroids(field, iterations=0), np.stack([ys, xs]))


def test_refine_centroids_interpolates_and_clips():
    # Constant field (0.5, 0.25) on a 4×4 grid: after 3 steps (1.5, 0.75) from the origin,
    # clipped at the last row/column; rounding gives (2, 1) for pixel (0, 0).
    field = np.zeros((2, 4, 4), np.float32)
    field[0], field[1] = 0.5, 0.25
    centroids = refine_centroids(torch.from_numpy(field), iterations=3)
    assert tuple(centroids[:, 0, 0]) == (2, 1)
    assert tuple(centroids[:, 3, 3]) == (3, 3)  # clipped to the grid


def test_instance_groups_two_centres():
    field = _field_to_centres(12, 20, [(5, 4), (6, 15)], split_x=10)
    groups = instance_groups(field)
    assert groups.dtype == np.int64 and groups.shape == (12, 20)
    assert np.all(groups[:, :10] == 0) and np.all(groups[:, 10:] == 1)
    np.testing.assert_array_equal(instance_groups(torch.from_numpy(field)), groups)


def test_instance_groups_extra_group_for_lost_pixels():
    field = _field_to_centres(14, 20, [(7, 4), (8, 15)], split_x=10)
    field[:, :2] = np.array([-5.0, 0.0]).reshape(2, 1, 1)  # rows 0-1 run into the top edge
    groups = instance_groups(field)
    # Rows 0-1 end on row 0 where ‖D‖ = 5 ≥ 2.5: no component, so they form the extra group,
    # numbered after the two components.
    assert groups.max() == 2
    assert np.all(groups[:2] == 2)
    assert np.all(groups[2:, :10] == 0) and np.all(groups[2:, 10:] == 1)


def _density_groups_reference(field, sigma, min_share):
    """density_groups written from its definition with plain loops (the smoothing is scipy's, as
    the definition says)."""
    from scipy.ndimage import gaussian_filter

    _, h, w = field.shape
    votes = np.zeros((h, w))
    vote_of = {}
    for y in range(h):
        for x in range(w):
            vy = min(max(int(np.rint(y + field[0, y, x])), 0), h - 1)
            vx = min(max(int(np.rint(x + field[1, y, x])), 0), w - 1)
            votes[vy, vx] += 1
            vote_of[y, x] = (vy, vx)
    density = gaussian_filter(votes, sigma)

    def key(cell):
        return density[cell], cell[0] * w + cell[1]

    def peak_of(cell):
        while True:
            y, x = cell
            best = max(((yy, xx) for yy in range(max(y - 1, 0), min(y + 2, h))
                        for xx in range(max(x - 1, 0), min(x + 2, w))), key=key)
            if best == cell:
                return cell
            cell = best

    peak = {p: peak_of(v) for p, v in vote_of.items()}
    members = {}
    for q in peak.values():
        members[q] = members.get(q, 0) + 1
    kept = sorted((q for q, n in members.items() if n >= min_share * h * w), key=lambda q: q[0] * w + q[1])
    number = {q: i for i, q in enumerate(kept)}
    out = np.zeros((h, w), np.int64)
    for (y, x), q in peak.items():
        out[y, x] = number.get(q, len(kept))
    return out


@pytest.mark.parametrize("seed", range(4))
def test_density_groups_matches_the_reference(seed):
    rng = np.random.default_rng(seed)
    h, w = 14, 19
    # Smooth random centres plus noise: several peaks, some small, votes off the grid clipped.
    field = _field_to_centres(h, w, [(3, 4), (10, 14)], split_x=9)
    field = field * rng.uniform(0.3, 1.0) + rng.normal(0, 1.5, size=field.shape).astype(np.float32)
    for sigma, share in ((1.0, 0.01), (0.6, 0.05), (2.0, 0.0)):
        groups = density_groups(field, sigma=sigma, min_share=share)
        np.testing.assert_array_equal(groups, _density_groups_reference(field, sigma, share))
        assert set(np.unique(groups)) == set(range(groups.max() + 1))


def test_density_groups_equal_the_official_groups_on_an_exact_field():
    field = _field_to_centres(12, 20, [(5, 4), (6, 15)], split_x=10)
    np.testing.assert_array_equal(density_groups(field), instance_groups(field))
    np.testing.assert_array_equal(density_groups(torch.from_numpy(field)), density_groups(field))


def test_density_groups_separate_instances_whose_votes_are_pulled_to_the_middle():
    # Two objects whose centroid votes are contracted towards the image centre (cells (6, 8) and
    # (6, 12), not the objects' centres (6, 4) and (6, 15)) on a background pointing at the middle
    # too: the field has no fixed point near either object, the official refinement carries every
    # pixel to one place, the vote peaks still tell the two apart.
    h, w = 13, 20
    ys, xs = np.mgrid[:h, :w].astype(np.float32)
    left, right = xs < 10, xs >= 10
    target_y = np.full((h, w), 6.0, np.float32)
    target_x = np.where(left, 8.0, 12.0).astype(np.float32)
    field = np.stack([target_y - ys, target_x - xs]).astype(np.float32)
    assert instance_groups(field).max() == 0  # official: one group
    groups = density_groups(field)
    assert groups.max() == 1
    assert np.all(groups[left] == groups[left][0]) and np.all(groups[right] == groups[right][0])
    assert groups[left][0] != groups[right][0]


def test_density_groups_put_rare_peaks_in_one_extra_group():
    field = _field_to_centres(20, 20, [(5, 5), (14, 14)], split_x=10)
    # Two pixels of the right half vote for the top-right corner: a peak with 2 of 400 pixels (< 1%).
    field[:, 0, 12], field[:, 0, 13] = (0, 19 - 12), (0, 19 - 13)
    groups = density_groups(field)
    assert groups.max() == 2 and groups[0, 12] == 2 and groups[0, 13] == 2
    assert np.all(groups[:, :10] == 0)
    assert groups[5, 14] == 1
    kept = density_groups(field, min_share=0.0)  # every peak kept, numbered in raster order
    assert kept.max() == 2 and kept[0, 12] == 0 and kept[5, 5] == 1 and kept[14, 14] == 2


def _two_objects(boundary_line: bool):
    """32×48 image (8×12 grid): one class (id 5) with CAM peaks on the left and the right, and
    optionally a boundary column at x = 6 that separates them."""
    cams = np.zeros((1, 8, 12), np.float32)
    cams[0, 2:6, 1:5] = 0.6
    cams[0, 3:5, 2:4] = 1.0
    cams[0, 2:6, 8:11] = 0.5
    cams[0, 3:5, 9] = 0.8
    boundary = np.zeros((8, 12), np.float32)
    if boundary_line:
        boundary[:, 6] = 1.0
    return cams, boundary


def test_semantic_labels_match_random_walk():
    cams, boundary = _two_objects(boundary_line=True)
    labels = semantic_labels(cams, [5], boundary, (32, 48))  # paper defaults: β 10, t 256, r 5
    assert labels.dtype == np.uint8 and labels.shape == (32, 48)
    assert set(np.unique(labels)) == {0, 5}
    assert labels[14, 10] == 5 and labels[14, 38] == 5 and labels[14, 26] == 0
    # The same numbers computed from random_walk directly.
    walked = random_walk(torch.from_numpy(cams), torch.from_numpy(boundary), beta=10.0, steps=256, radius=5)
    up = F.interpolate(walked[None], scale_factor=4, mode="bilinear", align_corners=False)[0, :, :32, :48]
    up = up / up.max()
    expected = np.where(up[0].numpy() > 0.25, 5, 0)
    np.testing.assert_array_equal(labels, expected)
    # The scores the labels were chosen from: background 0.25, then the normalised walked CAM.
    same, scores = semantic_scores(cams, [5], boundary, (32, 48))
    np.testing.assert_array_equal(same, labels)
    assert scores.dtype == np.float32 and scores.shape == (2, 32, 48) and np.all(scores[0] == 0.25)
    np.testing.assert_allclose(scores[1], up[0].numpy(), rtol=1e-6)


def test_boundary_splits_one_class_into_two_instances():
    cams, boundary = _two_objects(boundary_line=True)
    masks, classes, scores = cam_boundary_instance_labels(cams, [5], boundary, (32, 48), steps=32)
    assert masks.shape[0] == 2 and masks.dtype == bool
    np.testing.assert_array_equal(classes, [5, 5])
    assert masks[0, 14, 10] and masks[1, 14, 38]  # raster order: left object first
    # Scores: the global maximum of the normalised propagated maps is 1, inside the left object.
    assert scores[0] == pytest.approx(1.0) and 0.25 < scores[1] < 1.0
    # Union of the instance masks = the semantic label of the class.
    semantic = semantic_labels(cams, [5], boundary, (32, 48), steps=32)
    np.testing.assert_array_equal(masks.any(0), semantic == 5)
    # Without displacement information instance_labels has one group and gives the same result.
    zero = np.zeros((2, 8, 12), np.float32)
    for got, want in zip(instance_labels(cams, [5], boundary, zero, (32, 48), steps=32),
                         (masks, classes, scores)):
        np.testing.assert_array_equal(got, want)


def test_displacement_splits_touching_instances():
    # 32×96 image (8×24 grid): two objects of one class joined by a bridge, no boundary at all.
    cams = np.zeros((1, 8, 24), np.float32)
    cams[0, 2:6, 2:10] = 0.8
    cams[0, 2:6, 14:22] = 0.8
    cams[0, 3:5, 10:14] = 0.5
    boundary = np.zeros((8, 24), np.float32)
    masks, _, _ = cam_boundary_instance_labels(cams, [5], boundary, (32, 96), steps=8)
    assert masks.shape[0] == 1  # no boundary, no displacement: one merged instance
    field = _field_to_centres(8, 24, [(4, 6), (4, 17)], split_x=12)
    masks, classes, scores = instance_labels(cams, [5], boundary, field, (32, 96), steps=8)
    assert masks.shape == (2, 32, 96)
    np.testing.assert_array_equal(classes, [5, 5])
    assert masks[0, 16, 24] and masks[1, 16, 70]  # the two object centres
    assert not np.any(masks[0] & masks[1])
    np.testing.assert_allclose(scores, [1.0, 1.0], atol=1e-6)  # symmetric objects


def test_instance_labels_two_classes_keep_their_ids():
    cams, boundary = _two_objects(boundary_line=True)
    two = np.zeros((2, 8, 12), np.float32)
    two[0, :, :6] = cams[0, :, :6]  # class 5 left of the boundary column
    two[1, :, 7:] = cams[0, :, 7:]  # class 9 right of it
    field = np.zeros((2, 8, 12), np.float32)
    masks, classes, scores = instance_labels(torch.from_numpy(two), [5, 9], boundary, field,
                                             (32, 48), steps=16)
    np.testing.assert_array_equal(classes, [5, 9])
    assert masks[0, 14, 10] and masks[1, 14, 38]
    assert scores.dtype == np.float32 and np.all((scores > 0.25) & (scores <= 1))


def test_min_fragment_zeroes_small_components():
    cams = np.zeros((1, 8, 12), np.float32)
    cams[0, 2:6, 2:6] = 1.0  # big object
    cams[0, 6, 10] = 0.9  # one grid pixel: a few pixels after ×4 upsampling
    masks, classes, scores = cam_instance_labels(cams, [2], (32, 48), min_fragment=0.05)
    assert masks.shape[0] == 2
    sizes = masks.reshape(2, -1).sum(1)
    small = int(np.argmin(sizes))
    assert sizes[small] < 0.05 * 32 * 48 <= sizes[1 - small]
    assert scores[small] == 0.0 and scores[1 - small] == pytest.approx(1.0)
    # With the rule off the small component keeps its peak score. Upsampling ×4 with
    # align_corners=False samples the grid pixel at offsets ±0.125 and ±0.375, so the highest
    # upsampled value is 0.9 · (1 − 0.125)² = 0.6890625 (global max 1 from the big object).
    _, _, scores = cam_instance_labels(cams, [2], (32, 48), min_fragment=0.0)
    assert scores[small] == pytest.approx(0.9 * 0.875**2)


def test_split_into_instances_threshold_is_strict():
    index = np.zeros((6, 6), np.int64)
    index[0, 0:2] = 1  # region 0, component of 2 pixels
    index[4:6, 4:6] = 1  # region 0, component of 4 pixels
    index[0, 5] = 2  # region 1, component of 1 pixel
    score = np.arange(36, dtype=np.float32).reshape(6, 6) / 36
    masks, classes, scores = synthesis._split_into_instances(index, score, np.array([3, 8]), 2)
    np.testing.assert_array_equal(classes, [3, 8, 3])  # raster order of first pixels
    np.testing.assert_array_equal(masks.reshape(3, -1).sum(1), [2, 1, 4])
    np.testing.assert_allclose(scores, [1 / 36, 0.0, 35 / 36])  # size 2 is not < 2: kept


def test_cam_semantic_labels_threshold_and_argmax():
    cams = np.zeros((2, 2, 3), np.float32)  # 8×12 image
    cams[0] = [[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]]
    cams[1] = [[0.0, 0.5, 1.0], [0.0, 0.5, 1.0]]
    labels = cam_semantic_labels(cams, [4, 6], (8, 12))
    assert labels[:, :4].tolist() == [[4] * 4] * 8 and np.all(labels[:, 10:] == 6)
    assert np.all(cam_semantic_labels(cams, [4, 6], (8, 12), bg_threshold=1.1) == 0)
    assert not cam_semantic_labels(np.zeros((0, 2, 3)), [], (8, 12)).any()
    same, scores = cam_semantic_scores(cams, [4, 6], (8, 12))
    np.testing.assert_array_equal(same, labels)
    assert scores.shape == (3, 8, 12) and np.all(scores[0] == np.float32(0.15))
    assert scores[1, 0, 0] == 1.0 and scores[2, 0, 0] == 0.0 and scores[2, 0, 11] == 1.0
    assert cam_semantic_scores(np.zeros((0, 2, 3)), [], (8, 12))[1].shape == (1, 8, 12)


def test_grid_mismatch_is_rejected():
    with pytest.raises(ValueError):
        semantic_labels(np.zeros((1, 8, 12)), [1], np.zeros((8, 12)), (40, 48))
