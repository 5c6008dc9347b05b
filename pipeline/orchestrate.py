"""The end-to-end run: every stage in order, each skipped when its outputs are current.

manifest -> probe (which images decode) -> train CAM -> CAMs + relation mining -> train IRNet ->
synthesis -> publish (index, coco.json, LATEST) -> evaluation -> report. ``run.json`` records what
each stage did; what counts as done, and so what a rerun redoes, is decided in :mod:`pipeline.ledger`.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from pipeline import ledger
from pipeline.config import Config
from pipeline.io import layout, storage
from pipeline.progress import OUR_LOGGERS, WORKER_LINE_FORMAT, counts_text, summary_table
from pipeline.stages import common, plan

log = logging.getLogger(__name__)
STAGES = ("probe", "train_cam", "cams", "train_irn", "synthesis", "publish", "evaluate", "report")
# Stages that run even when --only leaves them out: every later stage reads the manifest without
# the images the probe found unreadable (a planning task, when no image is new).
ALWAYS = ("probe",)
# Loggers that print Ray's own execution plans, checkpoint paths and actor notices.
NOISY_LOGGERS = ("ray.data", "ray.train", "ray.tune", "ray.air", "ray._private", "ray.util",
                 "ray.train.v2._internal.execution.controller.placement_group_cleaner")


def _quiet_ray() -> None:
    """Worker setup hook: Ray's own INFO lines (checkpoint paths, reports) stay in its log files."""
    import importlib.util
    import threading
    import warnings

    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    # Ray Train reports each result through a logger named by its file path.
    spec = importlib.util.find_spec("ray.train.v2._internal.execution.context")
    if spec is not None and spec.origin:
        logging.getLogger(spec.origin).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*exclude_resources.*")
    # Ray Train's placement-group cleaner polls the State API, which needs the dashboard that an
    # embedded run does not start; its monitor thread then dies with a traceback that says nothing
    # about the job (the cleaner only matters when a controller dies and the cluster lives on).
    default = threading.excepthook

    def excepthook(args):
        if args.thread is None or args.thread.name != "PlacementGroupCleanerMonitor":
            default(args)

    threading.excepthook = excepthook


