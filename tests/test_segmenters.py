"""jobs.train_segmenter on the session's labelled run: DeepLab on pseudo labels and on ground truth
with two DDP workers (and a resume), Mask R-CNN on pseudo labels; metrics, files and report."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from jobs import train_segmenter
from pipeline import label_tables
from pipeline.io import layout, storage
from pipeline.io.layout import segmenter_model_file as model_file
from pipeline.ledger import RunState
from pipeline.models.store import load_exported

pytestmark = pytest.mark.slow
TINY = ["segmenter.backbone_init=none", "segmenter.epochs=1", "segmenter.max_steps=2", "segmenter.batch_size=4",
        "segmenter.crop_size=48", "segmenter.base_size=48", "segmenter.min_size=64", "segmenter.max_size=80",
        "segmenter.cpus_per_worker=0.5", "segmenter.eval_scales=[1.0, 0.5]"]


def _args(labelled: dict, root: str, *settings: str) -> list[str]:
    args = [a if not a.startswith("run.root=") else f"run.root={root}" for a in labelled["args"]]
    return args + sum((["--set", s] for s in TINY + list(settings)), [])


@pytest.fixture(scope="module")
def root(labelled, tmp_path_factory):
    copy = str(tmp_path_factory.mktemp("segmenters") / "run")
    shutil.copytree(labelled["root"], copy)
    return copy


def test_deeplab_on_pseudo_labels_and_ground_truth_with_two_workers(labelled, root):
    result = train_segmenter.main(_args(labelled, root, "segmenter.model=deeplab", "segmenter.labels=both",
                                        "segmenter.num_workers=2"))
    # The held-out images with ground truth: the synthetic ones of split 'val' (every 5th) in the
    # version (earlier tests may have grown the session's set).
    index = label_tables.read_index(layout.labels_dir(root, storage.read_text(layout.latest_pointer(root)).strip()))
    held_out = [i for i in index.column("image_id").to_pylist() if i.startswith("syn-") and int(i[4:]) % 5 == 0]
    assert result["evaluated_on"] == len(held_out) >= 2
    (row,) = result["table"]
    model, metric, pseudo, truth, ratio = row
    assert (model, metric) == ("DeepLab", "miou") and 0 <= pseudo <= 1 and 0 <= truth <= 1
    assert ratio == pytest.approx(pseudo / truth) if truth else ratio is None
    for labels in ("pseudo", "ground_truth"):
        meta = json.loads(storage.read_text(model_file(root, "deeplab", labels) + ".json"))
        assert meta["config"]["num_workers"] == 2 and meta["step"] == 2
    metrics = json.loads(storage.read_text(storage.join(layout.report_dir(root), "metrics.json")))
    assert set(metrics["segmenters"]) == {"deeplab-pseudo", "deeplab-ground_truth"}
    assert metrics["segmenters"]["deeplab-pseudo"]["train_images"] > metrics["segmenters"]["deeplab-ground_truth"][
        "train_images"] > 0  # every labelled training image vs those with ground truth
    html = storage.read_text(storage.join(layout.report_dir(root), "index.html"))
    assert "Models trained on the labels" in html and "DeepLab" in html


def test_an_interrupted_segmenter_resumes_from_its_checkpoint(labelled, root):
    args = _args(labelled, root, "segmenter.model=deeplab", "segmenter.labels=pseudo", "segmenter.num_workers=2")
    state = RunState(root).stage("train_deeplab_pseudo")
    run_dir = os.path.join(root, "models", state["run_name"])
    checkpoints = sorted(d for d in os.listdir(run_dir) if d.startswith("checkpoint_"))
    exported = load_exported(model_file(root, "deeplab", "pseudo"))
    RunState(root).update_stage("train_deeplab_pseudo", trained=False)  # died after the last checkpoint
    train_segmenter.main(args)
    assert sorted(d for d in os.listdir(run_dir) if d.startswith("checkpoint_")) == checkpoints
    resumed = load_exported(model_file(root, "deeplab", "pseudo"))
    assert all(torch.equal(resumed[k], exported[k]) for k in exported)
    # A rerun with everything current trains nothing and evaluates nothing again.
    before = os.stat(storage.join(layout.report_dir(root), "segmenters", "deeplab-pseudo.json")).st_mtime_ns
    train_segmenter.main(args)
    assert os.stat(storage.join(layout.report_dir(root), "segmenters", "deeplab-pseudo.json")).st_mtime_ns == before
    # Other inference scales change the evaluation, not the model: re-evaluated, not retrained.
    train_segmenter.main(args + ["--set", "segmenter.eval_scales=[1.0]"])
    assert os.stat(storage.join(layout.report_dir(root), "segmenters", "deeplab-pseudo.json")).st_mtime_ns != before
    assert sorted(d for d in os.listdir(run_dir) if d.startswith("checkpoint_")) == checkpoints
    evaluated_again = load_exported(model_file(root, "deeplab", "pseudo"))
    assert all(torch.equal(v, evaluated_again[k]) for k, v in resumed.items())


def test_mask_rcnn_on_pseudo_labels_reports_voc_and_coco_ap(labelled, root):
    # One step of two images: a Mask R-CNN step samples 512 RoIs per image through the box head
    # (~2 s per image on one core here), and the plumbing, not the learning, is under test.
    result = train_segmenter.main(_args(labelled, root, "segmenter.model=maskrcnn", "segmenter.labels=pseudo",
                                        "segmenter.batch_size=2", "segmenter.max_steps=1"))
    rows = {metric: pseudo for model, metric, pseudo, _, _ in result["table"] if model == "Mask R-CNN"}
    assert set(rows) == {"ap50", "ap70", "coco_ap"} and all(0 <= v <= 1 for v in rows.values())
    metrics = json.loads(storage.read_text(storage.join(layout.report_dir(root), "metrics.json")))
    assert {"deeplab-pseudo", "maskrcnn-pseudo"} <= set(metrics["segmenters"])
    assert json.loads(storage.read_text(model_file(root, "maskrcnn", "pseudo") + ".json"))["step"] == 1
