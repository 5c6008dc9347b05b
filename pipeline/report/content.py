"""The run report's content: summary, stage timings, per-class counts and metrics, label health,
ablations and previews of the first labelled images (``pipeline.report`` renders it)."""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
import torch.nn.functional as F

from pipeline import label_tables, ledger, plan, tasks
from pipeline.algorithms import doubt
from pipeline.data.images import read_inputs, read_label
from pipeline.data.transforms import normalize
from pipeline.io import codecs, layout, storage, tables
from pipeline.models.store import load_trained
from pipeline.report.colours import displacement_scale
from pipeline.report.html import (
    format_value,
    overlay_previews,
    render_report,
    write_report,
)
from pipeline.stages.cams import read_cam_rows
from pipeline.stages.review import ranking
from pipeline.train.cam import cam_skill

log = logging.getLogger(__name__)
SEGMENTER_METRICS = {"deeplab": ("miou",), "maskrcnn": ("ap50", "ap70", "coco_ap")}  # paper Tables 3-4
GRID_STRIDE = 4  # IRNet's boundary and displacement are at 1/4 of the image (IRNet.infer)

# Label-health figures of ``plan.index_summary``: (name, unit, what it is). The healthy ranges are
# plan.HEALTHY, outside which ``plan.health_warnings`` warns; a figure without one depends on the
# data and is read beside the others.
HEALTH_FIGURES = {
    "tagged_images_all_background": ("tagged images labelled all background", "percent",
                                     "images with a class tag whose labels have no foreground pixel"),
    "foreground_fraction": ("foreground fraction", "percent",
                            "mean share of an image's pixels labelled with a class"),
    "cam_fraction": ("CAM fraction", "percent",
                     "mean share of an image's pixels where a CAM is above synthesis.cam_bg_threshold"),
    "foreground_to_cam_area": ("labelled area / CAM area", "ratio",
                               "foreground fraction over CAM fraction: how far the labels grew or shrank the CAMs"),
    "instances_per_image": ("instances per image", "ratio", "mean number of instances per labelled image"),
    "instances_per_tag": ("instances per image tag", "ratio",
                          "instances over image-level class tags: low, instances are lost; high, fragmented"),
}


def preview_rows(root: str, manifest_dir: str, classes: list[str], cams_key: str, labels_dir: str,
                 count: int) -> list[dict[str, Any]]:
    """Task: the first ``count`` images of a version's index (by id) with their CAM shards."""
    index = label_tables.read_index(labels_dir, ["image_id", "uri", "semantic_uri", "instance_uri"]).slice(0, count)
    current = plan.current_cams(root, manifest_dir, classes, cams_key, image_ids=index.column("image_id"))
    rows = tables.join_rows(index, current.select(["image_id", "cam_shard"]), ["image_id"], "inner", extra=["cam_shard"])
    return rows.to_pylist()


def make_previews(run, version: str, count: int) -> list[dict[str, Any]]:
    """Preview panels of the first ``count`` labelled images (sorted by id)."""
    labels_dir = layout.labels_dir(run.root, version)
    rows = tasks.get(tasks.run_task(preview_rows, run.root, run.manifest_dir, run.classes,
                                      run.recorded_cams_key(), labels_dir, count, num_cpus=run.cfg.run.io_cpus))
    if not rows:
        return []
    irn = load_trained(run.root, "irn") if storage.exists(layout.model_file(run.root, "irn")) else None
    previews = []
    for row in rows:
        (cam_row,) = read_cam_rows(storage.join(layout.cams_dir(run.root), row["cam_shard"]), [row["image_id"]])
        image, _ = read_inputs(row["uri"], max_pixels=run.cfg.data.max_pixels)
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
        semantic = read_label(storage.resolve(row["semantic_uri"], labels_dir))
        instance = read_label(storage.resolve(row["instance_uri"], labels_dir))
        scale = None if displacement is None else displacement_scale(displacement)
        panels = overlay_previews(image, cam, boundary, displacement, semantic, instance, palette=codecs.VOC_PALETTE,
                                  stride=GRID_STRIDE, max_displacement=scale)
        captions = {} if scale is None else {"displacement": f"displacement\nfull at {GRID_STRIDE * scale:.1f} px"}
        previews.append({"image_id": row["image_id"], "panels": panels, "captions": captions})
    return previews


