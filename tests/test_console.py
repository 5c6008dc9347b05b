"""The console of a job started from the command line: our lines only, Ray's in run.log, all of it
back with --verbose (jobs._console); in a real label job, an image that does not decode is
reported once, before any training, and a rerun does not decode it again."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pipeline.io import layout, storage

ROOT = Path(__file__).resolve().parents[1]
RAY_INTERNALS = ("(SplitCoordinator", "core_worker.cc", "execution finished", "Started a local Ray instance", "\x1b[")

# What a job's driver meets: our records, Ray's logger, Ray's C++ core writing to descriptor 2,
# Ray's log thread printing a worker's (coloured) line, a line our code logged in a worker, the
# summary the job prints; then, after the console is given back, a write to descriptor 1.
SCRIPT = textwrap.dedent(r'''
    import atexit, logging, os, sys, threading
    from jobs import _console
    from pipeline.io import layout, storage

    root, verbose, fail = sys.argv[1], sys.argv[2] == "verbose", sys.argv[3] == "fail"
    atexit.register(lambda: os.write(1, b"descriptor 1 is the console again\n"))
    if root.startswith("memory://"):
        atexit.register(lambda: os.write(1, storage.read_bytes(layout.run_log(root))))
    _console.start(root, verbose=verbose)
    logging.getLogger("pipeline.orchestrate").info("stage cams: started")
    logging.getLogger("ray.data").info("Dataset train_0 execution finished in 1.00 seconds")
    os.write(2, b"[2026-01-01 E 1 1] core_worker.cc:2465: Actor with class name: 'X' has constructor arguments\n")
    worker = threading.Thread(target=print, args=("\x1b[36m(SplitCoordinator pid=7)\x1b[0m progress bars disabled",))
    worker.start()
    worker.join()
    _console.relay_worker_line({"lines": ["irn-ray WARNING pipeline.train.common: train_cam: step 1/1, ETA 0s",
                                          "a worker line of Ray's"]})
    print("labels: v1")
    if fail:
        raise RuntimeError("the stage failed")
''')


def _run_script(root: str, *args: str) -> tuple[subprocess.CompletedProcess, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", SCRIPT, root, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    return done, done.stdout + done.stderr


def test_the_console_shows_our_lines_and_run_log_everything(tmp_path):
    root = str(tmp_path / "run")
    done, console = _run_script(root, "quiet", "ok")
    assert done.returncode == 0, console
    assert "stage cams: started" in console and "warning: train_cam: step 1/1, ETA 0s" in console
    assert "labels: v1" in done.stdout and done.stdout.endswith("descriptor 1 is the console again\n")
    assert done.stderr.splitlines()[0].endswith(f"log: {root}/run.log (Ray's own lines too; --verbose shows them here)")
    for internal in RAY_INTERNALS + ("a worker line of Ray's",):
        assert internal not in console, internal
    log = storage.read_text(f"{root}/run.log")
    for line in ("stage cams: started", "execution finished", "core_worker.cc:2465",
                 "(SplitCoordinator pid=7)\x1b[0m progress bars disabled", "labels: v1"):
        assert line in log, line
    assert log.startswith("==== ") and "descriptor 1" not in log
    # A second job in the root appends to the same log.
    _run_script(root, "quiet", "ok")
    assert storage.read_text(f"{root}/run.log").count("==== ") == 2


def test_verbose_shows_the_log_and_a_failure_reaches_the_console(tmp_path):
    root = str(tmp_path / "run")
    done, console = _run_script(root, "verbose", "ok")
    assert done.returncode == 0, console
    for line in ("stage cams: started", "execution finished", "core_worker.cc:2465",
                 "(SplitCoordinator pid=7) progress bars disabled", "labels: v1"):
        assert line in console, line
    assert "\x1b[" not in console  # not a terminal: Ray's colours are left in the log
    done, console = _run_script(root, "quiet", "fail")
    assert done.returncode == 1 and "RuntimeError: the stage failed" in console
    assert "RuntimeError: the stage failed" in storage.read_text(f"{root}/run.log")


def test_a_remote_run_root_gets_the_log_when_the_job_ends():
    root = "memory://irn-console/run"
    done, console = _run_script(root, "quiet", "ok")
    assert done.returncode == 0, console
    first = done.stderr.splitlines()[0]
    assert f"then {root}/run.log" in first and "core_worker.cc" not in first
    # The script prints the uploaded log (the memory filesystem lives in its process).
    assert "core_worker.cc:2465" in done.stdout and "labels: v1" in done.stdout


@pytest.mark.slow
def test_a_label_job_console_reports_an_unreadable_image_once_before_training(labelled, tmp_path):
    from support import copy_models

    from pipeline import plan
    from pipeline.data.synthetic import write_synthetic_set
    from pipeline.io import codecs

    data = tmp_path / "data"
    manifest = write_synthetic_set(str(data), num_images=4, seed=5, num_classes=4, min_size=64, max_size=80)
    png = storage.read_bytes(str(data / "images" / "syn-000000.png"))
    storage.write_bytes(str(data / "images" / "half.png"), png[: len(png) // 2])
    rows = [{k: v for k, v in r.items() if v not in (None, "", [])} for r in codecs.read_parquet(manifest).to_pylist()]
    rows.append({"image_id": "broken-half", "uri": "images/half.png", "labels": ["disc"]})
    jsonl = data / "with-broken.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    root = str(tmp_path / "run")
    copy_models(labelled["root"], root)  # the session's networks: no training here
    args = ["--config", "configs/tiny.yaml", "--set", f"data.manifest={jsonl}", "--set", f"run.root={root}",
            "--set", "run.retrain=never", "--set", "eval.num_previews=1"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)

    def job(*extra: str) -> str:
        done = subprocess.run([sys.executable, "-m", "jobs.label", *args, *extra], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
        return done.stdout + done.stderr

    console = job("--only", "cams")
    for internal in RAY_INTERNALS + ("pid=",):
        assert internal not in console, internal
    # Reported once, with its reason, before the CAM network runs.
    (reported,) = [line for line in console.splitlines() if "broken-half" in line]
    assert "images/half.png" in reported and "truncated" in reported
    assert console.index("stage probe: done") < console.index("stage cams: started")
    log = storage.read_text(f"{root}/run.log")
    assert "Started a local Ray instance" in log  # Ray's own lines are kept
    for line in console.splitlines():  # everything the console showed is in the log too
        assert line.split(" ", 1)[-1].removeprefix("warning: ") in log, line
    state = json.loads(storage.read_text(layout.run_json(root)))
    manifest_dir = layout.manifest_dir(root, state["manifest"]["stamp"])
    assert "broken-half" not in plan.read_manifest(manifest_dir).column("image_id").to_pylist()
    training = plan.cam_training_rows(manifest_dir, state["manifest"]["classes"])[0].column("uri").to_pylist()
    assert training and not [uri for uri in training if uri.endswith("half.png")]

    console = job("--only", "probe", "--verbose")
    assert "Started a local Ray instance" in console and "\x1b[" not in console  # Ray's lines are back
    probe = json.loads(storage.read_text(layout.run_json(root)))["stages"]["probe"]
    assert probe["status"] == "skipped" and probe["counts"]["pending"] == 0 and probe["counts"]["unreadable"] == 1
    assert "do not decode" not in console  # known: not reported again
