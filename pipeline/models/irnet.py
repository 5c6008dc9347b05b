"""Inter-pixel Relation Network (IRNet, Sec. 4.1): class-boundary and displacement-field branches.

Both branches read the five levels of a frozen ResNet backbone (no gradient, frozen BatchNorm;
see ``pipeline.models.backbone``) and predict on the stride-4 grid. For an input of H×W that
grid is exactly ``h × w = ceil(H/4) × ceil(W/4)`` (the size of L1/L2; coarser levels are
upsampled by 2 or 4, which gives at least that many cells, and cropped bottom/right).

The backbone is IRNet's own: ImageNet weights by default, as in the official code
(``train_irn.backbone_init``); the trained CAM network's backbone (``cam_state_dict``) is an
option for runs without pretrained weights, and ``from_scratch`` trains it too (updating BatchNorm).

Displacement channels are ordered (dy, dx), in stride-4 grid cells. Losses live elsewhere.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.models.backbone import (
    ResNetBackbone,
    WeightsSource,
    build_backbone,
    extract_backbone_state,
)

__all__ = ["IRNet", "IRNetInference", "IRNetOutput", "build_irnet"]


class IRNetOutput(NamedTuple):
    """Raw IRNet outputs for an input [B, 3, H, W]; h = ceil(H/4), w = ceil(W/4).

    boundary_logits: [B, 1, h, w] class-boundary logits (sigmoid gives B in [0, 1]).
    displacement: [B, 2, h, w] displacement (dy, dx) in grid cells; ``mean_displacement`` is
        already subtracted when the model is in eval mode.
    """

    boundary_logits: torch.Tensor
    displacement: torch.Tensor


class IRNetInference(NamedTuple):
    """Flip-fused IRNet inference result (float32).

    boundary: [h, w] (or [B, h, w] for batched input) class-boundary probability in [0, 1].
    displacement: [2, h, w] (or [B, 2, h, w]) displacement (dy, dx) minus the mean displacement.
    """

    boundary: torch.Tensor
    displacement: torch.Tensor


def _conv_gn_relu(in_ch: int, out_ch: int, groups: int, upsample: int = 1) -> nn.Sequential:
    """1×1 conv (no bias) → GroupNorm → [bilinear ×upsample] → ReLU, the official order: the
    upsampling interpolates normalised features before the ReLU. Indices 0 (conv) and 1 (GN)
    are those of the official modules, so their state dicts map one to one."""
    layers: list[nn.Module] = [nn.Conv2d(in_ch, out_ch, kernel_size=1, bias=False), nn.GroupNorm(groups, out_ch)]
    if upsample > 1:
        layers.append(nn.Upsample(scale_factor=upsample, mode="bilinear", align_corners=False))
    return nn.Sequential(*layers, nn.ReLU(inplace=True))


def _crop_to(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Crop bottom/right to ``like``'s spatial size (upsampled coarse levels can be larger)."""
    return x[..., : like.shape[-2], : like.shape[-1]]


class BoundaryBranch(nn.Module):
    """Per level 1×1 conv → 32 ch + GN(4) (+ ×2 / ×4 upsampling for L3 / L4, L5) + ReLU, cropped
    to the stride-4 grid; concat (160); 1×1 → 1 logit (official fc_edge1..6).

    Input: BackboneFeatures-like (l1..l5). Output: float [B, 1, ceil(H/4), ceil(W/4)].
    """

    _UPSAMPLE = (1, 1, 2, 4, 4)

    def __init__(self, channels: tuple[int, int, int, int, int]) -> None:
        super().__init__()
        self.reduce = nn.ModuleList(_conv_gn_relu(c, 32, 4, s) for c, s in zip(channels, self._UPSAMPLE))
        self.head = nn.Conv2d(32 * 5, 1, kernel_size=1, bias=True)

    def forward(self, feats) -> torch.Tensor:
        """feats: 5 tensors (L1..L5) -> boundary logits [B, 1, h, w]."""
        grid = feats[1]
        parts = [_crop_to(m(f), grid) for m, f in zip(self.reduce, feats)]
        return self.head(torch.cat(parts, dim=1))


