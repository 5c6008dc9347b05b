"""Threshold guidance: sweep the background thresholds and beta of synthesis on the images with
ground truth, from the stored CAMs and the trained IRNet (``python -m jobs.tune``).

Nothing is trained and no CAM is computed again: each ground-truth image's CAMs are read from
its CAM shard, IRNet runs once on it (padded as in synthesis), and for every beta one semantic and
one instance random walk serve every threshold (``semantic_sweep`` / ``instance_sweep``). A task
per CAM shard scores its images; only confusion matrices and AP match records come back.
"""

from __future__ import annotations

import json
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import torch

from pipeline import ledger, plan, tasks
from pipeline.algorithms import synthesis as algo
from pipeline.algorithms.metrics import MaskAPAccumulator, confusion, image_records, mean_iou
from pipeline.config import Config, from_dict
from pipeline.data.images import read_inputs, read_label
from pipeline.io import layout, storage, tables
from pipeline.models.store import load_trained
from pipeline.progress import StageProgress
from pipeline.stages.cams import read_cam_rows
from pipeline.stages.evaluate import GT_COLUMNS, gt_instances, has_ground_truth
from pipeline.stages.synthesis import grouping_args, padded_input

THRESHOLDS = [round(0.05 * i, 2) for i in range(1, 13)]  # 0.05 .. 0.60
BETAS = [5.0, 7.0, 10.0, 14.0]


def tune_plan(root: str, manifest_dir: str, classes: list[str], cams_key: str, max_images: int) -> tuple[pa.Table, int]:
    """Task: up to ``max_images`` ground-truth images with a current CAM row, one row per CAM shard."""
    manifest = plan.read_manifest(manifest_dir, GT_COLUMNS)
    gt = manifest.filter(has_ground_truth(manifest))
    current = plan.current_cams(root, manifest_dir, classes, cams_key, image_ids=gt.column("image_id"))
    current = current.sort_by("image_id").slice(0, max_images)
    rows = tables.join_rows(gt, current.select(["image_id", "cam_shard"]), ["image_id"], "inner", extra=["cam_shard"])
    lookup = {r["image_id"]: r for r in rows.to_pylist()}
    grouped = rows.select(["cam_shard", "image_id"]).group_by("cam_shard").aggregate([("image_id", "list")])
    details = [json.dumps([lookup[i] for i in ids]) for ids in grouped.column("image_id_list").to_pylist()]
    return pa.table({"cam_shard": grouped.column("cam_shard"), "images": details}), rows.num_rows


def score_sweep(batch: dict[str, np.ndarray], *, root: str, cfg: dict[str, Any], classes: list[str],
                betas: list[float], thresholds: list[float]) -> Iterator[dict[str, Any]]:
    """Task per CAM shard: per image, the confusion matrix and AP records of every (beta, threshold)."""
    config = from_dict(cfg)
    section = config.synthesis
    net = load_trained(root, "irn")
    for shard, images_json in zip(batch["cam_shard"], batch["images"]):
        images = json.loads(str(images_json))
        rows = {r["image_id"]: r for r in read_cam_rows(storage.join(layout.cams_dir(root), str(shard)),
                                                         [i["image_id"] for i in images])}
        out: dict[str, list] = {"status": [], "result": []}
        for info in images:
            row = rows[info["image_id"]]
            image, _ = read_inputs(row["uri"], max_pixels=config.data.max_pixels)
            size = image.shape[:2]
            (inference,) = net.infer_padded(torch.from_numpy(padded_input(image, config.train_irn.crop_size))[None],
                                            [size])
            gt_semantic = read_label(info["gt_semantic_uri"]) if info["gt_semantic_uri"] else None
            gt_masks = gt_classes = None
            if info["gt_instance_uri"]:
                gt_masks, gt_classes = gt_instances(read_label(info["gt_instance_uri"]),
                                                    info["gt_instance_classes"] or [], classes)
            result: dict[str, Any] = {}
            groups = algo.pixel_groups(inference.displacement, **grouping_args(section)) \
                if gt_masks is not None else None  # one grouping serves every β
            for beta in betas:
                walk = {"beta": beta, "steps": section.steps, "radius": section.radius}
                if gt_semantic is not None:
                    maps = algo.semantic_sweep(row["cams"], row["class_ids"], inference.boundary, size,
                                               bg_thresholds=thresholds, **walk)
                    result[f"sem {beta}"] = [confusion(m, gt_semantic, len(classes) + 1).tolist() for m in maps]
                if gt_masks is not None:
                    found = algo.instance_sweep(row["cams"], row["class_ids"], inference.boundary,
                                                inference.displacement, size, bg_thresholds=thresholds,
                                                groups=groups, min_fragment=section.min_fragment, **walk)
                    result[f"ins {beta}"] = [image_records(*f, gt_masks, gt_classes,
                                                           iou_thresholds=config.eval.iou_thresholds) for f in found]
            out["status"].append("scored")
            out["result"].append(json.dumps(result))
        yield {k: np.array(v, dtype=object) for k, v in out.items()}


