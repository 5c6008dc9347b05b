"""Tests for pipeline.models: backbone, CAM network, IRNet (CPU, fp32, ResNet-18, tiny inputs)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import torchvision

from pipeline.models import (
    FrozenBatchNorm2d,
    IRNetOutput,
    build_backbone,
    build_cam_net,
    build_irnet,
)

SIZES = [(37, 53), (64, 64)]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _images(n: int, h: int, w: int) -> torch.Tensor:
    return torch.randn(n, 3, h, w)


def _randomise_bn_stats(module: torch.nn.Module) -> None:
    """Non-trivial running statistics so that 'frozen' is observable."""
    for m in module.modules():
        if isinstance(m, FrozenBatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 2.0)


def _bn_buffers(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()
            if k.endswith(("running_mean", "running_var", "num_batches_tracked"))}


# ---------------------------------------------------------------- backbone


@pytest.mark.parametrize("size", SIZES)
def test_backbone_levels_have_expected_strides(size):
    h, w = size
    backbone = build_backbone(depth=18)
    feats = backbone(_images(2, h, w))
    assert backbone.channels == (64, 64, 128, 256, 512)
    for f, c, s in zip(feats, backbone.channels, (4, 4, 8, 16, 16)):
        assert f.shape == (2, c, math.ceil(h / s), math.ceil(w / s))


def test_resnet50_shapes_small_input():
    backbone = build_backbone(depth=50)
    assert backbone.channels == (64, 256, 512, 1024, 2048)
    block = backbone.layer4[0]
    assert block.conv2.stride == (1, 1) and block.downsample[0].stride == (1, 1)
    irnet = build_irnet(depth=50)
    out = irnet(_images(1, 37, 53))
    assert out.boundary_logits.shape == (1, 1, 10, 14)
    assert out.displacement.shape == (1, 2, 10, 14)
    cam = build_cam_net(num_classes=3, depth=50)
    assert cam.cam_maps(_images(1, 37, 53)).shape == (1, 3, 3, 4)


def test_basicblock_layer4_stride_is_one_and_bn_is_frozen_type():
    backbone = build_backbone(depth=18)
    block = backbone.layer4[0]
    assert block.conv1.stride == (1, 1) and block.downsample[0].stride == (1, 1)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in backbone.modules())


def test_frozen_bn_uses_running_stats_in_train_mode():
    backbone = build_backbone(depth=18)
    _randomise_bn_stats(backbone)
    x = _images(2, 32, 32)
    before = _bn_buffers(backbone)
    backbone.train()
    y_train = backbone(x).l5
    backbone.eval()
    y_eval = backbone(x).l5
    torch.testing.assert_close(y_train, y_eval)
    for k, v in _bn_buffers(backbone).items():
        assert torch.equal(v, before[k]), k


def test_backbone_init_from_state_dict_file_and_file_object(tmp_path):
    reference = torchvision.models.resnet18(weights=None)  # includes fc.*, which is ignored
    path = tmp_path / "resnet18.pt"
    torch.save(reference.state_dict(), path)
    from_path = build_backbone(depth=18, init=str(path))
    with open(path, "rb") as fh:
        from_file = build_backbone(depth=18, init=fh)
    expected = reference.state_dict()
    for backbone in (from_path, from_file):
        for k, v in backbone.state_dict().items():
            assert torch.equal(v, expected[k]), k


def test_backbone_init_rejects_wrong_depth_and_bad_init(tmp_path):
    path = tmp_path / "resnet34.pt"
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), path)
    with pytest.raises(RuntimeError):
        build_backbone(depth=18, init=path)
    with pytest.raises(ValueError):
        build_backbone(depth=18, init=123)
    with pytest.raises(ValueError):
        build_backbone(depth=42)


# ---------------------------------------------------------------- CAM network


@pytest.mark.parametrize("size", SIZES)
def test_cam_net_shapes(size):
    h, w = size
    net = build_cam_net(num_classes=4, depth=18)
    x = _images(2, h, w)
    assert net(x).shape == (2, 4)
    cams = net.cam_maps(x)
    assert cams.shape == (2, 4, math.ceil(h / 16), math.ceil(w / 16))
    assert (cams >= 0).all()


def test_cam_maps_and_logits_share_classifier():
    net = build_cam_net(num_classes=4, depth=18).eval()
    x = _images(2, 37, 53)
    l5 = net.backbone(x).l5
    weight = net.classifier.weight[:, :, 0, 0]  # [C, c5]
    projected = torch.einsum("kc,bchw->bkhw", weight, l5)
    torch.testing.assert_close(net.cam_maps(x), projected.clamp_min(0))
    torch.testing.assert_close(net(x), projected.mean(dim=(2, 3)), rtol=1e-4, atol=1e-4)


def test_cam_gradients_reach_exactly_layer3_layer4_classifier():
    net = build_cam_net(num_classes=4, depth=18).train()
    labels = torch.tensor([[1.0, 0, 1, 0], [0, 1, 0, 0]])
    F.multilabel_soft_margin_loss(net(_images(2, 37, 53)), labels).backward()
    trainable = ("backbone.layer3.", "backbone.layer4.", "classifier.")
    for name, p in net.named_parameters():
        if name.startswith(trainable):
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert not p.requires_grad and p.grad is None, name
    backbone_group, classifier_group = net.parameter_groups()
    assert {id(p) for p in classifier_group} == {id(net.classifier.weight)}
    expected = {id(p) for n, p in net.named_parameters() if n.startswith(trainable[:2])}
    assert {id(p) for p in backbone_group} == expected


def test_cam_training_keeps_bn_stats_and_lowers_loss():
    net = build_cam_net(num_classes=3, depth=18).train()
    _randomise_bn_stats(net)
    before = _bn_buffers(net)
    x = _images(4, 32, 32)
    labels = torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0]])
    backbone_params, classifier_params = net.parameter_groups()
    opt = torch.optim.SGD(
        [{"params": backbone_params, "lr": 1e-3}, {"params": classifier_params, "lr": 1e-2}]
    )
    losses = []
    for _ in range(5):
        loss = F.multilabel_soft_margin_loss(net(x), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    final = F.multilabel_soft_margin_loss(net(x), labels).item()
    assert final < losses[0]
    for k, v in _bn_buffers(net).items():
        assert torch.equal(v, before[k]), k


# ---------------------------------------------------------------- IRNet


@pytest.mark.parametrize("size", SIZES)
def test_irnet_output_grid_is_ceil_quarter(size):
    h, w = size
    net = build_irnet(depth=18)
    out = net(_images(2, h, w))
    assert isinstance(out, IRNetOutput)
    grid = (math.ceil(h / 4), math.ceil(w / 4))
    assert out.boundary_logits.shape == (2, 1, *grid)
    assert out.displacement.shape == (2, 2, *grid)
    result = net.infer(_images(1, h, w)[0])
    assert result.boundary.shape == grid and result.displacement.shape == (2, *grid)
    assert ((result.boundary >= 0) & (result.boundary <= 1)).all()


def test_irnet_gradients_reach_only_branches_and_bn_stays_frozen():
    net = build_irnet(depth=18).train()
    _randomise_bn_stats(net)
    before = _bn_buffers(net)
    out = net(_images(2, 37, 53))
    (out.boundary_logits.square().mean() + out.displacement.square().mean()).backward()
    for name, p in net.named_parameters():
        if name.startswith("backbone."):
            assert not p.requires_grad and p.grad is None, name
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    boundary, displacement = net.parameter_groups()
    branch_ids = {id(p) for p in boundary} | {id(p) for p in displacement}
    assert branch_ids == {id(p) for n, p in net.named_parameters() if not n.startswith("backbone.")}
    assert not {id(p) for p in boundary} & {id(p) for p in displacement}
    for k, v in _bn_buffers(net).items():
        assert torch.equal(v, before[k]), k


def test_irnet_from_scratch_trains_its_backbone_and_loads_into_the_paper_net():
    net = build_irnet(depth=18, from_scratch=True).train()
    x = _images(2, 40, 40)
    out = net(x)
    (out.boundary_logits.square().mean() + out.displacement.square().mean()).backward()
    assert all(p.grad is not None for n, p in net.named_parameters() if n.startswith("backbone.layer4"))
    boundary, displacement = net.parameter_groups()
    assert {id(p) for p in net.backbone.parameters()} <= {id(p) for p in boundary}
    bn = net.backbone.bn1
    assert isinstance(bn, torch.nn.BatchNorm2d) and int(bn.num_batches_tracked) == 1  # statistics update
    frozen = build_irnet(depth=18, state_dict=net.state_dict()).eval()  # the paper's net, strictly
    net.eval()
    with torch.no_grad():
        torch.testing.assert_close(frozen(x).displacement, net(x).displacement)


def test_irnet_training_lowers_surrogate_loss():
    net = build_irnet(depth=18).train()
    x = _images(2, 32, 32)
    target_b = torch.rand(2, 1, 8, 8)
    target_d = torch.randn(2, 2, 8, 8)
    boundary, displacement = net.parameter_groups()
    opt = torch.optim.SGD([{"params": boundary, "lr": 1e-4}, {"params": displacement, "lr": 1e-3}])

    def loss_fn():
        out = net(x)
        return F.mse_loss(out.boundary_logits, target_b) + F.mse_loss(out.displacement, target_d)

    first = loss_fn()
    for _ in range(5):
        loss = loss_fn()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss_fn().item() < first.item()


def test_mean_displacement_subtracted_only_at_inference():
    net = build_irnet(depth=18)
    assert torch.equal(net.mean_displacement, torch.zeros(2))
    mean = torch.tensor([1.5, -2.0])
    net.set_mean_displacement(mean)
    assert "mean_displacement" in net.state_dict()
    x = _images(1, 37, 53)
    d_train = net.train()(x).displacement
    d_eval = net.eval()(x).displacement
    torch.testing.assert_close(d_eval, d_train - mean.view(1, 2, 1, 1))
    # infer subtracts regardless of mode, and uses the unflipped image only
    for mode in (True, False):
        net.train(mode)
        torch.testing.assert_close(net.infer(x[0]).displacement, d_eval[0])
    with pytest.raises(ValueError):
        net.set_mean_displacement(torch.zeros(3))


def test_infer_fuses_boundary_with_flipped_image():
    net = build_irnet(depth=18).eval()
    x = _images(1, 37, 53)
    logits = net(x).boundary_logits[0, 0]
    logits_flip = net(x.flip(-1)).boundary_logits[0, 0].flip(-1)
    result = net.infer(x[0])
    torch.testing.assert_close(result.boundary, torch.sigmoid((logits + logits_flip) / 2))
    batched = net.infer(torch.cat([x, x.flip(-1)]))
    assert batched.boundary.shape == (2, 10, 14) and batched.displacement.shape == (2, 2, 10, 14)
    torch.testing.assert_close(batched.boundary[0], result.boundary)
    padded = net.infer(x[0], pad_to=64)
    assert padded.boundary.shape == (10, 14) and padded.displacement.shape == (2, 10, 14)


def test_load_backbone_from_cam_state_dict():
    cam = build_cam_net(num_classes=3, depth=18)
    _randomise_bn_stats(cam)
    cam_state = cam.state_dict()
    irnet = build_irnet(depth=18)
    branches_before = {k: v.clone() for k, v in irnet.state_dict().items()
                       if not k.startswith("backbone.")}
    irnet.load_backbone_from_cam(cam_state)
    for k, v in irnet.backbone.state_dict().items():
        assert torch.equal(v, cam_state["backbone." + k]), k
    for k, v in irnet.state_dict().items():
        if not k.startswith("backbone."):
            assert torch.equal(v, branches_before[k]), k
    assert not any(p.requires_grad for p in irnet.backbone.parameters())
    # DDP-wrapped checkpoints and the builder path work too
    wrapped = {"module." + k: v for k, v in cam_state.items()}
    built = build_irnet(depth=18, cam_state_dict=wrapped)
    x = _images(1, 32, 32)
    torch.testing.assert_close(built.backbone(x).l5, cam.backbone(x).l5)


def test_bf16_autocast_channels_last_smoke():
    x = _images(1, 37, 53).to(memory_format=torch.channels_last)
    irnet = build_irnet(depth=18).to(memory_format=torch.channels_last)
    cam = build_cam_net(num_classes=2, depth=18).to(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = irnet(x)
        logits = cam(x)
        result = irnet.infer(x[0])
    assert out.displacement.shape == (1, 2, 10, 14) and logits.shape == (1, 2)
    assert result.boundary.dtype == torch.float32
    assert torch.isfinite(result.displacement).all()


def test_from_scratch_cam_net_trains_every_layer_and_loads_into_the_paper_net():
    torch.manual_seed(0)
    net = build_cam_net(num_classes=3, depth=18, from_scratch=True)
    net.train()
    bn_before = net.backbone.bn1.running_mean.clone()
    x = torch.randn(2, 3, 64, 64)
    F.multilabel_soft_margin_loss(net(x), torch.tensor([[1.0, 0, 1], [0, 1, 0]])).backward()
    assert all(p.grad is not None for p in net.parameters())
    assert not torch.equal(net.backbone.bn1.running_mean, bn_before)  # statistics are learned
    paper = build_cam_net(num_classes=3, depth=18, state_dict=net.state_dict()).eval()
    net.eval()
    with torch.no_grad():
        assert torch.allclose(paper.cam_maps(x), net.cam_maps(x), atol=1e-5)


def test_backbone_weights_from_any_fsspec_uri():
    import io

    from pipeline.io import storage
    from pipeline.models.backbone import build_backbone
    from pipeline.train.cam import backbone_source

    torch.manual_seed(3)
    source = build_backbone(depth=18)
    buf = io.BytesIO()
    torch.save(source.state_dict(), buf)
    storage.write_bytes("memory://weights/resnet18.pt", buf.getvalue())
    net = build_cam_net(num_classes=2, depth=18, backbone_init=backbone_source("memory://weights/resnet18.pt"))
    assert torch.equal(net.backbone.conv1.weight, source.conv1.weight)
    assert backbone_source("none") == "none" and backbone_source("imagenet") == "imagenet"
