"""CAMs from another method (``cams.source``): one ``<image_id>.npz`` per image.

Format: ``cams`` float16/32/64 [K, h, w] at any resolution (non-negative activations; negative
values are clipped by the ReLU) and ``class_ids`` int [K], 1-based ids into ``data.classes``, the
image's tags. Read with ``allow_pickle=False``: an object array is refused. Each map is resized
bilinearly to the stride-4 grid and to the full image, ReLU'd and divided by its maximum + 1e-5,
as CAMs of the CAM network are (Eq. 1). Anything else is a :class:`SourceCamError` whose reason
the CAM stage puts in quarantine.
"""

from __future__ import annotations

import io
import zipfile

import numpy as np
import torch
import torch.nn.functional as F

_NORM_EPS = 1e-5


class SourceCamError(ValueError):
    """A source CAM file that cannot be used; ``reason`` says why."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def read_source_cams(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    """(cams float32 [K, h, w], class_ids int64 [K]) of an npz file's bytes, checked."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            if "cams" not in npz or "class_ids" not in npz:
                raise SourceCamError(f"source CAM file lacks {'cams' if 'cams' not in npz else 'class_ids'}")
            cams, class_ids = npz["cams"], npz["class_ids"]
    except SourceCamError:
        raise
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as err:
        raise SourceCamError(f"source CAM file is not a readable npz ({type(err).__name__}: {err})") from None
    if cams.ndim != 3 or not np.issubdtype(cams.dtype, np.floating):
        raise SourceCamError(f"source cams must be float [K, h, w], got {cams.dtype} {cams.shape}")
    if class_ids.ndim != 1 or not np.issubdtype(class_ids.dtype, np.integer) or len(class_ids) != len(cams):
        raise SourceCamError(f"source class_ids must be int [K] with K = {len(cams)}, got {class_ids.dtype} "
                             f"{class_ids.shape}")
    if cams.size and 0 in cams.shape[1:]:
        raise SourceCamError(f"source cams are empty maps {cams.shape}")
    if not np.isfinite(cams).all():
        raise SourceCamError("source cams hold NaN or infinite values")
    return cams.astype(np.float32), class_ids.astype(np.int64)


def fit_source_cams(cams: np.ndarray, class_ids: np.ndarray, tags: list[int], num_classes: int,
                    image_size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Source CAMs of the tagged classes (in ``tags`` order) as (stride-4 [K, ceil(H/4), ceil(W/4)],
    full-resolution [K, H, W]) float32 in [0, 1)."""
    ids = [int(c) for c in class_ids]
    unknown = sorted(c for c in ids if not 1 <= c <= num_classes)
    if unknown:
        raise SourceCamError(f"source class ids {unknown} are not in 1..{num_classes} (data.classes)")
    if len(set(ids)) != len(ids):
        raise SourceCamError(f"source class ids {ids} repeat a class")
    if sorted(ids) != sorted(tags):
        raise SourceCamError(f"source class ids {sorted(ids)} disagree with the manifest's tags {sorted(tags)}")
    height, width = image_size
    grid = (-(-height // 4), -(-width // 4))
    if not ids:
        return np.zeros((0,) + grid, np.float32), np.zeros((0, height, width), np.float32)
    order = [ids.index(c) for c in tags]
    maps = torch.from_numpy(cams[order])[None]
    out = []
    for size in (grid, (height, width)):
        resized = F.relu(F.interpolate(maps, size=size, mode="bilinear", align_corners=False)[0])
        peak = resized.flatten(1).amax(dim=1).view(-1, 1, 1)
        out.append((resized / (peak + _NORM_EPS)).numpy())
    return out[0], out[1]