class _CurrentStderr(logging.StreamHandler):
    """A handler that writes to whatever ``sys.stderr`` is when a record is emitted."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _worker_setup() -> None:
    """Worker setup hook: Ray's lines quiet, ours (INFO and above) marked as ours
    (progress.WORKER_LINE_FORMAT), so the driver can show them on the console and leave Ray's to
    run.log."""
    _quiet_ray()
    handler = _CurrentStderr()
    handler.setFormatter(logging.Formatter(WORKER_LINE_FORMAT))
    for name in OUR_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(h, _CurrentStderr) for h in logger.handlers):
            logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def init_ray(cfg: Config) -> None:
    """Join the cluster in RAY_ADDRESS (``ray job submit``) or start an embedded local Ray."""
    if not sys.stdout.isatty():
        # No colour codes in a file or a pipe: Ray colours the prefix of each worker line it
        # forwards, and always the "[repeated 3x across cluster]" of its deduplication (which
        # reads this when Ray is first imported).
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
        os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    import ray
    import ray.data

    if not ray.is_initialized():
        address = cfg.ray.address
        if address == "auto-local":
            address = os.environ.get("RAY_ADDRESS") or "local"
        if address == "local":
            # Embedded: no dashboard or job server (Ray's own ports still listen on all interfaces,
            # see README Security); workers import this checkout.
            project = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
            path = os.pathsep.join(p for p in (project, os.environ.get("PYTHONPATH", "")) if p)
            log.info("starting Ray on this machine (%s CPUs)", cfg.ray.num_cpus or "all")
            ray.init(address="local", num_cpus=cfg.ray.num_cpus, num_gpus=cfg.ray.num_gpus, include_dashboard=False,
                     runtime_env={"worker_process_setup_hook": _worker_setup, "env_vars": {"PYTHONPATH": path}})
        else:  # merged with the submitted job's runtime env (its working_dir)
            log.info("joining the Ray cluster at %s", address)
            ray.init(address=address, runtime_env={"worker_process_setup_hook": _worker_setup})
    _quiet_ray()
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    context.verbose_stats_logs = False


@dataclass
class Run:
    cfg: Config
    manifest_dir: str
    classes: list[str]
    state: ledger.RunState
    force: set[str] = field(default_factory=set)
    only: set[str] | None = None

    @property
    def root(self) -> str:
        return self.cfg.run.root

    def stage(self, name: str, body: Callable[[], dict[str, Any]]) -> None:
        """Run one stage body; record status, counts and timing in run.json."""
        if self.only is not None and name not in self.only and name not in ALWAYS:
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
        self.state.update_stage(name, status=status, seconds=seconds, counts=counts)
        log.info("stage %s: %s in %.1fs (%s)", name, status, seconds, counts_text(counts))

    # Keys (pipeline.ledger): what each stage's outputs were made from.
    def cams_key(self) -> str:
        if self.cfg.cams.source:
            return ledger.cams_key(self.cfg, self.classes, f"source:{self.cfg.cams.source}")
        return ledger.cams_key(self.cfg, self.classes, ledger.file_fingerprint(layout.model_file(self.root, "cam")))

    def recorded_cams_key(self) -> str | None:
        return self.state.stage("cams").get("key")

    def synthesis_key(self, method: str | None = None) -> str:
        method = method or self.cfg.synthesis.method
        networks = ([] if self.cfg.cams.source else ["cam"]) + ([] if method == "cam" else ["irn"])
        models = [ledger.file_fingerprint(layout.model_file(self.root, m)) for m in networks]
        return ledger.synthesis_key(self.cfg, self.classes, self.recorded_cams_key(), models, method)


def _train_network(run: Run, network: str, key: str, train: Callable[[str], dict[str, Any]]) -> dict[str, Any]:
    """Retrain by ``run.retrain`` (never / always / auto = when the key changed or no model), or
    take the model ``train_<network>.use_model`` names."""
    from pipeline.train.common import import_model

    section = getattr(run.cfg, f"train_{network}")
    if section.use_model:
        key = ledger.fingerprint({"use_model": section.use_model, "file": ledger.file_fingerprint(section.use_model),
                                  "depth": section.depth, "classes": run.classes})
        model = layout.model_file(run.root, network)
        if run.state.stage(f"train_{network}").get("key") == key and storage.exists(model):
            return {"_skipped": True, "model": model}
        meta = import_model(section.use_model, model, network, depth=section.depth, num_classes=len(run.classes),
                            extra={"network": network, "classes": run.classes, "config": vars(section)})
        run.state.update_stage(f"train_{network}", key=key, trained=True, run_name=None)
        return {"model": model, "source": meta["source"]}
    needed, resume = ledger.needs_training(run.state, network, key, policy=run.cfg.run.retrain,
                                           forced=f"train_{network}" in run.force,
                                           model_exists=storage.exists(layout.model_file(run.root, network)))
    if not needed:
        return {"_skipped": True, "model": layout.model_file(run.root, network)}
    stage = run.state.stage(f"train_{network}")
    name = stage["run_name"] if resume else f"{network}-{key}-{time.strftime('%Y%m%dT%H%M%S')}"
    run.state.update_stage(f"train_{network}", key=key, run_name=name, trained=False)
    meta = train(name)
    run.state.update_stage(f"train_{network}", trained=True)
    return {"images": meta.get("num_images"), "final_loss": meta.get("metrics", {}).get("loss")}


class QualityGateError(RuntimeError):
    """The CAM network is too weak to label with: the run stops before it publishes anything."""


def stage_probe(run: Run) -> dict[str, Any]:
    from pipeline.stages.probe import probe_outputs, run_probe

    key = ledger.probe_key(run.cfg)
    ledger.claim_stage_outputs(run.state, "probe", key, probe_outputs(run.root), forced="probe" in run.force)
    return run_probe(run.cfg, run.manifest_dir, key)


def stage_train_cam(run: Run) -> dict[str, Any]:
    if run.cfg.cams.source:
        return {"_skipped": True, "reason": "cams.source gives the CAMs"}
    key = ledger.train_cam_key(run.cfg, run.classes)

    def train(name: str) -> dict[str, Any]:
        from pipeline.train.cam import train_cam  # Ray Train is imported only when training

        table_ref, count_ref, chance_ref = common.run_task(plan.cam_training_rows, run.manifest_dir, run.classes,
                                                           num_returns=3, num_cpus=run.cfg.run.io_cpus)
        held_out: list[dict[str, Any]] = []
        if run.cfg.train_cam.select_best:  # at most eval.max_classification_images rows: small
            held_out = common.get(common.run_task(
                plan.cam_training_rows, run.manifest_dir, run.classes, held_out=True,
                limit=run.cfg.eval.max_classification_images, num_returns=3, num_cpus=run.cfg.run.io_cpus)[0]
            ).select(["uri", "target"]).to_pylist()
        run.state.update_stage("train_cam", chance_loss=common.get(chance_ref))
        return train_cam(run.cfg, table_ref, common.get(count_ref), run.classes, name=name, held_out_rows=held_out)

    counts = _train_network(run, "cam", key, train)
    quality = held_out_quality(run)
    if quality:
        counts["held_out_map"] = quality.get("map")
    return counts


def held_out_quality(run: Run) -> dict[str, Any] | None:
    """The CAM network's classification mAP on the held-out images (recorded in run.json per
    model file, so it is measured once per model)."""
    from pipeline.train.cam import held_out_quality as measure

    model = layout.model_file(run.root, "cam")
    if not storage.exists(model):
        return None
    digest = ledger.file_fingerprint(model)
    recorded = run.state.stage("train_cam").get("held_out")
    if recorded and recorded.get("model") == digest:
        return recorded
    cfg = run.cfg
    quality = common.get(common.run_task(measure, run.root, run.manifest_dir, run.classes, size=cfg.train_cam.crop_size,
                                         max_pixels=cfg.data.max_pixels, max_images=cfg.eval.max_classification_images,
                                         num_cpus=1))
    record = {**(quality or {"images": 0}), "model": digest}
    run.state.update_stage("train_cam", held_out=record)
    return record


def cam_skill(held_out: dict[str, Any]) -> float:
    """(mAP - chance) / (1 - chance) of a held-out measurement: 0 at chance, 1 when perfect."""
    chance = held_out["chance"]
    return (held_out["map"] - chance) / (1 - chance) if chance < 1 else 1.0


def quality_gate(run: Run) -> None:
    """Stop before anything is published when the CAM network did not learn well enough: its
    held-out mAP below ``run.min_cam_map`` or its skill over chance below ``run.min_cam_skill``,
    or its final training loss near the chance loss."""
    gate = run.cfg.run.min_cam_map
    stage = run.state.stage("train_cam")
    if gate <= 0 or run.cfg.cams.source or not stage.get("held_out"):
        return
    held_out, problems = stage["held_out"], []
    if not held_out.get("images"):
        log.warning("quality gate: no held-out image to measure the CAM network on; not checked")
        return
    measured = (f"the CAM classifier's held-out mAP is {held_out['map']:.3f} on {held_out['images']} images "
                f"(chance {held_out['chance']:.3f})")
    skill = cam_skill(held_out)
    if held_out["map"] < gate:
        problems.append(f"{measured}, below run.min_cam_map {gate:.2f}")
    elif skill < run.cfg.run.min_cam_skill:
        problems.append(f"{measured}: {skill:.2f} of the way from chance to perfect, below run.min_cam_skill "
                        f"{run.cfg.run.min_cam_skill:.2f}; its CAMs would localise poorly")
    loss, chance = (stage.get("counts") or {}).get("final_loss"), stage.get("chance_loss")
    if loss is not None and chance and loss > CHANCE_LOSS_SHARE * chance:
        problems.append(f"its final training loss {loss:.3f} is within {100 - 100 * CHANCE_LOSS_SHARE:.0f}% of "
                        f"chance ({chance:.3f})")
    if problems:
        raise QualityGateError(
            "quality gate: " + "; ".join(problems) + ". Nothing was published (LATEST is unchanged); what was "
            "computed is kept. Try: more epochs or images; with no pretrained weights "
            "train_cam.from_scratch=true with optimizer=adamw and select_best=true; or CAMs from another method "
            "(cams.source). To label anyway: --set run.min_cam_map=0.")


CHANCE_LOSS_SHARE = 0.95  # a final loss above 95% of the chance loss: the network learnt (almost) nothing


def stage_cams(run: Run) -> dict[str, Any]:
    from pipeline.stages.cams import run_cams

    key = run.cams_key()
    root = run.root
    ledger.claim_stage_outputs(run.state, "cams", key, [layout.cams_dir(root), layout.relations_dir(root),
                                                        layout.high_res_cams_dir(root)])
    return run_cams(run.cfg, run.manifest_dir, run.classes, key)


def stage_train_irn(run: Run) -> dict[str, Any]:
    cams_key = run.recorded_cams_key()
    key = ledger.train_irn_key(run.cfg, cams_key)

    def train(name: str) -> dict[str, Any]:
        from pipeline.train.irn import train_irn

        table_ref, count_ref = common.run_task(plan.irn_training_rows, run.root, run.manifest_dir, run.classes,
                                               cams_key, num_returns=2, num_cpus=run.cfg.run.io_cpus)
        return train_irn(run.cfg, table_ref, common.get(count_ref), name=name)

    return _train_network(run, "irn", key, train)


def stage_synthesis(run: Run) -> dict[str, Any]:
    """Label what the next labels version needs (ledger.begin_version / plan_synthesis)."""
    from pipeline.stages.synthesis import run_synthesis

    key = run.synthesis_key()
    pending = ledger.begin_version(run.state, run.root, key, forced="synthesis" in run.force)
    ledger.record_pending(run.state, pending)
    version, base = pending["name"], pending["base"]
    base_dir = layout.labels_dir(run.root, base) if base else None
    counts = run_synthesis(run.cfg, run.manifest_dir, run.classes, run.recorded_cams_key(), key,
                           layout.labels_dir(run.root, version), base_dir)
    if not pending["resumed"] and base and counts["pending"] == 0 and counts["removed"] == 0:
        ledger.record_pending(run.state, None)  # the latest version is current: no new version
        return {**counts, "_skipped": True, "version": base}
    run.state.labels["pending"]["complete"] = True
    run.state.save()
    return {**counts, "version": version}


def stage_publish(run: Run) -> dict[str, Any]:
    """Write the new version's index and coco.json, record it, then point LATEST at it."""
    from pipeline.stages.coco import write_coco

    pending = run.state.labels.get("pending")
    if not pending:
        return {"_skipped": True, "version": ledger.latest_version(run.root)}
    if not pending.get("complete"):
        raise RuntimeError(f"labels version {pending['name']} is not complete; run the synthesis stage first")
    version, base = pending["name"], pending.get("base")
    labels_dir = layout.labels_dir(run.root, version)
    summary = common.get(common.run_task(
        plan.build_index, run.root, run.manifest_dir, run.classes, run.recorded_cams_key(), pending["key"], labels_dir,
        base, layout.labels_dir(run.root, base) if base else None, num_cpus=run.cfg.run.io_cpus))
    coco = common.get(common.run_task(write_coco, labels_dir, run.classes, num_cpus=run.cfg.run.io_cpus))
    summary["instances_per_class"] = coco["annotations_per_category"]
    for warning in summary["health_warnings"]:
        log.warning("labels %s: %s", version, warning)
    ledger.publish_version(run.state, run.root, version, summary)
    return {"version": version, "images": summary["images"], "instances": summary["instances"]}


