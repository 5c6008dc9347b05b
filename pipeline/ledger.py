"""The run's bookkeeping, in one place: keys, ``run.json``, labels versions, which images a version
quarantines, commit rules.

What will tonight's run redo?
-----------------------------
Every output row carries the **key** of the inputs it was made from, and an image is *done* for a
stage when a committed row with the image's current key exists (a columnar anti-join on
``image_id`` + key, see :func:`plan_cams` and :func:`plan_synthesis`; it runs in a Ray task, not on
the driver). The keys, and so what changes them:

================ =========================================================== ============================
key              made from                                                   recorded in
================ =========================================================== ============================
probe            ``data.max_pixels``                                         ``key`` of probe rows
train_cam        ``train_cam`` settings, classes                             run.json stages
use_model        the given file's content, depth, classes                    run.json stages (train_*)
held-out score   the CAM model file's hash (measured once per model)         run.json ``train_cam.held_out``
cams             hash of the CAM model file (or the ``cams.source``),        run.json stages
                 classes, ``cams``/``relations`` settings, ``max_pixels``
train_irn        ``train_irn`` settings, the cams key, the corrections of    run.json stages
                 its training images (plan.training_corrections_digest)
synthesis        ``synthesis`` settings, classes, the cams key, model hashes run.json labels
CAM row          H(cams key, the image's class ids)                          ``key`` of CAM rows
label row        H(synthesis key, CAM row key)                               ``key`` of label rows
evaluate         the labels version, ``eval`` settings, ground truth digest  run.json stages
report           the version, the evaluate key, ``eval.num_previews``, the   run.json stages
                 segmenters' metrics
segmenter        ``segmenter`` training settings, the labels (a version, or  run.json ``train_<m>_<labels>``
                 the manifest's ground truth), classes
segmenter result the segmenter key, the held-out image ids,                  run.json ``result_key``
                 ``segmenter`` evaluation settings (SEGMENTER_EVALUATION_ONLY)
================ =========================================================== ============================

So a nightly run (``run.retrain: auto``), stage by stage:

* **probe** decodes once the manifest images without a probe row or probe quarantine row of their
  uri and key (new or moved images). An image that does not decode is quarantined (stage
  ``probe``) and every later stage, training included, reads the manifest without it
  (``manifest/<stamp>/unreadable.parquet``, see :func:`plan_probe`);
* **train_cam**, **train_irn** (and the segmenters of ``jobs.train_segmenter``) retrain a network
  only when its key changed, its model is missing, or a run died mid-training (it then resumes
  from the checkpoint): :func:`train_network`, the one train-then-mark-trained commit rule. New
  corrections of IRNet's training images change its key: IRNet retrains on them, which relabels
  every image (the synthesis key holds the model's hash). A
  ``use_model`` file is imported once per content (:func:`use_model_key`); the CAM network's
  held-out score is measured once per model file (:func:`current_held_out`);
* **cams** computes CAMs and relations for manifest rows without a CAM row of their current key:
  new images, images whose tags changed, every image after the CAM model or its settings changed
  (old CAM outputs are then discarded). An image quarantined by the CAM stage is retried only when
  its uri or key changed;
* **synthesis** labels, into a new version V, the images without a label row of their current key
  in the latest version; every other image's row is carried into V's index as a *reference* to
  the version that labelled it (its PNGs and instance rows are never copied or rewritten). An
  image the manifest no longer lists leaves the index. A synthesis failure is retried when its uri
  or key changed. With nothing labelled, removed or newly corrected, no version is made
  (:func:`version_needed`);
* **publish** writes ``labels/V/index.parquet`` (each corrected image's row replaced by its newest
  correction, :func:`pipeline.label_tables.apply_corrections`) and ``coco.json``, records V in run.json, and only then
  points ``labels/LATEST`` at V;
* **evaluate** (with ground truth) scores LATEST when its key changed: a new version, other
  ``eval`` settings, other ground truth; **report** is rebuilt when its key changed: a new version
  or evaluation, other previews, new segmenter results (:func:`is_current`, the rule of every
  stage with one output);
* **segmenters** (``jobs.train_segmenter``) retrain on a new version (pseudo labels) or a new
  manifest (ground truth) or other training settings; a change of evaluation-only settings
  re-evaluates without retraining.

``--from-stage S`` forces S and every stage after it (:func:`forced_stages`): networks retrain,
CAMs and labels are recomputed for every image, a new version is made from scratch (no base),
evaluation and report are redone. ``tests/test_ledger_scenarios.py`` walks these rules through
the scenarios users meet (nothing changed, new images, changed tags or settings, ``--from-stage``).

A run that died resumes: finished shards are done rows, and an unpublished version V whose
synthesis key still holds is completed rather than restarted.

Commit rules (every file is written atomically: temporary name + rename, or one PUT):

* CAM stage: the relation PNG, then the image's row in a CAM shard (the row commits the image);
* synthesis: the PNGs, then the batch's ``instances/`` shard and its COCO part, then its
  ``images/`` shard, whose rows name the instance shard they belong to (an ``images/`` row commits
  the image; instance rows count only through it);
* a labels version: ``index.parquet``, ``coco.json``, the run.json record, then ``LATEST``;
* a trained network: run.json ``trained: false`` with the key and the Ray Train run name, the
  model file, its ``.json`` metadata, then ``trained: true`` (:func:`train_network`);
* ``report/metrics.json``: one read-modify-write of its top-level fields (:func:`update_metrics`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import platform
import time
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Callable, TypeVar

import numpy as np
import pyarrow as pa

from pipeline import __version__
from pipeline.config import Config
from pipeline.data.classes import Vocabulary
from pipeline.io import layout, storage
from pipeline.io.tables import conform, join_rows
from pipeline.label_tables import (
    CORRECTION_ROWS,
    INDEX_SCHEMA,
    URI_COLUMNS,
    apply_corrections,
    rank_doubt,
    relative_to_sibling,
)
from pipeline.quarantine import QUARANTINE_SCHEMA

log = logging.getLogger(__name__)
T = TypeVar("T")

# -------------------------------------------------------------------------------------- stages

# The stages of a labelling run, in order (after the manifest, which every run reads): the driver
# runs them in this order, jobs.status lists them so, the docs name them.
STAGES = ("probe", "train_cam", "cams", "train_irn", "synthesis", "publish", "evaluate", "report")
# Stages that run even when --only leaves them out: every later stage reads the manifest without
# the images the probe found unreadable (a planning task, when no image is new).
ALWAYS = ("probe",)


def forced_stages(from_stage: str | None) -> set[str]:
    """``--from-stage S``: S and every stage after it redo their work whatever their keys say
    (a network retrains, CAMs and labels are recomputed, a new version is made from scratch)."""
    if from_stage is None:
        return set()
    if from_stage not in STAGES:
        raise ValueError(f"unknown stage {from_stage!r}; stages: {', '.join(STAGES)}")
    return set(STAGES[STAGES.index(from_stage):])

# ----------------------------------------------------------------------------------------- keys

# Settings that change how a stage runs, not what it computes: left out of the keys, so moving a
# run root to GPUs or changing parallelism does not redo finished work.
EXECUTION_ONLY = {"num_workers", "use_gpu", "cpus_per_worker", "max_failures", "num_actors", "cpus_per_actor",
                  "gpus_per_actor", "cpus_per_task", "max_tasks", "keep_high_res", "bf16", "batch_size"}


def fingerprint(values: Any) -> str:
    """Stable short hash of the inputs that determine an output."""
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:16]


def settings(section: Any, *, training: bool = False) -> dict[str, Any]:
    """The fields of a config section that determine its outputs. ``batch_size`` matters only to
    training (it changes the optimisation), never to inference."""
    drop = EXECUTION_ONLY - ({"batch_size"} if training else set())
    return {k: v for k, v in vars(section).items() if k not in drop}


def file_fingerprint(uri: str) -> str:
    """Content hash of a (model) file, so retraining invalidates what was computed from it."""
    return hashlib.sha256(storage.read_bytes(uri)).hexdigest()[:16]


def probe_key(cfg) -> str:
    """What decides whether an image decodes: the pixel limit (pipeline.data.images)."""
    return fingerprint({"probe": {"max_pixels": cfg.data.max_pixels}})


def train_cam_key(cfg, classes: list[str]) -> str:
    return fingerprint({"train_cam": settings(cfg.train_cam, training=True), "classes": classes})


def cams_key(cfg, classes: list[str], cam_model: str) -> str:
    """``cam_model``: :func:`file_fingerprint` of the CAM network the CAMs come from."""
    return fingerprint({"model": cam_model, "classes": classes, "cams": settings(cfg.cams),
                        "relations": settings(cfg.relations), "max_pixels": cfg.data.max_pixels})


def train_irn_key(cfg, cams: str | None, corrections: str | None = None) -> str:
    """``corrections``: plan.training_corrections_digest; a new correction retrains IRNet (and so
    relabels every image). A run without corrections keeps the key it had before they existed."""
    parts = {"train_irn": settings(cfg.train_irn, training=True), "cams": cams}
    return fingerprint({**parts, "corrections": corrections} if corrections else parts)


def synthesis_key(cfg, classes: list[str], cams: str | None, models: list[str], method: str | None = None) -> str:
    """``models``: file fingerprints of the networks ``method`` uses (CAM, and IRNet unless 'cam')."""
    method = method or cfg.synthesis.method
    synthesis = {**settings(cfg.synthesis), "method": method}
    if synthesis["grouping"] == "official":  # keys from before the density grouping existed stay valid
        del synthesis["grouping"], synthesis["density_sigma"]
    return fingerprint({"synthesis": synthesis, "classes": classes,
                        "cams": cams, "pad_to": cfg.train_irn.crop_size, "models": models})


def _key(text: str) -> str:
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


def row_keys(stage_key: str, class_ids: list[list[int]]) -> pa.Array:
    """CAM row keys: H(stage key, class ids), one per image."""
    return pa.array([_key(f"{stage_key}|{','.join(str(int(c)) for c in ids)}") for ids in class_ids], pa.string())


def label_keys(synthesis_key: str, cam_keys: pa.Array | pa.ChunkedArray) -> pa.Array:
    """Label row keys: H(synthesis key, CAM row key)."""
    return pa.array([_key(f"{synthesis_key}|{k}") for k in cam_keys.to_pylist()], pa.string())


# ------------------------------------------------------------------------------------ run.json

PACKAGES = ("torch", "torchvision", "ray", "numpy", "pyarrow", "fsspec", "pillow", "pydensecrf2", "pycocotools")


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    versions["irn-ray"] = __version__
    return versions


def to_json_safe(value: Any) -> Any:
    """NaN/inf -> None, tuples -> lists, numpy scalars -> Python, recursively (strict JSON)."""
    if isinstance(value, dict):
        return {str(k): to_json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json_safe(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class RunState:
    """``<root>/run.json``: config, package versions, per-stage status and keys, labels versions.

    Every change is written at once (atomically), so an interrupted run leaves an accurate record
    that the next run resumes from.
    """

    def __init__(self, root: str):
        self.uri = layout.run_json(root)
        self.data: dict[str, Any] = (json.loads(storage.read_text(self.uri)) if storage.exists(self.uri)
                                     else {"stages": {}, "labels": {"versions": {}, "pending": None}})

    def stage(self, name: str) -> dict[str, Any]:
        return self.data["stages"].setdefault(name, {})

    def update_stage(self, name: str, **fields: Any) -> None:
        self.stage(name).update(fields, updated=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        self.save()

    @property
    def labels(self) -> dict[str, Any]:
        return self.data["labels"]

    def save(self) -> None:
        storage.write_text(self.uri, json.dumps(to_json_safe(self.data), indent=2, sort_keys=True))


@dataclass
class Run:
    """One labelling run as its stages see it: the config, the validated manifest, the classes,
    run.json, and which stages ``--from-stage`` forces and ``--only`` selects."""

    cfg: Config
    manifest_dir: str
    classes: list[str]
    state: RunState
    force: set[str] = field(default_factory=set)
    only: set[str] | None = None

    @property
    def root(self) -> str:
        return self.cfg.run.root

    def forced(self, stage: str) -> bool:
        return stage in self.force

    def selected(self, stage: str) -> bool:
        """Whether the driver runs ``stage`` at all (``--only``; ALWAYS stages always)."""
        return self.only is None or stage in self.only or stage in ALWAYS

    def cams_key(self) -> str:
        source = self.cfg.cams.source
        model = f"source:{source}" if source else file_fingerprint(layout.model_file(self.root, "cam"))
        return cams_key(self.cfg, self.classes, model)

    def recorded_cams_key(self) -> str | None:
        """The key of the CAMs on storage (what later stages read), as the cams stage recorded it."""
        return self.state.stage("cams").get("key")

    def synthesis_key(self, method: str | None = None) -> str:
        method = method or self.cfg.synthesis.method
        networks = ([] if self.cfg.cams.source else ["cam"]) + ([] if method == "cam" else ["irn"])
        models = [file_fingerprint(layout.model_file(self.root, m)) for m in networks]
        return synthesis_key(self.cfg, self.classes, self.recorded_cams_key(), models, method)


def needs_training(state: RunState, network: str, key: str, *, policy: str, forced: bool,
                   model_exists: bool) -> tuple[bool, bool]:
    """(train?, resume the interrupted Ray Train run?) for ``network`` by ``run.retrain``."""
    stage = state.stage(f"train_{network}")
    interrupted = stage.get("trained") is False  # a previous attempt died: finish it first
    needed = (forced or not model_exists or interrupted or policy == "always"
              or (policy == "auto" and stage.get("key") != key))
    resume = needed and interrupted and stage.get("key") == key and bool(stage.get("run_name"))
    return needed, resume


def train_network(state: RunState, network: str, key: str, model: str, train: Callable[[str], T], *,
                  policy: str, forced: bool) -> T | None:
    """The one commit rule of every trained network (CAM, IRNet, the segmenters): when
    :func:`needs_training` says so, record the key and the Ray Train run name with
    ``trained: false``, train (``train(run_name)`` exports ``model``), then mark it trained. A run
    that dies in between leaves ``trained: false``: the next run resumes the same Ray Train run.
    Returns what ``train`` returned, or None when the model at ``model`` is current."""
    needed, resume = needs_training(state, network, key, policy=policy, forced=forced,
                                    model_exists=storage.exists(model))
    if not needed:
        return None
    stage = f"train_{network}"
    name = state.stage(stage)["run_name"] if resume else f"{network}-{key}-{time.strftime('%Y%m%dT%H%M%S')}"
    state.update_stage(stage, key=key, run_name=name, trained=False, status="running")
    result = train(name)
    state.update_stage(stage, trained=True, status="done")
    return result


def use_model_key(section: Any, classes: list[str]) -> str:
    """``train_<network>.use_model``: the given file's content, the depth and the classes."""
    return fingerprint({"use_model": section.use_model, "file": file_fingerprint(section.use_model),
                        "depth": section.depth, "classes": classes})


