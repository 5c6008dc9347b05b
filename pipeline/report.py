"""A self-contained HTML run report: summary, stage timings, per-class metrics, ablation, previews.

Rendering is pure (arrays and records in, PNG bytes and HTML text out); only ``write_report`` touches
storage. The page has inline CSS, no JavaScript and no external references: every image is a base64
PNG data URI, so ``index.html`` opens offline, from a local disk or a downloaded object.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math

import numpy as np
from PIL import Image

from pipeline.io import storage

__all__ = ["PANELS", "overlay_previews", "render_report", "write_report"]

PANELS = ("image", "cam", "boundary", "displacement", "semantic", "instance")
GOLDEN_RATIO_CONJUGATE = 0.6180339887498949
NO_METRICS_NOTE = "no ground truth in the manifest: no metrics"


# ----------------------------------------------------------------------------- colour maps


def jet(values: np.ndarray) -> np.ndarray:
    """values: float [...] in [0, 1] -> uint8 [..., 3], the piecewise-linear 'jet' colormap."""
    x = np.clip(np.nan_to_num(np.asarray(values, dtype=np.float32)), 0.0, 1.0)[..., None]
    centres = np.array([3.0, 2.0, 1.0], dtype=np.float32)  # r, g, b peaks at x = 3/4, 1/2, 1/4
    return _to_uint8(np.clip(1.5 - np.abs(4.0 * x - centres), 0.0, 1.0))


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
    return _to_uint8(hsv_to_rgb(hue, np.full_like(hue, 0.85), np.full_like(hue, 1.0)))


def displacement_colours(displacement: np.ndarray, *, max_displacement: float) -> np.ndarray:
    """displacement: float [2, h, w] (dy, dx) -> uint8 [h, w, 3].

    Hue is the direction (atan2(dy, dx) over a full turn), value the length clipped at
    ``max_displacement`` grid cells, so zero displacement is black.
    """
    dy, dx = np.nan_to_num(np.asarray(displacement, dtype=np.float32))
    hue = (np.arctan2(dy, dx) / (2 * np.pi)) % 1.0
    value = np.clip(np.hypot(dy, dx) / max_displacement, 0.0, 1.0)
    return _to_uint8(hsv_to_rgb(hue, np.ones_like(hue), value))


# ----------------------------------------------------------------------------- panels


def overlay_previews(image, cam, boundary, displacement, semantic, instance, *, palette: np.ndarray,
                     max_side: int = 256, stride: int = 4, max_displacement: float = 32.0,
                     alpha: float = 0.5) -> dict[str, bytes]:
    """PNG bytes of the preview panels of one image, in ``PANELS`` order; a None input is omitted.

    Args:
        image: uint8 [H, W, 3] RGB (or None: overlays are then shown unblended).
        cam: float [H, W] in [0, 1], the max over classes; a jet heat map over the image.
        boundary: float [h, w] in [0, 1] on the stride grid; greyscale, white = boundary.
        displacement: float [2, h, w] (dy, dx) in grid cells; hue = direction, value = length.
        semantic: uint8 [H, W] (0 bg, 1..C classes, 255 ignore), coloured with ``palette``.
        instance: uint16 [H, W] (0 = none); one colour per id over the image.
        palette: uint8 [256, 3], e.g. ``pipeline.io.codecs.VOC_PALETTE``.
        max_side: panels are downscaled (aspect kept) so the long side is at most this.
        stride: grid stride of ``boundary`` and ``displacement`` (upsampled nearest, then cropped).
        max_displacement: displacement length (grid cells) shown at full brightness.
        alpha: weight of the overlay colours when blended over the image.

    Returns:
        {panel name: PNG bytes}, each RGB of size ``preview_size(H, W, max_side)``.
    """
    height, width = _full_size(image, cam, semantic, instance, boundary, displacement, stride)
    base = None if image is None else _rgb(image)
    panels: dict[str, np.ndarray] = {}
    if base is not None:
        panels["image"] = base
    if cam is not None:
        panels["cam"] = _blend(base, jet(cam), alpha)
    if boundary is not None:
        grey = _to_uint8(np.clip(_upsample_grid(np.asarray(boundary, np.float32), height, width, stride), 0, 1))
        panels["boundary"] = np.repeat(grey[..., None], 3, axis=-1)
    if displacement is not None:
        colours = displacement_colours(displacement, max_displacement=max_displacement)
        panels["displacement"] = _upsample_grid(colours.transpose(2, 0, 1), height, width, stride).transpose(1, 2, 0)
    if semantic is not None:
        panels["semantic"] = _blend(base, np.asarray(palette, np.uint8)[np.asarray(semantic, np.uint8)], alpha)
    if instance is not None:
        ids = np.asarray(instance).astype(np.int64)
        coloured = np.where((ids > 0)[..., None], instance_colours(np.maximum(ids, 1)), 0).astype(np.uint8)
        blended = _blend(base, coloured, alpha)
        panels["instance"] = blended if base is None else np.where((ids > 0)[..., None], blended, base)
    size = preview_size(height, width, max_side)
    out = {}
    for name, rgb in panels.items():
        if rgb.shape[:2] != (height, width):
            raise ValueError(f"panel {name!r} is {rgb.shape[:2]}, expected {(height, width)}")
        out[name] = _png(rgb, size)
    return out


def preview_size(height: int, width: int, max_side: int = 256) -> tuple[int, int]:
    """(width, height) in PIL order after shrinking so the long side is at most ``max_side``."""
    scale = min(1.0, max_side / max(height, width))
    return max(1, round(width * scale)), max(1, round(height * scale))


def _full_size(image, cam, semantic, instance, boundary, displacement, stride: int) -> tuple[int, int]:
    for full in (image, cam, semantic, instance):
        if full is not None:
            return tuple(np.shape(full)[:2])
    for grid in (boundary, None if displacement is None else np.shape(displacement)[1:]):
        if grid is not None:
            return np.shape(grid)[0] * stride, np.shape(grid)[1] * stride
    raise ValueError("overlay_previews needs at least one input that is not None")


def _upsample_grid(values: np.ndarray, height: int, width: int, stride: int) -> np.ndarray:
    """values: [..., h, w] -> [..., height, width], nearest ×stride, cropped (or edge-padded)."""
    rows = np.minimum(np.arange(height) // stride, values.shape[-2] - 1)
    cols = np.minimum(np.arange(width) // stride, values.shape[-1] - 1)
    return values[..., rows[:, None], cols[None, :]]


def _rgb(image) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be uint8 [H, W, 3], got {image.dtype} {image.shape}")
    return image


def _blend(base: np.ndarray | None, colours: np.ndarray, alpha: float) -> np.ndarray:
    if base is None:
        return colours
    return _to_uint8((alpha * colours.astype(np.float32) + (1 - alpha) * base.astype(np.float32)) / 255.0)


def _to_uint8(values: np.ndarray) -> np.ndarray:
    """float [...] in [0, 1] -> uint8 [...] in [0, 255]."""
    return np.round(np.asarray(values, dtype=np.float32) * 255.0).astype(np.uint8)


def _png(rgb: np.ndarray, size: tuple[int, int]) -> bytes:
    image = Image.fromarray(np.ascontiguousarray(rgb), mode="RGB")
    if image.size != size:
        image = image.resize(size, Image.Resampling.BOX)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


# ----------------------------------------------------------------------------- HTML

_CSS = """
body { font: 14px/1.45 system-ui, "Segoe UI", Helvetica, Arial, sans-serif; color: #1d2430;
       background: #f6f7f9; margin: 0; padding: 24px 32px; }
h1 { font-size: 22px; margin: 0 0 16px; } h2 { font-size: 17px; margin: 28px 0 10px; }
table, .metric, .preview { background: #fff; box-shadow: 0 1px 2px rgba(0,0,0,.08); }
table { border-collapse: collapse; } th { background: #eef1f4; font-weight: 600; }
th, td { padding: 5px 12px; border-bottom: 1px solid #e3e6ea; text-align: left; vertical-align: top; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.metrics { display: flex; gap: 14px; flex-wrap: wrap; } .metric { padding: 12px 18px; min-width: 110px; }
.metric .value { font-size: 28px; font-weight: 650; } .metric .name, .note, figcaption { color: #5b6573; }
.note { font-style: italic; } .warning { color: #b35c00; font-weight: 600; } .status-ok, .status-done { color: #1a7f37; }
.status-failed, .status-error { color: #c62828; font-weight: 600; } .status-skipped, .status-cached { color: #5b6573; }
.preview { padding: 10px 12px; margin-bottom: 14px; } .panels { display: flex; gap: 10px; flex-wrap: wrap; }
.preview h3 { font-size: 14px; margin: 0 0 8px; font-family: ui-monospace, Menlo, Consolas, monospace; }
figure { margin: 0; } figcaption { text-align: center; font-size: 12px; } img { display: block; }
"""
_STATUS_CLASSES = {"ok", "done", "failed", "error", "skipped", "cached"}


def render_report(*, title: str, summary: dict, stage_rows: list[dict], class_rows: list[dict],
                  metrics: dict | None, ablation_rows: list[dict], previews: list[dict],
                  tables: list[dict] = ()) -> str:
    """The report as one HTML document (str); every string from the inputs is escaped.

    Args:
        title: page title and heading.
        summary: flat {key: value} (run root, labels version, images, wall time ...).
        stage_rows: [{"stage", "status", "seconds", "counts": {name: number}}].
        class_rows: [{"class", "images", "instances", "iou", "ap50", "ap70"}]; None -> "—".
        metrics: headline {name: value} (mIoU, AP50 ...), or None when there is no ground truth.
        ablation_rows: [{"method", "miou", "ap50", "ap70"}] (paper Tables 1-2); omitted when empty.
        previews: [{"image_id": str, "panels": {name: PNG bytes}}] from ``overlay_previews``.
        tables: more sections, each {"title", "header": [str], "rows": [[value]], "notes": [str]};
            notes are shown as warnings under the table.

    Metric values that are floats in [0, 1] are shown as percentages with one decimal (0.523 -> 52.3).
    """
    parts = [f"<h1>{_esc(title)}</h1>", "<h2>Headline metrics</h2>", _metrics_block(metrics),
             "<h2>Run summary</h2>", _table(["key", "value"], [[k, _fmt(v)] for k, v in summary.items()])]
    parts += ["<h2>Stage timings</h2>", _stage_table(stage_rows)]
    parts += ["<h2>Per-class counts and metrics</h2>",
              _table(["class", "images", "instances", "IoU", "AP50", "AP70"],
                     [[row.get("class"), _fmt(row.get("images")), _fmt(row.get("instances")),
                       _fmt_metric(row.get("iou")), _fmt_metric(row.get("ap50")), _fmt_metric(row.get("ap70"))]
                      for row in class_rows], numeric_from=1)]
    if ablation_rows:
        parts += ["<h2>Ablation (paper Tables 1–2)</h2>",
                  _table(["method", "mIoU", "AP50", "AP70"],
                         [[row.get("method"), _fmt_metric(row.get("miou")), _fmt_metric(row.get("ap50")),
                           _fmt_metric(row.get("ap70"))] for row in ablation_rows], numeric_from=1)]
    for table in tables:
        parts += [f"<h2>{_esc(table['title'])}</h2>", _table(table["header"], table["rows"], numeric_from=1)]
        parts += [f'<p class="warning">{_esc(note)}</p>' for note in table.get("notes", [])]
    if previews:
        parts += ["<h2>Previews</h2>"] + [_preview_block(p) for p in previews]
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
            f"<title>{_esc(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
            + "\n".join(parts) + "\n</body>\n</html>\n")


def write_report(uri_dir: str, html_text: str) -> None:
    """Write ``<uri_dir>/index.html`` atomically (local path or any fsspec URI such as s3://)."""
    storage.write_text(storage.join(uri_dir, "index.html"), html_text)


def _metrics_block(metrics: dict | None) -> str:
    if metrics is None:
        return f'<p class="note">{_esc(NO_METRICS_NOTE)}</p>'
    cards = [f'<div class="metric"><div class="value">{_esc(_fmt_metric(value))}</div>'
             f'<div class="name">{_esc(name)}</div></div>' for name, value in metrics.items()]
    return '<div class="metrics">' + "".join(cards) + "</div>"


def _stage_table(rows: list[dict]) -> str:
    body = []
    for row in rows:
        status = str(row.get("status", ""))
        css = f' class="status-{status}"' if status in _STATUS_CLASSES else ""
        counts = row.get("counts") or {}
        cells = [f"<td>{_esc(row.get('stage'))}</td>", f"<td{css}>{_esc(status)}</td>",
                 f'<td class="num">{_esc(_fmt(row.get("seconds")))}</td>',
                 f"<td>{_esc(', '.join(f'{k}: {_fmt(v)}' for k, v in counts.items()) or '—')}</td>"]
        body.append("<tr>" + "".join(cells) + "</tr>")
    return _table_html(["stage", "status", "seconds", "counts"], body)


def _table(header: list[str], rows: list[list], *, numeric_from: int | None = None) -> str:
    body = []
    for row in rows:
        cells = [f'<td class="num">{_esc(c)}</td>' if numeric_from is not None and i >= numeric_from
                 else f"<td>{_esc(c)}</td>" for i, c in enumerate(row)]
        body.append("<tr>" + "".join(cells) + "</tr>")
    return _table_html(header, body)


def _table_html(header: list[str], body: list[str]) -> str:
    head = "".join(f"<th>{_esc(h)}</th>" for h in header)
    return f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n" + "\n".join(body) + "\n</tbody>\n</table>"


def _preview_block(preview: dict) -> str:
    panels = preview.get("panels") or {}
    names = [n for n in PANELS if n in panels] + [n for n in panels if n not in PANELS]
    figures = []
    for name in names:
        data = base64.b64encode(panels[name]).decode("ascii")
        figures.append(f'<figure><img src="data:image/png;base64,{data}" alt="{_esc(name)}">'
                       f"<figcaption>{_esc(name)}</figcaption></figure>")
    return (f'<div class="preview"><h3>{_esc(preview.get("image_id"))}</h3>'
            f'<div class="panels">{"".join(figures)}</div></div>')


def _esc(value) -> str:
    return html.escape("—" if value is None else str(value), quote=True)


def _fmt(value) -> str:
    """A summary/count value as text: None and non-finite -> "—", floats to 4 significant digits."""
    if value is None:
        return "—"
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        value = float(value)
        if not math.isfinite(value):
            return "—"
        return f"{value:.1f}" if abs(value) >= 100 else f"{value:.4g}"
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, default=str)
    return str(value)


def _fmt_metric(value) -> str:
    """A metric value: floats in [0, 1] as a percentage with one decimal (0.523 -> "52.3")."""
    if isinstance(value, (float, np.floating)) and math.isfinite(value) and 0.0 <= value <= 1.0:
        return f"{100.0 * float(value):.1f}"
    return _fmt(value)
