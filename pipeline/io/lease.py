"""One writer per run root: a lease in ``<root>/_lease.json``.

A job that writes to a run root takes the lease before its first write and holds it while it runs:

* **Taking it** is an atomic create (:func:`pipeline.io.storage.create_exclusive`: a hard link
  locally, a conditional PUT with ``If-None-Match: *`` on S3), so of two jobs started at once
  exactly one gets it. The record names the owner (host, pid, Ray job submission id, command), the
  start time and the last heartbeat.
* **Holding it**: a thread renews the heartbeat every ``heartbeat_seconds`` with a compare-and-swap
  (:func:`pipeline.io.storage.replace_if`: ``If-Match`` on S3). If the swap finds another owner's
  record (the lease expired and another job took it), the thread sends the job SIGTERM; if the
  heartbeat cannot be written for 90% of the expiry (storage down, a partitioned driver), the job
  ends at once with exit status 5, whatever its main thread waits for.
* **An expired lease** (no heartbeat for ``expiry_seconds``, by this machine's clock) is taken over
  with the same compare-and-swap, and said so in the log; ``break_lock`` takes any lease at once.
* **Releasing it** is the job's last write, on success, on failure and on SIGTERM; a SIGKILLed
  job leaves it to expire.

What it does not guarantee: clocks are trusted to agree within a fraction of the expiry (a record
looks expired by the reader's clock), and a job paused longer than the expiry (a frozen VM) may
write once more after another job took over, before its next heartbeat finds out.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import sys
import threading
import time
import uuid
from typing import Any

from pipeline.io import layout, retry, storage

log = logging.getLogger(__name__)


class LeaseHeld(RuntimeError):
    """Another job holds the run root's lease; the message is the one line to show."""


def _now() -> float:
    return time.time()


def _stamp(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def _age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 60} min {seconds % 60} s" if seconds >= 60 else f"{seconds} s"


def _ray_job() -> str | None:
    """The submission id of the Ray job this process is the entry point of (``ray job submit``)."""
    try:
        config = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
    except ValueError:
        return None
    return (config.get("metadata") or {}).get("job_submission_id")


def describe(record: dict[str, Any]) -> str:
    owner = record.get("owner", {})
    who = f"{owner.get('command', 'a job')} (host {owner.get('host')}, pid {owner.get('pid')}"
    if owner.get("ray_job"):
        who += f", Ray job {owner['ray_job']}"
    return who + ")"


def holder(root: str) -> dict[str, Any] | None:
    """The lease record of ``root`` with ``age`` (seconds since its heartbeat) and ``expired``;
    None when no job holds it."""
    found = storage.read_versioned(layout.lease_file(root))
    if found is None:
        return None
    record = json.loads(found[0])
    age = _now() - record["heartbeat"]
    return {**record, "age": age, "expired": age > record["expiry_seconds"], "started_at": _stamp(record["started"])}


def held_line(root: str, record: dict[str, Any]) -> str:
    return (f"run root locked: held by {describe(record)} since {_stamp(record['started'])}, heartbeat "
            f"{_age(record['age'])} ago; wait, or --break-lock if that job is dead")