def current_held_out(state: RunState, model: str) -> dict[str, Any] | None:
    """The CAM network's held-out classification score recorded for the model file whose
    :func:`file_fingerprint` is ``model``, or None: it is measured once per model."""
    recorded = state.stage("train_cam").get("held_out")
    return recorded if recorded and recorded.get("model") == model else None


def record_held_out(state: RunState, model: str, quality: dict[str, Any] | None) -> dict[str, Any]:
    record = {**(quality or {"images": 0}), "model": model}
    state.update_stage("train_cam", held_out=record)
    return record


def claim_stage_outputs(state: RunState, stage: str, key: str, directories: list[str], *,
                        forced: bool = False) -> None:
    """Make ``directories`` (or files) hold outputs of ``key`` only: when the stage's key changed,
    its old outputs can never be done again, so they are removed (their rows would be skipped
    anyway); ``forced`` removes them too, so the stage redoes everything."""
    previous = state.stage(stage).get("key")
    if forced or (previous is not None and previous != key):
        if previous is not None and previous != key:
            log.warning("inputs of stage %s changed; discarding its previous outputs", stage)
        for directory in directories:
            storage.remove(directory, recursive=True)
    if previous != key:
        state.update_stage(stage, key=key)


def is_current(state: RunState, stage: str, key: str, output: str, *, forced: bool = False,
               field: str = "key") -> bool:
    """The rule of the stages with one output (use_model, evaluation, report, a segmenter's
    result): current when run.json records ``key`` for it (under ``field``), the output exists and
    ``--from-stage`` does not force it."""
    return not forced and state.stage(stage).get(field) == key and storage.exists(output)


