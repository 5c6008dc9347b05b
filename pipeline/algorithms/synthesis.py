"""Pseudo label synthesis from CAMs, IRNet's class boundary map and displacement field (Sec. 5).

Full method:

* :func:`semantic_labels` — random walk of the class CAMs (the "reduced framework" of Sec. 6.2);
* :func:`instance_labels` — instance-wise CAMs (Eq. 11) propagated by random walk (Eq. 12, 13).

Ablations of the paper's Tables 1 and 2, so the evaluation can report them:

* :func:`cam_semantic_labels` — raw CAMs, no propagation (Table 2, "CAM");
* :func:`cam_instance_labels` — raw CAMs thresholded, connected components (Table 1, "CAM");
* :func:`cam_boundary_instance_labels` — CAMs propagated with the boundary map, connected
  components, no displacement field (Table 1, "CAM + Class Boundary").

All of them share one scoring path (:func:`_channel_scores`: ×4 upsampling, crop, division by the
global maximum, background channel; :func:`_winning_channels`: their argmax) and the instance
variants share one instance extraction (:func:`_split_into_instances`: 4-connected components with
max-score and the small-fragment rule). :func:`semantic_scores` and :func:`cam_semantic_scores`
return the semantic labels with the scores they were chosen from (the doubt signal ``walk_margin``
reads how close the runner-up came).

Default background thresholds: 0.25 for the propagated maps (official ``sem_seg_bg_thres`` and
``ins_seg_bg_thres``). The paper gives no value for thresholding raw CAMs; the CAM ablations use
0.15, the official ``cam_eval_thres`` with which the CAM row of Table 2 is evaluated, and the same
value is used for the raw-CAM instance row of Table 1.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .cams import strided_size
from .instances import density_groups, instance_groups
from .propagation import random_walk

__all__ = [
    "semantic_labels",
    "semantic_scores",
    "semantic_sweep",
    "instance_labels",
    "instance_sweep",
    "pixel_groups",
    "cam_semantic_labels",
    "cam_semantic_scores",
    "cam_instance_labels",
    "cam_boundary_instance_labels",
]

_CAM_BG_THRESHOLD = 0.15


def _as_cams(cams, image_size: Sequence[int]) -> torch.Tensor:
    """float32 [K, h, w] tensor on the input's device; checks h×w is the stride-4 grid of H×W."""
    tensor = torch.as_tensor(cams).float()
    if tensor.dim() != 3:
        raise ValueError(f"cams must be [K, h, w], got {tuple(tensor.shape)}")
    expected = strided_size(image_size, 4)
    if tuple(tensor.shape[1:]) != expected:
        raise ValueError(f"cams grid {tuple(tensor.shape[1:])} is not the stride-4 grid {expected}")
    return tensor


def _as_grid_map(values, like: torch.Tensor, name: str) -> torch.Tensor:
    """float32 [h, w] tensor on the device of ``like`` [K, h, w]."""
    tensor = torch.as_tensor(values).to(device=like.device, dtype=torch.float32)
    if tuple(tensor.shape) != tuple(like.shape[1:]):
        raise ValueError(f"{name} {tuple(tensor.shape)} does not match the CAM grid {tuple(like.shape[1:])}")
    return tensor


def _class_lookup(class_ids, count: int) -> np.ndarray:
    """int64 [count + 1]: index 0 -> background 0, index k -> class_ids[k − 1]."""
    keys = np.asarray(class_ids, dtype=np.int64).reshape(-1)
    if keys.shape[0] != count:
        raise ValueError(f"{keys.shape[0]} class ids for {count} CAM channels")
    return np.concatenate([[0], keys])


def _propagate(maps: torch.Tensor, boundary: torch.Tensor, *, beta: float, steps: int, radius: int):
    """random_walk, tolerating zero maps (an image without tags)."""
    if maps.shape[0] == 0:
        return maps
    return random_walk(maps, boundary, beta=beta, steps=steps, radius=radius)


def _channel_scores(maps: torch.Tensor, image_size: Sequence[int], bg_threshold: float) -> torch.Tensor:
    """float32 [N + 1, H, W]: a constant background channel ``bg_threshold``, then the stride-4
    score maps ``maps`` [N, h, w] upsampled ×4 (bilinear, align_corners=False), cropped to H×W and
    divided by their global maximum (left as is when it is not positive)."""
    height, width = int(image_size[0]), int(image_size[1])
    if maps.shape[0] == 0:
        return torch.full((1, height, width), bg_threshold, dtype=torch.float32, device=maps.device)
    up = F.interpolate(maps.unsqueeze(0), scale_factor=4, mode="bilinear", align_corners=False)
    up = up[0, :, :height, :width]
    peak = up.max()
    if peak > 0:
        up = up / peak
    return torch.cat([torch.full_like(up[:1], bg_threshold), up])


