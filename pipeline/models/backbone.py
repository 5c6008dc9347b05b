"""ResNet backbone with output stride 16 and frozen BatchNorm statistics (IRNet Sec. 3 and 4.1).

The backbone is a torchvision ResNet whose last downsampling stride (the first block of
``layer4``) is set to 1, so the deepest features keep stride 16. It exposes the five feature
levels that IRNet's branches consume:

    level  torchvision module(s)          stride  channels 18/34  channels 50/101
    L1     conv1 + bn1 + relu + maxpool   4       64              64
    L2     layer1                         4       64              256
    L3     layer2                         8       128             512
    L4     layer3                         16      256             1024
    L5     layer4 (stride set to 1)       16      512             2048

For an input of size H×W the levels have exactly ``ceil(H/s) × ceil(W/s)`` cells for their
stride ``s``: each 3×3/7×7 stride-2 conv or pool with padding k//2 maps n to ceil(n/2), and
ceil(ceil(n/a)/b) = ceil(n/(a·b)).

Input normalisation (ImageNet mean/std) is *not* part of the model; the data pipeline applies it.
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping
from typing import BinaryIO, NamedTuple, Union

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "BackboneFeatures",
    "FrozenBatchNorm2d",
    "ResNetBackbone",
    "WeightsSource",
    "build_backbone",
    "extract_backbone_state",
    "load_state_dict_file",
]

WeightsSource = Union[str, "os.PathLike[str]", BinaryIO]

DEPTHS = (18, 34, 50, 101)
# Prefixes that training wrappers add to state-dict keys (DDP, torch.compile).
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d that always normalises with its stored running statistics.

    The running mean/variance are never updated, in ``train()`` and ``eval()`` mode alike. The
    affine ``weight`` and ``bias`` stay ordinary parameters (trainable unless the owner turns
    ``requires_grad`` off), as in the official IRNet code. State-dict keys match
    ``nn.BatchNorm2d`` (``weight, bias, running_mean, running_var, num_batches_tracked``) so
    torchvision checkpoints load unchanged.

    It deliberately does not subclass ``nn.BatchNorm2d``: helpers such as
    ``nn.SyncBatchNorm.convert_sync_batchnorm`` would otherwise turn it back into a layer that
    updates its statistics.

    Input/output: float tensor [B, C, H, W] (any float dtype, any memory format).
    """

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise ``x`` [B, C, H, W] with the frozen statistics; same shape and dtype out."""
        return F.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias,
            training=False, momentum=0.0, eps=self.eps,
        )

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Very old BatchNorm checkpoints lack the counter; it carries no information here.
        key = prefix + "num_batches_tracked"
        if key not in state_dict:
            state_dict[key] = torch.tensor(0, dtype=torch.long)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"


class BackboneFeatures(NamedTuple):
    """The five backbone levels for an input [B, 3, H, W] (dtype follows the computation).

    l1: [B, c1, ceil(H/4), ceil(W/4)]; l2: [B, c2, ceil(H/4), ceil(W/4)];
    l3: [B, c3, ceil(H/8), ceil(W/8)]; l4, l5: [B, c4|c5, ceil(H/16), ceil(W/16)],
    with (c1..c5) = ``ResNetBackbone.channels``.
    """

    l1: torch.Tensor
    l2: torch.Tensor
    l3: torch.Tensor
    l4: torch.Tensor
    l5: torch.Tensor


class ResNetBackbone(nn.Module):
    """torchvision ResNet-{18,34,50,101} trunk with output stride 16 and frozen BatchNorm.

    Module and state-dict names are torchvision's (``conv1, bn1, layer1..layer4``; no ``fc``),
    so torchvision ImageNet weights load directly. Expects ImageNet-normalised input; the
    normalisation is done by the data pipeline, not here.

    Attributes:
        depth: ResNet depth (18, 34, 50 or 101).
        channels: channel counts of (L1, L2, L3, L4, L5), e.g. (64, 256, 512, 1024, 2048).
    """

    def __init__(self, *, depth: int = 50, batch_norm: bool = False) -> None:
        super().__init__()
        # torchvision here, not at the top: its import (~1 s) is paid only by processes that build
        # a network, not by every Ray worker and driver that imports the pipeline.
        import torchvision

        if depth not in DEPTHS:
            raise ValueError(f"depth must be one of {list(DEPTHS)}, got {depth}")
        builder = getattr(torchvision.models, f"resnet{depth}")
        # batch_norm=True: ordinary BatchNorm (statistics update in train mode), for training
        # from scratch where no pretrained statistics exist to freeze.
        net = builder(weights=None, norm_layer=nn.BatchNorm2d if batch_norm else FrozenBatchNorm2d)
        # Last downsampling stride -> 1 (output stride 16, no dilation, as in IRNet).
        block = net.layer4[0]
        strided_conv = block.conv2 if isinstance(block, torchvision.models.resnet.Bottleneck) else block.conv1
        strided_conv.stride = (1, 1)
        if block.downsample is not None:
            block.downsample[0].stride = (1, 1)

        self.depth = depth
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        expansion = 4 if depth >= 50 else 1
        self.channels: tuple[int, int, int, int, int] = (
            64, 64 * expansion, 128 * expansion, 256 * expansion, 512 * expansion,
        )

    def forward(self, x: torch.Tensor, *, detach_below: int = 0) -> BackboneFeatures:
        """Compute the five feature levels.

        Args:
            x: float [B, 3, H, W], ImageNet-normalised.
            detach_below: levels 1..``detach_below`` are detached before the next level consumes
                them (and returned detached), so no gradient flows below level
                ``detach_below + 1``. 0 (default) detaches nothing; the CAM net uses 3.

        Returns:
            BackboneFeatures (l1..l5), see its docstring for shapes.
        """
        feats = []
        h = x
        stages = (self._stem, self.layer1, self.layer2, self.layer3, self.layer4)
        for level, stage in enumerate(stages, start=1):
            h = stage(h)
            if level <= detach_below:
                h = h.detach()
            feats.append(h)
        return BackboneFeatures(*feats)


    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))


def load_state_dict_file(source: WeightsSource) -> dict[str, torch.Tensor]:
    """Read a tensor state dict from a local path or an open binary file object.

    Uses ``torch.load(..., map_location="cpu", weights_only=True)`` (no arbitrary unpickling).
    Callers holding a remote URI open it themselves (e.g. ``fsspec.open(uri, "rb")``) and pass
    the file object. Checkpoints of the form ``{"state_dict": {...}}`` or ``{"model": {...}}``
    are unwrapped.

    Returns:
        dict of parameter/buffer name -> CPU tensor.
    """
    if isinstance(source, (str, os.PathLike)):
        state = torch.load(os.fspath(source), map_location="cpu", weights_only=True)
    else:
        # torch.load needs a seekable stream; remote file objects are not always seekable.
        data = source.read()
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
    if not isinstance(state, Mapping):
        raise ValueError(f"expected a state dict (mapping), got {type(state).__name__}")
    return dict(state)


def extract_backbone_state(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Return the backbone entries of a state dict, keyed as ``ResNetBackbone`` expects.

    Accepts a plain torchvision ResNet state dict (``fc.*`` dropped), a ``ResNetBackbone`` state
    dict, or the state dict of a network holding the backbone as ``backbone`` (CAM net, IRNet),
    optionally with DDP ``module.`` / torch.compile ``_orig_mod.`` prefixes.
    """
    cleaned = {}
    for key, value in state_dict.items():
        changed = True
        while changed:
            changed = False
            for prefix in _WRAPPER_PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix):], True
        cleaned[key] = value
    if any(k.startswith("backbone.") for k in cleaned):
        return {k[len("backbone."):]: v for k, v in cleaned.items() if k.startswith("backbone.")}
    return {k: v for k, v in cleaned.items() if not k.startswith("fc.")}


