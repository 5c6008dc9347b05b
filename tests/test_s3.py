"""The whole job against S3: a moto server on 127.0.0.1 plays the object store, behind a proxy
that fails a share of the requests (tests/support.FaultProxy).

jobs.label runs in a subprocess (its own embedded Ray) whose environment carries the endpoint and
test credentials, exactly as a user's shell would; the credentials must appear in no output.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from support import FaultProxy, assert_same_outputs, copy_models, label_outputs, moto_s3

from jobs import label
from pipeline.data.synthetic import write_synthetic_set
from pipeline.io import layout

ROOT = Path(__file__).resolve().parents[1]
SECRET = "irn-test-secret-key-not-real"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def s3_env():
    with moto_s3("irn", SECRET) as env:
        yield env


def _environment(env: dict[str, str], **extra: str) -> dict[str, str]:
    return {**os.environ, **{k: v for k, v in env.items() if not k.startswith("_")}, "PYTHONPATH": str(ROOT), **extra}


def _run(code: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env=_environment(env))


def _s3(env: dict[str, str]):
    import boto3

    return boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=SECRET, region_name="us-east-1")


def _object(env: dict[str, str], key: str) -> bytes | None:
    try:
        return _s3(env).get_object(Bucket="irn", Key=key)["Body"].read()
    except Exception as err:  # noqa: BLE001 - NoSuchKey
        if "NoSuchKey" in type(err).__name__ or "NoSuchKey" in str(err):
            return None
        raise


def _label(args: list[str], env: dict[str, str], **extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "jobs.label", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_environment(env, **extra))


def _assert_no_credentials(data: bytes, where) -> None:
    assert SECRET.encode() not in data and b"irn-test-key" not in data, f"a credential is in {where}"


def test_label_job_on_s3_matches_the_same_run_on_local_paths(s3_env, tmp_path, labelled):
    made = _run("from pipeline.data.synthetic import write_synthetic_set as w; "
                "print(w('s3://irn/data', num_images=8, seed=11, num_classes=4, min_size=64, max_size=80))", s3_env)
    assert made.returncode == 0, made.stderr[-3000:]
    manifest = made.stdout.strip().splitlines()[-1]
    assert manifest == "s3://irn/data/manifest.parquet"
    # The CAM network trains here (its Ray Train checkpoints go to S3); IRNet is the session's,
    # put in place beforehand (run.retrain=never keeps it), to save a second training.
    irn = layout.model_file(labelled["root"], "irn")
    placed = _run("from pipeline.io import storage; "
                  f"[storage.write_bytes(t, open(s, 'rb').read()) for s, t in "
                  f"(({irn!r}, 's3://irn/run/models/irn/model.pt'), ({irn + '.json'!r}, 's3://irn/run/models/irn/model.pt.json'))]",
                  s3_env)
    assert placed.returncode == 0, placed.stderr[-3000:]
    # Every tenth request to S3 fails (503 SlowDown, 500 InternalError, or its answer is dropped
    # after the server acted): the job retries its way through and ends like a run without faults.
    proxy = FaultProxy(int(s3_env["_port"]), failure_rate=0.10, seed=7)
    faulty = {**s3_env, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{proxy.port}"}
    args = ["--config", "configs/tiny.yaml", "--set", f"data.manifest={manifest}", "--set", "run.root=s3://irn/run",
            "--set", "run.retrain=never"]
    ray_tmp = tempfile.mkdtemp(prefix="irns3", dir="/tmp")  # the job's Ray logs, to search (short: socket paths)
    try:
        # The default policy's attempts with shorter waits: the retries, not their pauses, are under test.
        job = _label(args, faulty, RAY_TMPDIR=ray_tmp, IRN_STORAGE_RETRIES="8,0.05,1")
        # A second job on the same root while the first holds the lease stops at once, writing nothing.
        deadline = time.time() + 120
        while _object(s3_env, "run/_lease.json") is None:
            assert job.poll() is None and time.time() < deadline, job.communicate()[1][-3000:]
            time.sleep(0.2)
        started = time.time()
        second = subprocess.run([sys.executable, "-m", "jobs.label", *args], cwd=ROOT, capture_output=True,
                                text=True, timeout=120, env=_environment(s3_env))
        assert second.returncode == 4, second.stderr[-3000:]
        assert second.stderr.strip().startswith("run root locked: held by jobs.label")
        assert len(second.stderr.strip().splitlines()) == 1 and time.time() - started < 30
        stdout, stderr = job.communicate(timeout=900)
        assert job.returncode == 0, stderr[-4000:]
        _assert_no_credentials(stdout.encode() + stderr.encode(), "job output")
        for path in Path(ray_tmp).rglob("*"):  # Ray's own logs of the job's workers and raylet
            if path.is_file():
                _assert_no_credentials(path.read_bytes(), path)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    faults = proxy.counts["503"] + proxy.counts["500"] + proxy.counts["dropped"]
    assert faults >= 20, proxy.counts
    assert _object(s3_env, "run/_lease.json") is None  # released: the job's last write
    retried = json.loads(_object(s3_env, "run/run.json"))["stages"]
    assert sum(info.get("counts", {}).get("storage_retries", 0) for info in retried.values()) > 0

    # Everything the job wrote to the bucket, downloaded for inspection.
    copy = tmp_path / "from-s3"
    fetched = _run(f"from pipeline.io import storage; fs, path = storage.filesystem('s3://irn/run'); "
                   f"fs.get(path, {str(copy)!r}, recursive=True)", s3_env)
    assert fetched.returncode == 0, fetched.stderr[-3000:]
    run_json = (copy / "run.json").read_text()
    for path in copy.rglob("*"):  # no output file (run.json, report, shards, checkpoints) holds one
        if path.is_file():
            _assert_no_credentials(path.read_bytes(), path)
    stages = json.loads(run_json)["stages"]
    assert stages["train_cam"]["status"] == "done" and stages["train_irn"]["status"] == "skipped"
    assert all(info["status"] == "done" for name, info in stages.items() if name not in ("evaluate", "train_irn"))
    assert list((copy / "models").glob("cam-*/checkpoint_*")), "no Ray Train checkpoint on S3"
    assert (copy / "report" / "index.html").exists()
    s3_outputs = label_outputs(str(copy))
    assert sorted(s3_outputs) == [f"syn-{i:06d}" for i in range(8)]

    # The same run on local paths, with the networks the S3 run trained (training itself is not
    # bit-reproducible across Ray schedules), produces the same CAMs, relations and labels.
    local_manifest = write_synthetic_set(str(tmp_path / "data"), num_images=8, seed=11, num_classes=4,
                                         min_size=64, max_size=80)
    local_root = str(tmp_path / "local")
    copy_models(str(copy), local_root)
    label.main(["--config", "configs/tiny.yaml", "--set", f"data.manifest={local_manifest}",
                "--set", f"run.root={local_root}", "--set", "run.retrain=never"])
    assert_same_outputs(label_outputs(local_root), s3_outputs)

    # Storage down: from the moment synthesis begins a version every request fails. The job ends well within
    # the minute, in one line naming the storage error; LATEST still names the version above; the
    # lease could not be released, so the rerun waits for its expiry, takes it over and resumes the
    # unfinished version, whose labels are those above.
    latest = _object(s3_env, "run/labels/LATEST")
    short = ["--set", "run.lease_expiry_seconds=5", "--set", "run.lease_heartbeat_seconds=1"]
    proxy.failure_rate = 0.0
    job = _label(args + short + ["--from-stage", "synthesis"], faulty, IRN_STORAGE_RETRIES="4,0.2,1")
    deadline = time.time() + 300
    while not json.loads(_object(s3_env, "run/run.json"))["labels"].get("pending"):  # synthesis began a version
        assert job.poll() is None and time.time() < deadline, job.communicate()[1][-3000:]
        time.sleep(0.2)
    proxy.failure_rate, down = 1.0, time.time()
    try:
        stdout, stderr = job.communicate(timeout=120)
    finally:
        proxy.failure_rate = 0.0
    assert job.returncode == 5, stderr[-4000:]
    assert time.time() - down < 60
    assert "storage unavailable after 4 attempts: " in stderr and "Traceback" not in stderr, stderr[-4000:]
    assert _object(s3_env, "run/labels/LATEST") == latest
    pending = json.loads(_object(s3_env, "run/run.json"))["labels"]["pending"]
    assert pending and pending["name"] != latest.decode().strip()
    time.sleep(6)  # the dead job's lease expires
    rerun = subprocess.run([sys.executable, "-m", "jobs.label", *args, *short], cwd=ROOT, capture_output=True,
                           text=True, timeout=900, env=_environment(faulty))
    proxy.close()
    assert rerun.returncode == 0, rerun.stderr[-4000:]
    assert "took over the expired lease of jobs.label" in rerun.stderr
    state = json.loads(_object(s3_env, "run/run.json"))
    assert state["stages"]["synthesis"]["counts"]["version"] == pending["name"]  # resumed, not restarted
    assert _object(s3_env, "run/labels/LATEST").decode().strip() == pending["name"]
    copy = tmp_path / "from-s3-after-outage"
    fetched = _run(f"from pipeline.io import storage; fs, path = storage.filesystem('s3://irn/run'); "
                   f"fs.get(path, {str(copy)!r}, recursive=True)", s3_env)
    assert fetched.returncode == 0, fetched.stderr[-3000:]
    assert_same_outputs(label_outputs(str(copy)), s3_outputs)


def _job(module: str, args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", module, *args], check=False, cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env=_environment(env))
    _assert_no_credentials(done.stdout.encode() + done.stderr.encode(), f"{module}'s output")
    return done


def _keys(env: dict[str, str], prefix: str) -> list[str]:
    pages = _s3(env).get_paginator("list_objects_v2").paginate(Bucket="irn", Prefix=prefix)
    return sorted(item["Key"] for page in pages for item in page.get("Contents", []))


def _parquet(env: dict[str, str], key: str) -> list[dict]:
    import io

    import pyarrow.parquet as pq

    return pq.read_table(io.BytesIO(_object(env, key))).to_pylist()


def test_review_and_corrections_on_the_s3_run(s3_env):
    """jobs.review and jobs.correct on the run root the label job above left on S3 (this module's
    bucket): the review package is written to S3, an edited COCO file read from S3 is stored under
    corrections/, and bad files are refused in one line with nothing stored."""
    import csv
    import io

    from pipeline.io import codecs

    latest = _object(s3_env, "run/labels/LATEST")
    if latest is None:
        pytest.skip("needs the label run on S3 of the test above")
    version = latest.decode().strip()
    index = _parquet(s3_env, f"run/labels/{version}/index.parquet")
    reviewed = _job("jobs.review", ["--root", "s3://irn/run", "--worst", "3", "--out", "s3://irn/review"], s3_env)
    assert reviewed.returncode == 0, reviewed.stderr[-3000:]
    assert reviewed.stdout.strip().endswith("-> s3://irn/review")
    ranking = list(csv.DictReader(io.StringIO(_object(s3_env, "review/ranking.csv").decode())))
    assert sorted(r["image_id"] for r in ranking) == sorted(r["image_id"] for r in index)
    document = json.loads(_object(s3_env, "review/annotations.json"))
    assert [im["file_name"].rsplit(".", 1)[0] for im in document["images"]] == [r["image_id"] for r in ranking[:3]]
    studio = _job("jobs.review", ["--root", "s3://irn/run", "--worst", "2", "--out", "s3://irn/review-ls",
                                  "--format", "labelstudio"], s3_env)
    assert studio.returncode == 0, studio.stderr[-3000:]
    tasks = json.loads(_object(s3_env, "review-ls/tasks.json"))
    assert [t["data"]["image_id"] for t in tasks] == [r["image_id"] for r in ranking[:2]]

    # The annotator redraws the first image as one rectangle and clears the second (background).
    first, second, third = document["images"]
    rectangle = [4, 6, 30, 6, 30, 20, 4, 20]  # x 4..30, y 6..20 on pixel edges
    document["annotations"] = [a for a in document["annotations"] if a["image_id"] == third["id"]]
    document["annotations"].append({"id": 1000, "image_id": first["id"], "category_id": 2,
                                    "segmentation": [rectangle]})
    text = json.dumps(document)
    _s3(s3_env).put_object(Bucket="irn", Key="review/edited.json", Body=text.encode())
    done = _job("jobs.correct", ["--root", "s3://irn/run", "--from", "s3://irn/review/edited.json", "--note", "on s3"],
                s3_env)
    assert done.returncode == 0, done.stderr[-3000:]
    (committed,) = [k for k in _keys(s3_env, "run/corrections/") if k.endswith("/images.parquet")]
    directory = committed.rsplit("/", 1)[0]
    assert f"s3://irn/{directory}" in done.stdout
    rows = {r["image_id"]: r for r in _parquet(s3_env, committed)}
    ids = [im["file_name"].rsplit(".", 1)[0] for im in (first, second, third)]
    assert sorted(rows) == sorted(ids)
    assert all(r["note"] == "on s3" and r["source"] == "s3://irn/review/edited.json" for r in rows.values())
    assert (rows[ids[0]]["num_instances"], rows[ids[0]]["class_ids"]) == (1, [2])
    assert (rows[ids[1]]["num_instances"], rows[ids[1]]["class_ids"]) == (0, [])
    assert rows[ids[2]]["num_instances"] == sum(a["image_id"] == third["id"] for a in document["annotations"])
    semantic = codecs.decode_label_png(_object(s3_env, f"{directory}/{rows[ids[0]]['semantic_uri']}"))
    assert semantic.shape == (first["height"], first["width"])
    assert (semantic[6:20, 4:30] == 2).all() and (semantic == 2).sum() == 14 * 26 == semantic.astype(bool).sum()
    assert not codecs.decode_label_png(_object(s3_env, f"{directory}/{rows[ids[1]]['semantic_uri']}")).any()
    assert len(_parquet(s3_env, f"{directory}/instances.parquet")) == sum(r["num_instances"] for r in rows.values())
    assert _object(s3_env, "run/_lease.json") is None

    # Bad files on S3: exit 2, one line naming the entry, nothing new under corrections/.
    stored = _keys(s3_env, "run/corrections/")
    image = document["images"][0]
    bad = {"truncated": (text[: len(text) // 2], "not a JSON document"),
           "unknown-id": ({**document, "images": [{**image, "file_name": "no-such-image.png"}], "annotations": []},
                          "'no-such-image.png' is not in the run's manifest"),
           "unknown-class": ({**document, "categories": [{"id": 1, "name": "unicorn"}]}, "category 'unicorn'"),
           "wrong-size": ({**document, "images": [{**image, "width": image["width"] + 1}], "annotations": []},
                          f"image {image['id']} ({image['file_name']!r}): says {image['width'] + 1}x{image['height']}")}
    for name, (content, _) in bad.items():
        body = content if isinstance(content, str) else json.dumps(content)
        _s3(s3_env).put_object(Bucket="irn", Key=f"review/{name}.json", Body=body.encode())
    # One process runs jobs.correct on each file (a process per file would spend seconds importing).
    refused = _run("import contextlib, io, json; from jobs import correct; out = {}\n"
                   f"for name in {list(bad)!r}:\n"
                   "    err = io.StringIO()\n"
                   "    with contextlib.redirect_stderr(err):\n"
                   "        try: correct.main(['--root', 's3://irn/run', '--from', f's3://irn/review/{name}.json'])\n"
                   "        except SystemExit as e: out[name] = [e.code, err.getvalue()]\n"
                   "print(json.dumps(out))", s3_env)
    _assert_no_credentials(refused.stdout.encode() + refused.stderr.encode(), "jobs.correct's output")
    assert refused.returncode == 0, refused.stderr[-3000:]
    outcomes = json.loads(refused.stdout.strip().splitlines()[-1])
    for name, (_, expected) in bad.items():
        code, stderr = outcomes[name]
        assert code == 2, (name, stderr[-3000:])
        lines = stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"correction error: s3://irn/review/{name}.json: "), lines
        assert expected in lines[0] and lines[0].endswith("nothing was stored"), lines[0]
    assert _keys(s3_env, "run/corrections/") == stored
    # The same file again (a tool's export taken in each night): nothing new, nothing stored.
    again = _job("jobs.correct", ["--root", "s3://irn/run", "--from", "s3://irn/review/edited.json"], s3_env)
    assert again.returncode == 0 and "nothing new" in again.stdout, again.stderr[-3000:]
    assert _keys(s3_env, "run/corrections/") == stored
    assert _object(s3_env, "run/_lease.json") is None
