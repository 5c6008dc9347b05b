"""Training segmenters on labels: joint augmentation keeps image and labels aligned; polygons and
YOLO lines round-trip to the masks; evaluation metrics on hand-made cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from pipeline.algorithms.polygons import mask_to_polygons, polygons_to_mask
from pipeline.data.segmentation import instance_masks, instance_train_sample, mask_boxes, semantic_train_sample
from pipeline.data.transforms import IMAGENET_MEAN, IMAGENET_STD


def _coded(height: int, width: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """An image whose red channel encodes its label map (label * 40 + 20), blocky so that
    nearest/bilinear resizing agree away from block edges."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 5, size=(height // 8 + 1, width // 8 + 1))
    label = np.kron(blocks, np.ones((8, 8), np.int64))[:height, :width].astype(np.uint8)
    image = np.zeros((height, width, 3), np.uint8)
    image[..., 0] = label * 40 + 20
    image[..., 1] = rng.integers(0, 255)
    return image, label


def _red(x: np.ndarray) -> np.ndarray:
    """Un-normalised red channel of a float32 [3, H, W] network input."""
    return (x[0] * IMAGENET_STD[0] + IMAGENET_MEAN[0]) * 255.0


def test_semantic_augmentation_moves_image_and_label_together():
    image, label = _coded(70, 90)
    for seed in range(8):
        x, target = semantic_train_sample(image, label, np.random.default_rng(seed), base_size=64, crop_size=56)
        assert x.shape == (3, 56, 56) and target.shape == (56, 56) and target.dtype == np.int64
        valid = target != 255
        assert valid.any()
        # Away from block edges the decoded red value gives back the label exactly.
        interior = ndimage.binary_erosion(valid & (ndimage.maximum_filter(target, 3) == ndimage.minimum_filter(target, 3)))
        decoded = np.round((_red(x) - 20) / 40)
        assert np.array_equal(decoded[interior], target[interior])
        padding = ~valid  # padded label is ignore; padded image is the mean colour (0 after normalising)
        assert np.allclose(x[:, padding], 0)


def test_instance_augmentation_flips_masks_with_the_image_and_boxes_enclose_them():
    image, label = _coded(40, 60, seed=3)
    ids = np.zeros((40, 60), np.uint16)
    ids[5:15, 4:20], ids[20:35, 30:58] = 1, 2
    masks, classes = instance_masks(ids, {1: 3, 2: 1, 7: 2})
    assert classes.tolist() == [3, 1] and masks.shape == (2, 40, 60)
    seen = set()
    for seed in range(6):
        x, out_masks, boxes = instance_train_sample(image, masks, np.random.default_rng(seed))
        flipped = not np.array_equal(out_masks, masks)
        seen.add(flipped)
        expected = masks[:, :, ::-1] if flipped else masks
        assert np.array_equal(out_masks, expected)
        red = x[0] * 255.0
        reference = image[:, ::-1, 0] if flipped else image[..., 0]
        assert np.allclose(red, reference, atol=1e-3)
        for mask, (x0, y0, x1, y1) in zip(out_masks, boxes):
            ys, xs = np.nonzero(mask)
            assert (x0, y0, x1, y1) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    assert seen == {True, False}
    assert mask_boxes(np.zeros((1, 4, 4), bool)).tolist() == [[0, 0, 0, 0]]
    assert instance_masks(np.zeros((4, 4), np.uint16), {1: 1})[0].shape == (0, 4, 4)


def _within_one_pixel_of_the_boundary(mask: np.ndarray, other: np.ndarray) -> bool:
    square = np.ones((3, 3), bool)
    boundary = ndimage.binary_dilation(mask, structure=square) & ~ndimage.binary_erosion(mask, structure=square)
    return not ((mask ^ other) & ~boundary).any()


def _shapes() -> dict[str, np.ndarray]:
    yy, xx = np.mgrid[0:60, 0:80]
    disc = (yy - 30) ** 2 + (xx - 40) ** 2 <= 20 ** 2
    ring = disc & ((yy - 30) ** 2 + (xx - 40) ** 2 >= 10 ** 2)
    two = disc & (xx > 30)
    two[3:9, 60:78] = True
    cross = ((np.abs(yy - 30) < 4) & (np.abs(xx - 40) < 25)) | ((np.abs(xx - 40) < 4) & (np.abs(yy - 30) < 25))
    thin = np.zeros((60, 80), bool)
    thin[10, 5:70] = True
    specks = np.zeros((60, 80), bool)  # parts of one and two pixels (8-connected): each must survive
    specks[5, 5] = specks[20, 30] = specks[21, 31] = specks[40, 60] = specks[40, 61] = True
    return {"disc": disc, "ring": ring, "two parts": two, "cross": cross, "thin": thin, "specks": specks}