def _winning_channels(
    maps: torch.Tensor, image_size: Sequence[int], bg_threshold: float
) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel winning channel of stride-4 score maps at full resolution: the argmax of
    :func:`_channel_scores`.

    Args:
        maps: float [N, h, w] non-negative score maps on the stride-4 grid.

    Returns:
        (index, score): int64 [H, W] with 0 = background and n = channel n − 1, and float32 [H, W],
        the normalised score of the winning channel (``bg_threshold`` where background wins).
    """
    score, index = _channel_scores(maps, image_size, bg_threshold).max(dim=0)
    return index.cpu().numpy().astype(np.int64), score.cpu().numpy().astype(np.float32)


def _scored_labels(maps: torch.Tensor, lookup: np.ndarray, image_size: Sequence[int],
                   bg_threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """uint8 [H, W] class ids by :func:`_winning_channels`, and the float32 [N + 1, H, W]
    :func:`_channel_scores` they were chosen from."""
    scores = _channel_scores(maps, image_size, bg_threshold)
    index = scores.max(dim=0)[1].cpu().numpy().astype(np.int64)
    return lookup[index].astype(np.uint8), scores.cpu().numpy().astype(np.float32)


def _split_into_instances(
    index: np.ndarray, score: np.ndarray, region_classes: np.ndarray, min_size: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every 4-connected component of every non-background region becomes one instance.

    Args:
        index: int64 [H, W] region map, 0 = background, n ≥ 1 = region n − 1.
        score: float32 [H, W] score of the region at each pixel.
        region_classes: int [R], class id of each region.
        min_size: components with fewer pixels than this get score 0.

    Returns:
        masks bool [N, H, W], classes int64 [N], scores float32 [N], components in raster order of
        their first pixel. Score = maximum of ``score`` inside the component.
    """
    from scipy import ndimage
    from skimage.measure import label as connected_components

    height, width = index.shape
    # Pixels of equal (non-zero) value are connected, so one call labels every region's pieces.
    components = connected_components(index, connectivity=1, background=0)
    count = int(components.max())
    if count == 0:
        return np.zeros((0, height, width), bool), np.zeros(0, np.int64), np.zeros(0, np.float32)
    ids = np.arange(1, count + 1)
    sizes = np.bincount(components.ravel(), minlength=count + 1)[1:]
    peaks = np.asarray(ndimage.maximum(score, components, ids), dtype=np.float32)
    # All pixels of a component share one region index, so its maximum is that index.
    regions = np.asarray(ndimage.maximum(index, components, ids)).astype(np.int64) - 1
    classes = np.asarray(region_classes, dtype=np.int64)[regions]
    scores = np.where(sizes < min_size, np.float32(0), peaks).astype(np.float32)
    masks = components[None] == ids[:, None, None]
    return masks, classes, scores


def semantic_labels(
    cams,
    class_ids,
    boundary,
    image_size: Sequence[int],
    *,
    bg_threshold: float = 0.25,
    beta: float = 10.0,
    steps: int = 256,
    radius: int = 5,
) -> np.ndarray:
    """Semantic pseudo label of one image: random walk of the class CAMs (Sec. 5.2, 6.2).

    Args:
        cams: float [K, h, w] stride-4 CAMs in [0, 1] (numpy or torch on any device; the walk runs
            on that device), (h, w) = (ceil(H/4), ceil(W/4)).
        class_ids: K class ids (1..C) of the CAM channels.
        boundary: float [h, w] class boundary probabilities in [0, 1].
        image_size: (H, W) of the image.
        bg_threshold: background score after normalising by the global maximum, in [0, 1].
        beta, steps, radius: random-walk hyperparameters (Eq. 12, 13, inference radius).

    Returns:
        uint8 numpy [H, W]: 0 = background, else a class id from ``class_ids``.
    """
    return semantic_scores(cams, class_ids, boundary, image_size, bg_threshold=bg_threshold, beta=beta,
                           steps=steps, radius=radius)[0]


