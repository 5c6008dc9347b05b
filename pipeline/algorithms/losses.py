"""IRNet training losses (Eq. 5, 6, 8, 9) with the official implementation's scaling."""

from __future__ import annotations

import torch

from .pairs import destination_values, path_affinities, search_offsets

EPS = 1e-5


def _masked_mean(values: torch.Tensor, mask: torch.Tensor, *, per_mask: int = 1) -> torch.Tensor:
    """Σ mask·values / (per_mask·Σ mask + 1e-5): a mean that is 0, not NaN, for an empty mask."""
    return (values * mask).sum() / (per_mask * mask.sum() + EPS)


def irn_losses(
    boundary_logits: torch.Tensor,
    displacement: torch.Tensor,
    bg_positive: torch.Tensor,
    fg_positive: torch.Tensor,
    negative: torch.Tensor,
    *,
    radius: int = 10,
    target: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Affinity (boundary) and displacement losses of IRNet for one batch.

    Pairs are (i, j = i + o) for o in ``search_offsets(radius)``, laid out [B, P, h, w] by source
    pixel as produced by :func:`pipeline.algorithms.pairs.relation_pair_labels`; label masks must
    be False for pairs whose destination leaves the grid. Means run over all pairs of the whole
    batch, as sum / (count + 1e-5).

    - P_bg, P_fg: mean of -log(a + 1e-5) over bg- / fg-positive pairs, a = 1 - max_Π sigmoid(logit).
    - N: mean of -log(1 + 1e-5 - a) over negative pairs.
    - L_aff = ((P_bg + P_fg)/2 + N)/2 (Eq. 8 up to the factor 1/2 of the official code).
    - D_fg: mean over fg-positive pairs and the two coordinates of |δ - δ̂| with
      δ = D(x_i) - D(x_j), δ̂ = x_j - x_i = o (Eq. 5).
    - D_bg: the same of |δ| over bg-positive pairs (Eq. 6).
    - D_exact: Σ |D(x) - target(x)| over the cells and two coordinates where ``target`` is
      finite, divided by the number of all cells and coordinates of the batch: the exact
      displacement to the centroid on images people labelled (not in the paper; 0 without targets,
      so the official loss is unchanged, docs/fidelity.md).
    - total = L_aff + (D_fg + D_bg + D_exact)/2.

    Args:
        boundary_logits: float [B, 1, h, w], boundary logits (B = sigmoid).
        displacement: float [B, 2, h, w], channels (dy, dx) in stride-4 grid units.
        bg_positive, fg_positive, negative: bool or float {0, 1} [B, P, h, w].
        radius: pair radius r the labels were built with (10 in the paper).
        target: float [B, 2, h, w] exact displacements in grid units, NaN where there is none.
    Returns: dict of scalar tensors "P_bg", "P_fg", "N", "L_aff", "D_fg", "D_bg", "D_exact", "total", all
        non-negative and differentiable with respect to both network outputs.
    """
    offsets = search_offsets(radius)
    if bg_positive.shape[-3] != len(offsets):
        raise ValueError(
            f"labels have {bg_positive.shape[-3]} pairs per pixel, radius {radius} has {len(offsets)}"
        )
    dtype = boundary_logits.dtype
    bg, fg, neg = (m.to(dtype) for m in (bg_positive, fg_positive, negative))

    affinity = path_affinities(torch.sigmoid(boundary_logits[:, 0]), radius)  # [B, P, h, w]
    positive_term = -torch.log(affinity + EPS)
    p_bg = _masked_mean(positive_term, bg)
    p_fg = _masked_mean(positive_term, fg)
    n = _masked_mean(-torch.log(1.0 + EPS - affinity), neg)
    l_aff = ((p_bg + p_fg) / 2 + n) / 2

    # δ(i, j) = D(x_i) - D(x_j), [B, 2, P, h, w]; destinations outside the grid read 0 (masked).
    delta = displacement.unsqueeze(2) - destination_values(displacement, radius, fill=0.0)
    pair_offset = torch.as_tensor(offsets.T, dtype=displacement.dtype, device=displacement.device)
    pair_offset = pair_offset.view(1, 2, -1, 1, 1)
    d_fg = _masked_mean((delta - pair_offset).abs(), fg.unsqueeze(1), per_mask=2)
    d_bg = _masked_mean(delta.abs(), bg.unsqueeze(1), per_mask=2)

    d_exact = displacement.new_zeros(())
    if target is not None:
        known = torch.isfinite(target)
        # Over every cell of the batch (unknown ones count 0): a corrected pixel weighs as much as
        # any other, however few corrected images a batch holds.
        d_exact = ((displacement - torch.nan_to_num(target)).abs() * known.to(dtype)).sum() / (known.numel() + EPS)

    total = l_aff + (d_fg + d_bg + d_exact) / 2
    return {"P_bg": p_bg, "P_fg": p_fg, "N": n, "L_aff": l_aff, "D_fg": d_fg, "D_bg": d_bg, "D_exact": d_exact,
            "total": total}
