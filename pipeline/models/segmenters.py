"""The models trained on a labels version (paper Sec. 6.3-6.4), as torchvision builds them.

* ``deeplab``: ``deeplabv3_resnet50`` (ResNet-50, output stride 8, ASPP), the closest maintained
  equivalent of the paper's DeepLab v2-ResNet-50 (torchvision has no v2);
* ``maskrcnn``: ``maskrcnn_resnet50_fpn`` (ResNet-50-FPN), the paper's Mask R-CNN.

Backbones start from ImageNet (``imagenet``, where torchvision can download it), a ResNet-50 state
dict file, or nothing (``none``: trained from scratch, every layer with updating BatchNorm).
Class ids 1..C are the model's classes 1..C; 0 is background.
"""

from __future__ import annotations

import io
from typing import BinaryIO

import torch
import torchvision
from torch import nn

MODELS = ("deeplab", "maskrcnn")


def _backbone_state(source: str | BinaryIO) -> dict[str, torch.Tensor]:
    from pipeline.models.backbone import extract_backbone_state, load_state_dict_file

    return extract_backbone_state(load_state_dict_file(source))


def build_segmenter(model: str, num_classes: int, *, backbone_init: str | BinaryIO = "none",
                    min_size: int = 800, max_size: int = 1333) -> nn.Module:
    """A torchvision segmenter for ``num_classes`` foreground classes (+ background).

    Args:
        model: 'deeplab' or 'maskrcnn'.
        backbone_init: 'imagenet', 'none', or a ResNet-50 state dict (path or binary file).
        min_size, max_size: Mask R-CNN's own input resizing (GeneralizedRCNNTransform).
    Returns: the model on CPU, float32, in train mode. DeepLab maps [B, 3, H, W] (normalised) to
        {"out": logits [B, C + 1, H, W]}; Mask R-CNN takes lists of [3, H, W] images in [0, 1].
    """
    imagenet = isinstance(backbone_init, str) and backbone_init == "imagenet"
    weights = torchvision.models.ResNet50_Weights.IMAGENET1K_V1 if imagenet else None
    from_file = not isinstance(backbone_init, str) or backbone_init not in ("none", "imagenet")
    if model == "maskrcnn" and from_file:
        # As torchvision builds it from ImageNet weights: frozen BatchNorm, the last 3 stages train
        # (detection batches are too small for BatchNorm statistics).
        from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
        from torchvision.ops import FrozenBatchNorm2d

        resnet = torchvision.models.resnet50(norm_layer=FrozenBatchNorm2d)
        _load_backbone(resnet, backbone_init)
        return torchvision.models.detection.MaskRCNN(_resnet_fpn_extractor(resnet, 3), num_classes=num_classes + 1,
                                                     min_size=min_size, max_size=max_size)
    if model == "deeplab":
        net = torchvision.models.segmentation.deeplabv3_resnet50(
            weights=None, weights_backbone=weights, num_classes=num_classes + 1, aux_loss=False)
        body = net.backbone
    elif model == "maskrcnn":
        net = torchvision.models.detection.maskrcnn_resnet50_fpn(
            weights=None, weights_backbone=weights, num_classes=num_classes + 1, min_size=min_size,
            max_size=max_size, trainable_backbone_layers=3 if imagenet else None)
        body = net.backbone.body
    else:
        raise ValueError(f"segmenter.model must be one of {MODELS}, got {model!r}")
    if from_file:
        _load_backbone(body, backbone_init)
    return net


def _load_backbone(body: nn.Module, source: str | BinaryIO) -> None:
    """Load a ResNet-50 state dict into ``body`` (its keys; BatchNorm counters are optional)."""
    state = _backbone_state(io.BytesIO(source.read()) if hasattr(source, "read") else source)
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    missing, unexpected = body.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if unexpected or len(missing) == len(body.state_dict()):
        raise ValueError(f"segmenter.backbone_init is not a ResNet-50 state dict ({len(unexpected)} unexpected, "
                         f"{len(missing)} missing keys)")
