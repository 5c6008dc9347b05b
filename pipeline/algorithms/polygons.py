"""Instance masks as polygons (YOLO segmentation labels) and back.

A mask becomes one polygon per 8-connected component (each line of a YOLO label file is one
object); a component with holes (a ring) becomes one polygon whose outline runs into each hole
along a zero-width cut and around it in the opposite direction, so an even-odd fill leaves the
hole empty. Vertices lie on the boundary between object and background pixels
(``skimage.measure.find_contours`` at level 0.5 on the padded mask, diagonal neighbours joined as
in the components) and are simplified with a tolerance below one pixel; a part too small to keep
three vertices keeps its exact outline, so no part is lost. Re-rasterising
(:func:`polygons_to_mask`) gives back the mask up to pixels on its boundary.
"""

from __future__ import annotations

import numpy as np

__all__ = ["mask_to_polygons", "polygons_to_mask"]


def _ring(contour: np.ndarray, tolerance: float) -> np.ndarray:
    """(row, col) contour of the padded mask -> simplified (x, y) vertices in image pixels."""
    from skimage.measure import approximate_polygon

    simplified = approximate_polygon(contour, tolerance=tolerance) if tolerance > 0 else contour
    if len(simplified) < 4:  # closed (last = first): a one- or two-pixel part became a segment
        simplified = contour
    xy = simplified[:, ::-1] - 1.0  # undo the one-pixel padding; (col, row) = (x, y)
    return xy[:-1] if len(xy) > 1 and np.allclose(xy[0], xy[-1]) else xy


def _signed_area(xy: np.ndarray) -> float:
    x, y = xy[:, 0], xy[:, 1]
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y))


def _bridge(outer: np.ndarray, hole: np.ndarray) -> np.ndarray:
    """``outer`` with ``hole`` spliced in at their closest vertices (a zero-width cut)."""
    distances = ((outer[:, None, :] - hole[None, :, :]) ** 2).sum(-1)
    i, j = np.unravel_index(int(distances.argmin()), distances.shape)
    if _signed_area(hole) * _signed_area(outer) > 0:  # a hole runs the other way round
        hole = hole[::-1]
        j = len(hole) - 1 - j
    hole_loop = np.concatenate([hole[j:], hole[: j + 1]])
    return np.concatenate([outer[: i + 1], hole_loop, outer[i:]])


def mask_to_polygons(mask: np.ndarray, *, tolerance: float = 0.5, min_pixels: int = 1) -> list[np.ndarray]:
    """Polygons of a binary mask, one per 8-connected component (holes spliced in).

    Args:
        mask: bool [H, W].
        tolerance: largest distance (pixels) a simplified outline may stray from the exact one.
        min_pixels: components with fewer pixels are left out.
    Returns: list of float64 [V, 2] arrays of (x, y) vertices in pixel-centre coordinates (pixel
        (r, c) is centred on (x, y) = (c, r); edge coordinates are these + 0.5).
    """
    from skimage.measure import find_contours, label

    mask = np.asarray(mask, bool)
    components = label(mask, connectivity=2)
    polygons = []
    for index in range(1, int(components.max()) + 1):
        component = components == index
        if component.sum() < min_pixels:
            continue
        padded = np.pad(component, 1).astype(np.float32)
        contours = [c for c in find_contours(padded, 0.5, fully_connected="high") if len(c) >= 3]
        if not contours:
            continue
        rings = [_ring(c, tolerance) for c in contours]
        rings = [r for r in rings if len(r) >= 3]
        if not rings:
            continue
        # The outer boundary encloses the largest area; the others bound holes.
        order = np.argsort([-abs(_signed_area(r)) for r in rings])
        outline = rings[order[0]]
        for k in order[1:]:
            outline = _bridge(outline, rings[k])
        polygons.append(outline)
    return polygons


def polygons_to_mask(polygons: list[np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    """Rasterise polygons of (x, y) vertices (pixel-centre coordinates) into bool [H, W], each with
    an even-odd fill (holes stay empty), the union over polygons."""
    from skimage.draw import polygon as fill

    out = np.zeros(shape, bool)
    for xy in polygons:
        canvas = np.zeros(shape, np.int32)
        rows, cols = fill(xy[:, 1], xy[:, 0], shape)
        # skimage fills by even-odd scanlines over the whole outline, the cut included.
        canvas[rows, cols] = 1
        out |= canvas.astype(bool)
    return out
