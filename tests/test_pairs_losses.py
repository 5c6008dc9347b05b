"""Pairs, paths, affinities, relation labels and IRNet losses on hand-checkable inputs."""

import math

import numpy as np
import pytest
import torch

from pipeline.algorithms.losses import irn_losses
from pipeline.algorithms.pairs import (
    centroid_offsets,
    destination_inside,
    destination_values,
    downsample_labels,
    instance_relation_map,
    offset_path,
    path_affinities,
    relation_pair_labels,
    search_offsets,
)


def test_offset_counts_and_order():
    assert search_offsets(5).shape == (34, 2)
    assert search_offsets(10).shape == (152, 2)
    assert search_offsets(2).tolist() == [[0, 1], [1, -1], [1, 0], [1, 1]]
    r5 = search_offsets(5).tolist()
    assert r5[:6] == [[0, 1], [0, 2], [0, 3], [0, 4], [1, -4], [1, -3]]
    assert r5[-5:] == [[4, -2], [4, -1], [4, 0], [4, 1], [4, 2]]
    assert search_offsets(5).dtype == np.int64


@pytest.mark.parametrize(
    "offset, expected",
    [
        ((0, 3), [(0, 0), (0, 1), (0, 2), (0, 3)]),
        ((1, 1), [(0, 0), (0, 1), (1, 0), (1, 1)]),
        ((1, -1), [(0, -1), (0, 0), (1, -1), (1, 0)]),
        # |x - y| <= 1 inside the 3x3 box: the two far corners are dropped.
        ((2, 2), [(0, 0), (0, 1), (1, 0), (1, 1), (1, 2), (2, 1), (2, 2)]),
        # (3x - y)^2 / 10 < 1 holds for all 8 points of the 4x2 box.
        ((3, 1), [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1), (3, 0), (3, 1)]),
        # (2x - 4y)^2 / 20 < 1  <=>  |x - 2y| <= 2 inside the 3x5 box.
        ((2, 4), [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2), (1, 3), (1, 4), (2, 2), (2, 3), (2, 4)]),
        ((3, 3), [(y, x) for y in range(4) for x in range(4) if abs(x - y) <= 1]),
    ],
)
def test_paths_by_hand(offset, expected):
    assert sorted(map(tuple, offset_path(offset).tolist())) == sorted(expected)


def test_downsample_takes_pixel_4i_plus_2_like_pil_nearest_at_a_quarter():
    from PIL import Image

    label = (np.arange(64 * 40).reshape(64, 40) % 251).astype(np.uint8)
    small = downsample_labels(label)
    assert small.shape == (16, 10) and np.array_equal(small, label[2::4, 2::4])
    # The official code: imutils.pil_rescale(label, 0.25, 0), PIL NEAREST to round(H / 4).
    official = np.asarray(Image.fromarray(label).resize((10, 16), Image.NEAREST))
    assert np.array_equal(small, official)
    assert torch.equal(downsample_labels(torch.from_numpy(label)), torch.from_numpy(small.copy()))
    # Sizes that are no multiple of 4: the ceil grid, each cell its centre pixel, as PIL does.
    odd = (np.arange(9 * 13).reshape(9, 13) % 251).astype(np.uint8)
    assert np.array_equal(downsample_labels(odd), np.asarray(Image.fromarray(odd).resize((4, 3), Image.NEAREST)))


def test_training_pairs_start_in_the_official_interior():
    from pipeline.algorithms.pairs import source_interior

    inside = source_interior(128, 128, 10)
    assert int(inside.sum()) == 119 * 110  # the official PathIndex's 13090 sources for a 512 crop
    assert inside[:119, 9:119].all() and not inside[119:].any() and not inside[:, :9].any()
    assert not inside[:, 119:].any()
    rng = np.random.default_rng(1)
    relation = rng.choice([0, 1, 2, 255], size=(24, 30)).astype(np.uint8)
    everywhere = relation_pair_labels(relation, 5)
    interior = relation_pair_labels(relation, 5, interior=True)
    mask = source_interior(24, 30, 5)
    for all_pairs, kept in zip(everywhere, interior):
        assert torch.equal(kept, all_pairs & mask) and kept.sum() < all_pairs.sum()