# ------------------------------------------------------------- evaluation, report, segmenters

def evaluation_key(version: str, eval_settings: Any, ground_truth_digest: str | None) -> str:
    """The evaluation of a labels version: the version, ``eval`` settings, the ground truth's digest."""
    return fingerprint({"version": version, "eval": vars(eval_settings), "gt": ground_truth_digest})


def report_key(version: str, evaluation: str | None, previews: int, segmenters: dict[str, Any]) -> str:
    """The report: the version, the evaluation key, ``eval.num_previews``, the segmenters' metrics."""
    return fingerprint({"version": version, "metrics": evaluation, "previews": previews,
                        "segmenters": {k: v.get("metrics") for k, v in segmenters.items()}})


# Segmenter settings that change its results, not the model: a change re-evaluates, never retrains.
SEGMENTER_EVALUATION_ONLY = {"eval_scales", "mask_threshold", "max_eval_images"}


def segmenter_key(section: Any, labels: str, classes: list[str], version: str, manifest_stamp: str) -> str:
    """A downstream segmenter: its training settings, the labels it learns from (a labels version,
    or the ground truth of this manifest), the classes."""
    training = {k: v for k, v in settings(section, training=True).items()
                if k not in SEGMENTER_EVALUATION_ONLY | {"labels"}}
    return fingerprint({"segmenter": training, "labels": labels, "classes": classes, "version": version,
                        "manifest": manifest_stamp if labels == "ground_truth" else None})


