"""The quality gate's rules on hand-made held-out measurements (the end-to-end stop, exit status 3
with LATEST untouched, is in tests/test_label_job.py)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from pipeline.config import load_config
from pipeline.train.cam import QualityGateError, cam_skill, quality_gate


def _run(held_out: dict, *overrides: str, final_loss: float = 0.2, chance_loss: float = 0.6):
    stage = {"held_out": held_out, "counts": {"final_loss": final_loss}, "chance_loss": chance_loss}
    state = SimpleNamespace(stage=lambda name: stage if name == "train_cam" else {})
    return SimpleNamespace(cfg=load_config("configs/demo.yaml", list(overrides)), state=state)


def test_skill_is_the_share_of_the_way_from_chance_to_perfect():
    assert cam_skill({"map": 0.5, "chance": 0.5}) == 0
    assert cam_skill({"map": 1.0, "chance": 0.3}) == 1
    assert cam_skill({"map": 0.823, "chance": 0.542}) == pytest.approx(0.281 / 0.458)


@pytest.mark.parametrize("measured, stops, named", [
    ({"images": 16, "map": 0.961, "chance": 0.5}, False, None),   # skill 0.92: labels of mIoU ~0.5
    ({"images": 16, "map": 0.871, "chance": 0.5}, True, "run.min_cam_skill"),  # 0.74: mIoU ~0.3
    ({"images": 16, "map": 0.823, "chance": 0.542}, True, "run.min_cam_skill"),  # 0.61
    ({"images": 16, "map": 0.55, "chance": 0.1}, True, "run.min_cam_map"),  # absolute floor first
    ({"images": 0}, False, None),  # nothing to measure on: not checked (a warning)
])
def test_gate_stops_below_either_threshold(measured, stops, named):
    if not stops:
        quality_gate(_run(measured))
        return
    with pytest.raises(QualityGateError) as err:
        quality_gate(_run(measured))
    assert str(err.value).startswith("quality gate:") and named in str(err.value)


def test_near_chance_loss_stops_and_min_cam_map_zero_turns_the_gate_off():
    good = {"images": 16, "map": 0.99, "chance": 0.5}
    with pytest.raises(QualityGateError, match="chance"):
        quality_gate(_run(good, final_loss=0.59, chance_loss=0.6))
    quality_gate(_run({"images": 16, "map": 0.3, "chance": 0.5}, "run.min_cam_map=0", final_loss=0.6))
    quality_gate(_run({"images": 16, "map": 0.3, "chance": 0.5}, "cams.source=/x", "train_irn.backbone_init=none"))
