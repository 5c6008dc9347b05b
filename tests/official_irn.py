"""The official IRNet networks (jiwoon-ahn/irn, net/resnet50_cam.py and net/resnet50_irn.py) as
test references: their module names, layer order and forward passes, written from that code's
description, so that a state dict of this layout is a state dict of the released code.

Not used by the pipeline. ``BatchNorm2d`` in eval mode normalises with its running statistics as
the official FixedBatchNorm always does; call ``.eval()`` before comparing outputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torchvision
from torch import nn


def official_resnet50() -> nn.Module:
    """ResNet-50 with strides (2, 2, 2, 1): torchvision's Bottleneck (stride on the 3x3 conv),
    layer4's first block and its downsample at stride 1, no fc used."""
    net = torchvision.models.resnet50(weights=None)
    net.layer4[0].conv2.stride = (1, 1)
    net.layer4[0].downsample[0].stride = (1, 1)
    del net.fc
    return net


class OfficialCAM(nn.Module):
    """net/resnet50_cam.py ``Net`` / ``CAM``: stage1 = conv1, bn1, relu, maxpool, layer1."""

    def __init__(self, num_classes: int = 20):
        super().__init__()
        self.resnet50 = official_resnet50()
        r = self.resnet50
        self.stage1 = nn.Sequential(r.conv1, r.bn1, r.relu, r.maxpool, r.layer1)
        self.stage2 = nn.Sequential(r.layer2)
        self.stage3 = nn.Sequential(r.layer3)
        self.stage4 = nn.Sequential(r.layer4)
        self.classifier = nn.Conv2d(2048, num_classes, 1, bias=False)
        self.backbone = nn.ModuleList([self.stage1, self.stage2, self.stage3, self.stage4])
        self.newly_added = nn.ModuleList([self.classifier])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage4(self.stage3(self.stage2(self.stage1(x))))
        return self.classifier(x.mean(dim=(2, 3), keepdim=True)).flatten(1)

    def cam(self, x: torch.Tensor) -> torch.Tensor:
        """``CAM.forward`` on [image, flipped image]: relu(conv(features, W)) of the image plus
        the flipped-back maps of the flip."""
        x = self.stage4(self.stage3(self.stage2(self.stage1(x))))
        x = F.relu(F.conv2d(x, self.classifier.weight))
        return x[0] + x[1].flip(-1)