def segmenter_result_key(model: str, image_ids: list[str], section: Any) -> str:
    """A segmenter's evaluation: its model key, the held-out images, the evaluation settings."""
    return fingerprint({"model": model, "images": image_ids,
                        **{k: getattr(section, k) for k in SEGMENTER_EVALUATION_ONLY}})


def read_metrics(root: str) -> dict[str, Any] | None:
    uri = layout.metrics_file(root)
    return json.loads(storage.read_text(uri)) if storage.exists(uri) else None


def update_metrics(root: str, **fields: Any) -> dict[str, Any]:
    """Set top-level ``fields`` of ``report/metrics.json`` (the evaluation writes its own, the
    segmenter job ``segmenters``; each keeps the other's); one atomic write."""
    metrics = {**(read_metrics(root) or {}), **fields}
    storage.write_text(layout.metrics_file(root), json.dumps(to_json_safe(metrics), indent=2, sort_keys=True))
    return metrics


def segmenter_results(root: str) -> dict[str, dict[str, Any]]:
    """{'<model>-<labels>': result} of every segmenter evaluated in this run root."""
    return {uri.rsplit("/", 1)[-1].removesuffix(".json"): json.loads(storage.read_text(uri))
            for uri in storage.list_files(layout.segmenter_results_dir(root), ".json")}


