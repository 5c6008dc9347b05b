"""The Ray Train jobs: CAM network then IRNet on a small synthetic set with two CPU workers."""

from __future__ import annotations

import json
import os

import pytest
import torch

from jobs import make_cams, train_cam, train_irn
from pipeline.data.synthetic import write_synthetic_set
from pipeline.io import layout, storage
from pipeline.models.cam_net import build_cam_net
from pipeline.models.irnet import build_irnet
from pipeline.runstate import RunState
from pipeline.train.common import load_exported

pytestmark = pytest.mark.slow


def test_train_cam_then_irn_with_two_workers_and_resume(tmp_path, ray_session):
    manifest = write_synthetic_set(str(tmp_path / "data"), num_images=12, seed=5, num_classes=3,
                                   min_size=64, max_size=72)
    root = str(tmp_path / "run")
    args = ["--set", f"data.manifest={manifest}", "--set", f"run.root={root}"]
    for o in ("train_cam.depth=18", "train_cam.backbone_init=none", "train_cam.batch_size=4",
              "train_cam.epochs=2", "train_cam.crop_size=64", "train_cam.resize_long=[64, 72]",
              "train_cam.num_workers=2", "train_cam.cpus_per_worker=0.5", "cams.scales=[1.0]",
              "cams.cpus_per_actor=0.5", "relations.cpus_per_task=0.5", "train_irn.depth=18",
              "train_irn.batch_size=4", "train_irn.epochs=1", "train_irn.crop_size=64",
              "train_irn.num_workers=2", "train_irn.cpus_per_worker=0.5"):
        args += ["--set", o]

    state = train_cam.main(args)
    assert state["stages"]["train_cam"]["status"] == "done"
    cam_meta = json.loads(storage.read_text(layout.model_file(root, "cam") + ".json"))
    assert cam_meta["epoch"] == 1 and cam_meta["metrics"]["start_epoch"] == 0
    run_dir = os.path.join(root, "models", state["stages"]["train_cam"]["run_name"])
    checkpoints = sorted(d for d in os.listdir(run_dir) if d.startswith("checkpoint_"))
    assert checkpoints, "Ray Train wrote no checkpoint into the run root"
    cam_state = load_exported(layout.model_file(root, "cam"))
    build_cam_net(num_classes=3, depth=18, state_dict=cam_state)  # loads strictly

    # A rerun after the process died between the last checkpoint and the export resumes from
    # the checkpoint: no epoch is trained again.
    run_state = RunState(root)
    run_state.update_stage("train_cam", trained=False)
    state = train_cam.main(args)
    assert state["stages"]["train_cam"]["run_name"] == os.path.basename(run_dir)
    assert sorted(d for d in os.listdir(run_dir) if d.startswith("checkpoint_")) == checkpoints, \
        "the rerun trained again instead of resuming from the checkpoint"
    resumed = load_exported(layout.model_file(root, "cam"))
    assert all(torch.equal(resumed[k], cam_state[k]) for k in cam_state)

    make_cams.main(args)
    state = train_irn.main(args)
    assert state["stages"]["train_irn"]["status"] == "done"
    irn = build_irnet(depth=18, state_dict=load_exported(layout.model_file(root, "irn")))
    irn_meta = json.loads(storage.read_text(layout.model_file(root, "irn") + ".json"))
    assert irn.mean_displacement.abs().sum() > 0
    assert torch.allclose(irn.mean_displacement, torch.tensor(irn_meta["metrics"]["mean_displacement"]))
    # A plain rerun of a finished job does no training at all.
    assert train_irn.main(args)["stages"]["train_irn"]["status"] == "skipped"
