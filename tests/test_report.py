import base64
import io
import re

import numpy as np
import pytest
from PIL import Image

from pipeline.io.codecs import VOC_PALETTE
from pipeline.report import (PANELS, displacement_colours, instance_colours, overlay_previews, preview_size,
                             render_report, write_report)


def _inputs(height=300, width=520, seed=0):
    """Random inputs of one image; the grid is ceil(size / 4) like the IRN outputs."""
    rng = np.random.default_rng(seed)
    h, w = -(-height // 4), -(-width // 4)
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    cam = rng.random((height, width)).astype(np.float32)
    boundary = rng.random((h, w)).astype(np.float32)
    displacement = rng.normal(0, 8, (2, h, w)).astype(np.float32)
    semantic = rng.integers(0, 4, (height, width)).astype(np.uint8)
    semantic[:10] = 255
    instance = rng.integers(0, 5, (height, width)).astype(np.uint16)
    return image, cam, boundary, displacement, semantic, instance


def _open(png: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(png))
    image.load()
    return image


def test_panels_are_pngs_downscaled_to_long_side_256():
    panels = overlay_previews(*_inputs(300, 520), palette=VOC_PALETTE)
    assert list(panels) == list(PANELS)
    for png in panels.values():
        image = _open(png)
        assert image.format == "PNG" and image.mode == "RGB"
        assert image.size == (256, 148)  # 520 x 300 -> 256 x round(300 * 256 / 520)
    assert preview_size(300, 520) == (256, 148)


def test_small_images_keep_their_size_and_grid_panels_are_cropped():
    image, cam, boundary, displacement, semantic, instance = _inputs(37, 50)  # grid 10 x 13 -> 40 x 52
    panels = overlay_previews(image, None, boundary, displacement, None, None, palette=VOC_PALETTE)
    assert set(panels) == {"image", "boundary", "displacement"}
    for png in panels.values():
        assert _open(png).size == (50, 37)


def test_none_inputs_are_omitted():
    image, cam, boundary, displacement, semantic, instance = _inputs(40, 40)
    panels = overlay_previews(None, cam, None, None, semantic, None, palette=VOC_PALETTE)
    assert set(panels) == {"cam", "semantic"}
    with pytest.raises(ValueError):
        overlay_previews(None, None, None, None, None, None, palette=VOC_PALETTE)


def test_boundary_is_white_where_high_and_upsampled_nearest():
    boundary = np.zeros((3, 3), np.float32)
    boundary[1, 1] = 1.0
    panel = np.asarray(_open(overlay_previews(None, None, boundary, None, None, None,
                                              palette=VOC_PALETTE)["boundary"]))
    assert panel.shape == (12, 12, 3)
    assert (panel[4:8, 4:8] == 255).all() and panel[:4].max() == 0 and panel[8:].max() == 0


def test_displacement_colour_depends_on_direction_and_length():
    field = np.zeros((2, 1, 4), np.float32)
    field[:, 0, 0] = (0, 10)   # right
    field[:, 0, 1] = (0, -10)  # left
    field[:, 0, 2] = (10, 0)   # down
    colours = displacement_colours(field, max_displacement=10).astype(int)
    assert np.abs(colours[0, 0] - colours[0, 1]).sum() > 200
    assert np.abs(colours[0, 0] - colours[0, 2]).sum() > 200
    assert colours[0, 0].max() == 255 and colours[0, 3].max() == 0  # full length bright, zero black


def test_instance_colours_distinct_and_background_untouched():
    colours = instance_colours(np.arange(1, 33))
    assert len({tuple(c) for c in colours}) == 32
    assert np.array_equal(instance_colours(np.array([7])), instance_colours(np.array([7])))
    image = np.full((8, 8, 3), 100, np.uint8)
    ids = np.zeros((8, 8), np.uint16)
    ids[:4, :4], ids[4:, 4:] = 1, 2
    panel = np.asarray(_open(overlay_previews(image, None, None, None, None, ids,
                                              palette=VOC_PALETTE)["instance"]))
    assert (panel[:4, 4:] == 100).all()
    assert not np.array_equal(panel[0, 0], panel[7, 7])


def test_semantic_uses_the_palette_blended_over_the_image():
    image = np.zeros((4, 4, 3), np.uint8)
    semantic = np.full((4, 4), 15, np.uint8)  # person: (192, 128, 128)
    panel = np.asarray(_open(overlay_previews(image, None, None, None, semantic, None,
                                              palette=VOC_PALETTE)["semantic"]))
    assert tuple(panel[0, 0]) == (96, 64, 64)


def _report(previews, *, class_name="cat", metrics=None, ablation=()):
    return render_report(
        title="Run <demo> & co",
        summary={"run root": "/tmp/run", "labels version": 3, "images": 24, "wall time (s)": 12.345},
        stage_rows=[{"stage": "cams", "status": "ok", "seconds": 3.2, "counts": {"images": 24}},
                    {"stage": "irn_train", "status": "failed", "seconds": None, "counts": {}}],
        class_rows=[{"class": class_name, "images": 5, "instances": 7, "iou": 0.5234, "ap50": None, "ap70": 0.1},
                    {"class": "dog", "images": 3, "instances": 3, "iou": None, "ap50": None, "ap70": None}],
        metrics=metrics, ablation_rows=list(ablation), previews=previews)


def test_render_report_contents_and_self_contained():
    previews = [{"image_id": f"img_{i}", "panels": overlay_previews(*_inputs(40, 60, seed=i),
                                                                    palette=VOC_PALETTE)} for i in range(2)]
    text = _report(previews, metrics={"mIoU": 0.6612, "AP50": 0.373, "AP70": 0.214},
                   ablation=[{"method": "CAM", "miou": 0.48, "ap50": None, "ap70": None},
                             {"method": "IRN (ours)", "miou": 0.661, "ap50": 0.373, "ap70": 0.214}])
    assert "Run &lt;demo&gt; &amp; co" in text and "<demo>" not in text
    for name in ("cams", "irn_train", "cat", "dog", "img_0", "img_1", "Stage timings",
                 "Per-class counts and metrics", "IRN (ours)", "66.1", "52.3", "37.3"):
        assert name in text
    assert "Ablation" in text
    sources = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)
    assert len(sources) == text.count("<img") == 2 * len(PANELS)
    assert _open(base64.b64decode(sources[0])).format == "PNG"
    assert "http://" not in text and "https://" not in text and "<script" not in text.lower()
    assert "no ground truth" not in text


