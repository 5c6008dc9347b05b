"""The run report's content: summary, stage timings, per-class counts and metrics, label health,
ablations and previews of the first labelled images (``pipeline.report`` renders it)."""

from __future__ import annotations

import json
import logging
from typing import Any

import torch
import torch.nn.functional as F

from pipeline import ledger
from pipeline.data.images import decode_image
from pipeline.data.transforms import normalize
from pipeline.io import codecs, layout, storage, tables
from pipeline.report import overlay_previews, render_report, write_report
from pipeline.stages import common, plan
from pipeline.stages.cams import read_cam_rows
from pipeline.train.common import load_trained

log = logging.getLogger(__name__)


def preview_rows(root: str, manifest_dir: str, classes: list[str], cams_key: str, labels_dir: str,
                 count: int) -> list[dict[str, Any]]:
    """Task: the first ``count`` images of a version's index (by id) with their CAM shards."""
    index = ledger.read_index(labels_dir, ["image_id", "uri", "semantic_uri", "instance_uri"]).slice(0, count)
    current = plan.current_cams(root, manifest_dir, classes, cams_key, image_ids=index.column("image_id"))
    rows = tables.join_rows(index, current.select(["image_id", "cam_shard"]), ["image_id"], "inner", extra=["cam_shard"])
    return rows.to_pylist()


def make_previews(run, version: str, count: int) -> list[dict[str, Any]]:
    """Preview panels of the first ``count`` labelled images (sorted by id)."""
    labels_dir = layout.labels_dir(run.root, version)
    rows = common.get(common.run_task(preview_rows, run.root, run.manifest_dir, run.classes,
                                      run.recorded_cams_key(), labels_dir, count, num_cpus=run.cfg.run.io_cpus))
    if not rows:
        return []
    irn = load_trained(run.root, "irn") if storage.exists(layout.model_file(run.root, "irn")) else None
    previews = []
    for row in rows:
        (cam_row,) = read_cam_rows(storage.join(layout.cams_dir(run.root), row["cam_shard"]), [row["image_id"]])
        image = decode_image(storage.read_bytes(row["uri"]), max_pixels=run.cfg.data.max_pixels)
        height, width = image.shape[:2]
        stride4 = torch.from_numpy(cam_row["cams"])
        cam = None
        if stride4.shape[0]:
            up = F.interpolate(stride4[None], scale_factor=4, mode="bilinear", align_corners=False)[0]
            cam = up[:, :height, :width].amax(dim=0).numpy()
        boundary = displacement = None
        if irn is not None:
            out = irn.infer(torch.from_numpy(normalize(image)), pad_to=run.cfg.train_irn.crop_size)
            boundary, displacement = out.boundary.numpy(), out.displacement.numpy()
        semantic = codecs.decode_label_png(storage.read_bytes(storage.resolve(row["semantic_uri"], labels_dir)))
        instance = codecs.decode_label_png(storage.read_bytes(storage.resolve(row["instance_uri"], labels_dir)))
        panels = overlay_previews(image, cam, boundary, displacement, semantic, instance, palette=codecs.VOC_PALETTE)
        previews.append({"image_id": row["image_id"], "panels": panels})
    return previews


def _class_rows(run, summary: dict[str, Any], metrics: dict[str, Any] | None) -> list[dict[str, Any]]:
    full = (metrics or {}).get("irnet", {})
    ap = full.get("per_class_ap", {})
    images = summary.get("images_per_class", {})
    instances = summary.get("instances_per_class", {})
    return [{"class": name, "images": images.get(name, 0), "instances": instances.get(name, 0),
             "iou": full.get("per_class_iou", {}).get(name), "ap50": ap.get("0.5", {}).get(name),
             "ap70": ap.get("0.7", {}).get(name)} for name in run.classes]


def build_report(run) -> dict[str, Any]:
    """Write ``report/index.html`` unless it is current for this labels version and metrics."""
    from pipeline.stages.evaluate import metrics_uri

    version = ledger.latest_version(run.root)
    if version is None:
        return {"_skipped": True, "reason": "no labels"}
    metrics = json.loads(storage.read_text(metrics_uri(run.root))) if storage.exists(metrics_uri(run.root)) else None
    from pipeline.orchestrate import cam_skill
    from pipeline.segment import comparison_rows, segmenter_results

    segmenters = segmenter_results(run.root)
    key = ledger.fingerprint({"version": version, "metrics": run.state.stage("evaluate").get("key"),
                              "previews": run.cfg.eval.num_previews,
                              "segmenters": {k: v.get("metrics") for k, v in segmenters.items()}})
    index = storage.join(layout.report_dir(run.root), "index.html")
    if storage.exists(index) and run.state.stage("report").get("key") == key and "report" not in run.force:
        return {"_skipped": True, "uri": index}
    stages = run.state.data["stages"]
    stage_rows = [{"stage": name, "status": info.get("status"), "seconds": info.get("seconds"),
                   "counts": info.get("counts", {})} for name, info in stages.items()]
    full = (metrics or {}).get("irnet")
    headline = None if not full else {"mIoU": full["miou"], **{f"AP{int(float(t) * 100)}": v for t, v in full["ap"].items()}}
    held_out = run.state.stage("train_cam").get("held_out") or {}
    if held_out.get("images"):
        headline = headline or {}
        headline["CAM net mAP (held-out)"] = held_out["map"]
        headline["CAM net skill over chance"] = cam_skill(held_out)
    ablations = [] if not metrics else [
        {"method": label, "miou": m["miou"], "ap50": m["ap"].get("0.5"), "ap70": m["ap"].get("0.7")}
        for label, m in (("CAM", metrics["ablations"].get("cam")),
                         ("CAM + class boundary", metrics["ablations"].get("cam_boundary")),
                         ("IRNet (full)", full)) if m]
    manifest = run.state.data.get("manifest", {})
    summary = run.state.labels["versions"].get(version, {})
    overview = {"run root": run.root, "labels version": version, "manifest": manifest.get("uri"),
                "valid images": manifest.get("valid"), "quarantined in manifest": manifest.get("quarantined"),
                "labelled images": summary.get("images"), "instances": summary.get("instances"),
                "classes": ", ".join(run.classes), "synthesis method": run.cfg.synthesis.method}
    health = summary.get("health") or {}
    tables = [{"title": "Label health", "header": ["figure", "value"],
               "rows": [[name.replace("_", " "), value] for name, value in health.items()],
               "notes": summary.get("health_warnings", [])}] if health else []
    if segmenters:
        tables.append({"title": "Models trained on the labels (paper Tables 3-4)",
                       "header": ["model", "metric", "pseudo labels", "ground truth", "pseudo / ground truth"],
                       "rows": comparison_rows(segmenters),
                       "notes": [f"evaluated on the held-out images with ground truth; trained on "
                                 f"{v.get('train_images')} images ({k})" for k, v in sorted(segmenters.items())]})
    html_text = render_report(title=f"irn-ray labels {version}", summary=overview, stage_rows=stage_rows,
                              class_rows=_class_rows(run, summary, metrics), metrics=headline,
                              ablation_rows=ablations, previews=make_previews(run, version, run.cfg.eval.num_previews),
                              tables=tables)
    write_report(layout.report_dir(run.root), html_text)
    run.state.update_stage("report", key=key)
    return {"uri": index}

