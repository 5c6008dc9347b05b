"""Where everything lives under a run root (DESIGN §3). One function per kind of output."""

from __future__ import annotations

import hashlib

from pipeline.io.storage import join


def run_json(root: str) -> str:
    return join(root, "run.json")


def manifest_root(root: str) -> str:
    return join(root, "manifest")


def manifest_dir(root: str, stamp: str) -> str:
    """The validated manifest of one run: ``valid/part-*.parquet`` (and ``checked/`` while it is read)."""
    return join(root, "manifest", stamp)


def unreadable_file(manifest_dir: str) -> str:
    """The manifest's images that do not decode (QUARANTINE_SCHEMA rows), written by the probe."""
    return join(manifest_dir, "unreadable.parquet")


def probe_dir(root: str) -> str:
    """Probe rows (ledger.PROBE_SCHEMA) of the images that decoded."""
    return join(root, "probe")


def lease_file(root: str) -> str:
    """Who writes to the run root now (pipeline.io.lease): one job at a time."""
    return join(root, "_lease.json")


def run_log(root: str) -> str:
    """Everything a command-line job logged, Ray's lines included (jobs._console)."""
    return join(root, "run.log")


def models_dir(root: str) -> str:
    """Exported networks and the Ray Train runs (checkpoints) that made them."""
    return join(root, "models")


def model_file(root: str, network: str) -> str:
    """Exported state dict of ``network`` ('cam' or 'irn'); metadata beside it as ``.json``."""
    return join(models_dir(root), network, "model.pt")


def cams_dir(root: str) -> str:
    return join(root, "cams")


def relations_dir(root: str) -> str:
    return join(root, "relations")


def relation_png(root: str, image_id: str) -> str:
    return join(relations_dir(root), f"{image_id}.png")


def high_res_cams_dir(root: str) -> str:
    return join(root, "cams_high_res")


def labels_root(root: str) -> str:
    return join(root, "labels")


def latest_pointer(root: str) -> str:
    return join(root, "labels", "LATEST")


def labels_dir(root: str, version: str) -> str:
    return join(root, "labels", version)


def index_file(labels: str) -> str:
    """One row per image of a labels version (pipeline.label_tables.INDEX_SCHEMA)."""
    return join(labels, "index.parquet")


def coco_file(labels: str) -> str:
    return join(labels, "coco.json")


def semantic_png(labels: str, image_id: str) -> str:
    return join(labels, "semantic", f"{image_id}.png")


def instance_png(labels: str, image_id: str) -> str:
    return join(labels, "instance", f"{image_id}.png")


def quarantine_dir(root: str) -> str:
    return join(root, "quarantine")


def corrections_root(root: str) -> str:
    """Human corrections of labels (pipeline.stages.corrections), one directory each, never rewritten."""
    return join(root, "corrections")


def correction_dir(root: str, name: str) -> str:
    return join(root, "corrections", name)


def correction_from_version(name: str, relative: str) -> str:
    """A file of correction ``name`` as a labels version's index names it (relative to
    ``labels/<version>/``, like every URI of an index)."""
    return f"../../corrections/{name}/{relative}"


def report_dir(root: str) -> str:
    return join(root, "report")


def report_file(root: str) -> str:
    return join(root, "report", "index.html")


def tune_file(root: str) -> str:
    """The threshold sweep of ``jobs.tune``."""
    return join(root, "report", "tune.json")


def metrics_file(root: str) -> str:
    """The evaluation of the latest version against ground truth, with the segmenters' results
    (written by :func:`pipeline.ledger.update_metrics` only)."""
    return join(root, "report", "metrics.json")


def ablation_dir(root: str, method: str, key: str) -> str:
    """Labels of the ground-truth images by an ablation ``method`` (cam, cam_boundary), for evaluation."""
    return join(root, "report", "ablations", f"{method}-{key}")


def segmenter_results_dir(root: str) -> str:
    """``<model>-<labels>.json``: one downstream segmenter's metrics on the held-out images."""
    return join(root, "report", "segmenters")


def part_name(image_ids: list[str], prefix: str = "part") -> str:
    """Deterministic shard name for a batch: a retried batch overwrites its own shard."""
    digest = hashlib.sha1("\n".join(sorted(image_ids)).encode()).hexdigest()[:20]
    return f"{prefix}-{digest}.parquet"


def segmenter_model_file(root: str, model: str, labels: str) -> str:
    """A downstream segmenter (``model`` trained on ``labels``: pseudo or ground_truth)."""
    return join(models_dir(root), f"{model}-{labels}", "model.pt")