# 3x4 relation map; radius 2 has offsets (0,1), (1,-1), (1,0), (1,1). Counted by hand:
#   (0,1):  row0 bg,neg,fg; row1 inv,inv,neg; row2 bg,neg,fg        -> bg 2, fg 2, neg 3
#   (1,-1): (0,1)-(1,0) bg, (0,3)-(1,2) fg, (1,2)-(2,1) neg, (1,3)-(2,2) fg -> 1, 2, 1
#   (1,0):  col0 bg,bg; col2 fg,neg; col3 neg,fg                     -> 2, 2, 2
#   (1,1):  (0,1)-(1,2) neg, (0,2)-(1,3) neg, (1,0)-(2,1) bg, (1,2)-(2,3) neg -> 1, 0, 3
RELATIONS = np.array([[0, 0, 1, 1], [0, 255, 1, 2], [0, 0, 2, 2]], dtype=np.uint8)


def test_relation_pair_counts_by_hand():
    bg, fg, neg = relation_pair_labels(RELATIONS, 2)
    assert bg.shape == fg.shape == neg.shape == (4, 3, 4) and bg.dtype == torch.bool
    per_offset = [[int(m[k].sum()) for m in (bg, fg, neg)] for k in range(4)]
    assert per_offset == [[2, 2, 3], [1, 2, 1], [2, 2, 2], [1, 0, 3]]
    assert bool(neg[0, 0, 1]) and bool(bg[1, 0, 1]) and bool(fg[2, 0, 2])
    assert not (bg & fg).any() and not (bg & neg).any() and not (fg & neg).any()
    # torch input gives the same labels
    again = relation_pair_labels(torch.from_numpy(RELATIONS), 2)
    assert all(torch.equal(a, b) for a, b in zip((bg, fg, neg), again))


def test_labels_never_leave_the_grid():
    rng = np.random.default_rng(0)
    relation = rng.choice([0, 1, 2, 255], size=(9, 11)).astype(np.uint8)
    inside = destination_inside(9, 11, 5)
    for mask in relation_pair_labels(relation, 5):
        assert not (mask & ~inside).any()
    # all-background map: every pair inside the grid is a bg-positive pair
    bg, fg, neg = relation_pair_labels(np.zeros((9, 11), np.uint8), 5)
    assert torch.equal(bg, inside) and not fg.any() and not neg.any()


def _reference_affinities(boundary: np.ndarray, radius: int) -> np.ndarray:
    """a = 1 - max B over the path, straight from the definition, one pixel and offset at a time."""
    h, w = boundary.shape
    offsets = search_offsets(radius)
    out = np.zeros((len(offsets), h, w))
    for k, (dy, dx) in enumerate(offsets):
        for y in range(h):
            for x in range(w):
                if not (0 <= y + dy < h and 0 <= x + dx < w):
                    continue
                values = [
                    boundary[y + py, x + px]
                    for py in range(min(0, dy), max(0, dy) + 1)
                    for px in range(min(0, dx), max(0, dx) + 1)
                    if (dy * px - dx * py) ** 2 / (dy * dy + dx * dx) < 1
                ]
                out[k, y, x] = 1 - max(values)
    return out


def test_affinity_on_hand_made_boundary():
    boundary = torch.zeros(5, 6, dtype=torch.float64)
    boundary[1, 2] = 0.8
    boundary[2, 4] = 0.3
    aff = path_affinities(boundary, 3)
    offsets = [tuple(o) for o in search_offsets(3).tolist()]
    at = lambda o, y, x: float(aff[offsets.index(o), y, x])  # noqa: E731
    assert at((0, 2), 1, 0) == pytest.approx(0.2)  # (1,0) (1,1) (1,2)
    assert at((2, 2), 0, 1) == pytest.approx(0.2)  # path passes (1,2)
    assert at((1, 1), 1, 3) == pytest.approx(0.7)  # path box holds (2,4)
    assert at((0, 2), 0, 0) == pytest.approx(1.0)
    assert at((0, 1), 4, 5) == 0.0  # destination outside: B = 1 there
    inside = destination_inside(5, 6, 3)
    reference = _reference_affinities(boundary.numpy(), 3)
    np.testing.assert_allclose(aff.numpy() * inside.numpy(), reference)


