"""The end-to-end run: every stage in order, each skipped when its outputs are complete.

train CAM -> CAMs + relation mining -> train IRNet -> synthesis -> COCO export -> evaluation ->
report. ``run.json`` records what each stage did. Labels are versioned: a run writes
``labels/<V>/`` and switches ``labels/LATEST`` to V only once V is complete, so a failed night
leaves the previous version intact; a rerun on a grown manifest copies the previous version and
labels only the new images.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import pyarrow as pa

from pipeline.config import Config
from pipeline.data.manifest import ManifestRow, load_manifest, quarantine_table, rows_to_table
from pipeline.io import codecs, layout, storage
from pipeline.runstate import RunState, package_versions, to_json_safe
from pipeline.stages import common

log = logging.getLogger(__name__)
STAGES = ("train_cam", "cams", "train_irn", "synthesis", "coco", "evaluate", "report")


def _quiet_ray_train() -> None:
    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)


def init_ray(cfg: Config) -> None:
    """Join the cluster in RAY_ADDRESS (``ray job submit``) or start an embedded local Ray."""
    import ray

    if ray.is_initialized():
        return
    address = cfg.ray.address
    if address == "auto-local":
        address = os.environ.get("RAY_ADDRESS") or "local"
    if address == "local":
        # Embedded: no dashboard or job server (Ray's own ports still listen on all interfaces, see
        # README Security); workers import this checkout.
        project = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        path = os.pathsep.join(p for p in (project, os.environ.get("PYTHONPATH", "")) if p)
        ray.init(address="local", num_cpus=cfg.ray.num_cpus, num_gpus=cfg.ray.num_gpus, include_dashboard=False,
                 runtime_env={"worker_process_setup_hook": _quiet_ray_train, "env_vars": {"PYTHONPATH": path}})
    else:
        ray.init(address=address)


@dataclass
class Run:
    cfg: Config
    rows: list[ManifestRow]
    classes: list[str]
    state: RunState
    force: set[str] = field(default_factory=set)
    only: set[str] | None = None
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def root(self) -> str:
        return self.cfg.run.root

    def wanted(self, stage: str) -> bool:
        return self.only is None or stage in self.only

    def stage(self, name: str, body: Callable[[], dict[str, Any]]) -> None:
        """Run one stage body; record status, counts and timing in run.json."""
        if not self.wanted(name):
            return
        t0 = time.perf_counter()
        self.state.update_stage(name, status="running")
        log.info("stage %s: started", name)
        try:
            counts = body()
        except Exception:
            self.state.update_stage(name, status="failed", seconds=round(time.perf_counter() - t0, 2))
            raise
        seconds = round(time.perf_counter() - t0, 2)
        status = "skipped" if counts.pop("_skipped", False) else "done"
        self.timings[name] = seconds
        self.state.update_stage(name, status=status, seconds=seconds, counts=counts)
        log.info("stage %s: %s in %.1fs %s", name, status, seconds, counts)


def cams_key(root: str) -> str | None:
    """The key of the CAM/relation outputs in the run root (see stages.cams.stage_key)."""
    marker = storage.join(layout.cams_dir(root), "_stage.json")
    return json.loads(storage.read_text(marker)).get("key") if storage.exists(marker) else None


def _train_rows(rows: list[ManifestRow]) -> list[ManifestRow]:
    """Rows used for training: all but split 'val' (held out), or all if that leaves none."""
    train = [r for r in rows if r.split != "val"]
    return train or rows


def _train_network(run: Run, network: str, key: str, train: Callable[[str], dict[str, Any]]) -> dict[str, Any]:
    """Retrain by ``run.retrain`` (never / always / auto = when the key changed or no model)."""
    stage = run.state.stage(f"train_{network}")
    exists = storage.exists(layout.model_file(run.root, network))
    policy = run.cfg.run.retrain
    interrupted = stage.get("trained") is False  # a previous attempt died: finish it first
    needed = (f"train_{network}" in run.force or not exists or interrupted or policy == "always"
              or (policy == "auto" and stage.get("key") != key))
    if not needed:
        return {"_skipped": True, "model": layout.model_file(run.root, network)}
    # Same key and an interrupted earlier attempt: resume its Ray Train run from the checkpoint.
    resume = stage.get("key") == key and stage.get("trained") is False and stage.get("run_name")
    name = stage["run_name"] if resume else f"{network}-{key}-{time.strftime('%Y%m%dT%H%M%S')}"
    run.state.update_stage(f"train_{network}", key=key, run_name=name, trained=False)
    meta = train(name)
    run.state.update_stage(f"train_{network}", trained=True)
    return {"images": meta.get("num_images"), "final_loss": meta.get("metrics", {}).get("loss")}


def stage_train_cam(run: Run) -> dict[str, Any]:
    from pipeline.train.cam import train_cam

    rows = _train_rows(run.rows)
    key = common.fingerprint({"train_cam": common.settings(run.cfg.train_cam), "classes": run.classes})
    return _train_network(run, "cam", key, lambda name: train_cam(run.cfg, rows_to_table(rows), run.classes, name=name))


def stage_cams(run: Run) -> dict[str, Any]:
    from pipeline.stages.cams import run_cams

    counts = run_cams(run.cfg, rows_to_table(run.rows), run.classes)
    return {**counts, "_skipped": counts.get("skipped") == len(run.rows)}


def stage_train_irn(run: Run) -> dict[str, Any]:
    from pipeline.train.irn import train_irn

    mined = set(common.read_column(layout.cams_dir(run.root), "image_id"))
    rows = [r for r in _train_rows(run.rows) if r.image_id in mined]
    table = pa.table({"uri": [r.uri for r in rows],
                      "relation_uri": [layout.relation_png(run.root, r.image_id) for r in rows]})
    key = common.fingerprint({"train_irn": common.settings(run.cfg.train_irn), "cams": cams_key(run.root)})
    return _train_network(run, "irn", key, lambda name: train_irn(run.cfg, table, name=name))


def synthesis_key(run: Run) -> str:
    models = ["cam"] if run.cfg.synthesis.method == "cam" else ["cam", "irn"]
    return common.fingerprint({"synthesis": common.settings(run.cfg.synthesis, inference=True), "classes": run.classes,
                               "cams": cams_key(run.root),
                               "models": [common.file_fingerprint(layout.model_file(run.root, m)) for m in models]})


def latest_version(root: str) -> str | None:
    pointer = layout.latest_pointer(root)
    return storage.read_text(pointer).strip() if storage.exists(pointer) else None


def _copy_version(root: str, source: str, target: str, keep: set[str]) -> None:
    """Copy a complete labels version's outputs for the images in ``keep`` into a new version.

    Files of kept images are copied whole (server-side on S3); shards that also list images no
    longer in the manifest are rewritten without them.
    """
    src, dst = layout.labels_dir(root, source), layout.labels_dir(root, target)
    for sub in ("semantic", "instance"):
        for uri in storage.list_files(storage.join(src, sub), ".png"):
            name = uri.rsplit("/", 1)[-1]
            if name.removesuffix(".png") in keep:
                storage.copy(uri, storage.join(dst, sub, name))
    for sub in ("instances", "images"):
        for uri in storage.list_files(storage.join(src, sub), ".parquet"):
            target_uri = storage.join(dst, sub, uri.rsplit("/", 1)[-1])
            ids = codecs.read_parquet_columns(uri, ["image_id"]).column("image_id").to_pylist()
            kept = [image_id in keep for image_id in ids]
            if all(kept):
                storage.copy(uri, target_uri)
            elif any(kept):
                table = codecs.read_parquet(uri)
                codecs.write_parquet(target_uri, table.filter(pa.array(kept, pa.bool_())))


def stage_synthesis(run: Run) -> dict[str, Any]:
    """Label the manifest's images into a labels version: the current one if it is complete and
    holds exactly this manifest's images, else a new one (a copy of the previous version's images
    that are still in the manifest, plus the rest)."""
    from pipeline.stages.synthesis import current_labels, run_synthesis

    key, labels = synthesis_key(run), run.state.labels
    ids = {r.image_id for r in run.rows}
    latest, pending = latest_version(run.root), labels.get("pending")
    if pending and pending["name"] == latest:  # published; the run stopped before it said so
        labels["pending"] = pending = None
        run.state.save()
    forced = "synthesis" in run.force
    if pending and pending["key"] == key and not forced:
        version = pending["name"]  # resume the version an interrupted run was writing
        pending.pop("complete", None)
        run.state.save()
    else:
        latest_key = labels["versions"].get(latest, {}).get("key") if latest else None
        reusable: set[str] = set()  # images of the latest version whose labels are still right
        if latest and latest_key == key and not forced:
            cams = common.read_class_ids(layout.cams_dir(run.root))
            reusable, stale = current_labels(cams, layout.labels_dir(run.root, latest))
            failed = common.quarantined_ids(run.root, "synthesis")
            if not stale and reusable <= ids and not (set(cams) & ids) - reusable - failed:
                if pending:  # an unfinished version of other settings: abandoned, not published
                    labels["pending"] = None
                    run.state.save()
                return {"_skipped": True, "version": latest, "images": len(reusable)}
        version = time.strftime("v%Y%m%dT%H%M%SZ", time.gmtime())
        labels["pending"] = {"name": version, "key": key, "base": latest if reusable else None}
        run.state.save()
        if reusable:
            _copy_version(run.root, latest, version, reusable & ids)
    counts = run_synthesis(run.cfg, layout.labels_dir(run.root, version), uris={r.image_id: r.uri for r in run.rows})
    labels["pending"]["complete"] = True
    run.state.save()
    return {**counts, "version": version}


def stage_coco(run: Run) -> dict[str, Any]:
    from pipeline.stages.coco import export_coco

    labels = run.state.labels
    pending = labels.get("pending")
    if not pending:
        return {"_skipped": True, "version": latest_version(run.root)}
    if not pending.get("complete"):
        raise RuntimeError(f"labels version {pending['name']} is not complete; run the synthesis stage first")
    version = pending["name"]
    summary = export_coco(layout.labels_dir(run.root, version), run.classes)
    labels["versions"][version] = {"key": pending["key"], "base": pending.get("base"),
                                   "images": summary.get("num_images"), "instances": summary.get("num_annotations")}
    run.state.save()
    # The version is complete: make it the one users see, atomically. A run that stops right
    # after this still lists it as pending; the next run sees LATEST names it and never resumes it.
    storage.write_text(layout.latest_pointer(run.root), version + "\n")
    labels["pending"] = None
    run.state.save()
    return {"version": version, "images": summary.get("num_images"), "instances": summary.get("num_annotations")}


def metrics_uri(root: str) -> str:
    return storage.join(layout.report_dir(root), "metrics.json")


def stage_evaluate(run: Run) -> dict[str, Any]:
    from pipeline.stages.evaluate import cam_classification_map, evaluate_labels
    from pipeline.stages.synthesis import run_synthesis

    gt_rows = [r for r in run.rows if r.has_ground_truth]
    version = latest_version(run.root)
    if not gt_rows or version is None:
        return {"_skipped": True, "reason": "no ground truth" if not gt_rows else "no labels"}
    key = common.fingerprint({"version": version, "eval": vars(run.cfg.eval), "ids": sorted(r.image_id for r in gt_rows)})
    if storage.exists(metrics_uri(run.root)) and "evaluate" not in run.force:
        if json.loads(storage.read_text(metrics_uri(run.root))).get("key") == key:
            return {"_skipped": True, "version": version}
    thresholds = run.cfg.eval.iou_thresholds
    result = {"key": key, "labels_version": version,
              "irnet": evaluate_labels(layout.labels_dir(run.root, version), gt_rows, run.classes,
                                       iou_thresholds=thresholds), "ablations": {}}
    if run.cfg.eval.ablations:
        uris = {r.image_id: r.uri for r in gt_rows}
        for method in ("cam", "cam_boundary"):
            directory = storage.join(layout.report_dir(run.root), "ablations", f"{method}-{synthesis_key(run)}")
            run_synthesis(run.cfg, directory, method=method, uris=uris, stage=f"ablation_{method}")
            result["ablations"][method] = evaluate_labels(directory, gt_rows, run.classes, iou_thresholds=thresholds)
    result["cam_classification"] = cam_classification_map(run.root, run.rows, run.classes,
                                                          max_images=run.cfg.eval.max_classification_images)
    storage.write_text(metrics_uri(run.root), json.dumps(to_json_safe(result), indent=2, sort_keys=True))
    full = result["irnet"]
    return {"miou": full["miou"], **{f"ap{t}": v for t, v in full["ap"].items()}}


def stage_report(run: Run) -> dict[str, Any]:
    from pipeline.previews import build_report

    return build_report(run)


def run_label(cfg: Config, *, from_stage: str | None = None, only: list[str] | None = None) -> dict[str, Any]:
    """Run (or resume) the whole job; returns the run summary written to run.json."""
    for name in [from_stage] + list(only or []):
        if name is not None and name not in STAGES:
            raise ValueError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}")
    t0 = time.perf_counter()
    init_ray(cfg)
    state = RunState(cfg.run.root)
    state.data.update(config=cfg.to_dict(), versions=package_versions())
    rows, quarantine, classes = load_manifest(cfg.data.manifest, cfg.data.classes)
    if not classes:
        raise ValueError("no classes: data.classes is empty and no manifest row has a label")
    # The manifest's own quarantine is one shard, rewritten each run: it describes this manifest.
    manifest_quarantine = storage.join(layout.quarantine_dir(cfg.run.root), "manifest.parquet")
    if quarantine or storage.exists(manifest_quarantine):
        codecs.write_parquet(manifest_quarantine, quarantine_table(quarantine))
    codecs.write_parquet(layout.manifest_table(cfg.run.root), rows_to_table(rows))
    state.data["manifest"] = {"uri": cfg.data.manifest, "valid": len(rows), "quarantined": len(quarantine),
                              "classes": classes}
    state.save()
    # --from-stage reruns that stage and everything after it; --only runs just the named stages
    # (each still skipped when its outputs are current).
    force = set(STAGES[STAGES.index(from_stage):]) if from_stage else set()
    run = Run(cfg, rows, classes, state, force=force, only=set(only) if only else None)
    for name, body in (("train_cam", stage_train_cam), ("cams", stage_cams), ("train_irn", stage_train_irn),
                       ("synthesis", stage_synthesis), ("coco", stage_coco), ("evaluate", stage_evaluate),
                       ("report", stage_report)):
        run.stage(name, lambda body=body: body(run))
    state.data["last_run"] = {"seconds": round(time.perf_counter() - t0, 1), "stage_seconds": run.timings,
                              "labels_version": latest_version(cfg.run.root)}
    state.save()
    return state.data
