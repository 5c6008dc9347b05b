"""Joint image/label augmentation for training segmenters on a labels version, as torchvision's
reference scripts do it (references/segmentation and references/detection): the label map or
the instance masks go through the same resize (nearest), flip and crop as the image; padding is
0 for the image (after normalisation) and 255 (ignore) for label maps.
"""

from __future__ import annotations

import numpy as np

from pipeline.data.transforms import IGNORE, normalize, random_crop, resize_image, resize_label, scaled_size


def semantic_train_sample(image: np.ndarray, label: np.ndarray, rng: np.random.Generator, *, base_size: int,
                          crop_size: int) -> tuple[np.ndarray, np.ndarray]:
    """DeepLab training sample (references/segmentation/presets.py): shorter side resized to a
    random size in [0.5, 2.0] x ``base_size`` (bilinear image, nearest label), horizontal flip with
    probability 0.5, random ``crop_size`` crop (padded: image 0, label 255), normalised.

    image: uint8 [H, W, 3]; label: uint8 [H, W] -> (float32 [3, crop, crop], int64 [crop, crop]).
    """
    height, width = image.shape[:2]
    short = int(rng.integers(int(0.5 * base_size), int(2.0 * base_size) + 1))
    size = scaled_size(height, width, short / min(height, width))
    image, label = resize_image(image, size), resize_label(label, size)
    if rng.random() < 0.5:
        image, label = image[:, ::-1], label[:, ::-1]
    crop, target = random_crop(normalize(np.ascontiguousarray(image)), np.ascontiguousarray(label), crop_size, rng)
    return crop, target.astype(np.int64)


def instance_train_sample(image: np.ndarray, masks: np.ndarray, rng: np.random.Generator,
                          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mask R-CNN training sample (references/detection/presets.py "hflip"): horizontal flip with
    probability 0.5 of the image and its masks; the model resizes and normalises itself.

    image: uint8 [H, W, 3]; masks: bool [N, H, W] -> (float32 [3, H, W] in [0, 1], bool masks
    [N, H, W], float32 boxes [N, 4] as (x0, y0, x1, y1) around each mask, pixel edges).
    """
    if rng.random() < 0.5:
        image, masks = image[:, ::-1], masks[:, :, ::-1]
    image = np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32) / 255.0
    masks = np.ascontiguousarray(masks)
    return image, masks, mask_boxes(masks)


def mask_boxes(masks: np.ndarray) -> np.ndarray:
    """float32 [N, 4] (x0, y0, x1, y1) boxes enclosing each bool mask [N, H, W] (pixel edges)."""
    boxes = np.zeros((len(masks), 4), np.float32)
    for i, mask in enumerate(masks):
        ys, xs = np.nonzero(mask)
        if len(ys):
            boxes[i] = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    return boxes


def instance_masks(ids: np.ndarray, classes: dict[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """An instance-id map and {instance id: class id} -> (bool masks [N, H, W], class ids [N]) of
    the instances that are present; id 0 and ids without a class are not instances."""
    present = [int(i) for i in np.unique(ids) if int(i) in classes and int(i) != 0]
    if not present:
        return np.zeros((0,) + ids.shape, bool), np.zeros(0, np.int64)
    return np.stack([ids == i for i in present]), np.array([classes[i] for i in present], np.int64)


__all__ = ["IGNORE", "instance_masks", "instance_train_sample", "mask_boxes", "semantic_train_sample"]
