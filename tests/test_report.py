import base64
import io
import re

import numpy as np
import pytest
from PIL import Image

from pipeline.io.codecs import VOC_PALETTE
from pipeline.plan import HEALTHY, health_warnings
from pipeline.report.colours import direction_wheel, displacement_colours, displacement_scale, instance_colours
from pipeline.report.content import HEALTH_FIGURES, headline_figures, health_figures, stage_rows
from pipeline.report.html import (
    PANELS,
    format_range,
    format_value,
    in_range,
    overlay_previews,
    preview_size,
    render_report,
    write_report,
)


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
    colours = displacement_colours(field, scale=10).astype(int)
    assert np.abs(colours[0, 0] - colours[0, 1]).sum() > 200
    assert np.abs(colours[0, 0] - colours[0, 2]).sum() > 200
    assert colours[0, 0].max() == 255 and colours[0, 3].max() == 0  # full length bright, zero black


def test_displacement_known_directions_give_known_hues_and_length_gives_value():
    # (dy, dx) with rows down: right, down, left, up at full length, then right at half length.
    field = np.array([[0, 4, 0, -4, 0], [4, 0, -4, 0, 2]], np.float32)[:, None, :]
    colours = displacement_colours(field, scale=4.0)[0]
    assert [tuple(c) for c in colours] == [(255, 0, 0), (128, 255, 0), (0, 255, 255), (128, 0, 255), (128, 0, 0)]


def test_a_tiny_field_is_visible_and_an_outlier_does_not_darken_the_rest():
    rng = np.random.default_rng(0)
    field = rng.normal(0, 0.05, (2, 20, 20)).astype(np.float32)  # an early IRNet: well under one cell
    old = displacement_colours(field, scale=32.0)  # the former fixed scale: black
    assert old.max() <= 2
    panel = np.asarray(_open(overlay_previews(None, None, None, field, None, None, palette=VOC_PALETTE)["displacement"]))
    assert panel.max(axis=-1).mean() > 80  # most cells clearly lit, not black
    field[:, 0, 0] = (500.0, 0.0)  # one wild cell of 400
    assert displacement_scale(field) < 1.0
    assert displacement_scale(np.zeros((2, 3, 3))) == 0.0
    assert displacement_colours(np.zeros((2, 3, 3)), scale=0.0).max() == 0  # no NaN from 0 / 0


def test_direction_wheel_is_the_legend_of_the_colours():
    wheel = direction_wheel(65).astype(int)
    assert wheel.shape == (65, 65, 3)
    assert wheel[32, 32].max() == 0  # centre: no displacement, black
    assert tuple(wheel[0, 0]) == (255, 255, 255)  # outside the disc
    rim = {"right": wheel[32, 64], "down": wheel[64, 32], "left": wheel[32, 0], "up": wheel[0, 32]}
    expected = displacement_colours(np.array([[0, 1, 0, -1], [1, 0, -1, 0]], np.float32)[:, None, :], scale=1.0)[0]
    for got, want in zip(rim.values(), expected):
        assert np.abs(got - want.astype(int)).max() <= 1


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


HEALTH = {"tagged_images_all_background": 0.041666666666666664, "foreground_fraction": 0.11292348802089691,
          "cam_fraction": 0.8634305596351624, "foreground_to_cam_area": 0.13078, "instances_per_image": 14.208333333,
          "instances_per_tag": 7.75}


def _report(previews, *, class_name="cat", headline=(), ground_truth=True, ablation=(), health=(),
            stage_rows=None):
    return render_report(
        title="Run <demo> & co",
        summary={"run root": "/tmp/run", "labels version": 3, "images": 24, "wall time (s)": 12.345},
        stage_rows=stage_rows or [{"stage": "cams", "status": "ok", "seconds": 3.2, "counts": {"images": 24}},
                                  {"stage": "irn_train", "status": "failed", "seconds": None, "counts": {}}],
        class_rows=[{"class": class_name, "images": 5, "instances": 7, "iou": 0.5234, "ap50": None, "ap70": 0.1},
                    {"class": "dog", "images": 3, "instances": 3, "iou": None, "ap50": None, "ap70": None}],
        headline=list(headline), ground_truth=ground_truth, ablation_rows=list(ablation), previews=previews,
        health=list(health), health_notes=["labels cover 0.13x the CAM area"] if health else [])


def _visible_text(page: str) -> str:
    """The page without its inline images and style: what a reader sees as text."""
    page = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", page)
    return re.sub(r"<style>.*?</style>", "", page, flags=re.S)