class Lease:
    """The lease of ``root`` for one job (``command`` names it in the record)."""

    def __init__(self, root: str, *, command: str, expiry_seconds: float = 600.0, heartbeat_seconds: float = 30.0):
        self.root, self.uri = root, layout.lease_file(root)
        self.expiry, self.interval = expiry_seconds, heartbeat_seconds
        self.token = uuid.uuid4().hex
        self.owner = {"host": socket.gethostname(), "pid": os.getpid(), "command": command, "ray_job": _ray_job()}
        self.started = _now()
        self.tag: str | None = None
        self.took_over: str | None = None  # what acquire() said when it took another job's lease
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(self) -> bytes:
        return json.dumps({"owner": self.owner, "token": self.token, "started": self.started,
                           "heartbeat": _now(), "expiry_seconds": self.expiry}, sort_keys=True).encode()

    def acquire(self, *, break_lock: bool = False) -> None:
        """Take the lease (raises :class:`LeaseHeld` when a live job holds it) and start the heartbeat."""
        for _ in range(3):  # a lease released or taken over while we look: look again
            data = self._record()
            if storage.create_exclusive(self.uri, data):
                self.tag = storage.version_tag(data)
                break
            found = storage.read_versioned(self.uri)
            if found is None:
                continue
            record = json.loads(found[0])
            if record["token"] == self.token:  # ours: the create succeeded, its answer was lost and retried
                self.tag = found[1]
                break
            record["age"] = _now() - record["heartbeat"]
            if not (break_lock or record["age"] > record["expiry_seconds"]):
                raise LeaseHeld(held_line(self.root, record))
            data = self._record()
            if storage.replace_if(self.uri, data, found[1]) or self._is_ours(data):
                self.tag = storage.version_tag(data)
                self.took_over = (f"run root {self.root}: {'broke' if break_lock else 'took over the expired'} lease "
                                  f"of {describe(record)} (heartbeat {_age(record['age'])} ago)")
                break
        else:
            raise LeaseHeld(f"run root locked: could not take the lease of {self.root}; another job is taking it")
        self._thread = threading.Thread(target=self._heartbeat, name="irn-ray-lease", daemon=True)
        self._thread.start()

    def _heartbeat(self) -> None:
        last_written = _now()
        while not self._stop.wait(self.interval):
            data = self._record()
            try:
                if not storage.replace_if(self.uri, data, self.tag) and not self._is_ours(data):
                    found = storage.read_versioned(self.uri)
                    other = describe(json.loads(found[0])) if found else "nobody (the lease file is gone)"
                    self._lost(f"lease of run root {self.root} lost: it is held by {other}; stopping this job")
                    return
                self.tag, last_written = storage.version_tag(data), _now()
            except Exception as err:  # noqa: BLE001 - storage unreachable: keep trying until the expiry
                log.warning("lease heartbeat of %s failed (%s: %s)", self.root, type(err).__name__, err)
                if _now() - last_written > self.expiry * 0.9:
                    self._storage_down(err, _now() - last_written)
                    return

    def _is_ours(self, data: bytes) -> bool:
        """Whether the lease file holds ``data``: a swap that succeeded, whose answer was lost, and
        whose retry then failed its precondition."""
        found = storage.read_versioned(self.uri)
        return found is not None and found[1] == storage.version_tag(data)

    def _storage_down(self, err: BaseException, age: float) -> None:
        """Storage has refused the heartbeat for 90% of the expiry: another job may take the lease
        soon, so this one ends now, whatever its main thread is waiting for (nothing it would
        write can reach storage anyway), with exit status 5 (jobs._cli.STORAGE_DOWN)."""
        detail = str(err).strip().splitlines()[-1].rstrip(".") if str(err).strip() else type(err).__name__
        log.error("storage unavailable after %d attempts: %s: %s; the lease of %s has not been renewed for %s, "
                  "so this job stops. LATEST is unchanged by this run's unfinished work; rerun to resume",
                  retry.RETRY.attempts, type(err).__name__, detail, self.root, _age(age))
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        os._exit(5)

    def _lost(self, message: str) -> None:
        log.error("%s", message)
        self.tag = None  # nothing to release: it is not ours
        os.kill(os.getpid(), signal.SIGTERM)

    def stop_heartbeat(self) -> None:
        """The job is ending: no more heartbeats (nor a stop for a late one); the lease stays ours
        until :meth:`release`."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    def release(self) -> None:
        """Give the lease back (the job's last write); only if it is still ours."""
        self.stop_heartbeat()
        if self.tag is not None:
            try:
                storage.remove_if(self.uri, self.tag)
            except Exception as err:  # noqa: BLE001 - it expires on its own
                log.warning("could not release the lease of %s (%s); it expires in %s", self.root, err,
                            _age(self.expiry))
            self.tag = None


def hold(root: str, *, command: str, break_lock: bool, expiry_seconds: float, heartbeat_seconds: float):
    """A context manager: the lease of ``root`` held for the ``with`` block, released at its end,
    on an exception and on SIGTERM (then the process ends as SIGTERM would have ended it)."""
    return _Held(Lease(root, command=command, expiry_seconds=expiry_seconds, heartbeat_seconds=heartbeat_seconds),
                 break_lock)


class _Held:
    def __init__(self, lease: Lease, break_lock: bool):
        self.lease, self.break_lock, self.previous = lease, break_lock, None

    def __enter__(self) -> Lease:
        self.lease.acquire(break_lock=self.break_lock)
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        return self.lease

    def _on_sigterm(self, signum, frame) -> None:
        self.lease.release()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGTERM)

    def __exit__(self, *exc) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)
        self.lease.release()
