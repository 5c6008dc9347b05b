"""The models trained on a labels version (paper Sec. 6.3-6.4), as torchvision builds them.

* ``deeplab``: ``deeplabv3_resnet50`` (ResNet-50, output stride 8, ASPP), the closest maintained
  equivalent of the paper's DeepLab v2-ResNet-50 (torchvision has no v2);
* ``maskrcnn``: ``maskrcnn_resnet50_fpn`` (ResNet-50-FPN), the paper's Mask R-CNN.

``depth=18`` builds the same heads on a ResNet-18 body for small runs: Mask R-CNN through
torchvision's FPN extractor, with the FPN and the mask head at half width (128 channels);
DeepLab's ASPP head on a ResNet-18 at output stride 8 (the stride of layer3 and layer4 set to 1:
torchvision's BasicBlock has no dilation, so the receptive field is smaller than ResNet-50's
dilated one).

Backbones start from ImageNet (``imagenet``, where torchvision can download it), a ResNet state
dict file of the same depth (e.g. the run's CAM network: ``segmenter.backbone_init: cam``), or
nothing (``none``: trained from scratch, every layer with updating BatchNorm).
Class ids 1..C are the model's classes 1..C; 0 is background.
"""

from __future__ import annotations

import io
from typing import BinaryIO

import torch
from torch import nn

from pipeline.models.backbone import extract_backbone_state, load_state_dict_file

MODELS = ("deeplab", "maskrcnn")
DEPTHS = (18, 50)


def _backbone_state(source: str | BinaryIO) -> dict[str, torch.Tensor]:
    return extract_backbone_state(load_state_dict_file(source))


def build_segmenter(model: str, num_classes: int, *, depth: int = 50, backbone_init: str | BinaryIO = "none",
                    min_size: int = 800, max_size: int = 1333, rpn_proposals: int = 2000,
                    roi_samples: int = 512) -> nn.Module:
    """A torchvision segmenter for ``num_classes`` foreground classes (+ background).

    Args:
        model: 'deeplab' or 'maskrcnn'.
        depth: 50 (the paper's) or 18 (small runs).
        backbone_init: 'imagenet', 'none', or a ResNet state dict of ``depth`` (path or binary file).
        min_size, max_size: Mask R-CNN's own input resizing (GeneralizedRCNNTransform).
        rpn_proposals, roi_samples: Mask R-CNN's training proposals kept after NMS per image and
            RoIs sampled from them for the box and mask heads (torchvision's 2000 and 512).
    Returns: the model on CPU, float32, in train mode. DeepLab maps [B, 3, H, W] (normalised) to
        {"out": logits [B, C + 1, H, W]}; Mask R-CNN takes lists of [3, H, W] images in [0, 1].
    """
    import torchvision  # here: only the processes that build a segmenter pay its import

    if model not in MODELS:
        raise ValueError(f"segmenter.model must be one of {MODELS}, got {model!r}")
    if depth not in DEPTHS:
        raise ValueError(f"segmenter.depth must be one of {DEPTHS}, got {depth!r}")
    imagenet = isinstance(backbone_init, str) and backbone_init == "imagenet"
    from_file = not isinstance(backbone_init, str) or backbone_init not in ("none", "imagenet")
    resnet = getattr(torchvision.models, f"resnet{depth}")
    weights = torchvision.models.get_model_weights(resnet).IMAGENET1K_V1 if imagenet else None
    detection = {"min_size": min_size, "max_size": max_size, "rpn_post_nms_top_n_train": rpn_proposals,
                 "box_batch_size_per_image": roi_samples}
    if model == "maskrcnn" and (from_file or depth != 50):
        # As torchvision builds it from pretrained weights: frozen BatchNorm, the last 3 stages train
        # (detection batches are too small for BatchNorm statistics); from scratch every stage
        # trains with updating BatchNorm, as maskrcnn_resnet50_fpn does without weights.
        from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
        from torchvision.ops import FrozenBatchNorm2d

        pretrained = from_file or imagenet
        body = resnet(weights=weights, norm_layer=FrozenBatchNorm2d if pretrained else nn.BatchNorm2d)
        if from_file:
            _load_backbone(body, backbone_init, depth)
        backbone = _resnet_fpn_extractor(body, 3 if pretrained else 5)
        if depth == 50:
            return torchvision.models.detection.MaskRCNN(backbone, num_classes=num_classes + 1, **detection)
        return _half_width_maskrcnn(backbone, num_classes + 1, detection)
    if model == "deeplab" and depth == 18:
        from torchvision.models._utils import IntermediateLayerGetter
        from torchvision.models.segmentation.deeplabv3 import DeepLabHead, DeepLabV3

        body = resnet(weights=weights)
        for layer in (body.layer3, body.layer4):  # output stride 8
            layer[0].conv1.stride = (1, 1)
            layer[0].downsample[0].stride = (1, 1)
        if from_file:
            _load_backbone(body, backbone_init, depth)
        return DeepLabV3(IntermediateLayerGetter(body, {"layer4": "out"}), DeepLabHead(512, num_classes + 1))
    if model == "deeplab":
        net = torchvision.models.segmentation.deeplabv3_resnet50(
            weights=None, weights_backbone=weights, num_classes=num_classes + 1, aux_loss=False)
        body = net.backbone
    else:
        net = torchvision.models.detection.maskrcnn_resnet50_fpn(
            weights=None, weights_backbone=weights, num_classes=num_classes + 1,
            trainable_backbone_layers=3 if imagenet else None, **detection)
        body = net.backbone.body
    if from_file:
        _load_backbone(body, backbone_init, depth)
    return net


def _half_width_maskrcnn(backbone: nn.Module, num_classes: int, detection: dict) -> nn.Module:
    """Mask R-CNN on a ResNet-18 FPN body with the FPN and the mask head at 128 channels (torchvision's
    are 256): on 2 CPU cores it trains 2.7x and predicts 2.4x faster (benchmarks/segmenter_width.py),
    the box head (1024-d) and every other setting as torchvision's."""
    import torchvision
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
    from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
    from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool

    width = 128
    backbone.fpn = FeaturePyramidNetwork([64, 128, 256, 512], width, extra_blocks=LastLevelMaxPool())
    backbone.out_channels = width
    return torchvision.models.detection.MaskRCNN(
        backbone, num_classes=None, box_predictor=FastRCNNPredictor(1024, num_classes),
        mask_head=MaskRCNNHeads(width, (width,) * 4, 1), mask_predictor=MaskRCNNPredictor(width, width, num_classes),
        **detection)


def _load_backbone(body: nn.Module, source: str | BinaryIO, depth: int) -> None:
    """Load a ResNet-``depth`` state dict into ``body`` (its keys; BatchNorm counters are optional)."""
    state = _backbone_state(io.BytesIO(source.read()) if hasattr(source, "read") else source)
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    try:
        missing, unexpected = body.load_state_dict(state, strict=False)
    except RuntimeError as err:  # same keys, other shapes: another depth
        raise ValueError(f"segmenter.backbone_init is not a ResNet-{depth} state dict; set segmenter.depth to the "
                         f"weights' depth ({str(err).splitlines()[-1].strip()[:120]})") from None
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if unexpected or len(missing) == len(body.state_dict()):
        raise ValueError(f"segmenter.backbone_init is not a ResNet-{depth} state dict ({len(unexpected)} unexpected, "
                         f"{len(missing)} missing keys); set segmenter.depth to the weights' depth")