# ------------------------------------------------------------------------------ labels versions


def latest_version(root: str) -> str | None:
    pointer = layout.latest_pointer(root)
    return storage.read_text(pointer).strip() if storage.exists(pointer) else None


def begin_version(state: RunState, root: str, key: str, *, forced: bool) -> dict[str, Any]:
    """The labels version this run writes: the unpublished one an interrupted run left (same key)
    or a new one based on LATEST. Returns the pending record {name, key, base, resumed}."""
    labels, latest = state.labels, latest_version(root)
    pending = labels.get("pending")
    if pending and pending["name"] == latest:  # published; the run stopped before it said so
        pending = None
    if pending and pending["key"] == key and not forced:
        return {**pending, "resumed": True}
    base = None if forced else latest
    return {"name": time.strftime("v%Y%m%dT%H%M%SZ", time.gmtime()), "key": key, "base": base, "resumed": False}


def record_pending(state: RunState, pending: dict[str, Any] | None) -> None:
    state.labels["pending"] = None if pending is None else {k: pending[k] for k in ("name", "key", "base")}
    state.save()


def version_needed(state: RunState, pending: dict[str, Any], *, labelled: int, removed: int,
                   corrected: int = 0) -> bool:
    """After synthesis wrote ``pending``'s labels: is there a new version to publish? A resumed or
    first version is; a new one on top of LATEST only when it labelled or removed an image, or
    people corrected one since (:func:`pipeline.label_tables.corrections_changed`). The answer is
    recorded: the pending version is marked complete (for publish), or dropped."""
    if pending["resumed"] or not pending["base"] or labelled or removed or corrected:
        state.labels["pending"]["complete"] = True
        state.save()
        return True
    record_pending(state, None)  # the latest version is current: no new version
    return False


def publish_version(state: RunState, root: str, version: str, summary: dict[str, Any]) -> None:
    """V is complete (index and coco.json written): record it, then point LATEST at it.

    A run that stops between the two still lists V as pending; the next run sees LATEST names it
    and never resumes (rewrites) a published version.
    """
    pending = state.labels.get("pending") or {}
    state.labels["versions"][version] = {"key": pending.get("key"), "base": pending.get("base"),
                                         "published": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                         **summary}
    state.save()
    storage.write_text(layout.latest_pointer(root), version + "\n")
    state.labels["pending"] = None
    state.save()


