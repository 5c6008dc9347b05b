"""Interruption: jobs.label killed mid-stage (SIGKILL, then SIGTERM) resumes and ends like an uninterrupted run;
the run root's lease keeps the next job out until the killed one's lease expires, a SIGTERMed
job gives it back, and of two jobs started at once on the root one runs and the other stops.

The reference is the session's labelled run of the hostile data set (tests/conftest.py). Each
interrupted run starts from its exported networks (``run.retrain=never``), so every later stage
must reproduce the reference exactly; the job runs in its own process group with its own
embedded Ray, as when a machine or a scheduler stops it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support import assert_same_outputs, copy_models, label_outputs, label_versions

from pipeline.io import layout, lease, storage

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
LEASE_EXPIRY = 8  # seconds without a heartbeat before the next job takes the lease over


def _args(labelled: dict, root: str) -> list[str]:
    """The reference run's arguments for another root, reusing its networks; one CRF task at a
    time and shards of two images, so shards appear one after another; only the stages that make
    the labels (evaluation and report add nothing here)."""
    args = [a if not a.startswith("run.root=") else f"run.root={root}" for a in labelled["args"]]
    return args + ["--set", "run.retrain=never", "--set", "relations.max_tasks=1", "--set", "run.shard_rows=2",
                   "--set", f"run.lease_expiry_seconds={LEASE_EXPIRY}", "--set", "run.lease_heartbeat_seconds=1",
                   "--only", "cams", "--only", "synthesis", "--only", "publish"]


def _images(labelled: dict) -> int:
    """Rows of the manifest that reach the per-image stages (valid, and decoded by the probe)."""
    return labelled["state"]["stages"]["cams"]["counts"]["images"]


def _start(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    return subprocess.Popen([sys.executable, "-m", "jobs.label", *args], cwd=ROOT, env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _interrupt_when(job: subprocess.Popen, directory: str, sig: signal.Signals, timeout: float = 300) -> dict[str, int]:
    """Send ``sig`` to the job once ``directory`` holds its first shard; return the shards then present."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        shards = storage.list_files(directory, ".parquet")
        if shards:
            break
        assert job.poll() is None, f"job ended before it was interrupted:\n{job.stdout.read()[-3000:]}"
        time.sleep(0.02)
    else:
        pytest.fail(f"no shard in {directory} after {timeout} s")
    if sig == signal.SIGKILL:
        os.killpg(job.pid, signal.SIGKILL)  # the driver and its whole embedded Ray, at once
    else:
        job.send_signal(sig)  # the driver only, as `kill` or a scheduler would
    present = {uri: os.stat(uri).st_mtime_ns for uri in storage.list_files(directory, ".parquet")}
    try:
        job.wait(timeout=60)
    finally:
        try:
            os.killpg(job.pid, signal.SIGKILL)  # whatever the driver left behind
        except ProcessLookupError:
            pass
    assert job.returncode != 0, "the job finished before the signal reached it"
    return present


def _finish_two_at_once(args: list[str], root: str) -> dict:
    """Start two jobs on ``root`` at the same moment: exactly one takes the lease and finishes, the
    other exits 4 within seconds in one line. The run.json after it."""
    started = time.time()
    jobs = [_start(args), _start(args)]
    while all(job.poll() is None for job in jobs):
        assert time.time() - started < 120, "neither job stopped"
        time.sleep(0.1)
    first = next(job for job in jobs if job.poll() is not None)
    output = first.stdout.read()
    assert first.returncode == 4, output[-3000:]
    assert output.strip().startswith("run root locked: held by jobs.label") and len(output.strip().splitlines()) == 1
    assert time.time() - started < 60
    other = jobs[1 - jobs.index(first)]
    rest, _ = other.communicate(timeout=600)
    assert other.returncode == 0, rest[-4000:]
    return json.loads(storage.read_text(layout.run_json(root)))


def test_sigkill_during_crf_mining_then_sigterm_during_synthesis_resume_to_the_same_labels(labelled, tmp_path):
    """One root, interrupted twice: SIGKILL to the whole process group during CRF mining, then
    SIGTERM to the driver during synthesis; then two jobs start at the same moment: one stops at
    once, the other completes."""
    root = str(tmp_path / "interrupted")
    copy_models(labelled["root"], root)
    args = _args(labelled, root)
    cam_shards = _interrupt_when(_start(args), layout.cams_dir(root), signal.SIGKILL)
    killed = time.time()

    # The killed job's lease holds until it expires: a job started now stops at once, writing nothing.
    blocked = _start(args)
    output, _ = blocked.communicate(timeout=120)
    assert blocked.returncode == 4, output[-3000:]
    assert output.strip().startswith("run root locked: held by jobs.label") and len(output.strip().splitlines()) == 1
    assert time.time() - killed < LEASE_EXPIRY, "the blocked job took longer than the lease's expiry"
    time.sleep(max(0.0, killed + LEASE_EXPIRY + 1 - time.time()))

    # Second run: it takes the expired lease over, resumes the CAM stage mid-way, then is stopped
    # while it labels.
    job = _start(args)
    deadline = time.time() + 300
    while not label_versions(root) and time.time() < deadline:  # the version appears with its first PNG
        assert job.poll() is None, job.stdout.read()[-3000:]
        time.sleep(0.05)
    version = label_versions(root)[0]
    label_shards = _interrupt_when(job, storage.join(layout.labels_dir(root, version), "images"), signal.SIGTERM)
    assert lease.holder(root) is None  # SIGTERM gave the lease back
    assert "took over the expired lease of jobs.label" in storage.read_text(layout.run_log(root))
    state = json.loads(storage.read_text(layout.run_json(root)))
    counts = state["stages"]["cams"]["counts"]
    assert 0 < counts["skipped"] < _images(labelled), counts  # the killed stage resumed mid-way
    assert counts["skipped"] + counts.get("done", 0) + counts.get("quarantined", 0) == _images(labelled)
    pending = state["labels"]["pending"]
    assert pending["name"] == version and not pending.get("complete")
    assert not storage.exists(layout.latest_pointer(root))  # nothing half-done is published

    state = _finish_two_at_once(args, root)
    counts = state["stages"]["synthesis"]["counts"]
    labelled_images = len(labelled["outputs"])
    assert counts["version"] == version  # the interrupted version was resumed, not restarted
    assert 0 < counts["skipped"] < labelled_images, counts
    assert counts["skipped"] + counts.get("done", 0) == labelled_images, counts
    for uri, mtime in {**cam_shards, **label_shards}.items():  # shards finished before a signal stay
        assert os.stat(uri).st_mtime_ns == mtime, uri
    assert_same_outputs(label_outputs(root), labelled["outputs"])

