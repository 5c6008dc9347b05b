"""Ray plumbing every floor above uses: joining or starting Ray with its own lines kept quiet,
tasks, datasets from planned tables, progress, status rows."""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, Callable

import numpy as np

from pipeline.config import Config
from pipeline.io import storage
from pipeline.progress import OUR_LOGGERS, WORKER_LINE_FORMAT, StageProgress

log = logging.getLogger(__name__)
# Loggers that print Ray's own execution plans, checkpoint paths and actor notices.
NOISY_LOGGERS = ("ray.data", "ray.train", "ray.tune", "ray.air", "ray._private", "ray.util",
                 "ray.train.v2._internal.execution.controller.placement_group_cleaner")


def _quiet_ray() -> None:
    """Worker setup hook: Ray's own INFO lines (checkpoint paths, reports) stay in its log files."""
    import importlib.util
    import threading
    import warnings

    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    # Ray Train reports each result through a logger named by its file path.
    spec = importlib.util.find_spec("ray.train.v2._internal.execution.context")
    if spec is not None and spec.origin:
        logging.getLogger(spec.origin).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*exclude_resources.*")
    # Ray Train's placement-group cleaner polls the State API, which needs the dashboard that an
    # embedded run does not start; its monitor thread then dies with a traceback that says nothing
    # about the job (the cleaner only matters when a controller dies and the cluster lives on).
    default = threading.excepthook

    def excepthook(args):
        if args.thread is None or args.thread.name != "PlacementGroupCleanerMonitor":
            default(args)

    threading.excepthook = excepthook


class _CurrentStderr(logging.StreamHandler):
    """A handler that writes to whatever ``sys.stderr`` is when a record is emitted."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


RETRY_COUNTER = "irn-ray-storage-retries"  # the named actor that counts storage retries of the job
_counters: dict = {}  # the driver's handle per Ray job: an actor lives as long as a handle to it


class _RetryCounter:
    def __init__(self):
        self.count = 0

    def add(self) -> None:
        self.count += 1

    def total(self) -> int:
        return self.count


def _count_retry(operation: str, uri: str, err: BaseException) -> None:
    """storage.on_retry listener: one more retry for the job's count (fire and forget)."""
    import ray

    try:
        ray.get_actor(RETRY_COUNTER).add.remote()
    except Exception:  # noqa: BLE001 - no counter (a process outside a job): the debug log has it
        pass


def storage_retries() -> int:
    """Storage calls retried so far by this job, in every process (0 without a counter)."""
    import ray

    try:
        return ray.get(ray.get_actor(RETRY_COUNTER).total.remote())
    except ValueError:
        return 0


def _worker_setup() -> None:
    """Worker setup hook: Ray's lines quiet, ours (INFO and above) marked as ours
    (progress.WORKER_LINE_FORMAT), so the driver can show them on the console and leave Ray's to
    run.log; storage retries counted for the job."""
    _quiet_ray()
    storage.on_retry(_count_retry)
    handler = _CurrentStderr()
    handler.setFormatter(logging.Formatter(WORKER_LINE_FORMAT))
    for name in OUR_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(h, _CurrentStderr) for h in logger.handlers):
            logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def init_ray(cfg: Config) -> None:
    """Join the cluster in RAY_ADDRESS (``ray job submit``) or start an embedded local Ray."""
    if not sys.stdout.isatty():
        # No colour codes in a file or a pipe: Ray colours the prefix of each worker line it
        # forwards, and always the "[repeated 3x across cluster]" of its deduplication (which
        # reads this when Ray is first imported).
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
        os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    import ray
    import ray.data

    if not ray.is_initialized():
        address = cfg.ray.address
        if address == "auto-local":
            address = os.environ.get("RAY_ADDRESS") or "local"
        if address == "local":
            # Embedded: no dashboard or job server (Ray's own ports still listen on all interfaces,
            # see README Security); workers import this checkout.
            project = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
            path = os.pathsep.join(p for p in (project, os.environ.get("PYTHONPATH", "")) if p)
            log.info("starting Ray on this machine (%s CPUs)", cfg.ray.num_cpus or "all")
            ray.init(address="local", num_cpus=cfg.ray.num_cpus, num_gpus=cfg.ray.num_gpus, include_dashboard=False,
                     runtime_env={"worker_process_setup_hook": _worker_setup, "env_vars": {"PYTHONPATH": path}})
        else:  # merged with the submitted job's runtime env (its working_dir)
            log.info("joining the Ray cluster at %s", address)
            ray.init(address=address, runtime_env={"worker_process_setup_hook": _worker_setup})
    _quiet_ray()
    if ray.is_initialized():
        job = ray.get_runtime_context().get_job_id()
        if job not in _counters:
            _counters[job] = ray.remote(num_cpus=0)(_RetryCounter).options(name=RETRY_COUNTER,
                                                                          get_if_exists=True).remote()
    storage.on_retry(_count_retry)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    context.verbose_stats_logs = False



