"""The console of a job started from the command line: our lines there, everything in run.log.

Ray writes to the driver's file descriptors itself: its C++ core prints errors such as
``core_worker.cc: Actor with class name ... has constructor arguments in the object store`` to
descriptor 2, and its log thread prints every worker's output (the ``(SplitCoordinator pid=...)``
lines, "Dataset ... execution finished") to ``sys.stdout`` and ``sys.stderr``. No logging filter
holds those back, so :func:`start` points descriptors 1 and 2 at the run's log and keeps
duplicates of the originals for the console, which then gets only:

* the job's log records from our loggers (``progress.OUR_LOGGERS``), as ``HH:MM:SS message``;
* the records our code logs inside Ray workers, which the workers mark
  (``progress.WORKER_LINE_FORMAT``) and the driver picks out of the worker output it receives;
* what the job prints from its main thread (its summary), and a traceback if it fails.

The log gets all of that and everything else: ``<root>/run.log`` beside run.json, appended to by
every job run in the root. For a remote root (s3://...) the job writes a local file (the console's
first line names it) and appends it to ``<root>/run.log`` when it ends. With ``verbose`` the
console shows the log as it grows instead, Ray's lines included.
"""

from __future__ import annotations

import atexit
import logging
import os
import re
import sys
import tempfile
import threading
import time
import traceback
from typing import Any

from pipeline.io import layout, storage
from pipeline.progress import OUR_LOGGERS, parse_worker_line

log = logging.getLogger("irn-ray")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_RELAY = "irn-ray-console"  # name of our handler in Ray's worker-output dispatcher
_ANSI = re.compile(rb"\x1b\[[0-9;]*m")


def started_as_job() -> bool:
    """Whether this process runs a job module as its main (``python -m jobs.label``), rather than
    a test or a notebook calling a job's ``main()`` (whose console is left alone)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return spec is not None and spec.name.startswith("jobs.")


def _command() -> str:
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return " ".join([f"python -m {spec.name}" if spec is not None else sys.argv[0], *sys.argv[1:]])


def _ours(record: logging.LogRecord) -> bool:
    return record.name.split(".")[0] in OUR_LOGGERS or record.name == "__main__"


def _not_relayed(record: logging.LogRecord) -> bool:
    return not getattr(record, "relayed", False)  # Ray already wrote a worker's line to the log


class ConsoleFormatter(logging.Formatter):
    """``16:50:03 stage cams: started``; warnings and errors say so."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.exc_info:
            message += "\n" + self.formatException(record.exc_info)
        level = f"{record.levelname.lower()}: " if record.levelno >= logging.WARNING else ""
        return f"{time.strftime('%H:%M:%S', time.localtime(record.created))} {level}{message}"


class _MainThreadTee:
    """``sys.stdout`` of a job: everything to the log; the job's own prints (its main thread) also
    to the console. Ray prints the workers' output from its log thread: that stays in the log."""

    def __init__(self, log_stream, console):
        self._log, self._console = log_stream, console

    def write(self, text: str) -> int:
        if threading.current_thread() is threading.main_thread():
            self._console.write(text)
        return self._log.write(text)

    def flush(self) -> None:
        self._console.flush()
        self._log.flush()

    def isatty(self) -> bool:
        return False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._log, name)


def relay_worker_line(data: dict[str, Any]) -> None:
    """Ray's worker-output dispatcher handler: our workers' records become driver records (marked
    ``relayed``), so they reach the console like the driver's own."""
    for line in data.get("lines", ()):
        parsed = parse_worker_line(line)
        if parsed is not None:
            level, name, message = parsed
            logging.getLogger(name).log(level, "%s", message, extra={"relayed": True})


