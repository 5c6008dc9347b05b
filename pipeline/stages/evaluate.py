"""Evaluation of a labels version against the manifest's ground truth (DESIGN §4 "Evaluation").

Semantic: confusion over background + C classes (GT 255 ignored) -> mIoU. Instance: VOC-style mask
AP at each IoU threshold. Images are scored in Ray tasks, one task per instance shard the images'
labels live in; only each image's confusion matrix and per-detection match records come back.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pycocotools import mask as mask_utils

from pipeline import label_tables, ledger, plan, tasks
from pipeline.algorithms.metrics import MaskAPAccumulator, confusion, image_records, mean_iou
from pipeline.data.classes import Vocabulary
from pipeline.data.images import read_label
from pipeline.io import codecs, layout, storage, tables
from pipeline.progress import StageProgress
from pipeline.stages.synthesis import run_synthesis

log = logging.getLogger(__name__)
GT_COLUMNS = ["image_id", "gt_semantic_uri", "gt_instance_uri", "gt_instance_classes"]


def has_ground_truth(manifest: pa.Table) -> pa.Array:
    return pc.or_(pc.not_equal(pc.fill_null(manifest.column("gt_semantic_uri"), ""), ""),
                  pc.not_equal(pc.fill_null(manifest.column("gt_instance_uri"), ""), ""))


def evaluation_plan(manifest_dir: str, labels_dir: str) -> tuple[pa.Table, dict[str, int]]:
    """Task: the ground-truth images of the manifest that the labels hold, one row per instance
    shard (lists of image ids, label and ground-truth URIs), and how many have no labels."""
    manifest = plan.read_manifest(manifest_dir, GT_COLUMNS)
    gt = manifest.filter(has_ground_truth(manifest))
    index = label_tables.read_index(labels_dir, ["image_id", "semantic_uri", "instances_uri"])
    rows = tables.join_rows(gt, index, ["image_id"], "inner", extra=["semantic_uri", "instances_uri"])
    classes_json = pa.array([list(v or []) for v in rows.column("gt_instance_classes").to_pylist()],
                            pa.list_(pa.string()))
    rows = rows.set_column(rows.schema.get_field_index("gt_instance_classes"), "gt_instance_classes", classes_json)
    grouped = pa.table({"instances_uri": rows.column("instances_uri"), "image_id": rows.column("image_id"),
                        "semantic_uri": rows.column("semantic_uri"),
                        "gt_semantic_uri": rows.column("gt_semantic_uri"),
                        "gt_instance_uri": rows.column("gt_instance_uri")})
    grouped = grouped.group_by("instances_uri").aggregate(
        [(c, "list") for c in ("image_id", "semantic_uri", "gt_semantic_uri", "gt_instance_uri")])
    # gt_instance_classes are lists: carried as a lookup the scoring task filters by image id.
    lookup = dict(zip(rows.column("image_id").to_pylist(), classes_json.to_pylist()))
    grouped = grouped.append_column(
        "gt_instance_classes", pa.array([[lookup[i] for i in ids] for ids in grouped.column("image_id_list").to_pylist()],
                                        pa.list_(pa.list_(pa.string()))))
    return grouped, {"ground_truth": gt.num_rows, "labelled": rows.num_rows, "missing_labels": gt.num_rows - rows.num_rows}


def decode_instances(rows: list[dict[str, Any]], size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Instance rows (COCO RLE) -> masks bool [N, H, W], class ids int [N], scores float [N]."""
    if not rows:
        return np.zeros((0,) + size, bool), np.zeros(0, np.int64), np.zeros(0, np.float32)
    masks = np.stack([mask_utils.decode({"size": [r["height"], r["width"]], "counts": r["rle_counts"].encode()})
                      .astype(bool) for r in rows])
    return masks, np.array([r["class_id"] for r in rows]), np.array([r["score"] for r in rows], np.float32)


