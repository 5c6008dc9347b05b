"""The paper's last step: Mask R-CNN / DeepLab trained on a labels version, evaluated against the
same model trained on ground truth (Tables 3-4; ``python -m jobs.train_segmenter``).

Each (model, labels) pair is a network like the CAM network and IRNet: keyed in run.json
(``train_<model>_<labels>``), trained by ``run.retrain``, resumed from its Ray Train checkpoint.
Its metrics on the held-out images with ground truth go to ``report/segmenters/<model>-<labels>.json``,
into ``report/metrics.json`` (``segmenters``) and the report's table.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from pipeline import ledger
from pipeline.config import Config
from pipeline.io import layout, storage
from pipeline.stages import common
from pipeline.stages.evaluate import metrics_uri

log = logging.getLogger(__name__)
METRICS = {"deeplab": ("miou",), "maskrcnn": ("ap50", "ap70", "coco_ap")}
EVALUATION_ONLY = {"eval_scales", "mask_threshold", "max_eval_images"}  # change results, not models


def results_dir(root: str) -> str:
    return storage.join(layout.report_dir(root), "segmenters")


def segmenter_results(root: str) -> dict[str, dict[str, Any]]:
    """{'<model>-<labels>': result} of every segmenter evaluated in this run root."""
    found = {}
    for uri in storage.list_files(results_dir(root), ".json"):
        found[uri.rsplit("/", 1)[-1].removesuffix(".json")] = json.loads(storage.read_text(uri))
    return found


def comparison_rows(results: dict[str, dict[str, Any]]) -> list[list[Any]]:
    """Rows (model, metric, pseudo labels, ground truth, ratio) as in the paper's Tables 3-4."""
    rows = []
    for model, metrics in METRICS.items():
        pseudo = (results.get(f"{model}-pseudo") or {}).get("metrics", {})
        truth = (results.get(f"{model}-ground_truth") or {}).get("metrics", {})
        for metric in metrics:
            if metric in pseudo or metric in truth:
                a, b = pseudo.get(metric), truth.get(metric)
                ratio = a / b if a is not None and b else None
                rows.append([{"deeplab": "DeepLab", "maskrcnn": "Mask R-CNN"}[model], metric, a, b, ratio])
    return rows


def _train_and_evaluate(cfg: Config, state: ledger.RunState, version: str, labels: str, eval_rows: list[dict],
                        manifest_dir: str, classes: list[str]) -> dict[str, Any]:
    from pipeline.stages.segmenter_eval import evaluate_segmenter
    from pipeline.train.segmenter import model_file, segmenter_rows, train_segmenter

    section, root = cfg.segmenter, cfg.run.root
    network = f"{section.model}_{labels}"
    settings = ledger.settings(section, training=True)
    key = ledger.fingerprint({"segmenter": {k: v for k, v in settings.items() if k not in EVALUATION_ONLY | {"labels"}},
                              "labels": labels, "classes": classes, "version": version,
                              "manifest": state.data["manifest"]["stamp"] if labels == "ground_truth" else None})
    result_key = ledger.fingerprint({"model": key, "images": [r["image_id"] for r in eval_rows],
                                     **{k: settings[k] for k in EVALUATION_ONLY}})
    model_uri = model_file(root, section.model, labels)
    needed, resume = ledger.needs_training(state, network, key, policy=cfg.run.retrain, forced=False,
                                           model_exists=storage.exists(model_uri))
    if needed:
        labels_dir = layout.labels_dir(root, version)
        table_ref, count_ref = common.run_task(segmenter_rows, labels_dir, manifest_dir, classes, labels=labels,
                                               num_returns=2, num_cpus=cfg.run.io_cpus)
        count = common.get(count_ref)
        if not count:
            raise ValueError(f"no training image for {section.model} on {labels} labels")
        stage = state.stage(f"train_{network}")
        name = stage["run_name"] if resume else f"{network}-{key}-{time.strftime('%Y%m%dT%H%M%S')}"
        state.update_stage(f"train_{network}", key=key, run_name=name, trained=False, status="running")
        log.info("training %s on the %s labels of %s (%d images)", section.model, labels, version, count)
        train_segmenter(cfg, table_ref, count, classes, name=name, model_uri=model_uri)
        state.update_stage(f"train_{network}", trained=True, status="done")
    result_uri = storage.join(results_dir(root), f"{section.model}-{labels}.json")
    if not needed and storage.exists(result_uri) and json.loads(storage.read_text(result_uri)).get("key") == result_key:
        return json.loads(storage.read_text(result_uri))
    metrics = common.get(common.run_task(
        evaluate_segmenter, model_uri, eval_rows, classes, scales=section.eval_scales,
        mask_threshold=section.mask_threshold, iou_thresholds=list(cfg.eval.iou_thresholds),
        max_pixels=cfg.data.max_pixels, threads=round(section.cpus_per_worker), num_cpus=section.cpus_per_worker,
        num_gpus=1 if section.use_gpu else 0))
    meta = json.loads(storage.read_text(model_uri + ".json"))
    result = {"model": section.model, "labels": labels, "version": version,
              "key": result_key, "train_images": meta.get("num_images"), "metrics": metrics}
    storage.write_text(result_uri, json.dumps(ledger.to_json_safe(result), indent=2, sort_keys=True))
    return result


def run_segmenters(cfg: Config, *, version: str | None = None) -> dict[str, Any]:
    """Train and evaluate ``segmenter.model`` on ``segmenter.labels`` of labels ``version``
    (default LATEST); record the results and rebuild the report."""
    from pipeline.orchestrate import Run, init_ray
    from pipeline.previews import build_report
    from pipeline.train.segmenter import segmenter_rows

    root = cfg.run.root
    state = ledger.RunState(root)
    if "manifest" not in state.data:
        raise ValueError(f"{root} has no labelling run yet: run jobs.label first")
    version = version or ledger.latest_version(root)
    if version is None or version not in state.labels["versions"]:
        raise ValueError(f"labels version {version!r} is not published in {root}")
    init_ray(cfg)
    manifest = state.data["manifest"]
    manifest_dir, classes = layout.manifest_dir(root, manifest["stamp"]), manifest["classes"]
    eval_ref, eval_count = common.run_task(segmenter_rows, layout.labels_dir(root, version), manifest_dir, classes,
                                           labels="ground_truth", evaluation=True,
                                           limit=cfg.segmenter.max_eval_images, num_returns=2,
                                           num_cpus=cfg.run.io_cpus)
    if not common.get(eval_count):
        raise ValueError("no held-out image with ground truth to evaluate on (rows with split 'val', or the "
                         "data.held_out_fraction share, that have gt_semantic_uri and gt_instance_uri)")
    eval_rows = common.get(eval_ref).to_pylist()
    kinds = ["pseudo", "ground_truth"] if cfg.segmenter.labels == "both" else [cfg.segmenter.labels]
    for labels in kinds:
        _train_and_evaluate(cfg, state, version, labels, eval_rows, manifest_dir, classes)
    results = segmenter_results(root)
    metrics = json.loads(storage.read_text(metrics_uri(root))) if storage.exists(metrics_uri(root)) else {}
    metrics["segmenters"] = results
    storage.write_text(metrics_uri(root), json.dumps(ledger.to_json_safe(metrics), indent=2, sort_keys=True))
    build_report(Run(cfg, manifest_dir, classes, state, force={"report"}))
    return {"version": version, "evaluated_on": len(eval_rows), "results": results,
            "table": comparison_rows(results)}
