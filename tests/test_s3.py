"""The whole job against S3: a moto server on 127.0.0.1 plays the object store.

jobs.label runs in a subprocess (its own embedded Ray) whose environment carries the endpoint and
test credentials, exactly as a user's shell would; the credentials must appear in no output.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SECRET = "irn-test-secret-key-not-real"
CLASSES = ["cross", "diamond", "disc", "square"]
pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_env():
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "irn-test-key",
           "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_REGION": "us-east-1", "AWS_DEFAULT_REGION": "us-east-1"}
    try:
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.2)
        import boto3

        boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                     aws_secret_access_key=SECRET, region_name="us-east-1").create_bucket(Bucket="irn")
        yield env
    finally:
        server.terminate()
        server.wait(timeout=10)


def _run(code: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env={**os.environ, **env, "PYTHONPATH": str(ROOT)})


def test_label_job_on_s3(s3_env):
    made = _run("from pipeline.data.synthetic import write_synthetic_set as w; "
                "print(w('s3://irn/data', num_images=8, seed=11, num_classes=4, min_size=64, max_size=80))", s3_env)
    assert made.returncode == 0, made.stderr[-3000:]
    manifest = made.stdout.strip().splitlines()[-1]
    assert manifest == "s3://irn/data/manifest.parquet"
    overrides = [f"data.manifest={manifest}", f"data.classes=[{', '.join(CLASSES)}]", "run.root=s3://irn/run",
                 "ray.num_cpus=2", "train_cam.depth=18", "train_cam.backbone_init=none", "train_cam.batch_size=4",
                 "train_cam.epochs=1", "train_cam.crop_size=64", "train_cam.resize_long=[64, 80]",
                 "train_cam.cpus_per_worker=0.5", "cams.scales=[1.0]", "cams.cpus_per_actor=0.5",
                 "relations.cpus_per_task=0.5", "train_irn.depth=18", "train_irn.batch_size=4", "train_irn.epochs=1",
                 "train_irn.crop_size=64", "train_irn.cpus_per_worker=0.5", "synthesis.cpus_per_actor=0.5",
                 "synthesis.steps=32", "eval.num_previews=1", "eval.ablations=false"]
    args = " ".join(f"--set '{o}'" for o in overrides)
    done = subprocess.run(f"{sys.executable} -m jobs.label {args}", shell=True, cwd=ROOT, capture_output=True,
                          text=True, timeout=900, env={**os.environ, **s3_env, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-4000:]
    assert SECRET not in done.stdout + done.stderr

    check = _run(
        "import json\n"
        "from pycocotools.coco import COCO\n"
        "from pipeline.io import layout, storage\n"
        "root = 's3://irn/run'\n"
        "version = storage.read_text(layout.latest_pointer(root)).strip()\n"
        "labels = layout.labels_dir(root, version)\n"
        "coco = json.loads(storage.read_text(storage.join(labels, 'coco.json')))\n"
        "print(json.dumps({'semantic': len(storage.list_files(storage.join(labels, 'semantic'), '.png')),\n"
        "  'instance': len(storage.list_files(storage.join(labels, 'instance'), '.png')),\n"
        "  'relations': len(storage.list_files(storage.join(root, 'relations'), '.png')),\n"
        "  'coco_images': len(coco['images']),\n"
        "  'models': [storage.exists(layout.model_file(root, n)) for n in ('cam', 'irn')],\n"
        "  'report': storage.exists(storage.join(root, 'report', 'index.html')),\n"
        "  'run_json': storage.read_text(layout.run_json(root))}))\n", s3_env)
    assert check.returncode == 0, check.stderr[-3000:]
    found = json.loads(check.stdout.strip().splitlines()[-1])
    assert found["semantic"] == found["instance"] == found["relations"] == found["coco_images"] == 8
    assert found["models"] == [True, True] and found["report"]
    assert SECRET not in found["run_json"]
