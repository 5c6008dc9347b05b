"""Torch modules of irn-ray: ResNet backbone, CAM network, IRNet (nn.Modules only, no I/O)."""

from pipeline.models.backbone import (
    BackboneFeatures,
    FrozenBatchNorm2d,
    ResNetBackbone,
    build_backbone,
    extract_backbone_state,
    load_state_dict_file,
)
from pipeline.models.cam_net import CAMNet, build_cam_net
from pipeline.models.irnet import IRNet, IRNetInference, IRNetOutput, build_irnet

__all__ = [
    "BackboneFeatures",
    "CAMNet",
    "FrozenBatchNorm2d",
    "IRNet",
    "IRNetInference",
    "IRNetOutput",
    "ResNetBackbone",
    "build_backbone",
    "build_cam_net",
    "build_irnet",
    "extract_backbone_state",
    "load_state_dict_file",
]
