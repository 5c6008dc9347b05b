"""The floors of ``.importlinter`` hold (import-linter; imports inside functions count), and the
contract catches what it is there for: a sideways import between stages and training, a circle."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _lint(directory: Path) -> subprocess.CompletedProcess:
    lint = Path(sys.executable).with_name("lint-imports")
    env = {**os.environ, "PYTHONPATH": str(directory)}
    return subprocess.run([str(lint)], cwd=directory, env=env, capture_output=True, text=True, timeout=300)


def test_the_floors_hold():
    result = _lint(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 kept, 0 broken" in result.stdout


@pytest.mark.parametrize("module, added, broken", [
    # a stage reaching into training from inside a function, as stages/cams.py once did for load_trained
    ("pipeline/stages/cams.py", "def _sideways():\n    from pipeline.train.common import fit_epochs\n",
     "pipeline.stages is not allowed to import pipeline.train"),
    # the ledger importing the driver that imports it: a circle
    ("pipeline/ledger.py", "def _circle():\n    from pipeline.orchestrate import run_label\n",
     "pipeline.ledger is not allowed to import pipeline.orchestrate"),
])
def test_the_contract_breaks_on_a_sideways_import_or_a_circle(tmp_path, module, added, broken):
    copy = tmp_path / "repo"
    for package in ("pipeline", "jobs"):
        shutil.copytree(ROOT / package, copy / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / ".importlinter", copy / ".importlinter")
    with open(copy / module, "a") as f:
        f.write("\n\n" + added)
    result = _lint(copy)
    assert result.returncode != 0 and broken in result.stdout, result.stdout + result.stderr
