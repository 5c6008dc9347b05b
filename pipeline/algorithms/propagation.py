"""Random-walk propagation of score maps over boundary-derived affinities (Eq. 12, 13).

The transition matrix T = A^β normalised over columns couples each grid pixel only with the
≈ 4·r² pixels within the radius, so it is stored as a sparse CSR matrix with
O(h·w·offsets) entries and applied ``steps`` times; the dense (h·w)² matrix of the official
implementation (and its repeated squaring) is never formed.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from .pairs import destination_inside, path_affinities, search_offsets


def _pair_weights(boundary: torch.Tensor, beta: float, radius: int):
    """Forward pair weights W(i, i+o) = a^β and backward ones W(j, j-o), both [P, h, w]."""
    h, w = boundary.shape
    inside = destination_inside(h, w, radius, device=boundary.device)
    forward = path_affinities(boundary, radius).clamp(min=0.0).pow(beta) * inside
    # The backward neighbour j - o of pixel j sees the forward weight stored at pixel j - o.
    margin = radius - 1
    padded = F.pad(forward, (margin, margin, margin, 0))
    offsets = [(dy, dx) for dy, dx in search_offsets(radius).tolist()]
    backward = torch.stack(
        [
            padded[k, margin - dy : margin - dy + h, margin - dx : margin - dx + w]
            for k, (dy, dx) in enumerate(offsets)
        ]
    )
    return offsets, forward, backward


def transition_matrix(boundary: torch.Tensor, *, beta: float = 10.0, radius: int = 5) -> torch.Tensor:
    """Sparse propagation operator M = Tᵀ of Eq. 12, as a CSR matrix on the boundary's device.

    With pixels flattened row-major (index y*w + x), affinities a_ij = a_ji for every pair
    closer than ``radius`` (path affinity of Eq. 7), a_ii = 1, and pairs leaving the grid absent,
    M[j, i] = a_ij^β / Σ_k a_kj^β; one random-walk step on a column layout [h*w, N] is M @ y.
    Every row of M sums to 1.

    Args:
        boundary: float [h, w] in [0, 1]; the matrix has the boundary's dtype.
        beta: Hadamard power β (> 0) applied to the affinities.
        radius: pair radius r.
    Returns: sparse CSR [h*w, h*w] with ≤ (2P + 1)·h·w stored entries, P = len(search_offsets(r)).
    """
    h, w = boundary.shape
    device = boundary.device
    offsets, forward, backward = _pair_weights(boundary, beta, radius)
    degree = 1.0 + forward.sum(0) + backward.sum(0)
    neighbours = [(0, 0)] + offsets + [(-dy, -dx) for dy, dx in offsets]
    values = torch.cat([torch.ones_like(degree)[None], forward, backward]) / degree
    # Row-major order of the neighbour offsets gives increasing column indices inside a row.
    order = sorted(range(len(neighbours)), key=neighbours.__getitem__)
    step = torch.tensor([neighbours[k] for k in order], dtype=torch.int64, device=device)
    values = values[torch.tensor(order, device=device)]
    ys = torch.arange(h, device=device).view(1, h, 1) + step[:, 0].view(-1, 1, 1)
    xs = torch.arange(w, device=device).view(1, 1, w) + step[:, 1].view(-1, 1, 1)
    valid = ((ys >= 0) & (ys < h) & (xs >= 0) & (xs < w)).permute(1, 2, 0).reshape(h * w, -1)
    index_dtype = torch.int32 if h * w * len(neighbours) < 2**31 else torch.int64
    columns = (ys * w + xs).permute(1, 2, 0).reshape(h * w, -1)[valid].to(index_dtype)
    entries = values.permute(1, 2, 0).reshape(h * w, -1)[valid]
    rows = torch.zeros(h * w + 1, dtype=index_dtype, device=device)
    rows[1:] = valid.sum(1).cumsum(0)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Ss]parse CSR tensor support is in beta.*")
        return torch.sparse_csr_tensor(
            rows, columns, entries, size=(h * w, h * w), check_invariants=False
        )


@torch.no_grad()
def random_walk(
    x: torch.Tensor,
    boundary: torch.Tensor,
    *,
    beta: float = 10.0,
    steps: int = 256,
    radius: int = 5,
    compute_dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Propagate score maps by a random walk on boundary affinities: (x ⊙ (1 − B)) · T^steps.

    Row-vector semantics of the official ``propagate_to_edge`` (exp_times=8 ⇔ steps=256):
    out_j = Σ_i x'_i (T^steps)_ij with x' = x ⊙ (1 − B), T_ij = a_ij^β / Σ_k a_kj^β, a_ij the path
    affinity 1 − max_Π B for every pair within ``radius`` in both directions, a_ii = 1, pairs
    leaving the image absent. Memory and time are O(h·w·r²) per step; no dense matrix.
    Device follows the inputs; not differentiable.

    Args:
        x: float [N, h, w], e.g. CAMs in [0, 1] (any non-negative scores).
        boundary: float [h, w] in [0, 1], class-boundary probability B.
        beta: Hadamard power β (> 0); 10 in the paper.
        steps: number of transition steps t (any integer >= 0); 256 in the official code.
        radius: pair radius r; 5 for inference.
        compute_dtype: internal dtype (float32 or float64). float64 by default because 256
            sequential float32 steps accumulate ~1e-4 relative rounding error (the same rounding
            repeats every step once the walk has nearly converged).
    Returns: [N, h, w] in x's dtype on x's device; each map's values stay within
        [0, max x'] and mass does not cross a closed boundary of B = 1.
    """
    if x.dim() != 3 or boundary.shape != x.shape[-2:]:
        raise ValueError(
            f"expected x [N,h,w] and boundary [h,w], got {tuple(x.shape)}, {tuple(boundary.shape)}"
        )
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    dtype = torch.promote_types(compute_dtype, torch.float32)
    n, h, w = x.shape
    bound = boundary.to(device=x.device, dtype=dtype)
    # Column layout [h*w, N] so one step is a single sparse-dense product.
    state = (x.to(dtype) * (1.0 - bound)).reshape(n, h * w).t().contiguous()
    if steps > 0 and n > 0:
        operator = transition_matrix(bound, beta=beta, radius=radius)
        for _ in range(steps):
            state = operator @ state
    return state.t().reshape(n, h, w).to(x.dtype)
