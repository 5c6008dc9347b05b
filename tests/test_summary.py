"""jobs.summary: the closing table of make demo, from a run root's report/metrics.json."""

from __future__ import annotations

import json

from jobs import summary


def _method(miou: float, ap50: float, ap70: float) -> dict:
    return {"miou": miou, "ap": {"0.5": ap50, "0.7": ap70}, "images": {"semantic": 80, "instance": 80}}


def test_summary_table(tmp_path):
    report = tmp_path / "report"
    report.mkdir()
    metrics = {"labels_version": "v1", "irnet": _method(0.8312, 0.5834, 0.3731),
               "ablations": {"cam": _method(0.542, 0.054, 0.0), "cam_boundary": _method(0.831, 0.321, 0.18)},
               "segmenters": {
                   "maskrcnn-pseudo": {"metrics": {"ap50": 0.31, "ap70": 0.12, "coco_ap": 0.1, "images": 16}},
                   "maskrcnn-ground_truth": {"metrics": {"ap50": 0.62, "ap70": 0.4, "coco_ap": 0.3, "images": 16}}}}
    (report / "metrics.json").write_text(json.dumps(metrics))
    lines = summary.summary(str(tmp_path)).splitlines()
    assert lines[0] == "labels v1 against the ground truth (80 images):"
    assert lines[2].split() == ["CAM", "only", "0.542", "0.054", "0.000"]
    assert lines[3].split() == ["CAM", "+", "boundary", "0.831", "0.321", "0.180"]
    assert lines[4].split() == ["IRNet", "0.831", "0.583", "0.373"]
    assert "(16 held-out images)" in lines[6]
    assert lines[8].split() == ["Mask", "R-CNN", "ap50", "0.310", "0.620", "0.500"]
    assert lines[-1] == f"report: {tmp_path}/report/index.html"


def test_summary_without_evaluation(tmp_path):
    assert "no evaluation yet" in summary.summary(str(tmp_path))
