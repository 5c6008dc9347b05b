"""Shared command line of the jobs: --config FILE, --set section.key=value overrides, --verbose,
--break-lock.

Started as ``python -m jobs.<name>``, a job's console shows our lines only (stages, progress,
warnings, the summary); Ray's own lines go to ``<run root>/run.log`` (jobs._console). A job that
writes to a run root holds its lease (:func:`writing`, pipeline.io.lease): exit status 2 is a bad
setting or input, 3 the quality gate, 4 another job holding the root, 5 storage down.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from typing import Iterator, NoReturn

from jobs import _console
from pipeline.config import Config, ConfigError, check_inputs, load_config
from pipeline.data.manifest import manifest_format
from pipeline.io import lease, retry, storage

LOCKED = 4  # exit status: another job holds the run root's lease
STORAGE_DOWN = 5  # exit status: storage kept failing after every retry


def _outage(err: BaseException) -> BaseException | None:
    """The storage error that outlasted the retries behind ``err`` (Ray wraps a worker's), or None."""
    seen = set()
    while err is not None and id(err) not in seen:
        if storage.transient(err):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def _storage_down(err: BaseException) -> str:
    """One line for a storage error that outlasted the retries (a worker's error: its last line)."""
    lines = [line for line in str(err).splitlines() if line.strip()]
    detail = (lines[-1] if lines else str(err)).rstrip(".")
    return (f"storage unavailable after {retry.RETRY.attempts} attempts: {type(err).__name__}: {detail}. "
            "LATEST is unchanged by this run's unfinished work; rerun to resume")


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", help="YAML config (local path or fsspec URI); defaults if omitted")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value (repeatable), e.g. --set run.root=s3://bucket/run")
    add_verbose(p)
    add_break_lock(p)
    return p


def add_break_lock(p: argparse.ArgumentParser) -> None:
    p.add_argument("--break-lock", action="store_true",
                   help="take the run root's lease even if another job holds it (only when that job is dead)")


def add_verbose(p: argparse.ArgumentParser) -> None:
    p.add_argument("--verbose", action="store_true",
                   help="show Ray's own lines (workers, datasets, actors) on the console too; they always go to "
                        "run.log in the run root")


def console(root: str, *, verbose: bool = False) -> None:
    """Hand the console over to jobs._console when this process runs a job from the command line
    (``python -m jobs.<name>``); else (a test or a notebook calling ``main()``) log to stderr."""
    if _console.started_as_job():
        _console.start(root, verbose=verbose)
    else:
        logging.basicConfig(level=logging.INFO, format=_console.LOG_FORMAT)


@contextlib.contextmanager
def writing(root: str, args: argparse.Namespace, *, expiry_seconds: float = 600.0,
            heartbeat_seconds: float = 30.0) -> Iterator[None]:
    """Hold the lease of ``root`` (pipeline.io.lease) for the block, with the console of the job;
    exit :data:`LOCKED` with one line, having written nothing, when another job holds it."""
    command = f"jobs.{sys.argv[0].rsplit('/', 1)[-1].removesuffix('.py')}" if _console.started_as_job() else "jobs"
    held = lease.hold(root, command=command, break_lock=getattr(args, "break_lock", False),
                      expiry_seconds=expiry_seconds, heartbeat_seconds=heartbeat_seconds)
    try:
        taken = held.__enter__()
    except lease.LeaseHeld as err:
        print(err, file=sys.stderr)
        raise SystemExit(LOCKED) from None
    except OSError as err:
        if _outage(err) is None:
            raise
        print(_storage_down(_outage(err)), file=sys.stderr)
        raise SystemExit(STORAGE_DOWN) from None
    try:
        console(root, verbose=getattr(args, "verbose", False))
        if taken.took_over:
            logging.getLogger("irn-ray").warning("%s", taken.took_over)
        yield
    except Exception as err:  # noqa: BLE001 - a storage outage ends in one line; anything else as it is
        if _outage(err) is None:
            raise
        logging.getLogger("irn-ray").error("%s", _storage_down(_outage(err)))
        if _console.started_as_job():
            # Storage is down: giving the lease back, appending run.log and a tidy Ray shutdown
            # (whose actors may be retrying a model load) cannot finish; the lease expires.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(STORAGE_DOWN)
        raise SystemExit(STORAGE_DOWN) from None
    finally:
        taken.stop_heartbeat()  # the job is ending: a slow shutdown must not look like a lost lease
        _console.stop()  # run.log appended to the run root while the lease is still held
        held.__exit__(None, None, None)


@contextlib.contextmanager
def job(args: argparse.Namespace) -> Iterator[Config]:
    """A job on a run root: its config (:func:`load`), the root's lease held and the console set
    up for the block (:func:`writing`)."""
    cfg = load(args)
    with writing(cfg.run.root, args, expiry_seconds=cfg.run.lease_expiry_seconds,
                 heartbeat_seconds=cfg.run.lease_heartbeat_seconds):
        yield cfg


def load(args: argparse.Namespace) -> Config:
    """The resolved config, or exit 2 with one line that names the key and the fix: a bad value
    (pipeline.config), or an input that cannot be read (:func:`pipeline.config.check_inputs`, a
    manifest of unknown format). Nothing has started then."""
    try:
        cfg = load_config(args.config, args.overrides)
        check_inputs(cfg)
    except ConfigError as err:
        _refuse(str(err))
    try:
        manifest_format(cfg.data.manifest)
    except ValueError as err:
        _refuse(f"data.manifest: {err}")
    return cfg


def _refuse(message: str) -> NoReturn:
    print(f"configuration error: {message}", file=sys.stderr)
    raise SystemExit(2)