@pytest.mark.parametrize("name", list(_shapes()))
def test_polygons_rasterise_back_to_the_mask_within_a_pixel_of_its_boundary(name):
    mask = _shapes()[name]
    polygons = mask_to_polygons(mask)
    assert len(polygons) == {"two parts": 2, "specks": 3}.get(name, 1)
    assert _within_one_pixel_of_the_boundary(mask, polygons_to_mask(polygons, mask.shape))
    if name == "specks":  # all boundary: "within a pixel" would hold for nothing at all
        assert np.array_equal(polygons_to_mask(polygons, mask.shape), mask)


def test_yolo_lines_round_trip(tmp_path):
    from pycocotools import mask as mask_utils

    from pipeline.stages.export import yolo_lines

    shapes = _shapes()
    rows = []
    for i, name in enumerate(("ring", "two parts", "cross"), start=1):
        rle = mask_utils.encode(np.asfortranarray(shapes[name].astype(np.uint8)))
        rows.append({"instance_id": i, "class_id": i, "height": 60, "width": 80,
                     "rle_counts": rle["counts"].decode("ascii")})
    lines = yolo_lines(rows, 60, 80).splitlines()
    assert [int(line.split()[0]) for line in lines] == [0, 1, 1, 2]  # 0-based classes, two parts -> two lines
    for name, class_index in (("ring", 0), ("two parts", 1), ("cross", 2)):
        polygons = []
        for line in lines:
            values = line.split()
            if int(values[0]) != class_index:
                continue
            coords = np.array(values[1:], float).reshape(-1, 2)
            assert (coords >= 0).all() and (coords <= 1).all()
            polygons.append(np.column_stack([coords[:, 0] * 80 - 0.5, coords[:, 1] * 60 - 0.5]))
        assert _within_one_pixel_of_the_boundary(shapes[name], polygons_to_mask(polygons, (60, 80)))


def test_coco_mask_ap_on_hand_made_cases():
    from pipeline.stages.segmenter_eval import _coco_ap, _rle

    a = np.zeros((20, 20), bool)
    a[2:8, 2:8] = True
    b = np.zeros((20, 20), bool)
    b[10:18, 10:18] = True
    images = [{"id": 1, "height": 20, "width": 20}]
    gt = [{"id": k + 1, "image_id": 1, "category_id": 1, "segmentation": _rle(m), "area": float(m.sum()),
           "iscrowd": 0, "bbox": [0, 0, 1, 1]} for k, m in enumerate((a, b))]
    perfect = [{"image_id": 1, "category_id": 1, "segmentation": _rle(m), "score": 0.9} for m in (a, b)]
    assert _coco_ap(images, gt, perfect, ["thing"]) == {"coco_ap": 1.0, "coco_ap50": 1.0, "coco_ap75": 1.0}
    half = _coco_ap(images, gt, perfect[:1], ["thing"])  # one of two found: precision 1 up to recall 0.5
    assert half["coco_ap50"] == pytest.approx(51 / 101)
    assert _coco_ap(images, gt, [], ["thing"])["coco_ap"] == 0.0


