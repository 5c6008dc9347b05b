"""Stage: publish the labels version synthesis completed: its index and coco.json, its record in
run.json, then ``labels/LATEST`` (ledger.publish_version: the order is the commit rule)."""

from __future__ import annotations

import logging
from typing import Any

from pipeline import ledger, plan, tasks
from pipeline.io import layout
from pipeline.stages.coco import write_coco

log = logging.getLogger(__name__)


def stage_publish(run: ledger.Run) -> dict[str, Any]:
    """Write the new version's index and coco.json, record it, then point LATEST at it."""
    pending = run.state.labels.get("pending")
    if not pending:
        return {"_skipped": True, "version": ledger.latest_version(run.root)}
    if not pending.get("complete"):
        raise RuntimeError(f"labels version {pending['name']} is not complete; run the synthesis stage first")
    version, base = pending["name"], pending.get("base")
    labels_dir = layout.labels_dir(run.root, version)
    summary = tasks.get(tasks.run_task(
        plan.build_index, run.root, run.manifest_dir, run.classes, run.recorded_cams_key(), pending["key"], labels_dir,
        base, layout.labels_dir(run.root, base) if base else None, num_cpus=run.cfg.run.io_cpus))
    coco = tasks.get(tasks.run_task(write_coco, labels_dir, run.classes, num_cpus=run.cfg.run.io_cpus))
    summary["instances_per_class"] = coco["annotations_per_category"]
    for warning in summary["health_warnings"]:
        log.warning("labels %s: %s", version, warning)
    ledger.publish_version(run.state, run.root, version, summary)
    return {"version": version, "images": summary["images"], "instances": summary["instances"]}