def run_task(fn: Callable, *args: Any, num_cpus: float = 1.0, num_gpus: float = 0, num_returns: int | str = 1,
             **kwargs: Any):
    """Run ``fn(*args, **kwargs)`` as a Ray task (off the driver); returns its ObjectRef(s)."""
    import ray

    return ray.remote(fn).options(num_cpus=num_cpus, num_gpus=num_gpus, num_returns=num_returns).remote(*args, **kwargs)


def get(ref):
    import ray

    return ray.get(ref)


MAX_BLOCKS = 10_000  # object references the driver holds for one dataset, at most


def _split(table, rows_per_block: int):
    """Task (streaming returns): ``table`` cut into blocks. Returned, not put: the driver owns
    them, so a block lost with a node is rebuilt from lineage."""
    rows = max(rows_per_block, -(-table.num_rows // MAX_BLOCKS), 1)
    for start in range(0, max(table.num_rows, 1), rows):
        yield table.slice(start, rows)


def dataset(table_ref, rows_per_block: int):
    """A Ray Dataset over the Arrow table behind ``table_ref`` (made by a task, never fetched to
    the driver), in blocks of ``rows_per_block`` rows (more when that would exceed MAX_BLOCKS), so
    work spreads over the workers and a lost worker costs only its block. No task of the dataset
    itself needs a CPU, so it also streams into Ray Train workers that hold every CPU."""
    import ray.data

    return ray.data.from_arrow_refs(list(run_task(_split, table_ref, rows_per_block, num_cpus=0.1,
                                                  num_returns="streaming")))


def shard_batch(shard_rows: int, block_rows: int) -> int:
    """Rows per shard-writing batch: ``shard_rows`` rounded up to whole upstream blocks, so batches
    are not cut into a full shard and a fragment."""
    return max(block_rows, -(-shard_rows // block_rows) * block_rows)


def summarise(ds, progress: StageProgress) -> dict[str, int]:
    """Drive a stage's dataset to completion; only per-image status rows reach the driver."""
    counts: dict[str, int] = {}
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        statuses = batch["status"]
        for status in statuses:
            counts[str(status)] = counts.get(str(status), 0) + 1
        progress.add(len(statuses))
    return counts


def status_batch(statuses: list[str]) -> dict[str, np.ndarray]:
    return {"status": np.array(statuses, dtype=object)}


def object_array(values: list) -> np.ndarray:
    """A 1-D object array of ``values`` (arrays of different shapes stay separate objects)."""
    array = np.empty(len(values), dtype=object)
    array[:] = values
    return array


def finish_stage(*directories: str) -> None:
    """After a stage's dataset completed: drop temporary files left by workers killed mid-write."""
    removed = sum(storage.remove_temp_files(d) for d in directories)
    if removed:
        log.warning("removed %d temporary files left by interrupted writers", removed)