def gt_instances(ids: np.ndarray, instance_classes: list[str], classes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Ground-truth masks bool [M, H, W] and class ids [M] (instance id i has class i-1 in the list)."""
    vocabulary = Vocabulary(classes)
    masks, class_ids = [], []
    for instance_id, name in enumerate(instance_classes, start=1):
        mask = ids == instance_id
        if mask.any() and vocabulary.get(name) is not None:
            masks.append(mask)
            class_ids.append(vocabulary.id(name))
    if not masks:
        return np.zeros((0,) + ids.shape, bool), np.zeros(0, np.int64)
    return np.stack(masks), np.array(class_ids)


def score_shard(batch: dict[str, np.ndarray], *, labels_dir: str, classes: list[str],
                thresholds: list[float]) -> Iterator[dict[str, Any]]:
    """Task per instance shard: each of its ground-truth images' confusion and AP records."""
    for shard, ids, semantic_uris, gt_semantic, gt_instance, gt_classes in zip(
            batch["instances_uri"], batch["image_id_list"], batch["semantic_uri_list"], batch["gt_semantic_uri_list"],
            batch["gt_instance_uri_list"], batch["gt_instance_classes"]):
        table = codecs.read_parquet(storage.resolve(str(shard), labels_dir), filters=[("image_id", "in", list(ids))])
        predicted: dict[str, list[dict]] = {}
        for row in table.to_pylist():
            predicted.setdefault(row["image_id"], []).append(row)
        out: dict[str, list] = {"status": [], "confusion": [], "ap_records": []}
        for image_id, semantic_uri, sem_uri, ins_uri, names in zip(ids, semantic_uris, gt_semantic, gt_instance, gt_classes):
            pred = read_label(storage.resolve(str(semantic_uri), labels_dir))
            matrix, records, status = None, None, "scored"
            if sem_uri:
                gt = read_label(str(sem_uri))
                if gt.shape != pred.shape:
                    log.warning("%s: ground truth %s and labels %s differ in size; skipped", image_id, gt.shape,
                                pred.shape)
                    status = "size mismatch"
                else:
                    matrix = confusion(pred, gt, len(classes) + 1)
            if ins_uri and status == "scored":
                gt_ids = read_label(str(ins_uri))
                rows = sorted(predicted.get(str(image_id), []), key=lambda r: r["instance_id"])
                records = image_records(*decode_instances(rows, pred.shape), *gt_instances(gt_ids, list(names), classes),
                                        iou_thresholds=thresholds)
            out["status"].append(status)
            out["confusion"].append(np.zeros((0, 0), np.int64) if matrix is None else matrix)
            out["ap_records"].append("" if records is None else json.dumps(records))
        yield {"status": np.array(out["status"], dtype=object), "confusion": tasks.object_array(out["confusion"]),
               "ap_records": np.array(out["ap_records"], dtype=object)}


def evaluate_labels(cfg, manifest_dir: str, labels_dir: str, classes: list[str], *, name: str = "evaluate",
                    ) -> dict[str, Any]:
    """mIoU and mask AP of the labels in ``labels_dir`` on the manifest rows that have ground truth."""
    thresholds = list(cfg.eval.iou_thresholds)
    grouped_ref, counts_ref = tasks.run_task(evaluation_plan, manifest_dir, labels_dir, num_returns=2,
                                              num_cpus=cfg.run.io_cpus)
    counts = tasks.get(counts_ref)
    matrix = np.zeros((len(classes) + 1, len(classes) + 1), np.int64)
    ap = MaskAPAccumulator(iou_thresholds=thresholds)
    semantic_images = instance_images = 0
    if counts["labelled"]:
        ds = tasks.dataset(grouped_ref, 1).map_batches(
            score_shard, batch_size=1, batch_format="numpy", num_cpus=1,
            fn_kwargs={"labels_dir": labels_dir, "classes": classes, "thresholds": thresholds})
        progress = StageProgress(name, counts["labelled"], every_seconds=cfg.run.progress_seconds)
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            for m, records in zip(batch["confusion"], batch["ap_records"]):
                if m is not None and m.size:
                    matrix += m
                    semantic_images += 1
                if records:
                    ap.extend(*json.loads(records))
                    instance_images += 1
            progress.add(len(batch["status"]))
    iou = mean_iou(matrix)
    ap_result = ap.result()
    return {
        "images": {"semantic": semantic_images, "instance": instance_images, "missing_labels": counts["missing_labels"]},
        "miou": iou["mean"] if semantic_images else None,
        "per_class_iou": {n: iou["per_class"][i] for i, n in enumerate(["background", *classes])}
        if semantic_images else {},
        "ap": {f"{t:g}": (ap_result[t]["mean"] if instance_images else None) for t in thresholds},
        "per_class_ap": {f"{t:g}": {classes[c - 1]: v for c, v in ap_result[t]["per_class"].items()}
                         for t in thresholds} if instance_images else {},
    }


def stage_evaluate(run: ledger.Run) -> dict[str, Any]:
    manifest = run.state.data["manifest"]
    version = ledger.latest_version(run.root)
    if not manifest["ground_truth"] or version is None:
        return {"_skipped": True, "reason": "no ground truth" if not manifest["ground_truth"] else "no labels"}
    cfg = run.cfg
    key = ledger.evaluation_key(version, cfg.eval, manifest["ground_truth_digest"])
    if ledger.is_current(run.state, "evaluate", key, layout.metrics_file(run.root), forced=run.forced("evaluate")):
        return {"_skipped": True, "version": version}
    result = {"labels_version": version,
              "irnet": evaluate_labels(cfg, run.manifest_dir, layout.labels_dir(run.root, version), run.classes),
              "ablations": {}}
    if cfg.eval.ablations:
        for method in ("cam", "cam_boundary"):
            key_m = run.synthesis_key(method)
            directory = layout.ablation_dir(run.root, method, key_m)
            run_synthesis(cfg, run.manifest_dir, run.classes, run.recorded_cams_key(), key_m, directory, None,
                          method=method, stage=f"ablation_{method}", ground_truth_only=True)
            tasks.get(tasks.run_task(plan.build_index, run.root, run.manifest_dir, run.classes,
                                       run.recorded_cams_key(), key_m, directory, None, None,
                                       stage=f"ablation_{method}", ground_truth_only=True, num_cpus=cfg.run.io_cpus))
            result["ablations"][method] = evaluate_labels(cfg, run.manifest_dir, directory, run.classes,
                                                          name=f"evaluate {method}")
    result["cam_classification"] = run.state.stage("train_cam").get("held_out")
    ledger.update_metrics(run.root, **result, segmenters=ledger.segmenter_results(run.root))
    run.state.update_stage("evaluate", key=key)
    full = result["irnet"]
    return {"miou": full["miou"], **{f"ap{t}": v for t, v in full["ap"].items()}}