def build_backbone(*, depth: int = 50, init: WeightsSource = "none", batch_norm: bool = False) -> ResNetBackbone:
    """Build a ``ResNetBackbone`` and initialise its weights.

    Args:
        depth: 18, 34, 50 (the paper's) or 101.
        init: ``"none"`` (torchvision's random init), ``"imagenet"`` (torchvision
            ``IMAGENET1K_V1`` weights; needs internet or a warm torch hub cache), or a state-dict
            source for ``load_state_dict_file``: a local path or an open binary file object.
            Loading is strict apart from the ignored classifier (``fc.*``).
        batch_norm: ordinary (updating) BatchNorm instead of frozen statistics; only for
            training from scratch.

    Returns:
        ResNetBackbone on CPU in float32.
    """
    backbone = ResNetBackbone(depth=depth, batch_norm=batch_norm)
    if isinstance(init, str) and init == "none":
        return backbone
    if isinstance(init, str) and init == "imagenet":
        import torchvision

        weights = torchvision.models.get_model_weights(f"resnet{depth}").IMAGENET1K_V1
        state = weights.get_state_dict(progress=False)
    elif isinstance(init, (str, os.PathLike)) or hasattr(init, "read"):
        state = load_state_dict_file(init)
    else:
        raise ValueError(f"init must be 'none', 'imagenet', a path or a binary file, got {init!r}")
    backbone.load_state_dict(extract_backbone_state(state), strict=True)
    return backbone
