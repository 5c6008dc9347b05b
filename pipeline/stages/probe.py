"""Stage: find the images that do not decode before anything trains on them.

Each valid manifest image without a probe record of its uri and key (``ledger.plan_probe``) is
read and decoded once (``pipeline.data.images.decode_image``) by CPU tasks, in a Ray Data pass
when there is more than one block of them. An image that decodes gets a row in
``probe/part-*.parquet``; one that does not (or whose file is missing), a quarantine row of stage
``probe`` with the reason. Both are kept, so a rerun probes only new or moved images. The
manifest's images with a current probe quarantine row are then written to
``manifest/<stamp>/unreadable.parquet``, which ``plan.read_manifest`` leaves out: no stage, CAM or
IRNet or segmenter training included, meets them, and each is reported once, when it is found.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline import ledger, plan, quarantine, tasks
from pipeline.config import Config
from pipeline.data.images import ImageDecodeError, read_inputs
from pipeline.io import codecs, layout, storage
from pipeline.progress import StageProgress

log = logging.getLogger(__name__)
STAGE = "probe"


def probe_outputs(root: str) -> list[str]:
    """Everything the probe wrote in ``root``: what a forced probe or a new key discards."""
    return [layout.probe_dir(root), *quarantine.quarantine_files(root, STAGE)]


def probe_batch(batch: pa.Table, *, root: str, key: str, max_pixels: int) -> dict[str, np.ndarray]:
    """CPU task: decode each image (image_id, uri) once; commit a probe shard of those that decode
    and quarantine rows of those that do not. A read that fails for another reason (a network
    error, a permission) records nothing: the image is probed again by the next run."""
    decoded, failed, statuses = [], [], []
    for image_id, uri in zip(batch.column("image_id").to_pylist(), batch.column("uri").to_pylist()):
        row = {"image_id": image_id, "uri": uri, "key": key}
        try:
            read_inputs(uri, max_pixels=max_pixels)
            decoded.append(row)
            statuses.append("decoded")
        except (ImageDecodeError, FileNotFoundError) as err:
            reason = err.reason if isinstance(err, ImageDecodeError) else "image file not found"
            failed.append({**row, "reason": reason})
            statuses.append("quarantined")
        except Exception as err:  # noqa: BLE001 - not the image's fault: try again next run
            log.warning("probe: could not read %s (%s: %s); it is probed again next run", uri, type(err).__name__, err)
            statuses.append("unread")
    quarantine.write_quarantine(root, STAGE, failed)
    if decoded:
        name = layout.part_name([f"{r['image_id']}\0{r['uri']}\0{key}" for r in decoded])
        codecs.write_parquet(storage.join(layout.probe_dir(root), name),
                             pa.Table.from_pylist(decoded, schema=ledger.PROBE_SCHEMA))
    return tasks.status_batch(statuses)


def run_probe(cfg: Config, manifest_dir: str, key: str) -> dict[str, Any]:
    """Probe the images of the run's manifest that no earlier run probed; record the unreadable."""
    root = cfg.run.root
    t0 = time.perf_counter()
    pending_ref, counts_ref = tasks.run_task(plan.probe_plan, root, manifest_dir, key, num_returns=2,
                                              num_cpus=cfg.run.io_cpus)
    counts = {**tasks.get(counts_ref), "plan_seconds": round(time.perf_counter() - t0, 2)}
    pending = counts["pending"]
    probe = {"root": root, "key": key, "max_pixels": cfg.data.max_pixels}
    # Blocks of at most run.shard_rows images, at least ~32 of them when there are many.
    block = min(cfg.run.shard_rows, max(16, -(-pending // 32)))
    if pending > block:
        ds = tasks.dataset(pending_ref, block).map_batches(
            probe_batch, batch_size=block, batch_format="pyarrow", num_cpus=cfg.run.io_cpus, fn_kwargs=probe)
        counts.update(tasks.summarise(ds, StageProgress(STAGE, pending, every_seconds=cfg.run.progress_seconds)))
    elif pending:
        statuses = tasks.get(tasks.run_task(probe_batch, pending_ref, num_cpus=cfg.run.io_cpus, **probe))["status"]
        for status in statuses:
            counts[str(status)] = counts.get(str(status), 0) + 1
    tasks.finish_stage(layout.probe_dir(root), layout.quarantine_dir(root))
    found = tasks.get(tasks.run_task(plan.record_unreadable, root, manifest_dir, key, pending_ref,
                                       num_cpus=cfg.run.io_cpus))
    if found["new"]:
        listed = "\n".join(f"  {r['image_id']} ({r['uri']}): {r['reason']}" for r in found["shown"])
        more = f"\n  ... and {found['new'] - len(found['shown'])} more" if found["new"] > len(found["shown"]) else ""
        log.warning("%d image(s) do not decode; they are left out of every stage (quarantine/%s-*.parquet):\n%s%s",
                    found["new"], STAGE, listed, more)
    counts["unreadable"] = found["unreadable"]
    return {**counts, "_skipped": True} if pending == 0 else counts


def stage_probe(run: ledger.Run) -> dict[str, Any]:
    key = ledger.probe_key(run.cfg)
    ledger.claim_stage_outputs(run.state, STAGE, key, probe_outputs(run.root), forced=run.forced(STAGE))
    return run_probe(run.cfg, run.manifest_dir, key)