def test_render_report_contents_and_self_contained():
    previews = [{"image_id": f"img_{i}", "panels": overlay_previews(*_inputs(40, 60, seed=i), palette=VOC_PALETTE),
                 "captions": {"displacement": "displacement\nfull at 3.2 px"}} for i in range(2)]
    metrics = {"irnet": {"miou": 0.6612, "ap": {"0.5": 0.373, "0.7": 0.214}},
               "ablations": {"cam": {"miou": 0.48, "ap": {"0.5": 0.2, "0.7": 0.1}}}}
    text = _report(previews, headline=headline_figures(metrics, {}, []),
                   ablation=[{"method": "CAM", "miou": 0.48, "ap50": None, "ap70": None},
                             {"method": "IRN (ours)", "miou": 0.661, "ap50": 0.373, "ap70": 0.214}])
    assert "Run &lt;demo&gt; &amp; co" in text and "<demo>" not in text
    for name in ("cams", "irn_train", "cat", "dog", "img_0", "img_1", "Stage timings",
                 "Per-class counts and metrics", "IRN (ours)", "66.1 %", "52.3 %", "37.3 %", "Ablation",
                 "<figcaption>displacement<br>full at 3.2 px</figcaption>", "right red"):
        assert name in text
    sources = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)
    assert len(sources) == text.count("<img") == 2 * len(PANELS) + 1  # + the direction wheel
    assert _open(base64.b64decode(sources[0])).format == "PNG"
    assert "http://" not in text and "https://" not in text and "<script" not in text.lower()
    assert "no ground truth" not in text


def test_headline_is_at_the_top_with_irnet_beside_the_ablations():
    metrics = {"irnet": {"miou": 0.6612, "ap": {"0.5": 0.373, "0.7": 0.214}},
               "ablations": {"cam": {"miou": 0.48, "ap": {"0.5": 0.2, "0.7": 0.1}},
                             "cam_boundary": {"miou": 0.55, "ap": {"0.5": 0.3, "0.7": 0.15}}}}
    held_out = {"images": 5, "map": 0.6125, "chance": 0.45}
    figures = headline_figures(metrics, held_out, health_figures(HEALTH))
    assert [f["name"] for f in figures] == ["IRNet mIoU", "IRNet AP50", "IRNet AP70", "CAM classifier mAP",
                                            "CAM classifier skill"]
    text = _visible_text(_report([], headline=figures))
    cards = text.index('<div class="metrics">')
    assert cards < text.index("Run summary") < text.index("Stage timings")
    top = text[cards:text.index("Run summary")]
    for shown in ("IRNet mIoU", "66.1 %", "CAM 48.0 %", "CAM + boundary 55.0 %", "IRNet AP70", "21.4 %",
                  "CAM + boundary 15.0 %", "61.3 %", "chance 45.0 %", "0.30"):  # skill (0.6125 - 0.45) / 0.55
        assert shown in top, shown


def test_without_ground_truth_the_headline_is_label_health_with_ranges():
    health = health_figures(HEALTH)
    text = _visible_text(_report([], headline=headline_figures(None, {}, health), ground_truth=False, health=health))
    assert "no ground truth in the manifest" in text
    top = text[text.index('<div class="metrics">'):text.index("Run summary")]
    assert "tagged images labelled all background" in top and "healthy ≤ 20.0 %" in top
    assert "labelled area / CAM area" in top and "healthy 0.50 – 2.00: outside" in top and 'class="metric warn"' in top
    assert "instances per image tag" in top and "healthy 0.50 – 8.00" in top
    assert "labels cover 0.13x the CAM area" in top  # the warnings sit under the cards


def test_label_health_table_is_rounded_with_its_healthy_range_beside_each_figure():
    text = _visible_text(_report([], health=health_figures(HEALTH)))
    table = text[text.index("<h2>Label health</h2>"):]
    table = table[:table.index("</table>")]
    cells = [re.findall(r"<td[^>]*>(.*?)</td>", row)[:4] for row in re.findall(r"<tr>(.*?)</tr>", table)]
    cells = [row for row in cells if row]  # not the header
    assert cells == [["tagged images labelled all background", "4.2 %", "≤ 20.0 %", "ok"],
                     ["foreground fraction", "11.3 %", "—", "—"],
                     ["CAM fraction", "86.3 %", "—", "—"],
                     ["labelled area / CAM area", "0.13", "0.50 – 2.00", "outside"],
                     ["instances per image", "14.21", "—", "—"],
                     ["instances per image tag", "7.75", "0.50 – 8.00", "ok"]]