def test_affinity_random_batched_and_differentiable():
    torch.manual_seed(0)
    boundary = torch.rand(2, 3, 7, 9, dtype=torch.float64, requires_grad=True)
    aff = path_affinities(boundary, 5)
    assert aff.shape == (2, 3, 34, 7, 9)
    inside = destination_inside(7, 9, 5)
    for b in range(2):
        for c in range(3):
            reference = _reference_affinities(boundary[b, c].detach().numpy(), 5)
            np.testing.assert_allclose((aff[b, c] * inside).detach().numpy(), reference)
    (aff * inside).sum().backward()
    assert torch.isfinite(boundary.grad).all() and (boundary.grad < 0).any()


def test_destination_values():
    x = torch.arange(12.0).view(3, 4)
    shifted = destination_values(x, 2, fill=-1.0)  # offsets (0,1), (1,-1), (1,0), (1,1)
    assert shifted[0, 1, 2] == x[1, 3] and shifted[0, 1, 3] == -1
    assert shifted[1, 0, 1] == x[1, 0] and shifted[1, 0, 0] == -1
    assert shifted[3, 2, 0] == -1 and shifted[2, 1, 3] == x[2, 3]


# 2x3 map, radius 2; every pair with both ends inside, its label and its path (absolute points).
LOSS_RELATIONS = np.array([[0, 0, 1], [1, 1, 1]], dtype=np.uint8)
SQUARE = [(0, 0), (0, 1), (1, 0), (1, 1)]
HAND_PAIRS = [  # (source, destination, kind, path)
    ((0, 0), (0, 1), "bg", [(0, 0), (0, 1)]),
    ((0, 1), (0, 2), "neg", [(0, 1), (0, 2)]),
    ((1, 0), (1, 1), "fg", [(1, 0), (1, 1)]),
    ((1, 1), (1, 2), "fg", [(1, 1), (1, 2)]),
    ((0, 1), (1, 0), "neg", SQUARE),
    ((0, 2), (1, 1), "fg", [(0, 1), (0, 2), (1, 1), (1, 2)]),
    ((0, 0), (1, 0), "neg", [(0, 0), (1, 0)]),
    ((0, 1), (1, 1), "neg", [(0, 1), (1, 1)]),
    ((0, 2), (1, 2), "fg", [(0, 2), (1, 2)]),
    ((0, 0), (1, 1), "neg", SQUARE),
    ((0, 1), (1, 2), "neg", [(0, 1), (0, 2), (1, 1), (1, 2)]),
]


def _hand_losses(logits: np.ndarray, disp: np.ndarray) -> dict:
    boundary = 1 / (1 + np.exp(-logits))
    terms = {"bg": [], "fg": [], "neg": [], "dfg": [], "dbg": []}
    for (ys, xs), (yd, xd), kind, path in HAND_PAIRS:
        a = 1 - max(boundary[p] for p in path)
        delta = disp[:, ys, xs] - disp[:, yd, xd]
        if kind == "neg":
            terms["neg"].append(-math.log(1 + 1e-5 - a))
            continue
        terms[kind].append(-math.log(a + 1e-5))
        if kind == "fg":
            target = np.array([yd - ys, xd - xs])
            terms["dfg"].extend(np.abs(delta - target))
        else:
            terms["dbg"].extend(np.abs(delta))
    mean = lambda v, n: sum(v) / (n + 1e-5)  # noqa: E731
    p_bg, p_fg, n = mean(terms["bg"], 1), mean(terms["fg"], 4), mean(terms["neg"], 6)
    d_fg, d_bg = mean(terms["dfg"], 2 * 4), mean(terms["dbg"], 2 * 1)
    l_aff = ((p_bg + p_fg) / 2 + n) / 2
    return {"P_bg": p_bg, "P_fg": p_fg, "N": n, "L_aff": l_aff, "D_fg": d_fg, "D_bg": d_bg, "D_exact": 0.0,
            "total": l_aff + (d_fg + d_bg) / 2}


