"""Classification network that produces Class Activation Maps (IRNet Sec. 3, Eq. 1).

ResNet backbone (output stride 16, frozen BatchNorm statistics) followed by global average
pooling and a bias-free 1×1 conv classifier. Gradients stop below ``layer3``: the ``layer2``
output is detached and conv1, bn1, layer1 and layer2 have ``requires_grad=False``.
The training loss (multilabel soft margin) and CAM post-processing (flip/scale fusion,
normalisation) live outside this module.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.models.backbone import ResNetBackbone, WeightsSource, build_backbone

__all__ = ["CAMNet", "build_cam_net"]

# Backbone levels whose parameters never train and whose output is detached (L1..L3).
_FROZEN_LEVELS = 3


class CAMNet(nn.Module):
    """Backbone + GAP + 1×1 conv classifier without bias.

    Input images are ImageNet-normalised float [B, 3, H, W] (normalisation is the data
    pipeline's job). ``h16 = ceil(H/16)``, ``w16 = ceil(W/16)``.

    Attributes:
        backbone: ResNetBackbone (conv1..layer2 frozen).
        classifier: nn.Conv2d(c5, num_classes, 1, bias=False).
        num_classes: number of foreground classes C.
    """

    def __init__(self, backbone: ResNetBackbone, *, num_classes: int, frozen_levels: int = _FROZEN_LEVELS) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.backbone = backbone
        self.num_classes = num_classes
        self.frozen_levels = frozen_levels
        self.classifier = nn.Conv2d(backbone.channels[4], num_classes, kernel_size=1, bias=False)
        levels = ((backbone.conv1, backbone.bn1), (backbone.layer1,), (backbone.layer2,), (backbone.layer3,))
        for modules in levels[:frozen_levels]:
            for module in modules:
                for p in module.parameters():
                    p.requires_grad_(False)

    def _l5(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x, detach_below=self.frozen_levels).l5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits.

        Args:
            x: float [B, 3, H, W], ImageNet-normalised.

        Returns:
            float [B, C] logits (dtype follows the computation, e.g. bf16 under autocast).
        """
        pooled = self._l5(x).mean(dim=(2, 3), keepdim=True)
        return self.classifier(pooled).flatten(1)

    def cam_maps(self, x: torch.Tensor) -> torch.Tensor:
        """Unnormalised class activation maps ReLU(W_c · f(x)) at stride 16 (no pooling).

        Args:
            x: float [B, 3, H, W], ImageNet-normalised.

        Returns:
            float [B, C, ceil(H/16), ceil(W/16)], values >= 0.
        """
        return F.relu(F.conv2d(self._l5(x), self.classifier.weight))

    def parameter_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(trainable backbone parameters (layer3, layer4), classifier parameters).

        The first group takes the base learning rate, the second 10× (DESIGN §4).
        """
        backbone = [p for p in self.backbone.parameters() if p.requires_grad]
        return backbone, list(self.classifier.parameters())


def build_cam_net(
    *,
    num_classes: int,
    depth: int = 50,
    backbone_init: WeightsSource = "none",
    state_dict: Mapping[str, torch.Tensor] | None = None,
    from_scratch: bool = False,
) -> CAMNet:
    """Build a CAMNet.

    Args:
        num_classes: number of foreground classes C.
        depth: ResNet depth, 18/34/50/101 (50 in the paper).
        backbone_init: ``"none"``, ``"imagenet"``, or a backbone state-dict path / binary file
            object (see ``build_backbone``).
        state_dict: optional full CAMNet state dict (e.g. a trained checkpoint) loaded strictly
            after construction; overrides ``backbone_init``.
        from_scratch: train every layer with updating BatchNorm statistics (no gradient stop,
            no frozen statistics). The paper's recipe assumes ImageNet weights; without any
            pretrained weights, frozen random statistics and frozen random early layers would
            leave the network unable to learn. Its state dict loads into the paper-mode net.

    Returns:
        CAMNet on CPU in float32.
    """
    net = CAMNet(build_backbone(depth=depth, init=backbone_init, batch_norm=from_scratch),
                 num_classes=num_classes, frozen_levels=0 if from_scratch else _FROZEN_LEVELS)
    if state_dict is not None:
        net.load_state_dict(state_dict, strict=True)
    return net