class DisplacementBranch(nn.Module):
    """Top-down displacement decoder (DESIGN §4, official fc_dp1..7).

    Per level 1×1 conv (64, 128, 256, 256, 256 ch) + GN(8, 16, 16, 16, 16) (+ ×2 upsampling for
    L4, L5) + ReLU; concat L3..L5 at stride 8 (768) → 1×1 256 + GN(16) + ×2 + ReLU to stride 4;
    concat with L1, L2 (448) → 1×1 256 + GN(16) + ReLU → 1×1 to 2 channels (no bias, no activation).

    Input: BackboneFeatures-like (l1..l5). Output: float [B, 2, ceil(H/4), ceil(W/4)], (dy, dx).
    """

    _WIDTHS = (64, 128, 256, 256, 256)
    _GROUPS = (8, 16, 16, 16, 16)
    _UPSAMPLE = (1, 1, 1, 2, 2)

    def __init__(self, channels: tuple[int, int, int, int, int]) -> None:
        super().__init__()
        self.reduce = nn.ModuleList(
            _conv_gn_relu(c, w, g, s) for c, w, g, s in zip(channels, self._WIDTHS, self._GROUPS, self._UPSAMPLE)
        )
        self.merge8 = _conv_gn_relu(sum(self._WIDTHS[2:]), 256, 16, upsample=2)
        self.merge4 = _conv_gn_relu(sum(self._WIDTHS[:2]) + 256, 256, 16)
        self.head = nn.Conv2d(256, 2, kernel_size=1, bias=False)

    def forward(self, feats) -> torch.Tensor:
        """feats: 5 tensors (L1..L5) -> displacement [B, 2, h, w]."""
        d1, d2, d3, d4, d5 = (m(f) for m, f in zip(self.reduce, feats))
        s8 = torch.cat([d3, _crop_to(d4, d3), _crop_to(d5, d3)], dim=1)
        s4 = self.merge4(torch.cat([d1, d2, _crop_to(self.merge8(s8), d2)], dim=1))
        return self.head(s4)


