"""The paper's last step: Mask R-CNN / DeepLab trained on a labels version, evaluated against the
same model trained on ground truth (Tables 3-4; ``python -m jobs.train_segmenter``).

Each (model, labels) pair is a network like the CAM network and IRNet: keyed in run.json
(``train_<model>_<labels>``, ledger.segmenter_key), trained by ``run.retrain`` under the same
commit rule (ledger.train_network), resumed from its Ray Train checkpoint. Its metrics on the
held-out images with ground truth go to ``report/segmenters/<model>-<labels>.json`` (current while
run.json's ``result_key`` holds, ledger.segmenter_result_key), into ``report/metrics.json``
(``segmenters``) and the report's table.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from pipeline import ledger, tasks
from pipeline.config import Config
from pipeline.io import layout, storage
from pipeline.report.content import build_report, comparison_rows
from pipeline.stages.segmenter_eval import evaluate_segmenter
from pipeline.train.segmenter import segmenter_rows, train_segmenter

log = logging.getLogger(__name__)


def _train_and_evaluate(cfg: Config, state: ledger.RunState, version: str, labels: str, eval_rows: list[dict],
                        manifest_dir: str, classes: list[str]) -> dict[str, Any]:
    section, root = cfg.segmenter, cfg.run.root
    network = f"{section.model}_{labels}"
    key = ledger.segmenter_key(section, labels, classes, version, state.data["manifest"]["stamp"])
    model_uri = layout.segmenter_model_file(root, section.model, labels)

    def train(name: str) -> dict[str, Any]:
        table_ref, count_ref = tasks.run_task(segmenter_rows, layout.labels_dir(root, version), manifest_dir, classes,
                                              labels=labels, num_returns=2, num_cpus=cfg.run.io_cpus)
        count = tasks.get(count_ref)
        if not count:
            raise ValueError(f"no training image for {section.model} on {labels} labels")
        log.info("training %s on the %s labels of %s (%d images)", section.model, labels, version, count)
        return train_segmenter(cfg, table_ref, count, classes, name=name, model_uri=model_uri)

    trained = ledger.train_network(state, network, key, model_uri, train, policy=cfg.run.retrain, forced=False)
    result_key = ledger.segmenter_result_key(key, [r["image_id"] for r in eval_rows], section)
    result_uri = storage.join(layout.segmenter_results_dir(root), f"{section.model}-{labels}.json")
    if trained is None and ledger.is_current(state, f"train_{network}", result_key, result_uri, field="result_key"):
        return json.loads(storage.read_text(result_uri))
    metrics = tasks.get(tasks.run_task(
        evaluate_segmenter, model_uri, eval_rows, classes, scales=section.eval_scales,
        mask_threshold=section.mask_threshold, iou_thresholds=list(cfg.eval.iou_thresholds),
        max_pixels=cfg.data.max_pixels, threads=round(section.cpus_per_worker), num_cpus=section.cpus_per_worker,
        num_gpus=1 if section.use_gpu else 0))
    meta = json.loads(storage.read_text(model_uri + ".json"))
    result = {"model": section.model, "labels": labels, "version": version,
              "key": result_key, "train_images": meta.get("num_images"), "metrics": metrics}
    storage.write_text(result_uri, json.dumps(ledger.to_json_safe(result), indent=2, sort_keys=True))
    state.update_stage(f"train_{network}", result_key=result_key)
    return result


def run_segmenters(cfg: Config, *, version: str | None = None) -> dict[str, Any]:
    """Train and evaluate ``segmenter.model`` on ``segmenter.labels`` of labels ``version``
    (default LATEST); record the results and rebuild the report."""
    root = cfg.run.root
    state = ledger.RunState(root)
    if "manifest" not in state.data:
        raise ValueError(f"{root} has no labelling run yet: run jobs.label first")
    version = version or ledger.latest_version(root)
    if version is None or version not in state.labels["versions"]:
        raise ValueError(f"labels version {version!r} is not published in {root}")
    tasks.init_ray(cfg)
    manifest = state.data["manifest"]
    manifest_dir, classes = layout.manifest_dir(root, manifest["stamp"]), manifest["classes"]
    eval_ref, eval_count = tasks.run_task(segmenter_rows, layout.labels_dir(root, version), manifest_dir, classes,
                                           labels="ground_truth", evaluation=True,
                                           limit=cfg.segmenter.max_eval_images, num_returns=2,
                                           num_cpus=cfg.run.io_cpus)
    if not tasks.get(eval_count):
        raise ValueError("no held-out image with ground truth to evaluate on (rows with split 'val', or the "
                         "data.held_out_fraction share, that have gt_semantic_uri and gt_instance_uri)")
    eval_rows = tasks.get(eval_ref).to_pylist()
    kinds = ["pseudo", "ground_truth"] if cfg.segmenter.labels == "both" else [cfg.segmenter.labels]
    for labels in kinds:
        _train_and_evaluate(cfg, state, version, labels, eval_rows, manifest_dir, classes)
    results = ledger.segmenter_results(root)
    ledger.update_metrics(root, segmenters=results)
    build_report(ledger.Run(cfg, manifest_dir, classes, state, force={"report"}))
    return {"version": version, "evaluated_on": len(eval_rows), "results": results,
            "table": comparison_rows(results)}
