"""The run report: summary, stage timings, per-class counts and metrics, ablations, previews."""

from __future__ import annotations

import json
import logging
from collections import Counter
from typing import Any

import torch
import torch.nn.functional as F

from pipeline.data.images import decode_image
from pipeline.data.transforms import normalize
from pipeline.io import codecs, layout, storage
from pipeline.report import overlay_previews, render_report, write_report
from pipeline.stages import common
from pipeline.stages.cams import read_cam_rows
from pipeline.train.common import load_trained

log = logging.getLogger(__name__)


def _cam_rows(root: str, image_ids: set[str]) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    for uri in storage.list_files(layout.cams_dir(root), ".parquet"):
        for row in read_cam_rows(uri):
            if row["image_id"] in image_ids:
                found[row["image_id"]] = row
        if len(found) == len(image_ids):
            break
    return found


def make_previews(run, version: str, count: int) -> list[dict[str, Any]]:
    """Preview panels for the first ``count`` labelled images (sorted by id)."""
    labels_dir = layout.labels_dir(run.root, version)
    labelled = sorted(common.read_column(storage.join(labels_dir, "images"), "image_id"))[:count]
    if not labelled:
        return []
    by_id = {r.image_id: r for r in run.rows}
    cams = _cam_rows(run.root, set(labelled))
    irn = load_trained(run.root, "irn") if storage.exists(layout.model_file(run.root, "irn")) else None
    previews = []
    for image_id in labelled:
        row = by_id.get(image_id)
        if row is None or image_id not in cams:
            continue
        image = decode_image(storage.read_bytes(row.uri), max_pixels=run.cfg.data.max_pixels)
        height, width = image.shape[:2]
        stride4 = torch.from_numpy(cams[image_id]["cams"])
        cam = None
        if stride4.shape[0]:
            up = F.interpolate(stride4[None], scale_factor=4, mode="bilinear", align_corners=False)[0]
            cam = up[:, :height, :width].amax(dim=0).numpy()
        boundary = displacement = None
        if irn is not None:
            out = irn.infer(torch.from_numpy(normalize(image)))
            boundary, displacement = out.boundary.numpy(), out.displacement.numpy()
        semantic = codecs.decode_label_png(storage.read_bytes(layout.semantic_png(labels_dir, image_id)))
        instance = codecs.decode_label_png(storage.read_bytes(layout.instance_png(labels_dir, image_id)))
        panels = overlay_previews(image, cam, boundary, displacement, semantic, instance, palette=codecs.VOC_PALETTE)
        previews.append({"image_id": image_id, "panels": panels})
    return previews


def _class_rows(run, version: str, metrics: dict[str, Any] | None) -> list[dict[str, Any]]:
    images = Counter(label for row in run.rows for label in row.labels)
    instances: Counter = Counter()
    for class_id in common.read_column(storage.join(layout.labels_dir(run.root, version), "instances"), "class_id"):
        instances[int(class_id)] += 1
    full = (metrics or {}).get("irnet", {})
    ap = full.get("per_class_ap", {})
    return [{"class": name, "images": images.get(name, 0), "instances": instances.get(i + 1, 0),
             "iou": full.get("per_class_iou", {}).get(name), "ap50": ap.get("0.5", {}).get(name),
             "ap70": ap.get("0.7", {}).get(name)} for i, name in enumerate(run.classes)]


def build_report(run) -> dict[str, Any]:
    """Write ``report/index.html`` unless it is current for this labels version and metrics."""
    from pipeline.orchestrate import latest_version, metrics_uri

    version = latest_version(run.root)
    if version is None:
        return {"_skipped": True, "reason": "no labels"}
    metrics = json.loads(storage.read_text(metrics_uri(run.root))) if storage.exists(metrics_uri(run.root)) else None
    key = common.fingerprint({"version": version, "metrics": (metrics or {}).get("key"),
                              "previews": run.cfg.eval.num_previews})
    index = storage.join(layout.report_dir(run.root), "index.html")
    if storage.exists(index) and run.state.stage("report").get("key") == key and "report" not in run.force:
        return {"_skipped": True, "uri": index}
    stages = run.state.data["stages"]
    stage_rows = [{"stage": name, "status": info.get("status"), "seconds": info.get("seconds"),
                   "counts": info.get("counts", {})} for name, info in stages.items()]
    full = (metrics or {}).get("irnet")
    headline = None if not full else {"mIoU": full["miou"], **{f"AP{int(float(t) * 100)}": v for t, v in full["ap"].items()}}
    if headline is not None and metrics.get("cam_classification"):
        headline["CAM net mAP (held-out)"] = metrics["cam_classification"]["map"]
    ablations = [] if not metrics else [
        {"method": label, "miou": m["miou"], "ap50": m["ap"].get("0.5"), "ap70": m["ap"].get("0.7")}
        for label, m in (("CAM", metrics["ablations"].get("cam")),
                         ("CAM + class boundary", metrics["ablations"].get("cam_boundary")),
                         ("IRNet (full)", full)) if m]
    manifest = run.state.data.get("manifest", {})
    summary = {"run root": run.root, "labels version": version, "manifest": manifest.get("uri"),
               "valid images": manifest.get("valid"), "quarantined in manifest": manifest.get("quarantined"),
               "classes": ", ".join(run.classes), "synthesis method": run.cfg.synthesis.method}
    html_text = render_report(title=f"irn-ray labels {version}", summary=summary, stage_rows=stage_rows,
                              class_rows=_class_rows(run, version, metrics), metrics=headline,
                              ablation_rows=ablations, previews=make_previews(run, version, run.cfg.eval.num_previews))
    write_report(layout.report_dir(run.root), html_text)
    run.state.update_stage("report", key=key)
    return {"uri": index}