# ---------------------------------------------------------------------------------- quarantine
# Its files are pipeline.quarantine's; which rows a version lists is decided here.

def version_quarantine(manifest_rejects: pa.Table, images: pa.Table, cams_failed: pa.Table, current: pa.Table,
                       synthesis_key: str, synthesis_failed: pa.Table) -> pa.Table:
    """Why the manifest's images that a version lacks are missing: the manifest's own rejects and
    the images the probe could not decode (``manifest_rejects``), and the CAM and synthesis
    failures of the images' current keys and uris (QUARANTINE_SCHEMA)."""
    columns = ["image_id", "uri", "stage", "reason", "key"]
    cams = join_rows(images.select(["image_id", "cam_key", "uri"]).rename_columns(["image_id", "key", "uri"]),
                     cams_failed, ["image_id", "key", "uri"], "inner", extra=["stage", "reason"])
    labels = pa.table({"image_id": current.column("image_id"), "uri": current.column("uri"),
                       "key": label_keys(synthesis_key, current.column("cam_key"))})
    synthesis = join_rows(labels, synthesis_failed, ["image_id", "key", "uri"], "inner", extra=["stage", "reason"])
    parts = [t.select(columns).cast(QUARANTINE_SCHEMA) for t in (manifest_rejects, cams, synthesis)]
    return pa.concat_tables(parts).sort_by([("image_id", "ascending"), ("stage", "ascending")])


# ----------------------------------------------------------------------------------------- plans
# The "done" rules as Arrow computations over key columns. They run inside a Ray task
# (pipeline.plan), so the driver never holds the set's ids; only counts come back.


def manifest_keys(manifest: pa.Table, classes: list[str], cams_key: str) -> pa.Table:
    """(image_id, uri, class_ids, cam_key, split) of validated manifest rows."""
    vocabulary = Vocabulary(classes)
    class_ids = [vocabulary.ids(labels) for labels in manifest.column("labels").to_pylist()]
    return pa.table({"image_id": manifest.column("image_id"), "uri": manifest.column("uri"),
                     "class_ids": pa.array(class_ids, pa.list_(pa.int32())),
                     "cam_key": row_keys(cams_key, class_ids), "split": manifest.column("split")})


# Probe rows: the images that decoded (one shard per probed batch, under probe/ of the run root).
PROBE_SCHEMA = pa.schema([("image_id", pa.string()), ("uri", pa.string()), ("key", pa.string())])


def plan_probe(images: pa.Table, probed: pa.Table, failed: pa.Table, key: str) -> tuple[pa.Table, dict[str, int]]:
    """Images to decode: no probe row and no probe quarantine row of their uri and ``key`` (an
    image is probed again when the manifest moves it or ``data.max_pixels`` changes).

    images: (image_id, uri); probed, failed: (image_id, uri, key).
    Returns (pending (image_id, uri), counts: images, skipped, pending).
    """
    images = images.select(["image_id", "uri"])
    keyed = images.append_column("key", pa.array([key] * images.num_rows, pa.string()))
    columns = ["image_id", "uri", "key"]
    pending = join_rows(join_rows(keyed, probed.select(columns), columns, "left anti"), failed.select(columns),
                        columns, "left anti")
    return pending.select(["image_id", "uri"]), {"images": images.num_rows,
                                                 "skipped": images.num_rows - pending.num_rows,
                                                 "pending": pending.num_rows}


def unreadable(images: pa.Table, failed: pa.Table, key: str) -> pa.Table:
    """The probe quarantine rows (QUARANTINE_SCHEMA) of ``images`` (image_id, uri) at their
    current uri and ``key``: the images no stage may read, one row each, sorted by image_id."""
    keyed = images.select(["image_id", "uri"])
    keyed = keyed.append_column("key", pa.array([key] * keyed.num_rows, pa.string()))
    rows = join_rows(failed.select(QUARANTINE_SCHEMA.names), keyed, ["image_id", "uri", "key"], "left semi")
    if rows.num_rows:  # a batch retried after a lost result may have quarantined an image twice
        first = pa.table({"image_id": rows.column("image_id"), "__row": pa.array(np.arange(rows.num_rows))})
        rows = rows.take(first.group_by("image_id").aggregate([("__row", "min")]).column("__row_min"))
    return rows.cast(QUARANTINE_SCHEMA).sort_by("image_id")


