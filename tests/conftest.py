"""Shared fixture: one local Ray per test session (started only when a test asks for it)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("RAY_DATA_LOG_LEVEL", "WARNING")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@pytest.fixture(scope="session")
def ray_session():
    """One embedded Ray (2 CPUs) for the session, started the way the jobs start it."""
    import ray

    from pipeline.config import from_dict
    from pipeline.orchestrate import init_ray

    init_ray(from_dict({"ray": {"address": "local", "num_cpus": 2}}))
    yield ray
    ray.shutdown()