def test_no_long_unrounded_number_anywhere_on_the_page():
    stages = {"manifest": {"status": "done", "seconds": 2.0512, "counts": {"valid": 24, "plan_seconds": 0.0403}},
              "evaluate": {"status": "done", "seconds": 0.52, "counts": {"miou": 0.11946235335800462,
                                                                         "ap0.5": 5.081300813008131e-05}},
              "train_irn": {"status": "done", "seconds": 76.0213, "counts": {"final_loss": 8.78912345}}}
    health = health_figures(HEALTH)
    text = _visible_text(_report([], headline=headline_figures(None, {"images": 5, "map": 0.61234567, "chance": 0.45},
                                                               health), ground_truth=False, health=health,
                                 stage_rows=stage_rows(stages, report_seconds=0.0)))
    assert not re.findall(r"\d\.\d{4,}|e-0\d", text)
    for shown in ("0.119", "8.79", "1 min 16 s", "2.1 s", "plan seconds 0.040"):
        assert shown in text, shown


def test_format_value_by_unit():
    assert format_value(0.11292348802089691, "percent") == "11.3 %"
    assert format_value(0.9697350263595581, "ratio") == "0.97"
    assert format_value(14.0, "count") == "14" and format_value(1464, "count") == "1,464"
    assert format_value(12.34, "seconds") == "12.3 s" and format_value(65.75, "seconds") == "1 min 06 s"
    assert format_value(754, "seconds") == "12 min 34 s"
    assert format_value(8000, "seconds") == "2 h 13 min"
    assert [format_value(v) for v in (0.11946, 8.7891, 23.26, 341, 1234.6)] == ["0.119", "8.79", "23.3", "341", "1,235"]
    assert format_value(None, "percent") == format_value(float("nan")) == "—" and format_value("v3") == "v3"
    with pytest.raises(ValueError):
        format_value(1.0, "percentage")
    assert (format_range((None, 0.2), "percent"), format_range((0.5, 2.0), "ratio"), format_range(None)) == (
        "≤ 20.0 %", "0.50 – 2.00", "—")
    assert (in_range(0.2, (None, 0.2)), in_range(0.21, (None, 0.2)), in_range(0.4, (0.5, 2.0)),
            in_range(None, (0.5, 2.0)), in_range(1.0, None)) == (True, False, False, None, None)


def test_a_figure_just_outside_its_healthy_range_warns_once():
    """A value just inside a figure's range gives no warning, one just outside one (plan.health_warnings),
    and the report marks the same values."""
    ranged = {f["name"]: f["healthy"] for f in health_figures({k: 1.0 for k in HEALTH_FIGURES}) if f["healthy"]}
    assert set(ranged) == {"tagged images labelled all background", "labelled area / CAM area",
                           "instances per image tag"}
    for key, (low, high) in HEALTHY.items():
        for edge, outside in ((low, -1e-3), (high, 1e-3)):
            if edge is None:
                continue
            assert health_warnings({key: edge}) == [], (key, edge)
            assert len(health_warnings({key: edge + outside})) == 1, (key, edge + outside)
        inside = high if low is None else low
        assert in_range(inside, (low, high))


def test_the_report_shows_its_own_stage_as_done():
    stages = {"publish": {"status": "done", "seconds": 0.09, "counts": {"images": 24}},  # run.json: sorted keys
              "report": {"status": "running"},  # while the report renders
              "train_cam": {"status": "skipped", "seconds": 4.0, "counts": {}}}
    rows = stage_rows(stages, order=("train_cam", "publish", "report"), report_seconds=1.234)
    assert [row["stage"] for row in rows] == ["train_cam", "publish", "report"]
    assert rows[1] == {"stage": "publish", "status": "done", "seconds": 0.09, "counts": {"images": 24}}
    assert rows[2] == {"stage": "report", "status": "done", "seconds": 1.23, "counts": {}}
    text = _visible_text(_report([], stage_rows=rows))
    assert "running" not in text
    assert '<td>report</td><td class="status-done">done</td><td class="num">1.2 s</td>' in text
    assert "3 stages: 1 skipped, 2 done · 5.3 s of stage time" in text


def test_render_report_without_metrics_ablation_or_previews():
    text = _report([], ground_truth=False)
    assert "no ground truth in the manifest" in text
    assert "Ablation" not in text and "<img" not in text and "Label health" not in text
    assert "—" in text  # None values
    assert "<th>IoU</th>" not in text and "Per-class counts</h2>" in text  # no columns of dashes


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
