"""Colour maps of the report's preview panels: pure numpy, arrays in, uint8 RGB arrays out."""

from __future__ import annotations

import numpy as np

__all__ = ["direction_wheel", "displacement_colours", "displacement_scale", "hsv_to_rgb", "instance_colours", "jet",
           "to_uint8"]

GOLDEN_RATIO_CONJUGATE = 0.6180339887498949


def to_uint8(values: np.ndarray) -> np.ndarray:
    """float [...] in [0, 1] -> uint8 [...] in [0, 255]."""
    return np.round(np.asarray(values, dtype=np.float32) * 255.0).astype(np.uint8)


def jet(values: np.ndarray) -> np.ndarray:
    """values: float [...] in [0, 1] -> uint8 [..., 3], the piecewise-linear 'jet' colormap."""
    x = np.clip(np.nan_to_num(np.asarray(values, dtype=np.float32)), 0.0, 1.0)[..., None]
    centres = np.array([3.0, 2.0, 1.0], dtype=np.float32)  # r, g, b peaks at x = 3/4, 1/2, 1/4
    return to_uint8(np.clip(1.5 - np.abs(4.0 * x - centres), 0.0, 1.0))


def hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """h, s, v: float [...] in [0, 1] (h wraps around) -> float32 [..., 3] in [0, 1]."""
    h, s, v = np.broadcast_arrays(*(np.asarray(a, dtype=np.float32) for a in (h, s, v)))
    h6 = (h % 1.0) * 6.0
    sector = np.floor(h6).astype(np.int64) % 6
    f = h6 - np.floor(h6)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    # Per sector (0..5), which of (v, t, p, q) is r, g and b.
    table = np.array([[0, 1, 2], [3, 0, 2], [2, 0, 1], [2, 3, 0], [1, 2, 0], [0, 2, 3]])
    choices = np.stack([v, t, p, q], axis=-1)
    return np.take_along_axis(choices, table[sector], axis=-1)


def instance_colours(ids: np.ndarray) -> np.ndarray:
    """ids: int [...] (>= 1) -> uint8 [..., 3]; golden-ratio hue steps, so nearby ids differ most."""
    hue = (np.asarray(ids, dtype=np.float64) * GOLDEN_RATIO_CONJUGATE) % 1.0
    return to_uint8(hsv_to_rgb(hue, np.full_like(hue, 0.85), np.full_like(hue, 1.0)))


def displacement_scale(displacement: np.ndarray, *, percentile: float = 99.0) -> float:
    """The length shown at full brightness: a high percentile of the field's lengths.

    A percentile rather than the maximum, so a few long outliers do not darken the rest; a
    per-image scale, because a trained field spans tens of cells and an early one under one.

    Args:
        displacement: float [2, h, w] (dy, dx), any unit (IRNet's: grid cells).
        percentile: in [0, 100].

    Returns:
        float >= 0 in the field's unit; 0 only when every finite length is 0.
    """
    lengths = np.hypot(*np.nan_to_num(np.asarray(displacement, dtype=np.float32)))
    scale = float(np.percentile(lengths, percentile)) if lengths.size else 0.0
    return scale if scale > 0 else float(lengths.max(initial=0.0))


def displacement_colours(displacement: np.ndarray, *, scale: float) -> np.ndarray:
    """displacement: float [2, h, w] (dy, dx), rows down -> uint8 [h, w, 3] (HSV with full saturation).

    Hue is the direction, atan2(dy, dx) over a full turn: right red (0°), down yellow-green (90°),
    left cyan (180°), up violet (270°). Value is the length over ``scale`` (same unit as the
    field), clipped to 1: zero length is black, lengths >= ``scale`` full brightness. A
    ``scale`` <= 0 (a field of zeros) gives black.
    """
    dy, dx = np.nan_to_num(np.asarray(displacement, dtype=np.float32))
    hue = (np.arctan2(dy, dx) / (2 * np.pi)) % 1.0
    value = np.clip(np.hypot(dy, dx) / scale, 0.0, 1.0) if scale > 0 else np.zeros_like(hue)
    return to_uint8(hsv_to_rgb(hue, np.ones_like(hue), value))


def direction_wheel(size: int = 64, *, background: tuple[int, int, int] = (255, 255, 255)) -> np.ndarray:
    """The legend of :func:`displacement_colours`: uint8 [size, size, 3].

    Each pixel of the disc is coloured as a displacement from the centre to it, with the radius as
    ``scale``: black centre, full-brightness rim, hue by direction. Outside the disc: ``background``.
    """
    centre = (size - 1) / 2.0
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) - centre
    wheel = displacement_colours(np.stack([y, x]), scale=centre)
    wheel[np.hypot(y, x) > centre + 0.5] = background
    return wheel
