"""Shared fixtures: one local Ray per test session, and one labelled run of the hostile data set
(each started only when a test asks for it)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("RAY_DATA_LOG_LEVEL", "WARNING")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Ray Train's controller looks at its workers every 2 s by default: ~1.5 s lost per training run.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")


@pytest.fixture(scope="session")
def ray_session():
    """One embedded Ray (2 CPUs) for the session, started the way the jobs start it."""
    import ray

    from pipeline.config import from_dict
    from pipeline.tasks import init_ray

    init_ray(from_dict({"ray": {"address": "local", "num_cpus": 2}}))
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def labelled(tmp_path_factory, ray_session):
    """jobs.label once over the hostile data set (tests/hostile.py) with the tiny settings.

    Used by tests/test_label_job.py (which inspects it) and tests/test_interruption.py (its
    reference: an uninterrupted run). ``outputs`` is taken right after the run, before any test
    reruns the job in this root.
    """
    from hostile import files_outside, hostile_manifest, tiny_config
    from support import label_outputs

    from jobs import label

    tmp = str(tmp_path_factory.mktemp("label"))
    root = f"{tmp}/run"
    manifest, manifest_quarantine = hostile_manifest(tmp, 10)
    args = sum((["--set", o] for o in tiny_config(tmp, manifest)), [])
    before = files_outside(tmp, root)
    state = label.main(args)
    return {"tmp": tmp, "root": root, "args": args, "state": state, "manifest": manifest,
            "manifest_quarantine": manifest_quarantine, "outside_before": before,
            "outside_after": files_outside(tmp, root), "basetemp": str(tmp_path_factory.getbasetemp()),
            "outputs": label_outputs(root)}