class _Console:
    def __init__(self, root: str, verbose: bool):
        self.root, self.verbose = root, verbose
        self.remote = not storage.is_local(root)
        if self.remote:
            handle, self.path = tempfile.mkstemp(prefix="irn-ray-", suffix=".log")
            os.close(handle)
        else:
            self.path = storage.filesystem(layout.run_log(root))[1]
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        self.stopped = threading.Event()
        self.handlers: list[logging.Handler] = []

    def start(self) -> None:
        atexit.register(self.stop)
        sys.stdout.flush()
        sys.stderr.flush()
        log_fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        start = os.lseek(log_fd, 0, os.SEEK_END)
        os.write(log_fd, f"==== {time.strftime('%Y-%m-%d %H:%M:%S')} {_command()}\n".encode())
        self.saved = (os.dup(1), os.dup(2))
        self.console_out = open(os.dup(self.saved[0]), "w", buffering=1, encoding="utf-8", errors="replace")
        self.console_err = open(os.dup(self.saved[1]), "w", buffering=1, encoding="utf-8", errors="replace")
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        self.log_stream = open(log_fd, "w", buffering=1, encoding="utf-8", errors="replace")
        self.stdout, self.excepthook = sys.stdout, sys.excepthook
        if hasattr(sys.stdout, "reconfigure"):
            sys.stdout.reconfigure(line_buffering=True)  # fd 1 is now a file: keep lines in order
        # The log is a file: no colours (Ray colours the worker prefixes and, always, the
        # "[repeated 3x across cluster]" of its deduplication, which a log does not need either).
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
        os.environ.setdefault("RAY_DEDUP_LOGS", "0")  # read when Ray is imported, after this

        root = logging.getLogger()
        for handler in list(root.handlers):
            root.removeHandler(handler)
        root.setLevel(logging.INFO)
        to_log = logging.StreamHandler(self.log_stream)
        to_log.setFormatter(logging.Formatter(LOG_FORMAT))
        to_log.addFilter(_not_relayed)
        self.handlers.append(to_log)
        if self.verbose:
            self.tail = threading.Thread(target=self._follow, args=(start,), name="irn-ray-log-tail", daemon=True)
            self.tail.start()
        else:
            to_console = logging.StreamHandler(self.console_err)
            to_console.setFormatter(ConsoleFormatter())
            to_console.addFilter(_ours)
            self.handlers.append(to_console)
            sys.stdout = _MainThreadTee(sys.stdout, self.console_out)
            from ray._private.ray_logging import global_worker_stdstream_dispatcher

            global_worker_stdstream_dispatcher.add_handler(_RELAY, relay_worker_line)
        for handler in self.handlers:
            root.addHandler(handler)
        sys.excepthook = self._excepthook
        where = (f"{self.path} while the job runs, then {layout.run_log(self.root)}" if self.remote else self.path)
        log.info("log: %s%s", where, "" if self.verbose else " (Ray's own lines too; --verbose shows them here)")

    def _follow(self, offset: int) -> None:
        """--verbose: copy what the log gains to the console, line by line, until the job ends
        (without colour codes unless the console is a terminal: Ray colours a few lines always)."""
        plain = not os.isatty(self.saved[0])
        with open(self.path, "rb") as f:
            f.seek(offset)
            partial = b""
            while True:
                data = partial + f.read(1 << 16)
                cut = data.rfind(b"\n") + 1 if not self.stopped.is_set() else len(data)
                lines, partial = data[:cut], data[cut:]
                if lines:
                    os.write(self.saved[0], _ANSI.sub(b"", lines) if plain else lines)
                elif self.stopped.is_set():
                    return
                else:
                    self.stopped.wait(0.1)

    def _excepthook(self, kind, value, tb) -> None:
        if not self.verbose:  # the console would not show what the log gets
            self.console_err.write("".join(traceback.format_exception(kind, value, tb)))
            self.console_err.flush()
        self.excepthook(kind, value, tb)

    def stop(self) -> None:
        """Give the descriptors back to the console (at exit); upload a remote root's log."""
        if self.stopped.is_set():
            return
        ray = sys.modules.get("ray")
        if ray is not None and ray.is_initialized():
            ray.shutdown()  # Ray's own exit hook may run after this one: its last lines go to the log
        if not self.verbose:
            from ray._private.ray_logging import global_worker_stdstream_dispatcher

            global_worker_stdstream_dispatcher.remove_handler(_RELAY)
        sys.stdout.flush()
        sys.stdout, sys.excepthook = self.stdout, self.excepthook
        sys.stdout.flush()
        sys.stderr.flush()
        self.stopped.set()
        if self.verbose:
            self.tail.join(timeout=5)
        root = logging.getLogger()
        for handler in self.handlers:
            root.removeHandler(handler)
        self.log_stream.flush()
        os.dup2(self.saved[0], 1)
        os.dup2(self.saved[1], 2)
        for stream in (self.log_stream, self.console_out, self.console_err):
            stream.close()
        for fd in self.saved:
            os.close(fd)
        if self.remote:
            self._upload()

    def _upload(self) -> None:
        target = layout.run_log(self.root)
        try:
            with open(self.path, "rb") as f:
                ours = f.read()
            earlier = storage.read_bytes(target) if storage.exists(target) else b""
            storage.write_bytes(target, earlier + ours)  # object stores cannot append: one PUT
        except Exception as err:  # noqa: BLE001 - the job's work is done; say where the log is
            print(f"could not append the log to {target} ({type(err).__name__}: {err}); it is kept at {self.path}",
                  file=sys.stderr)
            return
        os.remove(self.path)


_active: list[_Console] = []


def start(root: str, *, verbose: bool = False) -> None:
    """Hand the console to the job until it exits or :func:`stop` (see the module docstring)."""
    console = _Console(root, verbose)
    console.start()
    _active.append(console)


def stop() -> None:
    """End the job's console now (its log written to the run root), before the job's last write."""
    while _active:
        _active.pop().stop()