def test_loss_values_by_hand():
    logits = np.array([[-2.0, 0.5, -1.0], [1.5, -0.5, 0.0]])
    disp = np.array([[[0.5, -1.0, 2.0], [0.0, 1.0, -0.5]], [[1.0, 3.0, -2.0], [0.25, 0.0, 1.0]]])
    masks = [m.unsqueeze(0).repeat(2, 1, 1, 1) for m in relation_pair_labels(LOSS_RELATIONS, 2)]
    assert [int(m.sum()) for m in masks] == [2 * 1, 2 * 4, 2 * 6]
    # a batch of two copies: counts double, means stay the same
    losses = irn_losses(
        torch.tensor(logits).expand(2, 1, 2, 3), torch.tensor(disp).expand(2, 2, 2, 3), *masks, radius=2
    )
    expected = _hand_losses(logits, disp)
    assert set(losses) == set(expected)
    for name, value in expected.items():
        assert float(losses[name]) == pytest.approx(value, rel=1e-4), name


def test_exact_displacement_term_by_hand():
    """Corrected images add D_exact = Σ |D - target| over the known targets / all cells and
    coordinates of the batch; NaN targets (every image nobody corrected) leave the official loss
    exactly as it was."""
    logits = torch.tensor([[-2.0, 0.5, -1.0], [1.5, -0.5, 0.0]]).expand(2, 1, 2, 3)
    disp = torch.tensor([[[0.5, -1.0, 2.0], [0.0, 1.0, -0.5]], [[1.0, 3.0, -2.0], [0.25, 0.0, 1.0]]]).expand(2, 2, 2, 3)
    masks = [m.unsqueeze(0).repeat(2, 1, 1, 1) for m in relation_pair_labels(LOSS_RELATIONS, 2)]
    official = irn_losses(logits, disp, *masks, radius=2)
    unknown = irn_losses(logits, disp, *masks, radius=2, target=torch.full((2, 2, 2, 3), float("nan")))
    assert float(unknown["total"]) == float(official["total"]) and float(unknown["D_exact"]) == 0.0
    target = torch.full((2, 2, 2, 3), float("nan"))
    target[1, :, 0, 1] = torch.tensor([2.0, -1.0])  # image 1, pixel (0, 1): D there is (-1.0, 3.0)
    target[1, 0, 1, 2] = 0.0  # and one coordinate of pixel (1, 2): D is -0.5
    losses = irn_losses(logits, disp, *masks, radius=2, target=target)
    expected = (abs(-1.0 - 2.0) + abs(3.0 + 1.0) + abs(-0.5 - 0.0)) / (2 * 2 * 2 * 3 + 1e-5)  # over all cells
    assert float(losses["D_exact"]) == pytest.approx(expected, rel=1e-5)
    assert float(losses["total"]) == pytest.approx(float(official["total"]) + expected / 2, rel=1e-5)


def test_exact_relation_map_and_centroid_offsets_against_a_pixel_loop():
    rng = np.random.default_rng(3)
    semantic = rng.choice([0, 1, 2, 255], size=(9, 11), p=[0.4, 0.25, 0.25, 0.1]).astype(np.uint8)
    instances = rng.integers(0, 4, size=(9, 11)).astype(np.uint16)
    instances[0, 0], semantic[0, 0] = 300, 1  # past id 254: no exact label
    relation = instance_relation_map(semantic, instances)
    offsets = centroid_offsets(relation)
    for y in range(9):
        for x in range(11):
            s, i = int(semantic[y, x]), int(instances[y, x])
            expected = 0 if s == 0 else (i if s != 255 and 1 <= i <= 254 else 255)
            assert relation[y, x] == expected
            if expected == 255:
                assert np.isnan(offsets[:, y, x]).all()
                continue
            if expected == 0:
                assert (offsets[:, y, x] == 0).all()
                continue
            ys, xs = np.nonzero(relation == expected)
            assert offsets[:, y, x] == pytest.approx([ys.mean() - y, xs.mean() - x], abs=1e-5)


