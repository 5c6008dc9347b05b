"""Class attention maps (Eq. 1) from the multi-scale, flip-augmented outputs of the CAM network.

The network itself lives in ``pipeline.models``; this module only turns its per-scale class maps
into the two CAM resolutions the rest of the pipeline uses:

* stride-4 CAMs on the h×w grid, h = ceil(H/4), w = ceil(W/4) — the grid of IRNet's outputs, used
  for label synthesis;
* high-resolution CAMs on the full H×W image — used for relation mining.

Alignment of the stride-16 features with the image: the backbone sees an H×W image and produces
ceil(H/16)×ceil(W/16) features, each covering a 16×16 cell. Resizing them straight to H×W would
stretch the cells when H or W is not a multiple of 16, so (like the official implementation) the
maps are resized to the padded size 16·ceil(H/16) × 16·ceil(W/16), where every feature covers
exactly 16×16 pixels, and then cropped to the top-left H×W. The stride-4 grid uses a direct resize
to h×w, again as the official code does.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = ["strided_size", "strided_up_size", "make_cams"]

# Added to each class maximum before normalising so that all-zero maps stay zero (no 0/0).
_NORM_EPS = 1e-5


def strided_size(image_size: Sequence[int], stride: int = 4) -> tuple[int, int]:
    """Size of the feature grid of stride ``stride`` for an image of ``image_size``.

    Args:
        image_size: (H, W) of the image in pixels, positive ints.
        stride: grid stride in pixels (4 for the CAM/IRNet label grid).

    Returns:
        (ceil(H / stride), ceil(W / stride)).
    """
    height, width = int(image_size[0]), int(image_size[1])
    return (height + stride - 1) // stride, (width + stride - 1) // stride


def strided_up_size(image_size: Sequence[int], stride: int = 16) -> tuple[int, int]:
    """Image size rounded up to a multiple of ``stride``: (stride·ceil(H/stride), stride·ceil(W/stride)).

    Args:
        image_size: (H, W) of the image in pixels, positive ints.
        stride: feature stride in pixels (16 for the CAM backbone).
    """
    grid_h, grid_w = strided_size(image_size, stride)
    return grid_h * stride, grid_w * stride


def _normalise_per_class(maps: torch.Tensor) -> torch.Tensor:
    """Divide each [h, w] map of ``maps`` [K, h, w] by its own maximum + 1e-5."""
    if maps.shape[0] == 0:
        return maps
    peak = maps.flatten(1).amax(dim=1).view(-1, 1, 1)
    return maps / (peak + _NORM_EPS)


def make_cams(
    scale_outputs: Sequence[torch.Tensor],
    image_size: Sequence[int],
    class_indices: Sequence[int] | torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fuse multi-scale, flip-augmented class maps into normalised CAMs (Eq. 1).

    For each scale the maps of the image and of its horizontal flip (flipped back here) are added,
    resized bilinearly (align_corners=False) to the stride-4 grid and to the stride-16-aligned full
    resolution (cropped to H×W, see the module docstring), and summed over scales. Only the tagged
    classes are kept, and each class map is divided by its maximum + 1e-5.

    Args:
        scale_outputs: one tensor per scale, float [2, C, hs, ws], non-negative (ReLU'd class
            maps). Index 0 is the image, index 1 the horizontally flipped image's maps, still in
            flipped orientation. All tensors on the same device.
        image_size: (H, W) of the original image.
        class_indices: K tagged classes as 0-based indices into C (class id − 1), ints.

    Returns:
        (stride4_cams, highres_cams): float32 [K, h, w] with (h, w) = ``strided_size(image_size)``
        and float32 [K, H, W], both in [0, 1), on the device of ``scale_outputs``. A tagged class
        whose maps are zero everywhere stays zero.
    """
    if len(scale_outputs) == 0:
        raise ValueError("make_cams needs the outputs of at least one scale")
    height, width = int(image_size[0]), int(image_size[1])
    grid = strided_size((height, width), 4)
    padded = strided_up_size((height, width), 16)
    device = scale_outputs[0].device
    index = torch.as_tensor(class_indices, dtype=torch.long, device=device).reshape(-1)
    if index.numel() == 0:  # an image without tags: nothing to resize
        return (torch.zeros((0,) + grid, device=device), torch.zeros((0, height, width), device=device))

    stride4_sum = None
    highres_sum = None
    for output in scale_outputs:
        if output.dim() != 4 or output.shape[0] != 2:
            raise ValueError(f"expected a [2, C, hs, ws] tensor per scale, got {tuple(output.shape)}")
        # Select the tagged classes first: the resize is per channel, so this is exact and cheaper.
        fused = (output[0] + output[1].flip(-1)).index_select(0, index).float().unsqueeze(0)
        low = F.interpolate(fused, size=grid, mode="bilinear", align_corners=False)[0]
        high = F.interpolate(fused, size=padded, mode="bilinear", align_corners=False)[0]
        high = high[:, :height, :width]
        stride4_sum = low if stride4_sum is None else stride4_sum + low
        highres_sum = high if highres_sum is None else highres_sum + high

    return _normalise_per_class(stride4_sum), _normalise_per_class(highres_sum)
