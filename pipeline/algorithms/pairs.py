"""Pixel pairs within a radius, their paths, and the affinities and labels defined on them.

One implementation serves IRNet training (radius 10 on the stride-4 grid) and label synthesis
(radius 5). A pair is (i, j) with j = i + o for a search offset o = (dy, dx) from
:func:`search_offsets`; every tensor laid out per pair has shape [..., P, h, w] where index
[..., p, y, x] is the pair whose source i is grid pixel (y, x) and whose destination j is
(y + dy_p, x + dx_p). Offsets cover half of the disc (dy > 0, or dy = 0 and dx > 0), so every
unordered pair of distinct pixels closer than the radius appears exactly once.

Pairs whose destination lies outside the grid are kept in the layout (so shapes do not depend on
the data) and flagged by :func:`destination_inside`; everything computed for them is finite:
the boundary is taken as 1 outside the grid (affinity 0), labels as 255 (invalid).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

IGNORE_LABEL = 255


@lru_cache(maxsize=None)
def _offsets(radius: int) -> tuple[tuple[int, int], ...]:
    if radius < 2:
        raise ValueError(f"radius must be >= 2, got {radius}")
    offsets = [(0, dx) for dx in range(1, radius)]
    for dy in range(1, radius):
        for dx in range(-radius + 1, radius):
            if dy * dy + dx * dx < radius * radius:
                offsets.append((dy, dx))
    return tuple(offsets)


def search_offsets(radius: int) -> np.ndarray:
    """Search offsets (dy, dx) of Eq. 2 within ``radius``, in the fixed pair order.

    (0, dx) for dx = 1..r-1, then (dy, dx) for dy = 1..r-1, dx = -(r-1)..r-1 with
    dy^2 + dx^2 < r^2. Radius 5 gives 34 offsets, radius 10 gives 152.

    Returns: int64 [P, 2], columns (dy, dx).
    """
    return np.array(_offsets(int(radius)), dtype=np.int64).reshape(-1, 2)


@lru_cache(maxsize=None)
def _path(dy: int, dx: int) -> tuple[tuple[int, int], ...]:
    length_sq = dy * dy + dx * dx
    points = []
    for y in range(min(0, dy), max(0, dy) + 1):
        for x in range(min(0, dx), max(0, dx) + 1):
            if (dy * x - dx * y) ** 2 < length_sq:  # squared distance to the line < 1
                points.append((y, x))
    return tuple(points)


def offset_path(offset) -> np.ndarray:
    """Path Π of Eq. 7 for one offset, relative to the source pixel.

    Every grid point (y, x) in the box spanned by (0, 0) and (dy, dx) whose squared distance to
    the line through them is < 1, i.e. (dy*x - dx*y)^2 / (dy^2 + dx^2) < 1; both ends included.

    Args:
        offset: (dy, dx), not (0, 0).
    Returns: int64 [L, 2] of (y, x) points in row-major order.
    """
    dy, dx = int(offset[0]), int(offset[1])
    if dy == 0 and dx == 0:
        raise ValueError("the zero offset has no path")
    return np.array(_path(dy, dx), dtype=np.int64).reshape(-1, 2)


@lru_cache(maxsize=None)
def _path_tables(radius: int):
    """Distinct path points and, per path length, the offsets and their point indices."""
    offsets = _offsets(radius)
    points = sorted({p for o in offsets for p in _path(*o)})
    point_index = {p: k for k, p in enumerate(points)}
    by_length: dict[int, list[int]] = {}
    for k, o in enumerate(offsets):
        by_length.setdefault(len(_path(*o)), []).append(k)
    groups = []
    for length in sorted(by_length):
        members = by_length[length]
        table = [[point_index[p] for p in _path(*offsets[k])] for k in members]
        groups.append((tuple(members), tuple(map(tuple, table))))
    order = [k for members, _ in groups for k in members]
    inverse = tuple(int(v) for v in np.argsort(order))
    return tuple(points), tuple(groups), inverse


def _shifted(padded: torch.Tensor, dy: int, dx: int, h: int, w: int, margin: int) -> torch.Tensor:
    """View of ``padded`` (margin rows below, margin columns each side) at grid position + (dy, dx)."""
    return padded[..., dy : dy + h, margin + dx : margin + dx + w]


def path_affinities(boundary: torch.Tensor, radius: int) -> torch.Tensor:
    """Semantic affinity a_ij = 1 - max over the path of B (Eq. 7) for every pair.

    Differentiable (torch autograd; gradient of the max is shared among ties); runs on the device
    of ``boundary``. Pairs whose destination leaves the grid get affinity 0 because B is taken as
    1 outside the grid; mask them with :func:`destination_inside`. Autograd keeps one copy of B
    per path point of every offset (about 2100 copies for r = 10, 240 for r = 5).

    Args:
        boundary: float [..., h, w] in [0, 1], class-boundary probability B.
        radius: pair radius r (10 for training, 5 for inference).
    Returns: float [..., P, h, w] in [0, 1]; [..., p, y, x] is the affinity between (y, x) and
        (y, x) + search_offsets(radius)[p].
    """
    points, groups, inverse = _path_tables(int(radius))
    margin = radius - 1
    h, w = boundary.shape[-2:]
    padded = F.pad(boundary, (margin, margin, 0, margin), mode="constant", value=1.0)
    stack = torch.stack([_shifted(padded, py, px, h, w, margin) for py, px in points])
    # Offsets with equal path length share one gather + amax: ~20 kernels instead of one per offset.
    parts = []
    for _, table in groups:
        index = torch.tensor(table, dtype=torch.long, device=boundary.device)
        gathered = stack.index_select(0, index.reshape(-1))
        parts.append(gathered.reshape(index.shape + stack.shape[1:]).amax(dim=1))
    inverse_index = torch.tensor(inverse, dtype=torch.long, device=boundary.device)
    max_boundary = torch.cat(parts).index_select(0, inverse_index)
    return (1.0 - max_boundary).movedim(0, -3)


def destination_inside(height: int, width: int, radius: int, *, device=None) -> torch.Tensor:
    """Whether each pair's destination (y, x) + offset lies inside an height x width grid.

    The source is always inside; a pair with both ends inside has its whole path inside.

    Returns: bool [P, height, width].
    """
    offsets = torch.as_tensor(search_offsets(radius), device=device)
    ys = torch.arange(height, device=device).view(1, -1, 1) + offsets[:, 0].view(-1, 1, 1)
    xs = torch.arange(width, device=device).view(1, 1, -1) + offsets[:, 1].view(-1, 1, 1)
    return (ys < height) & (xs >= 0) & (xs < width)


def destination_values(x: torch.Tensor, radius: int, *, fill: float = 0.0) -> torch.Tensor:
    """Value of ``x`` at each pair's destination.

    Args:
        x: tensor [..., h, w] (any dtype, any device).
        radius: pair radius r.
        fill: value used where the destination leaves the grid.
    Returns: [..., P, h, w] with [..., p, y, x] = x[..., y + dy_p, x + dx_p] (or ``fill``).
    """
    margin = radius - 1
    h, w = x.shape[-2:]
    padded = F.pad(x, (margin, margin, 0, margin), mode="constant", value=fill)
    views = [_shifted(padded, int(dy), int(dx), h, w, margin) for dy, dx in search_offsets(radius)]
    return torch.stack(views, dim=-3)


def downsample_labels(label, *, stride: int = 4):
    """Nearest-neighbour downsampling of a full-resolution label map to the stride grid, as the
    official code does it (PIL NEAREST resize by 1/stride).

    Grid cell i of h = ceil(H/stride) takes image row floor((i + 0.5) * H / h), the centre of its
    cell: row ``4i + 2`` when H is a multiple of 4 (likewise for columns).

    Args:
        label: [..., H, W] (numpy array or torch tensor), e.g. 0 background, 1..C, 255 ignore.
    Returns: same type and dtype, [..., ceil(H/stride), ceil(W/stride)].
    """
    height, width = label.shape[-2:]
    h, w = -(-height // stride), -(-width // stride)
    rows = np.minimum(((np.arange(h) + 0.5) * height / h).astype(np.int64), height - 1)
    cols = np.minimum(((np.arange(w) + 0.5) * width / w).astype(np.int64), width - 1)
    if torch.is_tensor(label):
        rows, cols = torch.from_numpy(rows).to(label.device), torch.from_numpy(cols).to(label.device)
    return label[..., rows[:, None], cols[None, :]]


def instance_relation_map(semantic: np.ndarray, instances: np.ndarray) -> np.ndarray:
    """The exact relation map of an image people labelled: its instance ids in place of class ids,
    so that :func:`relation_pair_labels` makes pairs within one instance positive and pairs across
    two instances (of one class too) negative.

    Args:
        semantic: integer [H, W], 0 background, 1..C class, 255 ignore.
        instances: integer [H, W], instance ids (0 none).
    Returns: uint8 [H, W]: 0 on background, the instance id (1..254) on its class pixels, 255 on
        ignored pixels, class pixels without an instance and instances past id 254.
    """
    out = np.full(semantic.shape, IGNORE_LABEL, np.uint8)
    out[semantic == 0] = 0
    labelled = (semantic != 0) & (semantic != IGNORE_LABEL) & (instances >= 1) & (instances < IGNORE_LABEL)
    out[labelled] = instances[labelled]
    return out


def centroid_offsets(relation: np.ndarray) -> np.ndarray:
    """Each pixel's offset to the centroid of its instance, the exact displacement of Eq. 1.

    Args:
        relation: integer [H, W] from :func:`instance_relation_map` (0 background, 1..254
            instance, 255 ignore).
    Returns: float32 [2, H, W] of (dy, dx) in pixels: c - x for instance pixels (c: the mean
        position of the instance's pixels), 0 on background, NaN on ignored pixels.
    """
    height, width = relation.shape
    ids = relation.astype(np.int64).ravel()
    ys, xs = np.divmod(np.arange(height * width), width)
    count = np.maximum(np.bincount(ids, minlength=256), 1)
    centre_y, centre_x = np.bincount(ids, ys, 256) / count, np.bincount(ids, xs, 256) / count
    out = np.stack([centre_y[ids] - ys, centre_x[ids] - xs]).astype(np.float32)
    out[:, ids == 0] = 0.0
    out[:, ids == IGNORE_LABEL] = np.nan
    return out.reshape(2, height, width)


def source_interior(height: int, width: int, radius: int, *, device=None) -> torch.Tensor:
    """The sources the official training takes pairs from: at least ``radius - 1`` cells from the
    left, right and bottom edges of the grid (rows 0..h-r, columns r-1..w-r).

    Returns: bool [height, width].
    """
    margin = radius - 1
    mask = torch.zeros(height, width, dtype=torch.bool, device=device)
    mask[: max(height - margin, 0), margin: max(width - margin, margin)] = True
    return mask


def relation_pair_labels(relation_map, radius: int = 10, *, interior: bool = False) -> tuple[torch.Tensor, ...]:
    """Class-equivalence labels of every pair (Eq. 3, 4) from a stride-grid relation map.

    A pair is valid if both ends are inside the grid and neither is 255; a valid pair is positive
    if the labels are equal (background-positive if both are 0, foreground-positive otherwise)
    and negative if they differ.

    Args:
        relation_map: integer [h, w] (numpy array or torch tensor, any device): 0 background,
            1..C class, 255 ignore; already on the stride-4 grid (see :func:`downsample_labels`).
        radius: pair radius r (10 for training).
        interior: keep only pairs whose source lies in :func:`source_interior` (training, as the
            official code; all sources otherwise).
    Returns: (bg_positive, fg_positive, negative), each bool [P, h, w] on the map's device
        (CPU for numpy input); the three are disjoint.
    """
    if not torch.is_tensor(relation_map):
        relation_map = torch.from_numpy(np.ascontiguousarray(relation_map))
    labels = relation_map.to(torch.int64)
    source = labels.unsqueeze(0)
    target = destination_values(labels, radius, fill=IGNORE_LABEL)
    valid = (source != IGNORE_LABEL) & (target != IGNORE_LABEL)
    equal = valid & (source == target)
    bg_positive = equal & (source == 0)
    fg_positive = equal & (source != 0)
    negative = valid & (source != target)
    if interior:
        inside = source_interior(*labels.shape[-2:], radius, device=labels.device)
        bg_positive, fg_positive, negative = (m & inside for m in (bg_positive, fg_positive, negative))
    return bg_positive, fg_positive, negative