class MeanShift(nn.Module):
    def __init__(self, num_features: int):
        super().__init__()
        self.register_buffer("running_mean", torch.zeros(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.training else x - self.running_mean.view(1, 2, 1, 1)


def _up(scale: int) -> nn.Upsample:
    return nn.Upsample(scale_factor=scale, mode="bilinear", align_corners=False)


class OfficialIRN(nn.Module):
    """net/resnet50_irn.py ``Net`` (edge and displacement branches, MeanShift inside fc_dp7)."""

    def __init__(self):
        super().__init__()
        self.resnet50 = official_resnet50()
        r = self.resnet50
        self.stage1 = nn.Sequential(r.conv1, r.bn1, r.relu, r.maxpool)
        self.stage2 = nn.Sequential(r.layer1)
        self.stage3 = nn.Sequential(r.layer2)
        self.stage4 = nn.Sequential(r.layer3)
        self.stage5 = nn.Sequential(r.layer4)
        self.mean_shift = MeanShift(2)
        gn_relu = lambda c, out, g: [nn.Conv2d(c, out, 1, bias=False), nn.GroupNorm(g, out)]  # noqa: E731
        self.fc_edge1 = nn.Sequential(*gn_relu(64, 32, 4), nn.ReLU(inplace=True))
        self.fc_edge2 = nn.Sequential(*gn_relu(256, 32, 4), nn.ReLU(inplace=True))
        self.fc_edge3 = nn.Sequential(*gn_relu(512, 32, 4), _up(2), nn.ReLU(inplace=True))
        self.fc_edge4 = nn.Sequential(*gn_relu(1024, 32, 4), _up(4), nn.ReLU(inplace=True))
        self.fc_edge5 = nn.Sequential(*gn_relu(2048, 32, 4), _up(4), nn.ReLU(inplace=True))
        self.fc_edge6 = nn.Conv2d(160, 1, 1, bias=True)
        self.fc_dp1 = nn.Sequential(*gn_relu(64, 64, 8), nn.ReLU(inplace=True))
        self.fc_dp2 = nn.Sequential(*gn_relu(256, 128, 16), nn.ReLU(inplace=True))
        self.fc_dp3 = nn.Sequential(*gn_relu(512, 256, 16), nn.ReLU(inplace=True))
        self.fc_dp4 = nn.Sequential(*gn_relu(1024, 256, 16), _up(2), nn.ReLU(inplace=True))
        self.fc_dp5 = nn.Sequential(*gn_relu(2048, 256, 16), _up(2), nn.ReLU(inplace=True))
        self.fc_dp6 = nn.Sequential(*gn_relu(768, 256, 16), _up(2), nn.ReLU(inplace=True))
        self.fc_dp7 = nn.Sequential(*gn_relu(448, 256, 16), nn.ReLU(inplace=True),
                                    nn.Conv2d(256, 2, 1, bias=False), self.mean_shift)
        self.backbone = nn.ModuleList([self.stage1, self.stage2, self.stage3, self.stage4, self.stage5])
        self.edge_layers = nn.ModuleList([self.fc_edge1, self.fc_edge2, self.fc_edge3, self.fc_edge4,
                                          self.fc_edge5, self.fc_edge6])
        self.dp_layers = nn.ModuleList([self.fc_dp1, self.fc_dp2, self.fc_dp3, self.fc_dp4, self.fc_dp5,
                                        self.fc_dp6, self.fc_dp7])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x1 = self.stage1(x).detach()
        x2 = self.stage2(x1).detach()
        x3 = self.stage3(x2).detach()
        x4 = self.stage4(x3).detach()
        x5 = self.stage5(x4).detach()
        edge1, edge2 = self.fc_edge1(x1), self.fc_edge2(x2)
        h, w = edge2.shape[2:]
        edge3 = self.fc_edge3(x3)[..., :h, :w]
        edge4 = self.fc_edge4(x4)[..., :h, :w]
        edge5 = self.fc_edge5(x5)[..., :h, :w]
        edge_out = self.fc_edge6(torch.cat([edge1, edge2, edge3, edge4, edge5], dim=1))
        dp1, dp2, dp3 = self.fc_dp1(x1), self.fc_dp2(x2), self.fc_dp3(x3)
        dp4 = self.fc_dp4(x4)[..., :dp3.size(2), :dp3.size(3)]
        dp5 = self.fc_dp5(x5)[..., :dp3.size(2), :dp3.size(3)]
        dp_up3 = self.fc_dp6(torch.cat([dp3, dp4, dp5], dim=1))[..., :dp2.size(2), :dp2.size(3)]
        dp_out = self.fc_dp7(torch.cat([dp1, dp2, dp_up3], dim=1))
        return edge_out, dp_out

    def edge_displacement(self, x: torch.Tensor, crop_size: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
        """``EdgeDisplacement.forward`` on [image, flipped image] of one image [2, 3, H, W]:
        pad right/bottom to crop_size with 0, run, crop to ceil(H/4) x ceil(W/4), fuse the edge
        logits of the image and the flipped-back flip, sigmoid; displacement of the image."""
        feat = ((x.size(2) - 1) // 4 + 1, (x.size(3) - 1) // 4 + 1)
        x = F.pad(x, [0, crop_size - x.size(3), 0, crop_size - x.size(2)])
        edge_out, dp_out = self.forward(x)
        edge_out = edge_out[..., :feat[0], :feat[1]]
        dp_out = dp_out[..., :feat[0], :feat[1]]
        edge = torch.sigmoid(edge_out[0] / 2 + edge_out[1].flip(-1) / 2)
        return edge, dp_out[0]