class IRNet(nn.Module):
    """IRNet: frozen backbone + boundary branch + displacement branch.

    The backbone never receives gradients: its parameters have ``requires_grad=False`` and its
    features are computed under ``torch.no_grad()``. Inputs are ImageNet-normalised float
    [B, 3, H, W]; outputs live on the grid h × w = ceil(H/4) × ceil(W/4).

    Attributes:
        backbone: ResNetBackbone (frozen).
        boundary_branch: BoundaryBranch.
        displacement_branch: DisplacementBranch.
        mean_displacement: float32 buffer [2] (dy, dx), zeros until ``set_mean_displacement``;
            subtracted from the displacement in eval mode and in ``infer``, never in training.
    """

    def __init__(self, backbone: ResNetBackbone, *, train_backbone: bool = False) -> None:
        super().__init__()
        self.backbone = backbone
        self.train_backbone = train_backbone
        for p in self.backbone.parameters():
            p.requires_grad_(train_backbone)
        self.boundary_branch = BoundaryBranch(backbone.channels)
        self.displacement_branch = DisplacementBranch(backbone.channels)
        self.register_buffer("mean_displacement", torch.zeros(2))

    def _raw(self, x: torch.Tensor) -> IRNetOutput:
        with torch.set_grad_enabled(self.train_backbone and torch.is_grad_enabled()):
            feats = self.backbone(x)
        return IRNetOutput(self.boundary_branch(feats), self.displacement_branch(feats))

    def _centre(self, displacement: torch.Tensor) -> torch.Tensor:
        mean = self.mean_displacement.to(displacement.dtype).view(1, 2, 1, 1)
        return displacement - mean

    def forward(self, x: torch.Tensor) -> IRNetOutput:
        """Predict boundary logits and displacement.

        Args:
            x: float [B, 3, H, W], ImageNet-normalised.

        Returns:
            IRNetOutput(boundary_logits [B, 1, h, w], displacement [B, 2, h, w]) with
            h = ceil(H/4), w = ceil(W/4); dtype follows the computation (bf16 under autocast).
            In eval mode the displacement has ``mean_displacement`` subtracted; in train mode not.
        """
        out = self._raw(x)
        if self.training:
            return out
        return IRNetOutput(out.boundary_logits, self._centre(out.displacement))

    @torch.no_grad()
    def infer(self, image: torch.Tensor, *, pad_to: int | None = None) -> IRNetInference:
        """IRNet inference at scale 1.0 with flip fusion (DESIGN §4 "IRNet inference").

        Runs the image and its horizontal flip as one batch: boundary = sigmoid(mean of the
        boundary logits of the image and of the flipped-back flip); displacement from the
        unflipped image minus ``mean_displacement``. Independent of train/eval mode.

        Args:
            image: float [3, H, W] or [B, 3, H, W], ImageNet-normalised.
            pad_to: optional; zero-pad the input (and its flip) bottom/right to at least
                pad_to × pad_to before the network, as the official inference pads to the 512
                training crop so GroupNorm sees inputs like those in training; outputs are
                cropped back.

        Returns:
            IRNetInference(boundary [h, w] or [B, h, w] in [0, 1],
            displacement [2, h, w] or [B, 2, h, w]), float32, h = ceil(H/4), w = ceil(W/4).
        """
        single = image.dim() == 3
        x = image.unsqueeze(0) if single else image
        if x.dim() != 4:
            raise ValueError(f"image must be [3,H,W] or [B,3,H,W], got {tuple(image.shape)}")
        n, _, height, width = x.shape
        pad = pad_to or 0
        padded = F.pad(x, (0, max(pad - width, 0), 0, max(pad - height, 0)))
        results = self.infer_padded(padded, [(height, width)] * n)
        boundary = torch.stack([r.boundary for r in results])
        displacement = torch.stack([r.displacement for r in results])
        if single:
            return IRNetInference(boundary[0], displacement[0])
        return IRNetInference(boundary, displacement)

    @torch.no_grad()
    def infer_padded(self, padded: torch.Tensor, sizes: list[tuple[int, int]]) -> list[IRNetInference]:
        """:meth:`infer` of a batch of images of different sizes, each zero-padded bottom/right
        to a common size (so one forward serves them all).

        Args:
            padded: float [B, 3, Hp, Wp]; image i occupies [:, :H_i, :W_i], zeros elsewhere.
            sizes: B pairs (H_i, W_i).

        Returns:
            one IRNetInference per image: boundary [h_i, w_i], displacement [2, h_i, w_i], float32.
            Each flip is the flip of the image content, padded on its right like the image.
        """
        flips = torch.zeros_like(padded)
        for i, (height, width) in enumerate(sizes):
            flips[i, :, :height, :width] = padded[i, :, :height, :width].flip(-1)
        out = self._raw(torch.cat([padded, flips]))
        logits, n = out.boundary_logits[:, 0].float(), len(sizes)
        results = []
        for i, (height, width) in enumerate(sizes):
            h, w = -(-height // 4), -(-width // 4)
            boundary = torch.sigmoid((logits[i, :h, :w] + logits[n + i, :h, :w].flip(-1)) / 2)
            displacement = self._centre(out.displacement[i : i + 1, :, :h, :w].float())[0]
            results.append(IRNetInference(boundary, displacement))
        return results

    def set_mean_displacement(self, mean: torch.Tensor) -> None:
        """Store the training-set mean displacement, float [2] (dy, dx), in grid cells."""
        mean = torch.as_tensor(mean)
        if mean.shape != (2,):
            raise ValueError(f"mean displacement must have shape [2], got {tuple(mean.shape)}")
        self.mean_displacement.copy_(mean.detach())

    def parameter_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(boundary branch parameters, displacement branch parameters).

        Trained with lr 0.1 and 1.0 respectively (DESIGN §4). The backbone joins the first group
        only when it trains (``train_backbone``: runs without pretrained weights).
        """
        backbone = list(self.backbone.parameters()) if self.train_backbone else []
        return backbone + list(self.boundary_branch.parameters()), list(self.displacement_branch.parameters())

    def load_backbone_from_cam(self, cam_state_dict: Mapping[str, torch.Tensor]) -> None:
        """Initialise the backbone from a trained CAMNet state dict (``backbone.*`` entries).

        Strict: every backbone key must be present. Branches and ``mean_displacement`` are
        untouched; the backbone stays frozen.
        """
        self.backbone.load_state_dict(extract_backbone_state(cam_state_dict), strict=True)


def build_irnet(
    *,
    depth: int = 50,
    backbone_init: WeightsSource = "none",
    cam_state_dict: Mapping[str, torch.Tensor] | None = None,
    state_dict: Mapping[str, torch.Tensor] | None = None,
    from_scratch: bool = False,
) -> IRNet:
    """Build an IRNet.

    Args:
        depth: ResNet depth, 18/34/50/101 (50 in the paper); must match the CAM net's if
            ``cam_state_dict`` is given.
        backbone_init: ``"none"``, ``"imagenet"``, or a backbone state-dict path / binary file
            object (see ``build_backbone``).
        cam_state_dict: optional trained CAMNet state dict; its backbone overrides
            ``backbone_init`` (``train_irn.backbone_init: cam``; the official code starts from
            ImageNet instead).
        state_dict: optional full IRNet state dict (trained checkpoint, including
            ``mean_displacement``) loaded strictly last.
        from_scratch: the backbone trains too, with updating BatchNorm (runs without pretrained
            weights: a frozen random backbone gives the branches little to learn from). Its state
            dict loads into the paper's frozen network for inference.

    Returns:
        IRNet on CPU in float32.
    """
    net = IRNet(build_backbone(depth=depth, init=backbone_init, batch_norm=from_scratch), train_backbone=from_scratch)
    if cam_state_dict is not None:
        net.load_backbone_from_cam(cam_state_dict)
    if state_dict is not None:
        net.load_state_dict(state_dict, strict=True)
    return net
