"""Shared fixtures: one local Ray per test session (started only when a test asks for it)."""

from __future__ import annotations

import logging
import os

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("RAY_DATA_LOG_LEVEL", "WARNING")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def _quiet() -> None:
    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(
        logging.ERROR)


@pytest.fixture(scope="session")
def ray_session():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False,
             object_store_memory=512 * 2**20, runtime_env={"worker_process_setup_hook": _quiet})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def synthetic_set(tmp_path_factory):
    """A small synthetic set (24 images, 4 classes) shared by the tests; returns the manifest URI."""
    from pipeline.data.synthetic import write_synthetic_set

    out = tmp_path_factory.mktemp("synthetic")
    return write_synthetic_set(str(out), num_images=24, seed=7, num_classes=4, min_size=64, max_size=96)