def test_render_report_without_metrics_ablation_or_previews():
    text = _report([], metrics=None)
    assert "no ground truth in the manifest: no metrics" in text
    assert "Ablation" not in text and "<img" not in text
    assert "—" in text  # None values


def test_class_names_are_escaped():
    text = _report([], class_name="<script>alert(1)</script>")
    assert "<script>" not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text


def test_write_report(tmp_path):
    write_report(str(tmp_path / "report"), "<html></html>")
    assert (tmp_path / "report" / "index.html").read_text() == "<html></html>"


def test_progress_lines_and_summary_table(caplog):
    import logging

    from pipeline.progress import StageProgress, duration, summary_table

    assert (duration(12.3), duration(754), duration(8000), duration(None)) == ("12s", "12m34s", "2h13m", "-")
    with caplog.at_level(logging.INFO, logger="irn-ray"):
        progress = StageProgress("cams", 10, every_seconds=3600)
        progress.add(4)  # within the interval: no line
        progress.add(6)  # the last images: always a line
    lines = [r.getMessage() for r in caplog.records if r.name == "irn-ray"]
    assert len(lines) == 1 and lines[0].startswith("cams: 10/10 images (100%), ") and lines[0].endswith("ETA 0s")
    table = summary_table({"cams": {"status": "done", "seconds": 75, "counts": {"done": 3, "miou": 0.51234}},
                           "publish": {"status": "skipped", "seconds": 0.1, "counts": {}}}, ("cams", "synthesis", "publish"))
    assert table.splitlines() == ["stage    status    time  counts", "cams     done     1m15s  done 3, miou 0.512",
                                  "publish  skipped     0s  "]
