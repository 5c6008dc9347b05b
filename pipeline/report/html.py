"""A self-contained HTML run report: headline figures, summary, stage timings, per-class metrics,
ablation, label health and previews.

Rendering is pure (arrays and records in, PNG bytes and HTML text out); only ``write_report`` touches
storage. The page has inline CSS, no JavaScript and no external references: every image is a base64
PNG data URI, so ``index.html`` opens offline, from a local disk or a downloaded object.

Numbers are shown by what they are: a *figure* is ``{"name", "value", "unit", ...}`` with ``unit`` one
of ``UNITS`` — "percent" (a fraction in [0, 1] shown as "11.3 %"), "ratio" (two decimals), "count"
(an integer), "seconds" — and optionally ``"healthy": (low, high)`` (either may be None) shown beside
the value, ``"meaning"`` (a sentence) and ``"compare": [[label, value]]`` (the same figure of other
methods, e.g. the ablations).
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
from pipeline.plan import in_range
from pipeline.report.colours import (
    direction_wheel,
    displacement_colours,
    displacement_scale,
    instance_colours,
    jet,
    to_uint8,
)

__all__ = ["PANELS", "UNITS", "format_range", "format_value", "in_range", "overlay_previews", "render_report",
           "write_report"]

PANELS = ("image", "cam", "boundary", "displacement", "semantic", "instance")
UNITS = ("percent", "ratio", "count", "seconds")
NO_METRICS_NOTE = "no ground truth in the manifest: no mIoU or AP; label health instead"


# ----------------------------------------------------------------------------- panels


def overlay_previews(image, cam, boundary, displacement, semantic, instance, *, palette: np.ndarray,
                     max_side: int = 256, stride: int = 4, max_displacement: float | None = None,
                     alpha: float = 0.5) -> dict[str, bytes]:
    """PNG bytes of the preview panels of one image, in ``PANELS`` order; a None input is omitted.

    Args:
        image: uint8 [H, W, 3] RGB (or None: overlays are then shown unblended).
        cam: float [H, W] in [0, 1], the max over classes; a jet heat map over the image.
        boundary: float [h, w] in [0, 1] on the stride grid; greyscale, white = boundary.
        displacement: float [2, h, w] (dy, dx) in grid cells; hue = direction, value = length
            (``pipeline.colours.displacement_colours``).
        semantic: uint8 [H, W] (0 bg, 1..C classes, 255 ignore), coloured with ``palette``.
        instance: uint16 [H, W] (0 = none); one colour per id over the image.
        palette: uint8 [256, 3], e.g. ``pipeline.io.codecs.VOC_PALETTE``.
        max_side: panels are downscaled (aspect kept) so the long side is at most this.
        stride: grid stride of ``boundary`` and ``displacement`` (upsampled nearest, then cropped).
        max_displacement: displacement length (grid cells) shown at full brightness; None: the
            field's own ``displacement_scale`` (its 99th percentile length), so any field is visible.
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
        grey = to_uint8(np.clip(_upsample_grid(np.asarray(boundary, np.float32), height, width, stride), 0, 1))
        panels["boundary"] = np.repeat(grey[..., None], 3, axis=-1)
    if displacement is not None:
        scale = displacement_scale(displacement) if max_displacement is None else max_displacement
        colours = displacement_colours(displacement, scale=scale)
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
    for grid in (boundary, displacement):
        if grid is not None:
            height, width = np.shape(grid)[-2:]
            return height * stride, width * stride
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
    return to_uint8((alpha * colours.astype(np.float32) + (1 - alpha) * base.astype(np.float32)) / 255.0)


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
h1 { font-size: 22px; margin: 0 0 4px; } h2 { font-size: 17px; margin: 28px 0 10px; }
p.status { margin: 0 0 16px; color: #5b6573; }
table, .metric, .preview, .legend { background: #fff; box-shadow: 0 1px 2px rgba(0,0,0,.08); }
table { border-collapse: collapse; } th { background: #eef1f4; font-weight: 600; }
th, td { padding: 5px 12px; border-bottom: 1px solid #e3e6ea; text-align: left; vertical-align: top; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
.metrics { display: flex; gap: 10px; flex-wrap: wrap; margin-bottom: 10px; }
.metric { padding: 10px 14px; min-width: 120px; border-left: 4px solid #c9d1db; }
.metric.ok { border-left-color: #1a7f37; } .metric.warn { border-left-color: #d97706; }
.metric .value { font-size: 28px; font-weight: 650; font-variant-numeric: tabular-nums; }
.metric .name { font-weight: 600; max-width: 200px; } .metric .sub, .note, figcaption, td.meaning { color: #5b6573; }
.metric .sub { font-size: 12px; white-space: nowrap; } .note { font-style: italic; }
.warning, .check-outside { color: #b35c00; font-weight: 600; } .status-ok, .status-done, .check-ok { color: #1a7f37; }
.status-failed, .status-error { color: #c62828; font-weight: 600; } .status-skipped, .status-cached { color: #5b6573; }
.preview { padding: 10px 12px; margin-bottom: 14px; }
.panels { display: flex; gap: 10px; flex-wrap: wrap; align-items: flex-start; }
.preview h3 { font-size: 14px; margin: 0 0 8px; font-family: ui-monospace, Menlo, Consolas, monospace; }
.legend { display: flex; gap: 14px; align-items: center; padding: 10px 12px; margin-bottom: 14px; max-width: 900px; }
figure { margin: 0; display: table; } img { display: block; } .panels img { min-height: 160px; }
figcaption { display: table-caption; caption-side: bottom; text-align: center; font-size: 12px; }
"""
_STATUS_CLASSES = {"ok", "done", "failed", "error", "skipped", "cached"}
_DISPLACEMENT_LEGEND = (
    "Displacement panel: hue is the direction in which IRNet says the pixel's instance centroid lies "
    "(right red, down yellow-green, left cyan, up violet), brightness its distance: black is no displacement, "
    "full brightness the length under each panel (the 99th percentile of that image's field, in image pixels).")


def render_report(*, title: str, summary: dict, stage_rows: list[dict], class_rows: list[dict],
                  headline: list[dict], ground_truth: bool, ablation_rows: list[dict], previews: list[dict],
                  health: list[dict] = (), health_notes: list[str] = (), tables: list[dict] = ()) -> str:
    """The report as one HTML document (str); every string from the inputs is escaped.

    Args:
        title: page title and heading.
        summary: flat {key: value} (run root, labels version, images ...); numbers as ``format_value``.
        stage_rows: [{"stage", "status", "seconds", "counts": {name: number}}]; the line under the
            title counts them by status.
        class_rows: [{"class", "images", "instances", "iou", "ap50", "ap70"}]; metrics are fractions
            in [0, 1], None -> "—".
        headline: figures (see the module docstring) shown as cards at the top.
        ground_truth: False adds a note that there are no mIoU/AP figures, only label health, and
            leaves the metric columns out of the per-class table.
        ablation_rows: [{"method", "miou", "ap50", "ap70"}] (paper Tables 1-2); omitted when empty.
        previews: [{"image_id": str, "panels": {name: PNG bytes}, "captions": {name: str}}], panels
            from ``overlay_previews``; a panel without a caption is captioned with its name; a
            newline in a caption breaks the line.
        health: label-health figures, a table with their healthy ranges; omitted when empty.
        health_notes: warnings, shown under the headline cards.
        tables: more sections, each {"title", "header": [str], "rows": [[value]], "notes": [str]};
            numbers in rows as ``format_value`` without a unit; notes shown under the table.
    """
    parts = [f"<h1>{_esc(title)}</h1>", f'<p class="status">{_esc(_status_line(stage_rows))}</p>',
             "<h2>Headline</h2>"]
    if not ground_truth:
        parts.append(f'<p class="note">{_esc(NO_METRICS_NOTE)}</p>')
    parts.append(_cards(headline))
    parts += [f'<p class="warning">{_esc(note)}</p>' for note in health_notes]
    if ablation_rows:
        parts += ["<h2>Ablation (paper Tables 1–2)</h2>",
                  _table(["method", "mIoU", "AP50", "AP70"],
                         [[row.get("method"), *(format_value(row.get(k), "percent") for k in ("miou", "ap50", "ap70"))]
                          for row in ablation_rows], numeric_from=1)]
    for table in tables:
        parts += [f"<h2>{_esc(table['title'])}</h2>", _table(table["header"], table["rows"], numeric_from=1)]
        parts += [f'<p class="note">{_esc(note)}</p>' for note in table.get("notes", [])]
    if health:
        parts += ["<h2>Label health</h2>", _health_table(health)]
    parts += ["<h2>Run summary</h2>", _table(["key", "value"], [[k, v] for k, v in summary.items()])]
    parts += ["<h2>Stage timings</h2>", _stage_table(stage_rows)]
    metric_keys = ("iou", "ap50", "ap70") if ground_truth else ()  # no columns of dashes without ground truth
    parts += ["<h2>Per-class counts" + (" and metrics</h2>" if ground_truth else "</h2>"),
              _table(["class", "images", "instances", "IoU", "AP50", "AP70"][:3 + len(metric_keys)],
                     [[row.get("class"), format_value(row.get("images"), "count"),
                       format_value(row.get("instances"), "count"),
                       *(format_value(row.get(k), "percent") for k in metric_keys)]
                      for row in class_rows], numeric_from=1)]
    if previews:
        parts += ["<h2>Previews</h2>", _legend()] + [_preview_block(p) for p in previews]
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
            f"<title>{_esc(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
            + "\n".join(parts) + "\n</body>\n</html>\n")


def write_report(uri_dir: str, html_text: str) -> None:
    """Write ``<uri_dir>/index.html`` atomically (local path or any fsspec URI such as s3://)."""
    storage.write_text(storage.join(uri_dir, "index.html"), html_text)


# ----------------------------------------------------------------------------- numbers


def format_value(value, unit: str | None = None) -> str:
    """A number as text by its unit (``UNITS``); None, NaN and inf -> "—".

    percent: a fraction, 0.11292 -> "11.3 %"; ratio: 0.9697 -> "0.97"; count: 14 -> "14";
    seconds: 65.75 -> "65.8 s", 754 -> "12 min 34 s"; no unit: ints as ints, floats rounded
    (3 decimals under 1, 2 under 10, 1 under 100, none above). Strings pass through.
    """
    if unit is not None and unit not in UNITS:
        raise ValueError(f"unknown unit {unit!r}; units: {', '.join(UNITS)}")
    if value is None:
        return "—"
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, default=str)
    if not isinstance(value, (int, float, np.integer, np.floating)):
        return str(value)
    if not math.isfinite(float(value)):
        return "—"
    if unit == "percent":
        return f"{100.0 * float(value):.1f} %"
    if unit == "ratio":
        return f"{float(value):.2f}"
    if unit == "seconds":
        seconds = float(value)
        if seconds < 60:
            return f"{seconds:.1f} s"
        whole = int(round(seconds))
        if whole < 3600:
            return f"{whole // 60} min {whole % 60:02d} s"
        return f"{whole // 3600} h {whole % 3600 // 60:02d} min"
    if unit == "count" or isinstance(value, (int, np.integer)):
        return f"{int(round(float(value))):,}"
    value = float(value)
    decimals = next((d for d, limit in ((3, 1), (2, 10), (1, 100)) if abs(value) < limit), 0)
    return f"{value:,.{decimals}f}"


def format_range(healthy, unit: str | None = None) -> str:
    """A healthy range (low, high), either end None: "0.50 – 2.00", "≤ 20.0 %", "≥ 0.50"; None -> "—"."""
    if healthy is None:
        return "—"
    low, high = healthy
    if low is None and high is None:
        return "—"
    if low is None:
        return f"≤ {format_value(high, unit)}"
    if high is None:
        return f"≥ {format_value(low, unit)}"
    return f"{format_value(low, unit)} – {format_value(high, unit)}"


# ----------------------------------------------------------------------------- HTML pieces


def _status_line(stage_rows: list[dict]) -> str:
    by_status: dict[str, list[str]] = {}
    for row in stage_rows:
        by_status.setdefault(str(row.get("status")), []).append(str(row.get("stage")))
    seconds = sum(float(row.get("seconds") or 0) for row in stage_rows)
    counts = ", ".join(f"{len(names)} {status}" + ("" if status in ("done", "skipped") else f" ({', '.join(names)})")
                       for status, names in by_status.items())
    return f"{len(stage_rows)} stages: {counts} · {format_value(seconds, 'seconds')} of stage time"


def _cards(figures: list[dict]) -> str:
    cards = []
    for figure in figures:
        unit, value, healthy = figure.get("unit"), figure.get("value"), figure.get("healthy")
        verdict = in_range(value, healthy)
        css = {True: " ok", False: " warn"}.get(verdict, "")
        sub = []
        if healthy is not None:
            sub.append(f"healthy {format_range(healthy, unit)}" + ("" if verdict is not False else ": outside"))
        sub += [f"{label} {format_value(v, unit)}" for label, v in figure.get("compare") or ()]
        if figure.get("meaning"):
            sub.append(figure["meaning"])
        cards.append(f'<div class="metric{css}"><div class="value">{_esc(format_value(value, unit))}</div>'
                     f'<div class="name">{_esc(figure["name"])}</div>'
                     + "".join(f'<div class="sub">{_esc(s)}</div>' for s in sub) + "</div>")
    return '<div class="metrics">' + "".join(cards) + "</div>"


def _health_table(figures: list[dict]) -> str:
    body = []
    for figure in figures:
        unit, value, healthy = figure.get("unit"), figure.get("value"), figure.get("healthy")
        verdict = {True: "ok", False: "outside", None: "—"}[in_range(value, healthy)]
        body.append(f"<tr><td>{_esc(figure['name'])}</td><td class=\"num\">{_esc(format_value(value, unit))}</td>"
                    f"<td class=\"num\">{_esc(format_range(healthy, unit))}</td>"
                    f"<td class=\"check-{verdict}\">{_esc(verdict)}</td>"
                    f"<td class=\"meaning\">{_esc(figure.get('meaning'))}</td></tr>")
    return _table_html(["figure", "value", "healthy range", "check", "what it is"], body)


def _stage_table(rows: list[dict]) -> str:
    body = []
    for row in rows:
        status = str(row.get("status", ""))
        css = f' class="status-{status}"' if status in _STATUS_CLASSES else ""
        counts = ", ".join(f"{k.replace('_', ' ')} {format_value(v)}" for k, v in (row.get("counts") or {}).items())
        cells = [f"<td>{_esc(row.get('stage'))}</td>", f"<td{css}>{_esc(status)}</td>",
                 f'<td class="num">{_esc(format_value(row.get("seconds"), "seconds"))}</td>',
                 f"<td>{_esc(counts or '—')}</td>"]
        body.append("<tr>" + "".join(cells) + "</tr>")
    return _table_html(["stage", "status", "time", "counts"], body)


def _table(header: list[str], rows: list[list], *, numeric_from: int | None = None) -> str:
    body = []
    for row in rows:
        cells = [f'<td class="num">{_esc(format_value(c))}</td>' if numeric_from is not None and i >= numeric_from
                 else f"<td>{_esc(format_value(c))}</td>" for i, c in enumerate(row)]
        body.append("<tr>" + "".join(cells) + "</tr>")
    return _table_html(header, body)


def _table_html(header: list[str], body: list[str]) -> str:
    head = "".join(f"<th>{_esc(h)}</th>" for h in header)
    return f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n" + "\n".join(body) + "\n</tbody>\n</table>"


def _legend() -> str:
    wheel = base64.b64encode(_png(direction_wheel(64), (64, 64))).decode("ascii")
    return (f'<div class="legend"><img src="data:image/png;base64,{wheel}" alt="direction wheel" width="64" '
            f'height="64"><div>{_esc(_DISPLACEMENT_LEGEND)}</div></div>')


def _preview_block(preview: dict) -> str:
    panels, captions = preview.get("panels") or {}, preview.get("captions") or {}
    names = [n for n in PANELS if n in panels] + [n for n in panels if n not in PANELS]
    figures = []
    for name in names:
        data = base64.b64encode(panels[name]).decode("ascii")
        figures.append(f'<figure><img src="data:image/png;base64,{data}" alt="{_esc(name)}">'
                       f"<figcaption>{'<br>'.join(map(_esc, captions.get(name, name).splitlines()))}</figcaption>"
                       "</figure>")
    return (f'<div class="preview"><h3>{_esc(preview.get("image_id"))}</h3>'
            f'<div class="panels">{"".join(figures)}</div></div>')


def _esc(value) -> str:
    return html.escape("—" if value is None else str(value), quote=True)
