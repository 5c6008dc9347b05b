"""Class-agnostic instance map from IRNet's displacement field (Sec. 5.1, Eq. 10, 14, 15).

:func:`instance_groups` is the paper's grouping: every pixel's centroid estimate starts at the
pixel itself and repeatedly moves by the displacement read (bilinearly) at its current estimate.
Pixels with a small displacement are centroid candidates; their 4-connected components are the
detected centroids, and each pixel joins the component its refined centroid lands in.

:func:`density_groups` is a deviation for displacement fields whose per-instance offset is biased
(IRNet trained from scratch): each pixel votes once for x + D(x), and pixels whose votes fall on
the same peak of the vote density form a group. It needs no fixed point of the field at the
centroids, only that an instance's votes cluster apart from its neighbours' (README, Deviations).
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["refine_centroids", "instance_groups", "density_groups"]


def _as_displacement_tensor(displacement) -> torch.Tensor:
    """float32 [2, h, w] tensor on the input's device (numpy input -> CPU)."""
    field = torch.as_tensor(displacement)
    if field.dim() != 3 or field.shape[0] != 2:
        raise ValueError(f"displacement must be [2, h, w], got {tuple(field.shape)}")
    return field.float()


def _bilinear_at(field: torch.Tensor, cy: torch.Tensor, cx: torch.Tensor) -> torch.Tensor:
    """Sample ``field`` [2, h, w] at float pixel coordinates (cy, cx) [h, w] within the grid.

    Coordinates are in pixel units (0..h−1, 0..w−1), so a field that is linear in the coordinates
    is reproduced exactly. Returns [2, h, w].
    """
    _, height, width = field.shape
    y0 = cy.floor().clamp(0, height - 1)
    x0 = cx.floor().clamp(0, width - 1)
    wy = cy - y0
    wx = cx - x0
    y0 = y0.long()
    x0 = x0.long()
    y1 = (y0 + 1).clamp(max=height - 1)
    x1 = (x0 + 1).clamp(max=width - 1)
    flat = field.reshape(2, -1)

    def at(yy: torch.Tensor, xx: torch.Tensor) -> torch.Tensor:
        return flat[:, (yy * width + xx).reshape(-1)].reshape(2, height, width)

    return (
        at(y0, x0) * ((1 - wy) * (1 - wx))
        + at(y0, x1) * ((1 - wy) * wx)
        + at(y1, x0) * (wy * (1 - wx))
        + at(y1, x1) * (wy * wx)
    )


def refine_centroids(displacement, *, iterations: int = 100) -> np.ndarray:
    """Refined centroid of every pixel by iterating the displacement field (Eq. 10).

    c_0(x) = x; c_{u+1}(x) = clip(c_u(x) + D(c_u(x))) to the grid, with D interpolated bilinearly
    at the (fractional) current estimate; the final estimate is rounded to the nearest grid point.
    This is Eq. 10 written for the centroid x + D_u(x) instead of the displacement D_u(x).

    Args:
        displacement: float [2, h, w], (dy, dx) in grid units (numpy array, or torch tensor on
            any device; a tensor is iterated on its own device).
        iterations: number of refinement steps U (≥ 0).

    Returns:
        int64 numpy [2, h, w]: (row, column) of each pixel's centroid, rows in 0..h−1 and columns
        in 0..w−1.
    """
    field = _as_displacement_tensor(displacement)
    _, height, width = field.shape
    cy, cx = torch.meshgrid(
        torch.arange(height, dtype=field.dtype, device=field.device),
        torch.arange(width, dtype=field.dtype, device=field.device),
        indexing="ij",
    )
    for _ in range(iterations):
        step = _bilinear_at(field, cy, cx)
        cy = (cy + step[0]).clamp(0, height - 1)
        cx = (cx + step[1]).clamp(0, width - 1)
    centroids = torch.stack([cy, cx]).round().long()
    return centroids.cpu().numpy()


