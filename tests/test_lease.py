"""The run root's lease and the storage retry policy, on local paths and on S3 (a moto server):
one holder at a time, expiry and takeover, compare-and-swap heartbeats, retries only of what
retrying can change."""

from __future__ import annotations

import errno
import json
import os
import threading
import time

import pytest
from support import FaultProxy, moto_s3

from pipeline.io import layout, lease, retry, storage


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server with bucket ``lease``, reached through this process's environment."""
    with moto_s3("lease", "irn-test-secret") as env:
        saved = {k: os.environ.get(k) for k in env if not k.startswith("_")}
        os.environ.update({k: v for k, v in env.items() if not k.startswith("_")})
        try:
            yield int(env["_port"])
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


@pytest.mark.parametrize("where", ["local", "s3"])
def test_conditional_writes_let_one_writer_win(tmp_path, request, where):
    root = str(tmp_path) if where == "local" else f"s3://lease/{tmp_path.name}-cw"
    if where == "s3":
        request.getfixturevalue("s3")
    uri = storage.join(root, "x.json")
    assert storage.create_exclusive(uri, b"first") is True
    assert storage.create_exclusive(uri, b"second") is False
    data, tag = storage.read_versioned(uri)
    assert data == b"first"
    assert storage.replace_if(uri, b"third", storage.version_tag(b"other")) is False
    assert storage.replace_if(uri, b"third", tag) is True
    assert storage.replace_if(uri, b"fourth", tag) is False  # the tag moved on with the content
    assert storage.read_bytes(uri) == b"third"
    assert storage.remove_if(uri, tag) is False and storage.remove_if(uri, storage.version_tag(b"third")) is True
    assert storage.read_versioned(uri) is None


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_second_job_is_refused_until_the_first_releases_or_its_lease_expires(tmp_path, request, where, monkeypatch):
    root = str(tmp_path) if where == "local" else f"s3://lease/{tmp_path.name}-job"
    if where == "s3":
        request.getfixturevalue("s3")
    first = lease.Lease(root, command="jobs.label", expiry_seconds=1.5, heartbeat_seconds=0.3)
    first.acquire()
    second = lease.Lease(root, command="jobs.label", expiry_seconds=1.5, heartbeat_seconds=0.3)
    time.sleep(2.0)  # longer than the expiry: only the heartbeat keeps the first lease alive
    with pytest.raises(lease.LeaseHeld) as held:
        second.acquire()
    line = str(held.value)
    assert line.startswith("run root locked: held by jobs.label (host ") and "\n" not in line
    assert "heartbeat" in line and "--break-lock" in line
    record = lease.holder(root)
    assert record["token"] == first.token and not record["expired"] and record["age"] < 1.5
    first.release()
    assert lease.holder(root) is None
    second.acquire()  # released: free at once
    # A job that stops heartbeating (SIGKILLed) leaves its lease to expire; then it is taken over,
    # and the old holder, if it still runs, finds out at its next heartbeat and stops itself.
    second._stop.set()
    second._thread.join()
    third = lease.Lease(root, command="jobs.retain", expiry_seconds=1.5, heartbeat_seconds=0.3)
    with pytest.raises(lease.LeaseHeld):
        third.acquire()
    time.sleep(1.7)
    third.acquire()
    assert third.took_over.startswith(f"run root {root}: took over the expired lease of jobs.label")
    stopped = []
    monkeypatch.setattr(lease.os, "kill", lambda pid, sig: stopped.append((pid, sig)))
    second._stop = threading.Event()  # the old holder wakes up (it was paused, not killed)
    thread = threading.Thread(target=second._heartbeat)
    thread.start()
    thread.join(timeout=5)
    assert stopped and stopped[0][0] == os.getpid()
    assert second.tag is None  # nothing of its own to release
    second.release()
    assert lease.holder(root)["token"] == third.token  # the old holder did not remove the new lease
    fourth = lease.Lease(root, command="jobs.label", expiry_seconds=1.5, heartbeat_seconds=0.3)
    fourth.acquire(break_lock=True)
    assert fourth.took_over.startswith(f"run root {root}: broke lease of jobs.retain")
    third._stop.set()
    fourth.release()


def test_the_retry_policy_retries_what_can_change_and_nothing_else(monkeypatch):
    monkeypatch.setattr(retry.time, "sleep", lambda s: None)
    seen = []
    storage.on_retry(lambda op, uri, err: seen.append((op, type(err).__name__)))
    calls = {"n": 0}

    def flaky():
        calls["n"] += 1
        if calls["n"] <= 3:
            raise [OSError(errno.EBUSY, "SlowDown"), OSError(errno.EREMOTEIO, "InternalError"),
                   ConnectionResetError("reset")][calls["n"] - 1]
        return "ok"

    assert storage.retrying("read", "s3://b/k", flaky) == "ok" and calls["n"] == 4
    assert seen[-3:] == [("read", "OSError"), ("read", "OSError"), ("read", "ConnectionResetError")]
    for lasting in (FileNotFoundError("gone"), PermissionError("403"), FileExistsError("412"),
                    OSError(errno.EINVAL, "PreconditionFailed")):
        count = {"n": 0}

        def fail(err=lasting):
            count["n"] += 1
            raise err

        with pytest.raises(type(lasting)):
            storage.retrying("read", "s3://b/k", fail)
        assert count["n"] == 1, lasting
    always = {"n": 0}

    def down():
        always["n"] += 1
        raise OSError(errno.EBUSY, "SlowDown")

    with pytest.raises(OSError, match="SlowDown"):
        storage.retrying("write", "s3://b/k", down, storage.RetryPolicy(attempts=5))
    assert always["n"] == 5


def test_storage_calls_survive_a_faulty_s3(s3, tmp_path, monkeypatch):
    """Every fourth request fails (503, 500, or its answer is dropped after the server acted):
    writes, reads, range reads, listings, copies and deletes still do exactly what they should."""
    proxy = FaultProxy(s3, failure_rate=0.25, seed=3)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{proxy.port}")
    monkeypatch.setattr(retry, "RETRY", retry.RetryPolicy(attempts=12, base_seconds=0.01, cap_seconds=0.05))
    try:
        import fsspec

        fsspec.filesystem("s3").clear_instance_cache()
        base = f"s3://lease/{tmp_path.name}-faulty"
        blobs = {f"{base}/d/{i}.bin": os.urandom(1000 + i) for i in range(12)}
        for uri, data in blobs.items():
            storage.write_bytes(uri, data)
        assert storage.list_files(f"{base}/d", ".bin") == sorted(blobs)
        assert all(storage.read_bytes(uri) == data for uri, data in blobs.items())
        with storage.open_input(next(iter(blobs))) as f:
            f.seek(10)
            assert f.read(20) == next(iter(blobs.values()))[10:30]
        storage.copy(next(iter(blobs)), f"{base}/copy.bin")
        assert storage.read_bytes(f"{base}/copy.bin") == next(iter(blobs.values()))
        with storage.open_output(f"{base}/streamed.json") as f:
            f.write(json.dumps({"a": 1}).encode())
        assert json.loads(storage.read_text(f"{base}/streamed.json")) == {"a": 1}
        storage.remove(f"{base}/d", recursive=True)
        assert storage.list_files(f"{base}/d") == [] and not storage.exists(next(iter(blobs)))
        assert storage.create_exclusive(layout.lease_file(base), b"x") is True
        assert sum(proxy.counts[k] for k in ("503", "500", "dropped")) >= 10, proxy.counts
    finally:
        proxy.close()
        fsspec.filesystem("s3").clear_instance_cache()