def semantic_scores(cams, class_ids, boundary, image_size: Sequence[int], *, bg_threshold: float = 0.25,
                    beta: float = 10.0, steps: int = 256, radius: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """:func:`semantic_labels` and the scores its argmax chose from: float32 [K + 1, H, W], the
    background ``bg_threshold`` first, then the walked CAMs divided by their global maximum (in
    [0, 1]), in ``class_ids`` order."""
    maps = _as_cams(cams, image_size)
    lookup = _class_lookup(class_ids, maps.shape[0])
    walked = _propagate(maps, _as_grid_map(boundary, maps, "boundary"), beta=beta, steps=steps, radius=radius)
    return _scored_labels(walked, lookup, image_size, bg_threshold)


def semantic_sweep(cams, class_ids, boundary, image_size: Sequence[int], *, bg_thresholds: Sequence[float],
                   beta: float = 10.0, steps: int = 256, radius: int = 5) -> list[np.ndarray]:
    """:func:`semantic_labels` at several background thresholds from one random walk
    (threshold tuning); one uint8 [H, W] map per threshold."""
    maps = _as_cams(cams, image_size)
    lookup = _class_lookup(class_ids, maps.shape[0])
    walked = _propagate(maps, _as_grid_map(boundary, maps, "boundary"), beta=beta, steps=steps, radius=radius)
    return [lookup[_winning_channels(walked, image_size, t)[0]].astype(np.uint8) for t in bg_thresholds]


def instance_labels(
    cams,
    class_ids,
    boundary,
    displacement,
    image_size: Sequence[int],
    *,
    bg_threshold: float = 0.25,
    beta: float = 10.0,
    steps: int = 256,
    radius: int = 5,
    iterations: int = 100,
    threshold: float = 2.5,
    min_fragment: float = 0.01,
    grouping: str = "official",
    sigma: float = 1.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Instance pseudo labels of one image (Eq. 11–13, Sec. 5.2).

    The displacement field gives G class-agnostic groups (:func:`instance_groups`, or with
    ``grouping="density"`` :func:`density_groups`). For every
    class c and group k the CAM of c restricted to group k is propagated (one random walk over all
    K·G maps); after ×4 upsampling, cropping and division by the global maximum, each pixel takes
    the best of (background = ``bg_threshold``, every (c, k)). Each 4-connected component of a
    (c, k) region is an instance of class c scored by the maximum (c, k) score inside it;
    components smaller than ``min_fragment``·H·W pixels get score 0.

    Args:
        cams: float [K, h, w] stride-4 CAMs in [0, 1] (numpy or torch on any device).
        class_ids: K class ids (1..C).
        boundary: float [h, w] boundary probabilities in [0, 1].
        displacement: float [2, h, w] (dy, dx) displacement field in grid units, mean-subtracted.
        image_size: (H, W).
        bg_threshold, beta, steps, radius: as in :func:`semantic_labels`.
        iterations, threshold: centroid refinement steps and candidate threshold (Eq. 10, 14).
        min_fragment: fraction of the image below which an instance's score is set to 0.
        grouping: "official" (Eq. 10, 14) or "density" (vote peaks; ``sigma`` smooths the votes,
            and a peak needs ``min_fragment`` of the grid's pixels to be a group of its own).

    Returns:
        masks bool [N, H, W] (pairwise disjoint), classes int64 [N] (class ids), scores float32
        [N] in [0, 1].
    """
    return instance_sweep(cams, class_ids, boundary, displacement, image_size, bg_thresholds=[bg_threshold],
                          beta=beta, steps=steps, radius=radius, iterations=iterations, threshold=threshold,
                          min_fragment=min_fragment, grouping=grouping, sigma=sigma)[0]


def instance_sweep(cams, class_ids, boundary, displacement, image_size: Sequence[int], *,
                   bg_thresholds: Sequence[float], beta: float = 10.0, steps: int = 256, radius: int = 5,
                   iterations: int = 100, threshold: float = 2.5, min_fragment: float = 0.01,
                   grouping: str = "official", sigma: float = 1.0, groups: np.ndarray | None = None,
                   ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """:func:`instance_labels` at several background thresholds from one grouping and one random
    walk (threshold tuning); one (masks, classes, scores) per threshold. ``groups``: this
    displacement's :func:`pixel_groups`, when already computed (sweeping β reuses them)."""
    maps = _as_cams(cams, image_size)
    lookup = _class_lookup(class_ids, maps.shape[0])
    field = torch.as_tensor(displacement).to(maps.device)
    if tuple(field.shape) != (2,) + tuple(maps.shape[1:]):
        raise ValueError(f"displacement {tuple(field.shape)} does not match the CAM grid")
    if groups is None:
        groups = pixel_groups(field, grouping=grouping, iterations=iterations, threshold=threshold,
                              min_fragment=min_fragment, sigma=sigma)
    groups = torch.as_tensor(groups).to(maps.device)
    count = int(groups.max()) + 1
    in_group = groups.unsqueeze(0) == torch.arange(count, device=maps.device).view(-1, 1, 1)
    # Channel c·G + k is class c restricted to group k (Eq. 11).
    instance_cams = (maps.unsqueeze(1) * in_group.unsqueeze(0)).flatten(0, 1)
    walked = _propagate(
        instance_cams, _as_grid_map(boundary, maps, "boundary"), beta=beta, steps=steps, radius=radius
    )
    region_classes = np.repeat(lookup[1:], count)
    out = []
    for bg_threshold in bg_thresholds:
        index, score = _winning_channels(walked, image_size, bg_threshold)
        out.append(_split_into_instances(index, score, region_classes, min_fragment * index.size))
    return out


def pixel_groups(displacement, *, grouping: str = "official", iterations: int = 100, threshold: float = 2.5,
                 min_fragment: float = 0.01, sigma: float = 1.0) -> np.ndarray:
    """The class-agnostic groups of :func:`instance_labels`: int64 [h, w] from
    :func:`instance_groups` (``grouping="official"``) or :func:`density_groups` (``"density"``)."""
    if grouping == "density":
        return density_groups(displacement, sigma=sigma, min_share=min_fragment)
    if grouping == "official":
        return instance_groups(displacement, iterations=iterations, threshold=threshold)
    raise ValueError(f"grouping must be 'official' or 'density', got {grouping!r}")


def cam_semantic_labels(
    cams, class_ids, image_size: Sequence[int], *, bg_threshold: float = _CAM_BG_THRESHOLD
) -> np.ndarray:
    """Semantic labels from raw CAMs, without propagation (Table 2, "CAM" ablation).

    Same scoring as :func:`semantic_labels` minus the random walk: ×4 upsampling, crop, division
    by the global maximum (≈ 1 already for per-class normalised CAMs), background channel, argmax.

    Args:
        cams: float [K, h, w] stride-4 CAMs in [0, 1]; class_ids: K class ids; image_size: (H, W).
        bg_threshold: background score; default 0.15 (official CAM evaluation threshold).

    Returns:
        uint8 numpy [H, W]: 0 = background, else a class id.
    """
    return cam_semantic_scores(cams, class_ids, image_size, bg_threshold=bg_threshold)[0]


def cam_semantic_scores(cams, class_ids, image_size: Sequence[int], *, bg_threshold: float = _CAM_BG_THRESHOLD,
                        ) -> tuple[np.ndarray, np.ndarray]:
    """:func:`cam_semantic_labels` and the float32 [K + 1, H, W] scores its argmax chose from
    (as in :func:`semantic_scores`, without the walk)."""
    maps = _as_cams(cams, image_size)
    return _scored_labels(maps, _class_lookup(class_ids, maps.shape[0]), image_size, bg_threshold)


def cam_instance_labels(
    cams,
    class_ids,
    image_size: Sequence[int],
    *,
    bg_threshold: float = _CAM_BG_THRESHOLD,
    min_fragment: float = 0.01,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Instances from raw CAMs (Table 1, "CAM" ablation).

    The CAM semantic map (:func:`cam_semantic_labels`' scoring) is split per class into
    4-connected components, each one instance scored by the maximum normalised CAM inside it.
    Touching instances of one class therefore merge, as the paper notes for this baseline. The
    small-fragment rule is the same as in :func:`instance_labels` so that the ablation rows differ
    only in the ablated inputs.

    Args:
        cams: float [K, h, w] stride-4 CAMs in [0, 1]; class_ids: K class ids; image_size: (H, W).
        bg_threshold: background score; default 0.15 (see the module docstring).
        min_fragment: fraction of the image below which an instance's score is set to 0.

    Returns:
        masks bool [N, H, W], classes int64 [N], scores float32 [N] in [0, 1].
    """
    maps = _as_cams(cams, image_size)
    lookup = _class_lookup(class_ids, maps.shape[0])
    index, score = _winning_channels(maps, image_size, bg_threshold)
    return _split_into_instances(index, score, lookup[1:], min_fragment * index.size)


def cam_boundary_instance_labels(
    cams,
    class_ids,
    boundary,
    image_size: Sequence[int],
    *,
    bg_threshold: float = 0.25,
    beta: float = 10.0,
    steps: int = 256,
    radius: int = 5,
    min_fragment: float = 0.01,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Instances from CAMs propagated with the boundary map, no displacement field (Table 1,
    "CAM + Class Boundary" ablation).

    The semantic map of :func:`semantic_labels` is split per class into 4-connected components,
    each scored by the maximum propagated score inside it. Equals :func:`instance_labels` with a
    single instance group.

    Args:
        cams, class_ids, boundary, image_size, bg_threshold, beta, steps, radius, min_fragment:
            as in :func:`instance_labels`.

    Returns:
        masks bool [N, H, W], classes int64 [N], scores float32 [N] in [0, 1].
    """
    maps = _as_cams(cams, image_size)
    lookup = _class_lookup(class_ids, maps.shape[0])
    walked = _propagate(maps, _as_grid_map(boundary, maps, "boundary"), beta=beta, steps=steps, radius=radius)
    index, score = _winning_channels(walked, image_size, bg_threshold)
    return _split_into_instances(index, score, lookup[1:], min_fragment * index.size)
