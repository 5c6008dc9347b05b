"""Image/label transforms shared by training and inference (one concept, one place).

Images are uint8 [H, W, 3] RGB on input; networks get float32 [3, H, W] normalised with the ImageNet
mean/std. Labels are transformed together with their image: nearest-neighbour resizing, the same
flip, the same crop window, padding with 255 (ignore).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from pipeline.algorithms.pairs import centroid_offsets

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
IGNORE = 255


def normalize(image: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] -> float32 [3, H, W], ImageNet mean/std normalised."""
    return np.ascontiguousarray(((image.astype(np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD)
                                .transpose(2, 0, 1))


def resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 [H, W, 3] -> uint8 [h, w, 3], bicubic. ``size`` is (h, w)."""
    if image.shape[:2] == tuple(size):
        return image
    return np.asarray(Image.fromarray(image).resize((size[1], size[0]), Image.BICUBIC))


def resize_label(label: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 [H, W] -> uint8 [h, w], nearest neighbour."""
    if label.shape[:2] == tuple(size):
        return label
    return np.asarray(Image.fromarray(label).resize((size[1], size[0]), Image.NEAREST))


def scaled_size(height: int, width: int, scale: float) -> tuple[int, int]:
    return max(1, int(round(height * scale))), max(1, int(round(width * scale)))


def held_out_input(image: np.ndarray, size: int) -> np.ndarray:
    """The CAM classifier's held-out input: long side resized to ``size`` (bicubic), normalised,
    zero-padded bottom/right to float32 [3, size, size], so held-out images batch together."""
    height, width = image.shape[:2]
    resized = normalize(resize_image(image, scaled_size(height, width, size / max(height, width))))
    out = np.zeros((3, size, size), np.float32)
    out[:, : resized.shape[1], : resized.shape[2]] = resized[:, :size, :size]
    return out


def _crop_window(height: int, width: int, crop: int, rng: np.random.Generator):
    """Source and destination slices of a random crop x crop window (padding a smaller side at a
    random offset)."""
    sy = int(rng.integers(0, height - crop + 1)) if height > crop else 0
    sx = int(rng.integers(0, width - crop + 1)) if width > crop else 0
    dy = int(rng.integers(0, crop - height + 1)) if height < crop else 0
    dx = int(rng.integers(0, crop - width + 1)) if width < crop else 0
    h, w = min(crop, height), min(crop, width)
    return (slice(sy, sy + h), slice(sx, sx + w)), (slice(dy, dy + h), slice(dx, dx + w))


def _paste(array: np.ndarray, window, crop: int, fill) -> np.ndarray:
    """``array`` [..., H, W] cut at the window's source into a [..., crop, crop] array of ``fill``."""
    (source_y, source_x), (to_y, to_x) = window
    out = np.full(array.shape[:-2] + (crop, crop), fill, array.dtype)
    out[..., to_y, to_x] = array[..., source_y, source_x]
    return out


def random_crop(image: np.ndarray, label: np.ndarray | None, crop: int, rng: np.random.Generator,
                ) -> tuple[np.ndarray, np.ndarray | None]:
    """A random crop x crop window; a smaller side is padded (image 0, label 255) at a random offset.

    image: float32 [3, H, W] (already normalised, so 0 is the mean colour); label: uint8 [H, W].
    """
    window = _crop_window(image.shape[1], image.shape[2], crop, rng)
    return _paste(image, window, crop, 0.0), (_paste(label, window, crop, IGNORE) if label is not None else None)


def cam_train_sample(image: np.ndarray, rng: np.random.Generator, *, resize_long: tuple[int, int],
                     crop: int) -> np.ndarray:
    """CAM training augmentation (DESIGN §4): long side ~ U[low, high], flip, normalise, crop.

    image: uint8 [H, W, 3] -> float32 [3, crop, crop].
    """
    height, width = image.shape[:2]
    long_side = int(rng.integers(resize_long[0], resize_long[1] + 1))
    image = resize_image(image, scaled_size(height, width, long_side / max(height, width)))
    if rng.random() < 0.5:
        image = image[:, ::-1]
    return random_crop(normalize(image), None, crop, rng)[0]


def irn_train_sample(image: np.ndarray, relation: np.ndarray, rng: np.random.Generator, *,
                     rescale: tuple[float, float], crop: int, exact: bool = False):
    """IRNet training augmentation: random rescale, flip, normalise, crop image and relation map.

    image: uint8 [H, W, 3]; relation: uint8 [H, W] (0 bg, class id, 255 ignore)
    -> (float32 [3, crop, crop], uint8 [crop, crop]). With ``exact`` the relation map holds
    instance ids (a corrected image) and a third output is float32 [2, crop, crop], each pixel's
    offset to its instance's centroid (:func:`pipeline.algorithms.pairs.centroid_offsets`),
    taken before the crop, so an instance the crop cuts keeps its true centroid.
    """
    height, width = image.shape[:2]
    size = scaled_size(height, width, float(rng.uniform(rescale[0], rescale[1])))
    image, relation = resize_image(image, size), resize_label(relation, size)
    if rng.random() < 0.5:
        image, relation = image[:, ::-1], relation[:, ::-1]
    window = _crop_window(size[0], size[1], crop, rng)
    out = _paste(normalize(image), window, crop, 0.0), _paste(np.ascontiguousarray(relation), window, crop, IGNORE)
    if not exact:
        return out
    return (*out, _paste(centroid_offsets(relation), window, crop, np.nan))
