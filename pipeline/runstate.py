"""``run.json``: the run root's record of config, package versions, per-stage status and labels.

Every change is written at once (atomically), so an interrupted run leaves an accurate record that
the next run resumes from.
"""

from __future__ import annotations

import json
import math
import platform
import time
from importlib import metadata
from typing import Any

from pipeline.io import layout, storage

PACKAGES = ("torch", "torchvision", "ray", "numpy", "pyarrow", "fsspec", "pillow", "pydensecrf2", "pycocotools")


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    from pipeline import __version__

    versions["irn-ray"] = __version__
    return versions


def to_json_safe(value: Any) -> Any:
    """NaN/inf -> None, tuples -> lists, numpy scalars -> Python, recursively (strict JSON)."""
    if isinstance(value, dict):
        return {str(k): to_json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json_safe(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class RunState:
    """Load, update and save ``<root>/run.json``."""

    def __init__(self, root: str):
        self.uri = layout.run_json(root)
        self.data: dict[str, Any] = (json.loads(storage.read_text(self.uri)) if storage.exists(self.uri)
                                     else {"stages": {}, "labels": {"versions": {}, "pending": None}})

    def stage(self, name: str) -> dict[str, Any]:
        return self.data["stages"].setdefault(name, {})

    def update_stage(self, name: str, **fields: Any) -> None:
        self.stage(name).update(fields, updated=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        self.save()

    @property
    def labels(self) -> dict[str, Any]:
        return self.data["labels"]

    def save(self) -> None:
        storage.write_text(self.uri, json.dumps(to_json_safe(self.data), indent=2, sort_keys=True))
