"""State dicts of the official IRNet implementation (jiwoon-ahn/irn) -> this package's networks.

The official code saves ``model.module.state_dict()`` of ``net.resnet50_cam.Net`` (CAM) and of
``net.resnet50_irn.AffinityDisplacementLoss`` (IRNet). Every backbone tensor appears under
several aliases (``resnet50.*``, ``stage1..5.*``, ``backbone.*``; the branches also as
``edge_layers.*`` / ``dp_layers.*``); one alias set is enough:

=================================  ==========================================
official key                       this package (CAMNet / IRNet)
=================================  ==========================================
``resnet50.<torchvision name>``    ``backbone.<torchvision name>``
``classifier.weight``              ``classifier.weight``
``fc_edge1..5.{0,1}.*``            ``boundary_branch.reduce.0..4.{0,1}.*``
``fc_edge6.*``                     ``boundary_branch.head.*``
``fc_dp1..5.{0,1}.*``              ``displacement_branch.reduce.0..4.{0,1}.*``
``fc_dp6.{0,1}.*``                 ``displacement_branch.merge8.{0,1}.*``
``fc_dp7.{0,1}.*``                 ``displacement_branch.merge4.{0,1}.*``
``fc_dp7.3.weight``                ``displacement_branch.head.weight``
``mean_shift.running_mean``        ``mean_displacement``
=================================  ==========================================

The layer order and sizes are the same (conv → GroupNorm → upsample → ReLU), so a converted
state dict loads strictly and gives the official outputs (tests/test_official.py checks both
against a reference of the official modules). Tensors saved on CUDA are moved to the CPU.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

__all__ = ["is_official", "official_to_cam", "official_to_irn", "convert_official"]

_IRN_RULES = (
    (re.compile(r"^fc_edge([1-5])\.([01])\.(.+)$"), lambda m: f"boundary_branch.reduce.{int(m[1]) - 1}.{m[2]}.{m[3]}"),
    (re.compile(r"^fc_edge6\.(.+)$"), lambda m: f"boundary_branch.head.{m[1]}"),
    (re.compile(r"^fc_dp([1-5])\.([01])\.(.+)$"), lambda m: f"displacement_branch.reduce.{int(m[1]) - 1}.{m[2]}.{m[3]}"),
    (re.compile(r"^fc_dp6\.([01])\.(.+)$"), lambda m: f"displacement_branch.merge8.{m[1]}.{m[2]}"),
    (re.compile(r"^fc_dp7\.([01])\.(.+)$"), lambda m: f"displacement_branch.merge4.{m[1]}.{m[2]}"),
    (re.compile(r"^fc_dp7\.3\.weight$"), lambda m: "displacement_branch.head.weight"),
    (re.compile(r"^mean_shift\.running_mean$"), lambda m: "mean_displacement"),
)


def _strip_wrappers(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.removeprefix("module."): v for k, v in state_dict.items()}


def is_official(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """Whether ``state_dict`` has the official layout (``resnet50.*`` backbone keys)."""
    return any(k.removeprefix("module.").startswith("resnet50.") for k in state_dict)


def _backbone(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {"backbone." + k[len("resnet50."):]: v.detach().cpu() for k, v in state.items()
            if k.startswith("resnet50.") and not k.startswith("resnet50.fc.")}


def official_to_cam(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An official CAM network state dict as a :class:`~pipeline.models.cam_net.CAMNet` one."""
    state = _strip_wrappers(state_dict)
    if "classifier.weight" not in state:
        raise ValueError("not an official CAM network state dict: no classifier.weight")
    return {**_backbone(state), "classifier.weight": state["classifier.weight"].detach().cpu()}


def official_to_irn(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An official IRNet (``AffinityDisplacementLoss`` / ``EdgeDisplacement``) state dict as an
    :class:`~pipeline.models.irnet.IRNet` one."""
    state = _strip_wrappers(state_dict)
    out = _backbone(state)
    for key, value in state.items():
        for pattern, target in _IRN_RULES:
            match = pattern.match(key)
            if match:
                out[target(match)] = value.detach().cpu()
                break
    if "mean_displacement" not in out or "boundary_branch.head.weight" not in out:
        raise ValueError("not an official IRNet state dict: no fc_edge6 / mean_shift entries")
    return out


def convert_official(state_dict: Mapping[str, torch.Tensor], network: str) -> dict[str, torch.Tensor]:
    """``state_dict`` of ``network`` ('cam' or 'irn') in this package's layout, converted when it
    has the official one."""
    if not is_official(state_dict):
        return dict(state_dict)
    return official_to_cam(state_dict) if network == "cam" else official_to_irn(state_dict)
