"""Progress a person can read: one line per stage with done/total, rate and ETA, and a summary table.

Lines go through ``logging`` (logger ``irn-ray``), at most one per ``every_seconds`` per stage, plus
one when the stage finishes. Inside Ray workers, our loggers write :data:`WORKER_LINE_FORMAT`, so
the driver can tell our lines from Ray's among the worker output it receives
(:func:`parse_worker_line`).
"""

from __future__ import annotations

import logging
import re
import time
from typing import Any

log = logging.getLogger("irn-ray")
OUR_LOGGERS = ("irn-ray", "pipeline", "jobs")  # the lines of this project, on the driver and in workers
WORKER_LINE_FORMAT = "irn-ray %(levelname)s %(name)s: %(message)s"
_WORKER_LINE = re.compile(r"^irn-ray (DEBUG|INFO|WARNING|ERROR|CRITICAL) ([\w.-]+): (.*)$", re.DOTALL)


def parse_worker_line(line: str) -> tuple[int, str, str] | None:
    """(level, logger name, message) of a worker output line written in WORKER_LINE_FORMAT, else None."""
    match = _WORKER_LINE.match(line)
    if match is None:
        return None
    return logging.getLevelName(match.group(1)), match.group(2), match.group(3)


def counts_text(counts: dict[str, Any]) -> str:
    """'images 14, skipped 0, miou 0.069': a stage's counts as a person reads them (floats
    to three decimals, nested values left out)."""
    return ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in counts.items()
                     if not isinstance(v, (dict, list)))


def duration(seconds: float | None) -> str:
    """12.3 -> '12s', 754 -> '12m34s', 8000 -> '2h13m'."""
    if seconds is None:
        return "-"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class StageProgress:
    """Counts finished items of one stage and logs ``stage: done/total unit (pct), rate, ETA``."""

    def __init__(self, stage: str, total: int, *, unit: str = "images", every_seconds: float = 10.0):
        self.stage, self.total, self.unit, self.every = stage, total, unit, every_seconds
        self.done = 0
        self.t0 = self.last = time.perf_counter()

    def add(self, count: int) -> None:
        self.done += count
        now = time.perf_counter()
        if now - self.last >= self.every or self.done >= self.total:
            self.last = now
            log.info(self.line())

    def line(self) -> str:
        elapsed = time.perf_counter() - self.t0
        rate = self.done / elapsed if elapsed > 0 else 0.0
        pct = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        eta = (self.total - self.done) / rate if rate > 0 and self.total >= self.done else None
        return (f"{self.stage}: {self.done}/{self.total} {self.unit}{pct}, {rate:.2f} {self.unit}/s, "
                f"ETA {duration(eta)}")


def summary_table(stages: dict[str, dict[str, Any]], order: tuple[str, ...]) -> str:
    """A plain-text table of the stages of ``run.json``: status, seconds and the main counts."""
    rows = [("stage", "status", "time", "counts")]
    for name in order:
        info = stages.get(name)
        if not info:
            continue
        shown = counts_text(info.get("counts") or {})
        rows.append((name, str(info.get("status", "-")), duration(info.get("seconds")), shown))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join(f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:>{widths[2]}}  {r[3]}" for r in rows)
