"""Tests for pipeline.algorithms.cams (Eq. 1 post-processing) and .relations (Sec. 4.2)."""

from __future__ import annotations

import numpy as np
import torch

from pipeline.algorithms.cams import make_cams, strided_size, strided_up_size
from pipeline.algorithms.relations import crf_refine_labels, mine_relations

EPS = 1e-5


def test_strided_sizes():
    assert strided_size((37, 53)) == (10, 14)
    assert strided_size((32, 48)) == (8, 12)
    assert strided_size((37, 53), 16) == (3, 4)
    assert strided_up_size((37, 53)) == (48, 64)
    assert strided_up_size((32, 48)) == (32, 48)


def test_make_cams_shapes_and_normalisation_odd_size():
    gen = torch.Generator().manual_seed(0)
    # Four scales of a 37×53 image: stride-16 outputs of different sizes, C = 5 classes.
    outputs = [torch.rand(2, 5, hs, ws, generator=gen) for hs, ws in [(3, 4), (2, 2), (4, 6), (5, 7)]]
    stride4, highres = make_cams(outputs, (37, 53), [4, 1])
    assert stride4.shape == (2, 10, 14) and highres.shape == (2, 37, 53)
    assert stride4.dtype == torch.float32 and highres.dtype == torch.float32
    for cams in (stride4, highres):
        assert cams.min() >= 0
        peaks = cams.flatten(1).max(1).values
        # max / (max + 1e-5) with max ≈ 4 scales · 2 maps · O(1).
        assert torch.all(peaks < 1) and torch.all(peaks > 1 - 1e-5)


def test_make_cams_flip_add_and_class_selection():
    # 8×12 image: the stride-4 grid is 2×3, equal to the map size, so the resize is the identity.
    image = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    flipped_maps = torch.tensor([[10.0, 0.0, 0.0], [0.0, 0.0, 0.0]])  # flipped back: 10 at (0, 2)
    output = torch.zeros(2, 3, 2, 3)
    output[0, 2] = image
    output[1, 2] = flipped_maps
    output[0, 0] = 7.0  # class index 0: constant 7 + 0
    stride4, highres = make_cams([output], (8, 12), [2, 0, 1])
    fused = image + torch.tensor([[0.0, 0.0, 10.0], [0.0, 0.0, 0.0]])  # max 13 at (0, 2)
    torch.testing.assert_close(stride4[0], fused / (13 + EPS))
    torch.testing.assert_close(stride4[1], torch.full((2, 3), 7 / (7 + EPS)))
    assert torch.count_nonzero(stride4[2]) == 0  # a class with no response stays zero, no NaN
    assert highres.shape == (3, 8, 12) and torch.isfinite(highres).all()
    stride4, highres = make_cams([output], (8, 12), [])  # an image without tags
    assert stride4.shape == (0, 2, 3) and highres.shape == (0, 8, 12)


def test_make_cams_highres_is_stride16_aligned_then_cropped():
    # 37×53 image -> 3×4 features, padded size 48×64: every feature covers a 16×16 cell.
    output = torch.zeros(2, 1, 3, 4)
    output[0, 0, :, 0] = 1.0
    output[0, 0, :, 3] = 1.0
    _, highres = make_cams([output], (37, 53), [0])
    # Column 52 samples feature column (52 + 0.5) / 16 − 0.5 = 2.78125: 0.78125 of column 3.
    # (A direct resize to width 53 would sample column 3.46 -> 1.0.) The class max is 1 (x < 8).
    expected = 0.78125 / (1 + EPS)
    torch.testing.assert_close(highres[0, :, 52], torch.full((37,), expected))
    torch.testing.assert_close(highres[0, :, 0], torch.full((37,), 1 / (1 + EPS)))


def _two_square_scene():
    """40×40 grey image, a red square (class 3) and a blue square (class 7), each inside a green
    ring whose CAM is 0.15: fg for the 0.05 threshold, bg for the 0.30 threshold."""
    image = np.full((40, 40, 3), 128, np.uint8)
    cams = np.zeros((2, 40, 40), np.float32)
    for k, (top, left, colour) in enumerate([(4, 4, (220, 20, 20)), (22, 20, (20, 20, 220))]):
        image[top - 4:top + 14, left - 4:left + 14] = (20, 200, 20)
        cams[k, top - 4:top + 14, left - 4:left + 14] = 0.15
        image[top:top + 10, left:left + 10] = colour
        cams[k, top:top + 10, left:left + 10] = 1.0
    return image, cams


def test_mine_relations_two_squares():
    image, cams = _two_square_scene()
    relations = mine_relations(image, cams, [3, 7])
    assert relations.dtype == np.uint8 and relations.shape == (40, 40)
    assert relations[9, 9] == 3 and relations[27, 25] == 7  # square centres
    assert relations[0, 39] == 0 and relations[39, 0] == 0  # far background
    assert relations[2, 9] == 255 and relations[27, 18] == 255  # middle of the uncertain rings
    assert set(np.unique(relations)) == {0, 3, 7, 255}
    # CPU torch tensors are accepted for the CAMs.
    np.testing.assert_array_equal(mine_relations(image, torch.from_numpy(cams), [3, 7]), relations)


def test_mine_relations_thresholds_move_the_band():
    image, cams = _two_square_scene()
    # With fg_threshold below the ring score the ring becomes foreground.
    relations = mine_relations(image, cams, [3, 7], fg_threshold=0.1)
    assert relations[2, 9] == 3 and relations[27, 18] == 7


def test_mine_relations_without_tags_is_background():
    image, _ = _two_square_scene()
    relations = mine_relations(image, np.zeros((0, 40, 40), np.float32), [])
    assert relations.shape == (40, 40) and not relations.any()


def test_crf_refine_labels_removes_isolated_errors():
    rng = np.random.default_rng(0)
    image = np.zeros((30, 30, 3), np.uint8)
    image[:, 15:] = 255
    clean = np.zeros((30, 30), np.int64)
    clean[:, 15:] = 1
    noisy = clean.copy()
    flips = rng.choice(900, size=40, replace=False)
    noisy.ravel()[flips] = 1 - noisy.ravel()[flips]
    refined = crf_refine_labels(image, noisy, 2)
    np.testing.assert_array_equal(refined, clean)
    np.testing.assert_array_equal(crf_refine_labels(image, np.zeros((30, 30), int), 1), 0)


def test_mine_relations_accepts_read_only_inputs():
    """Arrays from Ray's object store arrive read-only; pydensecrf must not see them as such."""
    from pipeline.algorithms.relations import mine_relations

    image = np.zeros((16, 16, 3), np.uint8)
    image[4:12, 4:12] = 200
    cams = np.zeros((1, 16, 16), np.float32)
    cams[0, 4:12, 4:12] = 1.0
    image.setflags(write=False)
    cams.setflags(write=False)
    out = mine_relations(image, cams, [1])
    assert out.shape == (16, 16) and out[8, 8] == 1
