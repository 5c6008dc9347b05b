"""Helpers for the tests that start real servers and processes on this machine (loopback only)."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ephemeral_ports() -> tuple[int, int]:
    """The kernel's range for ports bound to 0 (Linux's default when the file is absent)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = (int(n) for n in f.read().split())
    except OSError:
        low, high = 32768, 60999
    return low, high


def wait_for_port(port: int, *, timeout: float, process: subprocess.Popen | None = None) -> None:
    """Block until something accepts connections on 127.0.0.1:``port``; fail if ``process`` exits."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process is not None and process.poll() is not None:
            output = process.stdout.read() if process.stdout else ""
            raise RuntimeError(f"process exited with {process.returncode} before port {port} opened:\n{output}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f} s")


@contextlib.contextmanager
def moto_s3(bucket: str, secret: str):
    """A moto S3 server on a free loopback port with ``bucket``; yields the environment that
    reaches it (endpoint and test credentials, as a user's shell would hold them) and its port
    as ``_port``."""
    import sys

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "irn-test-key",
           "AWS_SECRET_ACCESS_KEY": secret, "AWS_REGION": "us-east-1", "AWS_DEFAULT_REGION": "us-east-1"}
    try:
        wait_for_port(port, timeout=30, process=server)
        import boto3

        boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                     aws_secret_access_key=secret, region_name="us-east-1").create_bucket(Bucket=bucket)
        yield {**env, "_port": str(port)}
    finally:
        server.terminate()
        server.wait(timeout=10)


def label_versions(root: str) -> list[str]:
    """Names of the labels version directories under a local run root, oldest first."""
    import os

    from pipeline.io import layout

    directory = layout.labels_root(root)
    return sorted(name for name in os.listdir(directory) if name.startswith("v")) if os.path.isdir(directory) else []


def copy_models(source_root: str, target_root: str) -> None:
    """Put the exported networks of one run root into another (to relabel with the same models)."""
    from pipeline.io import layout, storage

    for network in ("cam", "irn"):
        for suffix in ("", ".json"):
            storage.copy(layout.model_file(source_root, network) + suffix,
                         layout.model_file(target_root, network) + suffix)


def label_outputs(root: str) -> dict[str, dict]:
    """Every per-image output of a run root's latest labels, by image id, for comparing runs.

    Checks on the way that each image has exactly one CAM row and one index row (none missing,
    none duplicated) and that every file decodes (none half-written).
    """
    import json

    import numpy as np

    from pipeline import label_tables
    from pipeline.io import codecs, layout, storage
    from pipeline.stages.cams import read_cam_rows

    version = storage.read_text(layout.latest_pointer(root)).strip()
    labels = layout.labels_dir(root, version)
    outputs: dict[str, dict] = {}
    for uri in storage.list_files(layout.cams_dir(root), ".parquet"):
        for row in read_cam_rows(uri):
            assert row["image_id"] not in outputs, f"{row['image_id']} has two CAM rows"
            outputs[row["image_id"]] = {"cams": row["cams"], "class_ids": row["class_ids"]}
    index = label_tables.read_index(labels).to_pylist()
    listed = [r["image_id"] for r in index]
    assert len(listed) == len(set(listed)), "an image is listed twice in the index"
    assert sorted(listed) == sorted(outputs), "labelled images differ from the images with CAMs"
    for row in index:
        out = outputs[row["image_id"]]
        out["relations"] = codecs.decode_label_png(storage.read_bytes(layout.relation_png(root, row["image_id"])))
        out["semantic"] = codecs.decode_label_png(storage.read_bytes(storage.resolve(row["semantic_uri"], labels)))
        out["instance"] = codecs.decode_label_png(storage.read_bytes(storage.resolve(row["instance_uri"], labels)))
        shard = codecs.read_parquet(storage.resolve(row["instances_uri"], labels), filters=[("image_id", "=", row["image_id"])])
        rows = sorted(shard.to_pylist(), key=lambda r: r["instance_id"])
        assert [r["instance_id"] for r in rows] == list(range(1, row["num_instances"] + 1)), f"{row['image_id']}: instances"
        # Ids in the PNG are instance rows (an instance may be hidden under higher-scoring ones).
        assert set(np.unique(out["instance"]).tolist()) - {0} <= {r["instance_id"] for r in rows}, row["image_id"]
        out["instances"] = [(r["class_id"], round(r["score"], 5), r["rle_counts"]) for r in rows]
    coco = json.loads(storage.read_text(layout.coco_file(labels)))
    assert sorted(image["file_name"] for image in coco["images"]) == sorted(outputs)
    return outputs


def assert_same_outputs(actual: dict[str, dict], expected: dict[str, dict]) -> None:
    """Two runs' :func:`label_outputs` are identical, image by image and array by array."""
    import numpy as np

    assert sorted(actual) == sorted(expected)
    for image_id, want in expected.items():
        got = actual[image_id]
        for key, value in want.items():
            if isinstance(value, np.ndarray):
                assert np.array_equal(got[key], value), f"{image_id}: {key} differs"
            else:
                assert got[key] == value, f"{image_id}: {key} differs"


class FaultProxy:
    """An HTTP proxy on 127.0.0.1 in front of an S3 server (moto) that fails a share of the requests,
    at random but seeded: answered 503 SlowDown or 500 InternalError without reaching the server, or
    forwarded and then dropped before the response (a PUT that succeeded but whose answer was lost).
    ``failure_rate`` may be changed while it runs (1.0: every request fails)."""

    ERRORS = ((503, "SlowDown", "Please reduce your request rate."),
              (500, "InternalError", "We encountered an internal error. Please try again."))

    def __init__(self, upstream_port: int, *, failure_rate: float, seed: int):
        import http.server
        import random
        import threading

        self.upstream, self.failure_rate = upstream_port, failure_rate
        self.rng, self.lock = random.Random(seed), threading.Lock()
        self.counts = {"forwarded": 0, "503": 0, "500": 0, "dropped": 0}
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                with proxy.lock:
                    fault = proxy.rng.random() < proxy.failure_rate
                    kind = proxy.rng.randrange(3)
                if fault and kind < 2:
                    status, code, message = proxy.ERRORS[kind]
                    proxy.counts[str(status)] += 1
                    payload = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
                               f"<Message>{message}</Message></Error>").encode()
                    self.send_response(status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(payload)
                    return
                status, headers, payload = proxy._forward(self.command, self.path, self.headers, body)
                if fault:  # the server did the work; its answer is lost
                    proxy.counts["dropped"] += 1
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                proxy.counts["forwarded"] += 1
                self.send_response(status)
                for key, value in headers:
                    if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(key, value)
                length = dict((k.lower(), v) for k, v in headers).get("content-length", "0")
                self.send_header("Content-Length", length if self.command == "HEAD" else str(len(payload)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(payload)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def _forward(self, method: str, path: str, headers, body: bytes | None):
        import http.client

        connection = http.client.HTTPConnection("127.0.0.1", self.upstream, timeout=60)
        try:
            connection.request(method, path, body=body, headers={k: v for k, v in headers.items()
                                                                 if k.lower() != "connection"})
            response = connection.getresponse()
            return response.status, response.getheaders(), response.read()
        finally:
            connection.close()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