def tune(cfg: Config, state: dict[str, Any], *, max_images: int = 200, betas: list[float] = BETAS,
         thresholds: list[float] = THRESHOLDS) -> dict[str, Any]:
    """Sweep (beta, semantic threshold) by mIoU and (beta, instance threshold) by mean mask AP;
    returns the tables and the best settings."""
    root = cfg.run.root
    manifest = state["manifest"]
    manifest_dir = layout.manifest_dir(root, manifest["stamp"])
    classes = manifest["classes"]
    grouped_ref, count_ref = tasks.run_task(tune_plan, root, manifest_dir, classes, state["stages"]["cams"]["key"],
                                             max_images, num_returns=2, num_cpus=cfg.run.io_cpus)
    total = tasks.get(count_ref)
    if not total:
        raise ValueError("no image with ground truth and CAMs in this run root: nothing to tune on")
    matrices: dict[tuple[float, float], np.ndarray] = {}
    accumulators: dict[tuple[float, float], MaskAPAccumulator] = {}
    ds = tasks.dataset(grouped_ref, 1).map_batches(
        score_sweep, batch_size=1, batch_format="numpy", num_cpus=1,
        fn_kwargs={"root": root, "cfg": cfg.to_dict(), "classes": classes, "betas": betas, "thresholds": thresholds})
    progress = StageProgress("tune", total, every_seconds=cfg.run.progress_seconds)
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for text in batch["result"]:
            for name, per_threshold in json.loads(str(text)).items():
                kind, beta = name.split()
                for t, value in zip(thresholds, per_threshold):
                    key = (float(beta), t)
                    if kind == "sem":
                        matrices[key] = matrices.get(key, 0) + np.asarray(value, np.int64)
                    else:
                        accumulators.setdefault(key, MaskAPAccumulator(iou_thresholds=cfg.eval.iou_thresholds)).extend(*value)
        progress.add(len(batch["status"]))
    semantic = [{"beta": b, "sem_bg_threshold": t, "miou": mean_iou(m)["mean"]} for (b, t), m in sorted(matrices.items())]
    instance = []
    for (b, t), acc in sorted(accumulators.items()):
        result = acc.result()
        instance.append({"beta": b, "ins_bg_threshold": t,
                         **{f"ap{int(100 * k)}": v["mean"] for k, v in result.items()}})
    out = {"images": total, "semantic": semantic, "instance": instance}
    out["image_ids"] = sorted(i for images in tasks.get(grouped_ref).column("images").to_pylist()
                              for i in (r["image_id"] for r in json.loads(images)))
    if semantic:
        out["best_semantic"] = max(semantic, key=lambda r: r["miou"])
    if instance:
        first = f"ap{int(100 * cfg.eval.iou_thresholds[0])}"
        out["best_instance"] = max(instance, key=lambda r: np.nan_to_num(r[first], nan=-1))
    storage.write_text(layout.tune_file(root), json.dumps(ledger.to_json_safe(out), indent=2))
    return out