def test_multiscale_flip_inference_averages_the_softmax_of_every_scale_and_flip():
    from pipeline.stages.segmenter_eval import multiscale_flip_probs

    class Net(torch.nn.Module):
        def forward(self, x):  # class 1 where the red channel is bright; position-dependent bias
            ramp = torch.linspace(0, 1, x.shape[-1]).view(1, 1, 1, -1)
            return {"out": torch.cat([torch.zeros_like(x[:, :1]), 3 * x[:, :1] + ramp], dim=1)}

    image = np.zeros((16, 24, 3), np.uint8)
    image[:, 12:, 0] = 255
    probs = multiscale_flip_probs(Net(), image, [1.0])
    assert probs.shape == (2, 16, 24) and torch.allclose(probs.sum(0), torch.ones(16, 24))
    # At scale 1 the flip removes the ramp's left-right asymmetry: average of ramp and its mirror.
    x = torch.from_numpy(((image / 255.0 - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1).astype(np.float32))
    ramp = torch.linspace(0, 1, 24)
    expected = (torch.sigmoid(3 * x[0] + ramp) + torch.sigmoid(3 * x[0] + ramp.flip(0))) / 2
    torch.testing.assert_close(probs[1], expected, rtol=1e-5, atol=1e-6)
    assert multiscale_flip_probs(Net(), image, [0.5, 1.0, 2.0]).shape == (2, 16, 24)


def test_segmenter_backbones_load_from_a_weights_file(tmp_path):
    import torchvision
    from torchvision.ops import FrozenBatchNorm2d

    from pipeline.models.segmenters import build_segmenter

    resnet = torchvision.models.resnet50()
    torch.nn.init.normal_(resnet.conv1.weight)
    resnet.bn1.running_mean.uniform_()
    path = tmp_path / "resnet50.pth"
    torch.save(resnet.state_dict(), path)
    deeplab = build_segmenter("deeplab", 3, backbone_init=str(path))
    assert torch.equal(deeplab.backbone.conv1.weight, resnet.conv1.weight)
    maskrcnn = build_segmenter("maskrcnn", 3, backbone_init=str(path))
    body = maskrcnn.backbone.body
    assert torch.equal(body.conv1.weight, resnet.conv1.weight)
    assert torch.equal(body.bn1.running_mean, resnet.bn1.running_mean) and isinstance(body.bn1, FrozenBatchNorm2d)
    # torchvision's detection recipe for a pretrained backbone: the stem and layer1 stay frozen.
    assert not body.conv1.weight.requires_grad and not any(p.requires_grad for p in body.layer1.parameters())
    assert all(p.requires_grad for p in body.layer4.parameters())
    torch.save({"not": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match="ResNet-50"):
        build_segmenter("maskrcnn", 3, backbone_init=str(path))


def test_resnet18_segmenters_take_a_cam_network_backbone(tmp_path):
    """segmenter.depth 18 + backbone_init cam: both segmenters start from the CAM network's
    ResNet-18 body, DeepLab at output stride 8, Mask R-CNN trains in both modes; a depth mismatch
    names the key to set."""
    from pipeline.models.cam_net import build_cam_net
    from pipeline.models.segmenters import build_segmenter

    torch.manual_seed(0)
    cam = build_cam_net(num_classes=3, depth=18, backbone_init="none", from_scratch=True)
    path = tmp_path / "cam.pt"
    torch.save(cam.state_dict(), path)
    cam_conv = cam.state_dict()["backbone.conv1.weight"]
    deeplab = build_segmenter("deeplab", 3, depth=18, backbone_init=str(path))
    assert torch.equal(deeplab.backbone.conv1.weight, cam_conv)
    out = deeplab.eval()(torch.zeros(1, 3, 64, 64))["out"]
    assert out.shape == (1, 4, 64, 64)
    assert deeplab.backbone(torch.zeros(1, 3, 64, 64))["out"].shape[-1] == 8  # output stride 8
    maskrcnn = build_segmenter("maskrcnn", 3, depth=18, backbone_init=str(path), min_size=64, max_size=96)
    assert torch.equal(maskrcnn.backbone.body.conv1.weight, cam_conv)
    masks = torch.zeros(1, 64, 64, dtype=torch.uint8)
    masks[0, 10:30, 12:40] = 1
    target = {"boxes": torch.tensor([[12.0, 10.0, 40.0, 30.0]]), "labels": torch.tensor([2]), "masks": masks}
    losses = maskrcnn.train()([torch.rand(3, 64, 64)], [target])
    sum(losses.values()).backward()
    assert maskrcnn.backbone.body.layer4[0].conv1.weight.grad is not None
    # half width: FPN and mask head at 128 channels; 3 classes + background in both predictors
    assert maskrcnn.backbone.out_channels == 128 and maskrcnn.roi_heads.mask_head[0][0].out_channels == 128
    assert maskrcnn.roi_heads.box_predictor.cls_score.out_features == 4
    assert maskrcnn.roi_heads.mask_predictor.mask_fcn_logits.out_channels == 4
    detections = maskrcnn.eval()([torch.rand(3, 64, 64)])[0]
    assert detections["masks"].shape[1:] == (1, 64, 64)
    with pytest.raises(ValueError, match="segmenter.depth"):
        build_segmenter("maskrcnn", 3, depth=50, backbone_init=str(path))
    small = build_segmenter("maskrcnn", 3, depth=18, rpn_proposals=300, roi_samples=64)
    assert small.rpn._post_nms_top_n["training"] == 300 and small.roi_heads.fg_bg_sampler.batch_size_per_image == 64
