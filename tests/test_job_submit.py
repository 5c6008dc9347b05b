"""Real job submission: a Ray head started with ``ray start`` on loopback, ``ray job submit``.

The head gets its own temp dir and ports (so it never touches the test session's embedded Ray),
runs the job from an uploaded ``--working-dir`` as a user's cluster would, and is stopped at the
end by signalling its own ``ray start --block`` process (``ray stop`` would stop every Ray here).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from support import copy_models, ephemeral_ports, free_port, wait_for_port

from pipeline import label_tables
from pipeline.data.synthetic import write_synthetic_set
from pipeline.io import layout, storage

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_head():
    """A Ray head on 127.0.0.1 with its own ports and temp dir; yields the job server address."""
    temp = tempfile.mkdtemp(prefix="irnhead", dir="/tmp")  # short: Ray's socket paths have a length limit
    dashboard = free_port()
    # Below the kernel's ephemeral range, where free_port() draws the head's other ports: the two
    # can never overlap (Ray refuses to start when a chosen port falls inside the worker range).
    first_worker_port = random.randrange(10000, ephemeral_ports()[0] - 200, 200)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           # Like an activated virtualenv: the job's `python` is this interpreter.
           "PATH": os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])}
    env.pop("RAY_ADDRESS", None)
    head = subprocess.Popen(
        [os.path.join(os.path.dirname(sys.executable), "ray"), "start", "--head", "--block",
         "--node-ip-address=127.0.0.1", f"--port={free_port()}", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dashboard}", f"--ray-client-server-port={free_port()}",
         f"--dashboard-agent-listen-port={free_port()}", f"--metrics-export-port={free_port()}",
         f"--min-worker-port={first_worker_port}", f"--max-worker-port={first_worker_port + 199}",
         "--num-cpus=2", f"--temp-dir={temp}", "--disable-usage-stats"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        wait_for_port(dashboard, timeout=120, process=head)
        yield {"address": address, "env": env}
    finally:
        try:
            os.killpg(head.pid, signal.SIGTERM)  # the head and every process it started (its own group)
            head.wait(timeout=2)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
        try:
            os.killpg(head.pid, signal.SIGKILL)  # anything of this head (its own process group) still up
        except ProcessLookupError:
            pass
        head.wait(timeout=30)
        shutil.rmtree(temp, ignore_errors=True)


def test_ray_job_submit_runs_the_label_job(ray_head, labelled, tmp_path):
    manifest = write_synthetic_set(str(tmp_path / "data"), num_images=6, seed=5, num_classes=4,
                                   min_size=64, max_size=80)
    root = str(tmp_path / "run")
    copy_models(labelled["root"], root)  # the session's networks: this test is about submission
    submission_id = f"irn-test-{os.getpid()}-{int(time.time())}"
    ray_cli = os.path.join(os.path.dirname(sys.executable), "ray")
    submitted = subprocess.run(
        [ray_cli, "job", "submit", "--address", ray_head["address"], "--submission-id", submission_id,
         "--working-dir", ".", "--no-wait", "--",
         "python", "-m", "jobs.label", "--config", "configs/tiny.yaml",
         "--set", f"data.manifest={manifest}", "--set", f"run.root={root}", "--set", "run.retrain=never"],
        cwd=ROOT, env=ray_head["env"], capture_output=True, text=True, timeout=180)
    assert submitted.returncode == 0, submitted.stdout[-3000:] + submitted.stderr[-3000:]

    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(ray_head["address"])
    deadline = time.time() + 480
    status = client.get_job_status(submission_id)
    while status not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED) and time.time() < deadline:
        time.sleep(2)
        status = client.get_job_status(submission_id)
    logs = client.get_job_logs(submission_id)
    assert status == JobStatus.SUCCEEDED, logs[-5000:]

    # The job ran on the head's cluster (not an embedded one) and labelled every image.
    run = json.loads(storage.read_text(layout.run_json(root)))
    assert all(info["status"] == "done" for name, info in run["stages"].items()
               if name not in ("evaluate", "train_cam", "train_irn"))
    version = storage.read_text(layout.latest_pointer(root)).strip()
    labels = layout.labels_dir(root, version)
    ids = sorted(f"syn-{i:06d}" for i in range(6))
    for image_id in ids:
        assert storage.exists(layout.semantic_png(labels, image_id))
        assert storage.exists(layout.instance_png(labels, image_id))
    assert label_tables.read_index(labels).column("image_id").to_pylist() == ids
    coco = json.loads(storage.read_text(storage.join(labels, "coco.json")))
    assert sorted(image["file_name"] for image in coco["images"]) == ids
    assert "labels: " in logs and "report: " in logs