def comparison_rows(results: dict[str, dict[str, Any]]) -> list[list[Any]]:
    """Rows (model, metric, pseudo labels, ground truth, ratio) as in the paper's Tables 3-4."""
    rows = []
    for model, metrics in SEGMENTER_METRICS.items():
        pseudo = (results.get(f"{model}-pseudo") or {}).get("metrics", {})
        truth = (results.get(f"{model}-ground_truth") or {}).get("metrics", {})
        for metric in metrics:
            if metric in pseudo or metric in truth:
                a, b = pseudo.get(metric), truth.get(metric)
                ratio = a / b if a is not None and b else None
                rows.append([{"deeplab": "DeepLab", "maskrcnn": "Mask R-CNN"}[model], metric, a, b, ratio])
    return rows


def _class_rows(run, summary: dict[str, Any], metrics: dict[str, Any] | None) -> list[dict[str, Any]]:
    full = (metrics or {}).get("irnet", {})
    ap = full.get("per_class_ap", {})
    images = summary.get("images_per_class", {})
    instances = summary.get("instances_per_class", {})
    return [{"class": name, "images": images.get(name, 0), "instances": instances.get(name, 0),
             "iou": full.get("per_class_iou", {}).get(name), "ap50": ap.get("0.5", {}).get(name),
             "ap70": ap.get("0.7", {}).get(name)} for name in run.classes]


def stage_rows(stages: dict[str, dict[str, Any]], *, order: tuple[str, ...] = (),
               report_seconds: float) -> list[dict[str, Any]]:
    """The stage table of run.json's ``stages`` (stages in ``order`` first, in that order), with the
    report's own row as done in ``report_seconds``.

    The report is rendered while its stage is still "running"; the page exists only once it is
    written, so on the page that stage is done (its seconds: up to rendering, not the write).
    """
    names = [n for n in order if n in stages] + [n for n in stages if n not in order]
    rows = [{"stage": name, "status": stages[name].get("status"), "seconds": stages[name].get("seconds"),
             "counts": stages[name].get("counts", {})} for name in names]
    for row in rows:
        if row["stage"] == "report":
            row.update(status="done", seconds=round(report_seconds, 2), counts={})
    return rows


def health_figures(health: dict[str, float | None]) -> list[dict[str, Any]]:
    """Label-health figures of a version summary's ``health``, in ``HEALTH_FIGURES`` order (others after)."""
    keys = [k for k in HEALTH_FIGURES if k in health] + [k for k in health if k not in HEALTH_FIGURES]
    figures = []
    for key in keys:
        name, unit, meaning = HEALTH_FIGURES.get(key, (key.replace("_", " "), None, None))
        figures.append({"name": name, "value": health[key], "unit": unit, "healthy": plan.HEALTHY.get(key),
                        "meaning": meaning})
    return figures