def test_exact_targets_point_at_the_centroid_of_the_whole_instance_after_rescale_flip_and_crop():
    from pipeline.data.transforms import irn_train_sample

    relation = np.zeros((64, 80), np.uint8)
    relation[8:40, 4:60] = 1  # wider than the crop: the crop cuts it
    relation[44:60, 62:78] = 2
    image = np.zeros((64, 80, 3), np.uint8)
    image[..., 0] = relation * 100
    cut = 0
    for seed in range(6):
        _, label, offsets = irn_train_sample(image, relation, np.random.default_rng(seed), rescale=(0.7, 1.3),
                                             crop=48, exact=True)
        for instance in (1, 2):
            ys, xs = np.nonzero(label == instance)
            if len(ys) == 0:
                continue
            # every pixel of an instance points at one spot, the whole (rescaled, flipped) instance's
            # centroid, which lies off the crop's own part of a cut instance
            centres = np.stack([ys + offsets[0, ys, xs], xs + offsets[1, ys, xs]], 1)
            assert np.ptp(centres, axis=0).max() < 1e-3
            cut += np.abs(centres[0] - [ys.mean(), xs.mean()]).max() > 2
        assert (offsets[:, label == 0] == 0).all() and np.isnan(offsets[:, label == 255]).all()
    assert cut  # the check saw instances cut by the crop


def test_empty_label_sets_give_zero_not_nan():
    masks = [torch.zeros(1, 4, 2, 3, dtype=torch.bool)] * 3
    losses = irn_losses(torch.zeros(1, 1, 2, 3), torch.zeros(1, 2, 2, 3), *masks, radius=2)
    assert all(float(v) == 0.0 for v in losses.values())


def test_sgd_lowers_total_loss():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    relation = np.zeros((12, 12), np.uint8)
    relation[2:7, 3:9] = 1
    relation[8:, :5] = 2
    relation[rng.random((12, 12)) < 0.1] = 255
    masks = [m.unsqueeze(0) for m in relation_pair_labels(relation, 5)]
    logits = torch.randn(1, 1, 12, 12, requires_grad=True)
    disp = torch.randn(1, 2, 12, 12, requires_grad=True)
    # means over ~2000 pairs make per-pixel gradients small, hence the large step
    optimizer = torch.optim.SGD([logits, disp], lr=20.0)
    history = []
    for _ in range(30):
        optimizer.zero_grad()
        losses = irn_losses(logits, disp, *masks, radius=5)
        losses["total"].backward()
        assert torch.isfinite(logits.grad).all() and torch.isfinite(disp.grad).all()
        optimizer.step()
        history.append({name: float(value.detach()) for name, value in losses.items()})
    assert history[-1]["total"] < 0.5 * history[0]["total"]
    assert history[-1]["L_aff"] < history[0]["L_aff"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    torch.manual_seed(0)
    relation = torch.randint(0, 3, (10, 10), dtype=torch.uint8)
    masks = [m.unsqueeze(0) for m in relation_pair_labels(relation, 5)]
    logits, disp = torch.randn(1, 1, 10, 10), torch.randn(1, 2, 10, 10)
    cpu = irn_losses(logits, disp, *masks, radius=5)
    gpu = irn_losses(logits.cuda(), disp.cuda(), *[m.cuda() for m in masks], radius=5)
    for name in cpu:
        assert float(gpu[name]) == pytest.approx(float(cpu[name]), rel=1e-4)
