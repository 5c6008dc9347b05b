"""The Ray Train jobs: the session's labelled run trained both networks with two DDP workers
(tests/hostile.py); here its results are checked, and an interrupted export is resumed."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from jobs import train_cam
from pipeline.io import layout, storage
from pipeline.ledger import RunState
from pipeline.models.cam_net import build_cam_net
from pipeline.models.irnet import build_irnet
from pipeline.models.store import load_exported

pytestmark = pytest.mark.slow


def test_two_worker_training_exports_both_networks(labelled):
    root, state = labelled["root"], labelled["state"]
    assert state["config"]["train_cam"]["num_workers"] == state["config"]["train_irn"]["num_workers"] == 2
    cam_meta = json.loads(storage.read_text(layout.model_file(root, "cam") + ".json"))
    assert cam_meta["metrics"]["start_epoch"] == 0 and cam_meta["step"] >= 1
    run_dir = os.path.join(root, "models", state["stages"]["train_cam"]["run_name"])
    assert sorted(d for d in os.listdir(run_dir) if d.startswith("checkpoint_")), "no checkpoint in the run root"
    build_cam_net(num_classes=4, depth=18, state_dict=load_exported(layout.model_file(root, "cam")))  # strict
    irn = build_irnet(depth=18, state_dict=load_exported(layout.model_file(root, "irn")))
    irn_meta = json.loads(storage.read_text(layout.model_file(root, "irn") + ".json"))
    assert irn.mean_displacement.abs().sum() > 0
    assert torch.allclose(irn.mean_displacement, torch.tensor(irn_meta["metrics"]["mean_displacement"]))


def test_an_interrupted_export_resumes_from_the_checkpoint(labelled, tmp_path):
    """A rerun after the process died between the last checkpoint and the export resumes from the
    checkpoint: no epoch is trained again and the exported weights are those of the checkpoint."""
    root = str(tmp_path / "run")
    shutil.copytree(labelled["root"], root)
    args = [a if not a.startswith("run.root=") else f"run.root={root}" for a in labelled["args"]]
    # The copied run.json points its Ray Train run at the original root's storage path name.
    name = RunState(root).stage("train_cam")["run_name"]
    run_dir = os.path.join(root, "models", name)
    checkpoints = sorted(d for d in os.listdir(run_dir) if d.startswith("checkpoint_"))
    exported = load_exported(layout.model_file(root, "cam"))
    storage.remove(layout.model_file(root, "cam"))
    RunState(root).update_stage("train_cam", trained=False)
    state = train_cam.main(args)
    assert state["stages"]["train_cam"]["run_name"] == name
    assert sorted(d for d in os.listdir(run_dir) if d.startswith("checkpoint_")) == checkpoints, \
        "the rerun trained again instead of resuming from the checkpoint"
    resumed = load_exported(layout.model_file(root, "cam"))
    assert all(torch.equal(resumed[k], exported[k]) for k in exported)
