"""Generated, tagged image sets with ground truth: the embedded default for the demo and the tests.

Each image has 1-3 of the set's object classes, 1-4 instances of each, on a textured background;
some instances of the same class touch each other (the case IRNet's displacement field exists for).
Image ``i`` of seed ``s`` depends only on (s, i): a larger ``num_images`` with the same seed grows
the set without changing the images already in it. Two styles:

* ``shapes`` (the demo's): crosses, diamonds, discs, squares, triangles, each class with its own
  colour family, so a small network learns it in minutes on a CPU;
* ``rings`` (a set the defaults were not tuned on): rings, crosses and ellipses of random size,
  aspect and angle, each instance filled with a random colour and stripe texture, so only the
  shape tells the class.

``cam_like_maps`` makes CAM-like activation maps from the ground truth (peaks inside objects,
blurred over their borders, at stride 16), to stand in for CAMs of another method (``cams.source``).
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

from pipeline.data.classes import Vocabulary
from pipeline.data.manifest import ManifestRow, rows_to_table
from pipeline.io import codecs, storage

# Sorted, so that the default class list (sorted union of the tags) numbers them in this order.
CLASS_NAMES = ("cross", "diamond", "disc", "square", "triangle")
RING_CLASSES = ("cross", "ellipse", "ring")
STYLES = ("shapes", "rings")
CLASS_COLOURS = np.array([(170, 60, 200), (230, 200, 40), (220, 40, 40), (40, 170, 60), (40, 80, 220)],
                         dtype=np.float32)


@dataclass
class SyntheticImage:
    image: np.ndarray  # uint8 [H, W, 3]
    semantic: np.ndarray  # uint8 [H, W], 0 background, class id 1..C
    instance: np.ndarray  # uint16 [H, W], 0 none, instance ids 1..N
    instance_classes: list[str]  # class name of instance id i at position i-1
    labels: list[str]  # sorted image-level tags


def _shape_mask(name: str, yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, r: float) -> np.ndarray:
    dy, dx = yy - cy, xx - cx
    if name == "disc":
        return dy * dy + dx * dx <= r * r
    if name == "square":
        return np.maximum(np.abs(dy), np.abs(dx)) <= 0.85 * r
    if name == "triangle":
        return (dy <= 0.8 * r) & (dy >= -r) & (np.abs(dx) <= 0.6 * (dy + r))
    if name == "diamond":
        return np.abs(dy) + np.abs(dx) <= 1.1 * r
    if name == "cross":
        arm = 0.35 * r
        return ((np.abs(dy) <= arm) & (np.abs(dx) <= r)) | ((np.abs(dx) <= arm) & (np.abs(dy) <= r))
    raise ValueError(f"unknown synthetic class {name!r}")


def _ring_mask(name: str, yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, r: float,
               rng: np.random.Generator) -> np.ndarray:
    """A ``rings``-style shape of radius ~r at a random angle and aspect."""
    angle = rng.uniform(0, np.pi)
    v = (yy - cy) * np.cos(angle) + (xx - cx) * np.sin(angle)
    u = -(yy - cy) * np.sin(angle) + (xx - cx) * np.cos(angle)
    if name == "ring":
        d = np.hypot(u, v)
        return (d <= r) & (d >= r * rng.uniform(0.45, 0.65))
    if name == "ellipse":
        a, b = r, r * rng.uniform(0.45, 0.8)
        return (u / a) ** 2 + (v / b) ** 2 <= 1.0
    if name == "cross":
        arm = r * rng.uniform(0.25, 0.4)
        return ((np.abs(v) <= arm) & (np.abs(u) <= r)) | ((np.abs(u) <= arm) & (np.abs(v) <= r))
    raise ValueError(f"unknown rings-style class {name!r}")


def _texture(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """float32 [H, W, 3]: a random colour with random-angle stripes, the same for any class."""
    colour = rng.uniform(40, 230, size=3).astype(np.float32)
    other = rng.uniform(40, 230, size=3).astype(np.float32)
    angle, period = rng.uniform(0, np.pi), rng.uniform(3, 9)
    wave = 0.5 + 0.5 * np.sin((yy * np.cos(angle) + xx * np.sin(angle)) * 2 * np.pi / period)
    return colour[None, None] * wave[..., None] + other[None, None] * (1 - wave[..., None])


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Muted low-frequency colour noise plus fine grain and faint stripes."""
    coarse = rng.uniform(60, 160, size=(max(2, height // 24), max(2, width // 24), 3)).astype(np.float32)
    base = np.asarray(Image.fromarray(coarse.astype(np.uint8)).resize((width, height), Image.BILINEAR),
                      dtype=np.float32)
    grey = base.mean(axis=2, keepdims=True)
    base = 0.5 * base + 0.5 * grey  # desaturate so object colours stand out
    yy, xx = np.mgrid[0:height, 0:width]
    angle, period = rng.uniform(0, np.pi), rng.uniform(6, 16)
    stripes = 10 * np.sin((yy * np.cos(angle) + xx * np.sin(angle)) * 2 * np.pi / period)
    return base + stripes[:, :, None] + rng.normal(0, 6, size=(height, width, 3))


def generate_image(rng: np.random.Generator, classes: tuple[str, ...], *, min_size: int = 96,
                   max_size: int = 160, radius: tuple[float, float] = (0.09, 0.16),
                   style: str = "shapes") -> SyntheticImage:
    """One synthetic image with its ground truth (see module docstring).

    ``radius``: object radius range as fractions of the image's shorter side.
    """
    height, width = (int(v) for v in rng.integers(min_size, max_size + 1, size=2))
    canvas = _background(rng, height, width)
    semantic = np.zeros((height, width), np.uint8)
    instance = np.zeros((height, width), np.uint16)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    present = rng.choice(len(classes), size=int(rng.integers(1, min(3, len(classes)) + 1)), replace=False)
    instance_classes: list[str] = []
    for class_index in sorted(present.tolist()):
        name = classes[class_index]
        previous: tuple[float, float, float] | None = None
        for _ in range(int(rng.integers(1, 5))):
            for _attempt in range(30):
                r = float(rng.uniform(*radius) * min(height, width))
                if previous is not None and rng.random() < 0.6:
                    # Touching neighbour of the previous instance of this class.
                    theta = rng.uniform(0, 2 * np.pi)
                    dist = (previous[2] + r) * 0.92
                    cy, cx = previous[0] + dist * np.sin(theta), previous[1] + dist * np.cos(theta)
                    allowed_overlap = 0.08
                else:
                    cy, cx = rng.uniform(r, height - r), rng.uniform(r, width - r)
                    allowed_overlap = 0.0
                if not (r <= cy <= height - r and r <= cx <= width - r):
                    continue
                if style == "rings":
                    mask = _ring_mask(name, yy, xx, cy, cx, r, rng)
                else:
                    mask = _shape_mask(name, yy, xx, cy, cx, r)
                area = int(mask.sum())
                if area < 30 or (instance[mask] > 0).sum() > allowed_overlap * area:
                    continue
                if style == "rings":
                    canvas[mask] = _texture(rng, yy, xx)[mask] + rng.normal(0, 5, size=(area, 3))
                else:
                    colour = CLASS_COLOURS[class_index] + rng.uniform(-25, 25, size=3)
                    shade = 1.0 + 0.12 * np.sin((yy - cy + xx - cx) / rng.uniform(2.5, 5.0))
                    canvas[mask] = colour[None, :] * shade[mask][:, None] + rng.normal(0, 5, size=(area, 3))
                instance_classes.append(name)
                instance[mask] = len(instance_classes)
                semantic[mask] = class_index + 1
                previous = (cy, cx, r)
                break
    # Occlusion may hide an instance entirely; renumber the visible ones 1..N.
    visible = [i for i in range(1, len(instance_classes) + 1) if (instance == i).any()]
    remap = np.zeros(len(instance_classes) + 1, np.uint16)
    remap[visible] = np.arange(1, len(visible) + 1)
    instance = remap[instance]
    instance_classes = [instance_classes[i - 1] for i in visible]
    image = np.clip(canvas, 0, 255).round().astype(np.uint8)
    labels = sorted({classes[c - 1] for c in np.unique(semantic) if c > 0})
    return SyntheticImage(image, semantic, instance, instance_classes, labels)


def cam_like_maps(semantic: np.ndarray, instance: np.ndarray, class_ids: list[int], *, stride: int = 16,
                  rng: np.random.Generator | None = None) -> np.ndarray:
    """CAM-like maps float32 [K, ceil(H/stride), ceil(W/stride)] of the classes ``class_ids``.

    Per instance, the square root of its distance to the border, scaled to peak 1 (CAMs peak on
    the most discriminative interior), blurred over ~4% of the image so activations bleed over
    borders and touching instances merge, averaged over stride x stride cells, with 5% noise.
    """
    from scipy import ndimage

    rng = rng or np.random.default_rng(0)
    height, width = semantic.shape
    grid = (-(-height // stride), -(-width // stride))
    maps = np.zeros((len(class_ids),) + grid, np.float32)
    for k, class_id in enumerate(class_ids):
        full = np.zeros((height, width), np.float32)
        for instance_id in np.unique(instance[semantic == class_id]):
            if instance_id == 0:
                continue
            distance = ndimage.distance_transform_edt(instance == instance_id)
            full = np.maximum(full, np.sqrt(distance / max(distance.max(), 1.0)))
        full = ndimage.gaussian_filter(full, sigma=0.04 * min(height, width))
        padded = np.zeros((grid[0] * stride, grid[1] * stride), np.float32)
        padded[:height, :width] = full
        cells = padded.reshape(grid[0], stride, grid[1], stride).mean(axis=(1, 3))
        maps[k] = np.clip(cells + rng.normal(0, 0.05 * max(cells.max(), 1e-3), size=grid), 0, None)
    return maps


def write_synthetic_set(out: str, *, num_images: int, seed: int = 0, num_classes: int = 4,
                        min_size: int = 96, max_size: int = 160, val_fraction: float = 0.2,
                        radius: tuple[float, float] = (0.09, 0.16), style: str = "shapes",
                        cam_like: str | None = None) -> str:
    """Write images, GT PNGs and ``manifest.parquet`` under ``out``; return the manifest URI.

    Images whose index ``i`` satisfies ``i % round(1 / val_fraction) == 0`` get split 'val', the
    rest 'train' (``val_fraction`` 0: no split). Files already present with the same content are
    rewritten (idempotent). With ``cam_like``, also write :func:`cam_like_maps` of every image as
    ``<cam_like>/<image_id>.npz`` (the ``cams.source`` format).
    """
    names = CLASS_NAMES if style == "shapes" else RING_CLASSES
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}, got {style!r}")
    if not 2 <= num_classes <= len(names):
        raise ValueError(f"num_classes must be in 2..{len(names)} for style {style!r}, got {num_classes}")
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    classes = names[:num_classes]
    every = max(1, round(1 / val_fraction)) if val_fraction > 0 else 0
    rows = []
    for index in range(num_images):
        sample = generate_image(np.random.default_rng([seed, index]), classes,
                                min_size=min_size, max_size=max_size, radius=radius, style=style)
        image_id = f"syn-{index:06d}"
        buf = io.BytesIO()
        Image.fromarray(sample.image).save(buf, format="PNG")
        storage.write_bytes(storage.join(out, "images", f"{image_id}.png"), buf.getvalue())
        storage.write_bytes(storage.join(out, "gt", "semantic", f"{image_id}.png"),
                            codecs.encode_semantic_png(sample.semantic))
        storage.write_bytes(storage.join(out, "gt", "instance", f"{image_id}.png"),
                            codecs.encode_instance_png(sample.instance))
        if cam_like:
            class_ids = [Vocabulary(classes).id(name) for name in sample.labels]
            maps = cam_like_maps(sample.semantic, sample.instance, class_ids, rng=np.random.default_rng([seed, index, 1]))
            buf = io.BytesIO()
            np.savez(buf, cams=maps.astype(np.float16), class_ids=np.array(class_ids, np.int64))
            storage.write_bytes(storage.join(cam_like, f"{image_id}.npz"), buf.getvalue())
        rows.append(ManifestRow(
            image_id=image_id, uri=f"images/{image_id}.png", labels=sample.labels,
            split=("val" if index % every == 0 else "train") if every else "",
            gt_semantic_uri=f"gt/semantic/{image_id}.png", gt_instance_uri=f"gt/instance/{image_id}.png",
            gt_instance_classes=sample.instance_classes))
    manifest = storage.join(out, "manifest.parquet")
    codecs.write_parquet(manifest, rows_to_table(rows))
    return manifest
