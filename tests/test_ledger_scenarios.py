"""What tonight's run redoes, stage by stage, in the scenarios users meet: a table of expectations
walked against the ledger's rules (keys, needs_training, plan_cams, plan_synthesis,
version_needed, is_current, forced_stages), as the stages ask them.

Last night's run is recorded as the stages record it (keys in run.json, CAM rows, the labels
version's index); each scenario changes the config, the manifest or the command line, and the
plan lists what is redone: networks retrained, images whose CAMs or labels are recomputed,
whether a new version is made, and the evaluation, report and segmenter steps.
"""

from __future__ import annotations

import pyarrow as pa
import pytest

from pipeline import ledger
from pipeline.config import load_config
from pipeline.io import layout, storage

CLASSES = ["circle", "square"]
MANIFEST = [("a", "a.png", ["circle"]), ("b", "b.png", ["square"]), ("c", "c.png", ["circle", "square"])]
GT_DIGEST = "gt-1"
EMPTY = pa.table({"image_id": pa.array([], pa.string()), "uri": pa.array([], pa.string()),
                  "key": pa.array([], pa.string())})


def _manifest(rows):
    return pa.table({"image_id": [r[0] for r in rows], "uri": [r[1] for r in rows],
                     "labels": pa.array([r[2] for r in rows], pa.list_(pa.string())), "split": [""] * len(rows)})


def _model(network: str, generation: int) -> str:
    """The file fingerprint of a network's model file: a new one each time it is trained."""
    return f"{network}@{generation}"


class Night:
    """The stages' questions to the ledger for one run, in stage order, against a run root."""

    def __init__(self, root: str, cfg, manifest, *, from_stage: str | None = None, models=None):
        self.root, self.cfg, self.manifest = root, cfg, manifest
        self.state = ledger.RunState(root)
        self.force = ledger.forced_stages(from_stage)
        self.models = dict(models or {"cam": 1, "irn": 1})

    def _train(self, network: str, key: str) -> bool:
        needed, _ = ledger.needs_training(self.state, network, key, policy=self.cfg.run.retrain,
                                          forced=f"train_{network}" in self.force, model_exists=True)
        if needed:
            self.models[network] += 1
            self.state.update_stage(f"train_{network}", key=key, trained=True)
        return needed

    def run(self, cam_rows: pa.Table, base_index: pa.Table, base: str | None,
            segmenter_cfg=None) -> tuple[dict, pa.Table, pa.Table]:
        cfg, plan = self.cfg, {}
        plan["train_cam"] = self._train("cam", ledger.train_cam_key(cfg, CLASSES))
        cams_key = ledger.cams_key(cfg, CLASSES, _model("cam", self.models["cam"]))
        previous = self.state.stage("cams").get("key")
        if "cams" in self.force or (previous is not None and previous != cams_key):
            cam_rows = cam_rows.slice(0, 0)  # claim_stage_outputs discards the old outputs
        self.state.update_stage("cams", key=cams_key)
        images = ledger.manifest_keys(self.manifest, CLASSES, cams_key)
        pending_cams, _ = ledger.plan_cams(images, cam_rows.select(["image_id", "key"]), EMPTY)
        plan["cams"] = sorted(pending_cams.column("image_id").to_pylist())
        cam_rows = pa.table({"image_id": images.column("image_id"), "key": images.column("cam_key"),
                             "shard": ["s"] * images.num_rows})
        plan["train_irn"] = self._train("irn", ledger.train_irn_key(cfg, cams_key))
        synthesis_key = ledger.synthesis_key(cfg, CLASSES, cams_key,
                                             [_model("cam", self.models["cam"]), _model("irn", self.models["irn"])])
        pending = ledger.begin_version(self.state, self.root, synthesis_key, forced="synthesis" in self.force)
        ledger.record_pending(self.state, pending)
        current = ledger.current_cams(images, cam_rows)
        base_rows = base_index if pending["base"] else base_index.slice(0, 0)
        reused, todo, _ = ledger.plan_synthesis(current, synthesis_key, base_rows, EMPTY.select(["image_id", "key"]),
                                                EMPTY)
        removed = len(set(base_rows.column("image_id").to_pylist()) - set(images.column("image_id").to_pylist()))
        plan["synthesis"] = sorted(todo.column("image_id").to_pylist())
        plan["new_version"] = ledger.version_needed(self.state, pending, labelled=todo.num_rows, removed=removed)
        version = base
        if plan["new_version"]:
            version = pending["name"] if pending["name"] != base else pending["name"] + "b"
            index = pa.table({"image_id": current.column("image_id"),
                              "key": ledger.label_keys(synthesis_key, current.column("cam_key"))})
            ledger.publish_version(self.state, self.root, version, {"images": index.num_rows})
            base_index = index
        evaluation = ledger.evaluation_key(version, cfg.eval, GT_DIGEST)
        plan["evaluate"] = not ledger.is_current(self.state, "evaluate", evaluation, layout.metrics_file(self.root),
                                                 forced="evaluate" in self.force)
        if plan["evaluate"]:
            ledger.update_metrics(self.root, labels_version=version)
            self.state.update_stage("evaluate", key=evaluation)
        section = (segmenter_cfg or cfg).segmenter
        segmenter = ledger.segmenter_key(section, "pseudo", CLASSES, version, "stamp")
        plan["train_segmenter"], _ = ledger.needs_training(self.state, "deeplab_pseudo", segmenter,
                                                           policy=cfg.run.retrain, forced=False, model_exists=True)
        result = ledger.segmenter_result_key(segmenter, ["c"], section)
        result_uri = storage.join(layout.segmenter_results_dir(self.root), "deeplab-pseudo.json")
        plan["evaluate_segmenter"] = plan["train_segmenter"] or not ledger.is_current(
            self.state, "train_deeplab_pseudo", result, result_uri, field="result_key")
        if plan["evaluate_segmenter"]:
            self.state.update_stage("train_deeplab_pseudo", key=segmenter, trained=True, result_key=result)
            storage.write_text(result_uri, '{"metrics": {"miou": %d}}' % len(self.state.data["stages"]))
        report = ledger.report_key(version, self.state.stage("evaluate").get("key"), cfg.eval.num_previews,
                                   ledger.segmenter_results(self.root))
        plan["report"] = not ledger.is_current(self.state, "report", report, layout.report_file(self.root),
                                               forced="report" in self.force)
        if plan["report"]:
            storage.write_text(layout.report_file(self.root), "<html></html>")
            self.state.update_stage("report", key=report)
        return plan, cam_rows, base_index


