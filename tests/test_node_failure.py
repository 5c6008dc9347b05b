"""Worker and node failures on a simulated multi-node cluster (ray.cluster_utils.Cluster).

tests/cluster_chaos.py runs jobs.label on a head plus three worker nodes and, while it works,
kills a Ray Train worker after a checkpoint, removes the node running CRF mining and removes the
node of the synthesis actor. The job must finish with exactly one complete set of outputs per image.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from support import label_outputs

from pipeline.data.synthetic import write_synthetic_set
from pipeline.io import layout, storage

ROOT = Path(__file__).resolve().parents[1]
NUM_IMAGES = 12
pytestmark = pytest.mark.slow


def test_job_survives_killed_training_worker_and_lost_nodes(labelled, tmp_path):
    manifest = write_synthetic_set(str(tmp_path / "data"), num_images=NUM_IMAGES, seed=3, num_classes=4,
                                   min_size=72, max_size=96)
    root = str(tmp_path / "run")
    # IRNet is the session's (run.retrain=never keeps it): the CAM network is the training killed here.
    for suffix in ("", ".json"):
        storage.copy(layout.model_file(labelled["root"], "irn") + suffix, layout.model_file(root, "irn") + suffix)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run(
        [sys.executable, "tests/cluster_chaos.py", "--config", "configs/tiny.yaml",
         "--set", f"data.manifest={manifest}", "--set", f"run.root={root}",
         "--set", "train_cam.epochs=3",  # long enough to be killed after its first checkpoint
         "--set", "run.shard_rows=2", "--set", "run.retrain=never"],  # shards of two images: nodes are lost between shards
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    report = json.loads(next(line for line in done.stdout.splitlines() if line.startswith('{"events"')))
    assert report["error"] is None, report
    events = report["events"]
    assert len(events) == 5, events
    assert events[0].startswith("killed training worker")
    assert "cams:" in events[2] and "synthesis:" in events[4]
    # Each node was lost mid-stage: after the first shard, before the last.
    cam_shards_then = int(events[2].split(": ")[1].split()[0])
    labelled_then = int(events[4].split(": ")[1].split()[0])
    assert cam_shards_then < NUM_IMAGES / 4 and labelled_then < NUM_IMAGES

    stages = report["stages"]
    assert stages["train_irn"]["status"] == "skipped", stages
    assert all(info["status"] == "done" for name, info in stages.items() if name != "train_irn"), stages
    assert stages["cams"]["counts"]["done"] == NUM_IMAGES
    assert stages["synthesis"]["counts"]["done"] == NUM_IMAGES
    # Ray Train restored the killed worker's run from its checkpoint instead of starting over.
    cam_meta = json.loads(storage.read_text(layout.model_file(root, "cam") + ".json"))
    assert cam_meta["metrics"]["start_epoch"] >= 1 and cam_meta["epoch"] == 2
    assert "train_cam resumes from epoch" in done.stdout + done.stderr

    # Exactly one complete set of outputs per image: no image missing or duplicated, every file
    # readable, and no temporary file of a killed writer left behind.
    outputs = label_outputs(root)
    assert sorted(outputs) == [f"syn-{i:06d}" for i in range(NUM_IMAGES)]
    assert len(storage.list_files(layout.relations_dir(root), ".png")) == NUM_IMAGES
    leftovers = [os.path.join(d, f) for d, _, files in os.walk(root) for f in files if f.startswith(".tmp-")]
    assert leftovers == []
    assert not storage.list_files(layout.quarantine_dir(root))
