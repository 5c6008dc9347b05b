"""`make gpu-check` on a machine without a GPU: one clear line, exit status 0."""

import runpy
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: make gpu-check measures it")
def test_gpu_check_says_so_without_a_gpu(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", [str(SCRIPT)])
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(SCRIPT), run_name="__main__")
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == (
        "gpu-check: no CUDA GPU on this machine (torch.cuda.is_available() is False); nothing measured.")