def stage_evaluate(run: Run) -> dict[str, Any]:
    from pipeline.stages.evaluate import evaluate_labels, metrics_uri
    from pipeline.stages.synthesis import run_synthesis

    manifest = run.state.data["manifest"]
    version = ledger.latest_version(run.root)
    if not manifest["ground_truth"] or version is None:
        return {"_skipped": True, "reason": "no ground truth" if not manifest["ground_truth"] else "no labels"}
    cfg = run.cfg
    key = ledger.fingerprint({"version": version, "eval": vars(cfg.eval), "gt": manifest["ground_truth_digest"]})
    if (storage.exists(metrics_uri(run.root)) and "evaluate" not in run.force
            and run.state.stage("evaluate").get("key") == key):
        return {"_skipped": True, "version": version}
    result = {"labels_version": version,
              "irnet": evaluate_labels(cfg, run.manifest_dir, layout.labels_dir(run.root, version), run.classes),
              "ablations": {}}
    if cfg.eval.ablations:
        for method in ("cam", "cam_boundary"):
            key_m = run.synthesis_key(method)
            directory = storage.join(layout.report_dir(run.root), "ablations", f"{method}-{key_m}")
            run_synthesis(cfg, run.manifest_dir, run.classes, run.recorded_cams_key(), key_m, directory, None,
                          method=method, stage=f"ablation_{method}", ground_truth_only=True)
            common.get(common.run_task(plan.build_index, run.root, run.manifest_dir, run.classes,
                                       run.recorded_cams_key(), key_m, directory, None, None,
                                       stage=f"ablation_{method}", ground_truth_only=True, num_cpus=cfg.run.io_cpus))
            result["ablations"][method] = evaluate_labels(cfg, run.manifest_dir, directory, run.classes,
                                                          name=f"evaluate {method}")
    result["cam_classification"] = run.state.stage("train_cam").get("held_out")
    from pipeline.segment import segmenter_results

    result["segmenters"] = segmenter_results(run.root)
    storage.write_text(metrics_uri(run.root), json.dumps(ledger.to_json_safe(result), indent=2, sort_keys=True))
    run.state.update_stage("evaluate", key=key)
    full = result["irnet"]
    return {"miou": full["miou"], **{f"ap{t}": v for t, v in full["ap"].items()}}