def instance_groups(displacement, *, iterations: int = 100, threshold: float = 2.5) -> np.ndarray:
    """Class-agnostic instance map (Eq. 14, 15, Appendix A.1).

    Candidate centroids are the pixels with ‖D(x)‖₂ < ``threshold`` (on the unrefined field),
    grouped into 4-connected components. Each pixel joins the component that contains its refined
    centroid (:func:`refine_centroids`); pixels whose centroid lands on no component form one extra
    group. Groups are numbered compactly: components that receive pixels, in raster order of their
    first pixel, then the extra group if it is not empty.

    Args:
        displacement: float [2, h, w], (dy, dx) in grid units (numpy array, or torch tensor on any
            device; the refinement then runs on that device).
        iterations: centroid refinement steps U.
        threshold: displacement norm (grid units) below which a pixel is a centroid candidate.

    Returns:
        int64 numpy [h, w], group index in 0..G−1 per pixel, every index used (G ≥ 1).
    """
    from skimage.measure import label as connected_components

    field = _as_displacement_tensor(displacement)
    candidates = (field.square().sum(0).sqrt() < threshold).cpu().numpy()
    components = connected_components(candidates, connectivity=1, background=0)  # 0 = none
    cy, cx = refine_centroids(field, iterations=iterations)
    landed = components[cy, cx]
    # Component labels 1..n come in raster order; the "no component" group goes after them.
    landed = np.where(landed == 0, components.max() + 1, landed)
    _, groups = np.unique(landed, return_inverse=True)
    return groups.reshape(landed.shape).astype(np.int64)


def density_groups(displacement, *, sigma: float = 1.0, min_share: float = 0.01) -> np.ndarray:
    """Class-agnostic instance map from the peaks of the one-step centroid votes (a deviation).

    1. Every pixel x votes for the grid cell nearest to its centroid estimate x + D(x) (rounded,
       clipped to the grid); the vote counts are smoothed by a Gaussian of ``sigma`` cells
       (scipy's ``gaussian_filter``, reflecting borders, truncated at 4 sigma).
    2. Every cell steps to the densest cell of its 3×3 neighbourhood, itself included, ordering
       cells by (density, raster index) so that ties are broken the same way everywhere; the cells
       that step to themselves are the peaks, and each cell belongs to the peak its steps reach.
    3. Each pixel joins the peak its vote's cell belongs to. Peaks joined by fewer than
       ``min_share``·h·w pixels (too few for an instance that synthesis would keep) are merged
       into one extra group.

    Groups are numbered compactly in raster order of their peak cell, the extra group last.

    Args:
        displacement: float [2, h, w], (dy, dx) in grid units (numpy, or a torch tensor on any
            device; the work is done on CPU).
        sigma: Gaussian smoothing of the vote counts, in grid cells (> 0).
        min_share: fraction of the grid's pixels a peak needs to be a group of its own.

    Returns:
        int64 numpy [h, w], group index in 0..G−1 per pixel, every index used (G ≥ 1).
    """
    from scipy.ndimage import gaussian_filter

    field = _as_displacement_tensor(displacement).cpu().numpy()
    _, height, width = field.shape
    rows, cols = np.mgrid[:height, :width]
    vote_y = np.clip(np.rint(rows + field[0]), 0, height - 1).astype(np.int64)
    vote_x = np.clip(np.rint(cols + field[1]), 0, width - 1).astype(np.int64)
    votes = (vote_y * width + vote_x).ravel()
    density = gaussian_filter(np.bincount(votes, minlength=height * width).reshape(height, width).astype(np.float64),
                              sigma)
    # Lexicographic (density, index) as one sortable rank: a strict order, so the steps end.
    order = np.lexsort((np.arange(height * width), density.ravel()))
    rank = np.empty(height * width, np.int64)
    rank[order] = np.arange(height * width)
    padded = np.pad(rank.reshape(height, width), 1, constant_values=-1)
    best = np.full((height, width), -1, np.int64)
    for dy in (0, 1, 2):
        for dx in (0, 1, 2):
            best = np.maximum(best, padded[dy:dy + height, dx:dx + width])
    step = order[best.ravel()]  # the cell each cell steps to
    while True:  # pointer jumping: at most log2(longest climb) rounds
        nxt = step[step]
        if np.array_equal(nxt, step):
            break
        step = nxt
    peak = step[votes]
    peaks, members = np.unique(peak, return_counts=True)
    small = members < min_share * height * width
    # np.unique sorts the peaks by index = raster order; small peaks all map to the extra group.
    number = np.where(small, (~small).sum(), np.cumsum(~small) - 1)
    return number[np.searchsorted(peaks, peak)].reshape(height, width).astype(np.int64)
