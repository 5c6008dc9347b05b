"""The labelling run's driver: every stage of ``ledger.STAGES`` in order, each skipped when its
outputs are current, and the run summary.

manifest -> probe (which images decode) -> train CAM -> CAMs + relation mining -> train IRNet ->
synthesis -> publish (index, coco.json, LATEST) -> evaluation -> report. Each stage body is a short
function in its own module; ``run.json`` records what each stage did; what counts as done, and so
what a rerun redoes, is decided in :mod:`pipeline.ledger`.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

from pipeline import ledger, tasks
from pipeline.config import Config
from pipeline.io import layout
from pipeline.progress import counts_text, summary_table
from pipeline.report.content import build_report
from pipeline.stages.cams import stage_cams
from pipeline.stages.evaluate import stage_evaluate
from pipeline.stages.manifest import ingest_manifest
from pipeline.stages.probe import stage_probe
from pipeline.stages.publish import stage_publish
from pipeline.stages.synthesis import stage_synthesis
from pipeline.train.cam import quality_gate, stage_train_cam
from pipeline.train.irn import stage_train_irn

log = logging.getLogger(__name__)
BODIES: dict[str, Callable[[ledger.Run], dict[str, Any]]] = {
    "probe": stage_probe, "train_cam": stage_train_cam, "cams": stage_cams, "train_irn": stage_train_irn,
    "synthesis": stage_synthesis, "publish": stage_publish, "evaluate": stage_evaluate, "report": build_report}


def _run_stage(run: ledger.Run, name: str) -> None:
    """Run one stage body; record status, counts and timing in run.json."""
    if not run.selected(name):
        return
    t0, retries = time.perf_counter(), tasks.storage_retries()
    run.state.update_stage(name, status="running")
    log.info("stage %s: started", name)
    try:
        counts = BODIES[name](run)
    except Exception:
        run.state.update_stage(name, status="failed", seconds=round(time.perf_counter() - t0, 2))
        raise
    seconds = round(time.perf_counter() - t0, 2)
    status = "skipped" if counts.pop("_skipped", False) else "done"
    retried = tasks.storage_retries() - retries
    if retried:
        counts["storage_retries"] = retried  # transient storage errors this stage survived
    run.state.update_stage(name, status=status, seconds=seconds, counts=counts)
    log.info("stage %s: %s in %.1fs (%s)", name, status, seconds, counts_text(counts))


def run_label(cfg: Config, *, from_stage: str | None = None, only: list[str] | None = None) -> dict[str, Any]:
    """Run (or resume) the whole job; returns the run summary written to run.json."""
    for name in only or []:
        if name not in ledger.STAGES:
            raise ValueError(f"unknown stage {name!r}; stages: {', '.join(ledger.STAGES)}")
    force = ledger.forced_stages(from_stage)
    t0 = time.perf_counter()
    tasks.init_ray(cfg)
    state = ledger.RunState(cfg.run.root)
    state.data.update(config=cfg.to_dict(), versions=ledger.package_versions())
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    t_manifest = time.perf_counter()
    log.info("stage manifest: started (%s)", cfg.data.manifest)
    summary = ingest_manifest(cfg, stamp)
    classes = summary.pop("classes")
    if not classes:
        raise ValueError("no classes: data.classes is empty and no manifest row has a label")
    state.data["manifest"] = {"uri": cfg.data.manifest, "stamp": stamp, "classes": classes, **summary}
    counts = {k: v for k, v in summary.items() if k != "ground_truth_digest"}
    seconds = round(time.perf_counter() - t_manifest, 2)
    state.update_stage("manifest", status="done", seconds=seconds, counts=counts)
    log.info("stage manifest: done in %.1fs (%s)", seconds, counts_text(counts))
    # --only runs just the named stages (each still skipped when its outputs are current).
    run = ledger.Run(cfg, layout.manifest_dir(cfg.run.root, stamp), classes, state, force=force,
              only=set(only) if only else None)
    for name in ledger.STAGES:
        _run_stage(run, name)
        if name == "train_cam":
            quality_gate(run)
    state.data["last_run"] = {"seconds": round(time.perf_counter() - t0, 1),
                              "labels_version": ledger.latest_version(cfg.run.root)}
    state.save()
    log.info("run summary (%s):\n%s", cfg.run.root, summary_table(state.data["stages"], ("manifest",) + ledger.STAGES))
    return state.data
