"""The official implementation's networks and ours are the same networks: state dicts of the
official layout (tests/official_irn.py, a reference of its modules) convert, load strictly and
give the same outputs; IRNet inference pads like the official EdgeDisplacement."""

from __future__ import annotations

import io

import pytest
import torch
from official_irn import OfficialCAM, OfficialIRN

from pipeline.models.cam_net import build_cam_net
from pipeline.models.irnet import build_irnet
from pipeline.models.official import convert_official, is_official, official_to_cam, official_to_irn


def _randomise(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random weights everywhere, BatchNorm statistics and GroupNorm affines included."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            if tensor.dtype.is_floating_point:
                values = torch.rand(tensor.shape, generator=generator)
                tensor.copy_(values * 0.5 + 0.75 if "running_var" in name or name.endswith("bn1.weight")
                             else (values - 0.5) * 0.2)
    return module.eval()


def _saved(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict as the official code saves it and torch.load reads it back (weights only)."""
    buf = io.BytesIO()
    torch.save(module.state_dict(), buf)
    return torch.load(io.BytesIO(buf.getvalue()), map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def official_irn():
    net = _randomise(OfficialIRN(), 1)
    net.mean_shift.running_mean.copy_(torch.tensor([0.3, -0.2]))
    return net


def test_official_cam_checkpoint_gives_the_same_cams():
    official = _randomise(OfficialCAM(num_classes=5), 0)
    state = _saved(official)
    assert is_official(state) and any(k.startswith("stage2.") for k in state)  # aliases, as saved
    ours = build_cam_net(num_classes=5, depth=50, state_dict=official_to_cam(state)).eval()  # strict
    x = torch.randn(2, 3, 72, 88)
    x[1] = x[0].flip(-1)
    with torch.no_grad():
        expected = official.cam(x)
        maps = ours.cam_maps(x)
        torch.testing.assert_close(maps[0] + maps[1].flip(-1), expected, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(ours(x[:1]), official(x[:1]), rtol=1e-4, atol=1e-5)


def test_official_irn_checkpoint_gives_the_same_boundary_and_displacement(official_irn):
    state = _saved(official_irn)
    ours = build_irnet(depth=50, state_dict=official_to_irn(state)).eval()  # strict: every key mapped
    assert torch.equal(ours.mean_displacement, torch.tensor([0.3, -0.2]))
    x = torch.randn(1, 3, 64, 80)
    with torch.no_grad():
        edge, dp = official_irn(x)
        out = ours(x)
    torch.testing.assert_close(out.boundary_logits, edge, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.displacement, dp, rtol=1e-4, atol=1e-5)  # eval: mean subtracted in both


def test_inference_pads_to_the_crop_like_the_official_edge_displacement(official_irn):
    ours = build_irnet(depth=50, state_dict=convert_official(_saved(official_irn), "irn")).eval()
    image = torch.randn(3, 50, 61)
    with torch.no_grad():
        edge, dp = official_irn.edge_displacement(torch.stack([image, image.flip(-1)]), crop_size=96)
        padded = ours.infer(image, pad_to=96)
        unpadded = ours.infer(image)
    assert padded.boundary.shape == (13, 16) and padded.displacement.shape == (2, 13, 16)
    torch.testing.assert_close(padded.boundary, edge[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(padded.displacement, dp, rtol=1e-4, atol=1e-5)
    # GroupNorm statistics see the padding: without it the outputs differ.
    assert not torch.allclose(unpadded.boundary, padded.boundary, atol=1e-3)


def test_batched_inference_of_different_sizes_equals_one_image_at_a_time(official_irn):
    ours = build_irnet(depth=50, state_dict=official_to_irn(_saved(official_irn))).eval()
    a, b = torch.randn(3, 40, 52), torch.randn(3, 48, 36)
    batch = torch.zeros(2, 3, 64, 64)
    batch[0, :, :40, :52], batch[1, :, :48, :36] = a, b
    with torch.no_grad():
        results = ours.infer_padded(batch, [(40, 52), (48, 36)])
        for result, image in zip(results, (a, b)):
            alone = ours.infer(image, pad_to=64)
            torch.testing.assert_close(result.boundary, alone.boundary, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(result.displacement, alone.displacement, rtol=1e-4, atol=1e-5)


def test_our_own_state_dicts_pass_through_and_wrong_ones_are_named():
    net = build_irnet(depth=18)
    assert convert_official(net.state_dict(), "irn").keys() == net.state_dict().keys()
    with pytest.raises(ValueError, match="classifier"):
        official_to_cam({"resnet50.conv1.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="IRNet"):
        official_to_irn({"resnet50.conv1.weight": torch.zeros(1)})