def headline_figures(metrics: dict[str, Any] | None, held_out: dict[str, Any],
                     health: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The cards at the top: IRNet's mIoU / AP50 / AP70 beside the ablations' (with ground truth) or
    the ranged label-health figures (without), then the CAM classifier's held-out mAP and skill."""
    full = (metrics or {}).get("irnet")
    if full:
        ablations = [(label, (metrics.get("ablations") or {}).get(name))
                     for label, name in (("CAM", "cam"), ("CAM + boundary", "cam_boundary"))]
        figures = [{"name": "IRNet mIoU", "value": full["miou"], "unit": "percent",
                    "compare": [(label, m["miou"]) for label, m in ablations if m]}]
        for threshold, value in full["ap"].items():
            figures.append({"name": f"IRNet AP{round(float(threshold) * 100)}", "value": value, "unit": "percent",
                            "compare": [(label, m["ap"].get(threshold)) for label, m in ablations if m]})
    else:  # the cards name the figure and its range; the health table says what it is
        figures = [{**f, "meaning": None} for f in health if f["healthy"] is not None]
    if held_out.get("images"):
        figures.append({"name": "CAM classifier mAP", "value": held_out["map"], "unit": "percent",
                        "meaning": f"{held_out['images']} held-out images, chance "
                                   f"{format_value(held_out.get('chance'), 'percent')}"})
        figures.append({"name": "CAM classifier skill", "value": cam_skill(held_out), "unit": "ratio",
                        "meaning": "0 = chance, 1 = perfect"})
    return figures


def _segmenter_rows(rows: list[list[Any]]) -> list[list[str]]:
    """:func:`comparison_rows` as text: metrics (fractions) in percent, the ratio with 2 decimals."""
    return [[model, metric, format_value(pseudo, "percent"), format_value(truth, "percent"),
             format_value(ratio, "ratio")] for model, metric, pseudo, truth, ratio in rows]


def most_in_doubt(labels_dir: str, count: int) -> dict[str, Any] | None:
    """The report's table of the ``count`` images most in doubt (pipeline.algorithms.doubt), or
    None for a version labelled before doubt existed."""
    rows = [r for r in ranking(labels_dir).slice(0, count).to_pylist() if r["doubt"] is not None]
    if not rows:
        return None
    return {"title": "Most in doubt (python -m jobs.review sends these for correction)",
            "header": ["image", "doubt", *doubt.COMBINED],
            "rows": [[r["image_id"], format_value(r["doubt"], "ratio"),
                      *(format_value(r[f"doubt_{name}"], "percent") for name in doubt.COMBINED)] for r in rows],
            "notes": ["doubt: the mean of the signals' percentile ranks in this version (0 least, 1 most in doubt); "
                      "low_score: 1 - the mean instance score; weak_outline: share of the outlines where IRNet sees "
                      "no boundary; cam_outside: share of the strong CAM area labelled background"]}


def build_report(run) -> dict[str, Any]:
    """Write ``report/index.html`` unless it is current for this labels version and metrics."""
    t0 = time.perf_counter()
    version = ledger.latest_version(run.root)
    if version is None:
        return {"_skipped": True, "reason": "no labels"}
    metrics = ledger.read_metrics(run.root)
    segmenters = ledger.segmenter_results(run.root)
    key = ledger.report_key(version, run.state.stage("evaluate").get("key"), run.cfg.eval.num_previews, segmenters)
    index = layout.report_file(run.root)
    if ledger.is_current(run.state, "report", key, index, forced=run.forced("report")):
        return {"_skipped": True, "uri": index}
    ablations = [] if not (metrics or {}).get("irnet") else [
        {"method": label, "miou": m["miou"], "ap50": m["ap"].get("0.5"), "ap70": m["ap"].get("0.7")}
        for label, m in (("CAM", metrics["ablations"].get("cam")),
                         ("CAM + class boundary", metrics["ablations"].get("cam_boundary")),
                         ("IRNet (full)", metrics["irnet"])) if m]
    manifest = run.state.data.get("manifest", {})
    summary = run.state.labels["versions"].get(version, {})
    overview = {"run root": run.root, "labels version": version, "manifest": manifest.get("uri"),
                "valid images": manifest.get("valid"), "quarantined in manifest": manifest.get("quarantined"),
                "labelled images": summary.get("images"), "corrected by people": summary.get("corrected", 0),
                "instances": summary.get("instances"), "classes": ", ".join(run.classes), "synthesis method": run.cfg.synthesis.method}
    health = health_figures(summary.get("health") or {})
    tables = []
    if segmenters:
        tables.append({"title": "Models trained on the labels (paper Tables 3-4)",
                       "header": ["model", "metric", "pseudo labels", "ground truth", "pseudo / ground truth"],
                       "rows": _segmenter_rows(comparison_rows(segmenters)),
                       "notes": [f"evaluated on the held-out images with ground truth; trained on "
                                 f"{v.get('train_images')} images ({k})" for k, v in sorted(segmenters.items())]})
    doubted = most_in_doubt(layout.labels_dir(run.root, version), run.cfg.eval.num_previews)
    if doubted:
        tables.append(doubted)
    previews = make_previews(run, version, run.cfg.eval.num_previews)
    html_text = render_report(
        title=f"irn-ray labels {version}", summary=overview,
        stage_rows=stage_rows(run.state.data["stages"], order=("manifest",) + ledger.STAGES,
                              report_seconds=time.perf_counter() - t0),
        class_rows=_class_rows(run, summary, metrics),
        headline=headline_figures(metrics, run.state.stage("train_cam").get("held_out") or {}, health),
        ground_truth=bool((metrics or {}).get("irnet")), ablation_rows=ablations, previews=previews,
        health=health, health_notes=summary.get("health_warnings", []), tables=tables)
    write_report(layout.report_dir(run.root), html_text)
    run.state.update_stage("report", key=key)
    return {"uri": index}