NOTHING = {"train_cam": False, "cams": [], "train_irn": False, "synthesis": [], "new_version": False,
           "evaluate": False, "train_segmenter": False, "evaluate_segmenter": False, "report": False}
ALL = ["a", "b", "c"]

# scenario: (config overrides, manifest, --from-stage, segmenter overrides) -> what is redone
SCENARIOS = {
    "nothing changed": ((), MANIFEST, None, (), {}),
    "new images": ((), MANIFEST + [("d", "d.png", ["square"])], None, (),
                   {"cams": ["d"], "synthesis": ["d"], "new_version": True, "evaluate": True,
                    "train_segmenter": True, "evaluate_segmenter": True, "report": True}),
    "an image leaves the manifest": ((), MANIFEST[:2], None, (),
                                     {"new_version": True, "evaluate": True, "train_segmenter": True,
                                      "evaluate_segmenter": True, "report": True}),
    "changed tags": ((), [MANIFEST[0], ("b", "b.png", ["circle", "square"]), MANIFEST[2]], None, (),
                     {"cams": ["b"], "synthesis": ["b"], "new_version": True, "evaluate": True,
                      "train_segmenter": True, "evaluate_segmenter": True, "report": True}),
    "changed synthesis config": (("synthesis.beta=8",), MANIFEST, None, (),
                                 {"synthesis": ALL, "new_version": True, "evaluate": True, "train_segmenter": True,
                                  "evaluate_segmenter": True, "report": True}),
    "changed eval settings": (("eval.ablations=false",), MANIFEST, None, (), {"evaluate": True, "report": True}),
    "changed segmenter training": ((), MANIFEST, None, ("segmenter.lr=0.0123",),
                                   {"train_segmenter": True, "evaluate_segmenter": True, "report": True}),
    "changed segmenter evaluation": ((), MANIFEST, None, ("segmenter.mask_threshold=0.4",),
                                     {"evaluate_segmenter": True, "report": True}),
    "changed CAM training": (("train_cam.epochs=7",), MANIFEST, None, (),
                             {"train_cam": True, "cams": ALL, "train_irn": True, "synthesis": ALL,
                              "new_version": True, "evaluate": True, "train_segmenter": True,
                              "evaluate_segmenter": True, "report": True}),
    "--from-stage cams": ((), MANIFEST, "cams", (),
                          {"cams": ALL, "train_irn": True, "synthesis": ALL, "new_version": True, "evaluate": True,
                           "train_segmenter": True, "evaluate_segmenter": True, "report": True}),
    "--from-stage synthesis": ((), MANIFEST, "synthesis", (),
                               {"synthesis": ALL, "new_version": True, "evaluate": True, "train_segmenter": True,
                                "evaluate_segmenter": True, "report": True}),
    "--from-stage report": ((), MANIFEST, "report", (), {"report": True}),
}


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_what_tonights_run_redoes(tmp_path, name):
    overrides, manifest, from_stage, segmenter_overrides, redone = SCENARIOS[name]
    root = str(tmp_path)
    base_cfg = load_config("configs/demo.yaml", [f"run.root={root}"])
    first = Night(root, base_cfg, _manifest(MANIFEST))
    cam_rows = pa.table({"image_id": pa.array([], pa.string()), "key": pa.array([], pa.string()),
                         "shard": pa.array([], pa.string())})
    everything, cam_rows, index = first.run(cam_rows, pa.table({"image_id": pa.array([], pa.string()),
                                                                "key": pa.array([], pa.string())}), None)
    assert everything["cams"] == ALL and everything["new_version"] and everything["report"]
    version = ledger.latest_version(root)
    cfg = load_config("configs/demo.yaml", [f"run.root={root}", *overrides])
    segmenter_cfg = load_config("configs/demo.yaml", [f"run.root={root}", *overrides, *segmenter_overrides])
    night = Night(root, cfg, _manifest(manifest), from_stage=from_stage, models=first.models)
    plan, _, _ = night.run(cam_rows, index, version, segmenter_cfg=segmenter_cfg)
    assert plan == {**NOTHING, **redone}


def test_from_stage_names_a_stage():
    assert ledger.forced_stages(None) == set()
    assert ledger.forced_stages("evaluate") == {"evaluate", "report"}
    with pytest.raises(ValueError, match="unknown stage 'coco'"):
        ledger.forced_stages("coco")