def stage_report(run: Run) -> dict[str, Any]:
    from pipeline.previews import build_report

    return build_report(run)


def run_label(cfg: Config, *, from_stage: str | None = None, only: list[str] | None = None) -> dict[str, Any]:
    """Run (or resume) the whole job; returns the run summary written to run.json."""
    from pipeline.stages.manifest import ingest_manifest

    for name in [from_stage] + list(only or []):
        if name is not None and name not in STAGES:
            raise ValueError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}")
    t0 = time.perf_counter()
    init_ray(cfg)
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
    # --from-stage reruns that stage and everything after it; --only runs just the named stages
    # (each still skipped when its outputs are current).
    force = set(STAGES[STAGES.index(from_stage):]) if from_stage else set()
    run = Run(cfg, layout.manifest_dir(cfg.run.root, stamp), classes, state, force=force,
              only=set(only) if only else None)
    bodies = {"probe": stage_probe, "train_cam": stage_train_cam, "cams": stage_cams, "train_irn": stage_train_irn,
              "synthesis": stage_synthesis, "publish": stage_publish, "evaluate": stage_evaluate,
              "report": stage_report}
    for name in STAGES:
        run.stage(name, lambda body=bodies[name]: body(run))
        if name == "train_cam":
            quality_gate(run)
    state.data["last_run"] = {"seconds": round(time.perf_counter() - t0, 1),
                              "labels_version": ledger.latest_version(cfg.run.root)}
    state.save()
    log.info("run summary (%s):\n%s", cfg.run.root, summary_table(state.data["stages"], ("manifest",) + STAGES))
    return state.data