def plan_cams(images: pa.Table, cam_rows: pa.Table, failed: pa.Table) -> tuple[pa.Table, dict[str, int]]:
    """Images whose CAM outputs are missing: no CAM row of their key, and no quarantine row of
    their key and uri (a failure is retried when the manifest moves the file or changes its tags).

    images: :func:`manifest_keys`; cam_rows: (image_id, key); failed: (image_id, uri, key).
    Returns (pending rows of ``images``, counts: images, skipped (done or failed before), pending).
    """
    done = cam_rows.rename_columns(["image_id", "cam_key"])
    todo = join_rows(images, done, ["image_id", "cam_key"], "left anti")
    failed = failed.select(["image_id", "key", "uri"]).rename_columns(["image_id", "cam_key", "uri"])
    pending = join_rows(todo, failed, ["image_id", "cam_key", "uri"], "left anti")
    return pending, {"images": images.num_rows, "skipped": images.num_rows - pending.num_rows,
                     "pending": pending.num_rows}


def current_cams(images: pa.Table, cam_rows: pa.Table) -> pa.Table:
    """``images`` that have a CAM row of their key, with the file name of its shard (``cam_shard``).

    cam_rows: (image_id, key, shard)."""
    done = cam_rows.select(["image_id", "key", "shard"]).rename_columns(["image_id", "cam_key", "cam_shard"])
    return join_rows(images, done, ["image_id", "cam_key"], "inner", extra=["cam_shard"])


def plan_synthesis(current: pa.Table, synthesis_key: str, base_index: pa.Table, labelled: pa.Table,
                   failed: pa.Table) -> tuple[pa.Table, pa.Table, dict[str, int]]:
    """What a labels version needs: (reused index rows, pending images, counts).

    current: :func:`current_cams`; base_index: the index of the version this one builds on (or
    empty); labelled: (image_id, key) rows this version already committed; failed: synthesis
    quarantine (image_id, uri, key). An image is reused when the base has a row of its label key,
    skipped when this version has one or it failed with its key and uri, else pending.
    """
    current = current.append_column("label_key", label_keys(synthesis_key, current.column("cam_key")))
    wanted = pa.table({"image_id": current.column("image_id"), "key": current.column("label_key")})
    reused = join_rows(base_index, wanted, ["image_id", "key"], "left semi")
    todo = join_rows(current, reused.select(["image_id", "key"]).rename_columns(["image_id", "label_key"]),
                     ["image_id", "label_key"], "left anti")
    done = labelled.select(["image_id", "key"]).rename_columns(["image_id", "label_key"])
    todo_new = join_rows(todo, done, ["image_id", "label_key"], "left anti")
    failed = failed.select(["image_id", "key", "uri"]).rename_columns(["image_id", "label_key", "uri"])
    pending = join_rows(todo_new, failed, ["image_id", "label_key", "uri"], "left anti")
    counts = {"images": current.num_rows, "reused": reused.num_rows, "skipped": todo.num_rows - pending.num_rows,
              "pending": pending.num_rows}
    return reused, pending, counts


def version_index(reused: pa.Table, base: str | None, labelled: pa.Table, current: pa.Table,
                  synthesis_key: str, corrections: pa.Table | None = None) -> pa.Table:
    """The index of a version: the reused rows (re-pointed at ``base``) and the rows it labelled
    itself that are still current, one per image (the last committed wins), then the
    ``corrections`` (:func:`apply_corrections`), sorted by image_id, with each image's doubt
    ranked among the images IRNet labelled."""
    if base is not None and reused.num_rows:
        for column in URI_COLUMNS:
            reused = reused.set_column(reused.schema.get_field_index(column), column,
                                       relative_to_sibling(reused.column(column), base))
    keys = current.select(["image_id", "cam_key"])
    keys = keys.append_column("key", label_keys(synthesis_key, keys.column("cam_key"))).select(["image_id", "key"])
    own = join_rows(labelled, keys, ["image_id", "key"], "left semi")
    if own.num_rows:  # a batch retried after a lost result may have committed an image twice
        last = pa.table({"image_id": own.column("image_id"), "__row": pa.array(np.arange(own.num_rows))})
        own = own.take(last.group_by("image_id").aggregate([("__row", "max")]).column("__row_max"))
    table = pa.concat_tables([conform(reused, INDEX_SCHEMA), conform(own, INDEX_SCHEMA)])
    return rank_doubt(apply_corrections(table, corrections if corrections is not None
                                        else CORRECTION_ROWS.empty_table()))
