"""The hostile-input data set of the end-to-end tests: good synthetic images plus every kind of bad
input a user's bucket and manifest can hold (see tests/conftest.py, fixture ``labelled``)."""

from __future__ import annotations

import io
import json
import math
import os
import struct
import zlib

import numpy as np
from PIL import Image

from pipeline.config import DataConfig
from pipeline.data.images import decode_image
from pipeline.data.synthetic import write_synthetic_set
from pipeline.io import codecs, storage

CLASSES = ["cross", "diamond", "disc", "square"]
GOOD = [f"syn-{i:06d}" for i in range(10)]
# Files that cannot be labelled: image_id -> (file name, words of its quarantine reason, stage probe).
BROKEN = {"broken-empty": ("broken-empty.png", "empty file"),
          "broken-truncated-png": ("broken-truncated.png", "truncated"),
          "broken-truncated-jpeg": ("broken-truncated.jpg", "truncated"),
          "broken-text": ("broken-text.jpg", "not a recognised image format"),
          "broken-bomb": ("broken-bomb.png", "over the limit of 40000000 (data.max_pixels)"),
          "broken-missing": ("broken-missing.png", "not found")}
# Good images re-encoded without changing a pixel: image_id -> (original id, file name).
CONVERTED = {"exif-syn-000003": ("syn-000003", "exif-syn-000003.png"),  # stored sideways, EXIF turns it
             "rgba-syn-000004": ("syn-000004", "rgba-syn-000004.png"),  # alpha 255 everywhere
             "rgb16-syn-000006": ("syn-000006", "rgb16-syn-000006.png")}  # 16 bits per channel, v * 257
CMYK = {"cmyk-syn-000007": ("syn-000007", "cmyk-syn-000007.jpg")}  # CMYK -> RGB is not exact



def tiny_config(tmp: str, manifest: str) -> list[str]:
    return [f"data.manifest={manifest}", f"data.classes=[{', '.join(CLASSES)}]", f"run.root={tmp}/run",
            "train_cam.depth=18", "train_cam.backbone_init=none", "train_cam.batch_size=4", "train_cam.epochs=1",
            "train_cam.crop_size=64", "train_cam.resize_long=[64, 80]", "train_cam.cpus_per_worker=0.5",
            "train_cam.num_workers=2", "train_irn.num_workers=2",  # DDP over two Ray Train workers
            "cams.scales=[1.0, 0.5]", "cams.cpus_per_actor=0.5", "relations.cpus_per_task=0.5",
            "train_irn.depth=18", "train_irn.backbone_init=cam", "train_irn.batch_size=4", "train_irn.epochs=1", "train_irn.crop_size=64",
            "train_irn.cpus_per_worker=0.5", "synthesis.cpus_per_actor=0.5", "synthesis.cpus_per_task=0.5",
            "synthesis.steps=64", "run.min_cam_map=0",
            "eval.num_previews=2"]


def encode(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    """A Pillow image as file bytes of format ``fmt``."""
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _png(width: int, height: int, bit_depth: int, scanlines: bytes) -> bytes:
    """An RGB PNG (colour type 2) written chunk by chunk: Pillow cannot write 16-bit RGB."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, bit_depth, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(scanlines))
            + chunk(b"IEND", b""))


def rgb16_png(image: np.ndarray) -> bytes:
    """uint8 [H, W, 3] -> 16-bit-per-channel PNG holding v * 257 (its top byte is v)."""
    wide = image.astype(">u2") * 257
    return _png(image.shape[1], image.shape[0], 16, b"".join(b"\x00" + row.tobytes() for row in wide))


def exif_rotated_png(image: np.ndarray) -> bytes:
    """The pixels turned 90° counter-clockwise, tagged EXIF Orientation 6 (turn clockwise to view)."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(Image.fromarray(np.ascontiguousarray(np.rot90(image))), "PNG", exif=exif)


def opaque_rgba_png(image: np.ndarray) -> bytes:
    """RGBA with alpha 255 everywhere: compositing over black leaves every pixel as it was."""
    return encode(Image.fromarray(np.dstack([image, np.full(image.shape[:2], 255, np.uint8)])), "PNG")


def cmyk_jpeg(image: np.ndarray) -> bytes:
    return encode(Image.fromarray(image).convert("CMYK"), "JPEG", quality=95)


def _converted_files(image_of) -> dict[str, bytes]:
    """File name -> bytes of every re-encoded copy; ``image_of(id)`` gives an original's pixels."""
    encoders = {"exif-syn-000003": exif_rotated_png, "rgba-syn-000004": opaque_rgba_png,
                "rgb16-syn-000006": rgb16_png, "cmyk-syn-000007": cmyk_jpeg}
    return {name: encoders[image_id](image_of(original))
            for image_id, (original, name) in {**CONVERTED, **CMYK}.items()}


def _broken_files(good_png: bytes) -> dict[str, bytes]:
    """File name -> bytes of every broken file (the missing one is not written)."""
    jpeg = encode(Image.open(io.BytesIO(good_png)), "JPEG")
    side = math.isqrt(DataConfig().max_pixels) + 1000  # header claims 54 Mpx; the file is ~70 bytes
    bomb = _png(side, side, 8, b"\x00" * 64)
    return {"broken-empty.png": b"", "broken-truncated.png": good_png[: len(good_png) // 2],
            "broken-truncated.jpg": jpeg[: len(jpeg) // 2], "broken-text.jpg": b"id,label\n1,cat\n" * 20,
            "broken-bomb.png": bomb}


def unsafe_ids(tmp: str) -> list[str]:
    """Ids that would name files outside their directory (or hidden ones) if used as names."""
    return ["../escape-up1", "../../escape-up2", "../../../../escape-up4", "nested/escape-sub",
            "back\\escape-bs", "nul\x00escape", ".tmp-escape-hidden", "..", os.path.join(tmp, "escape-abs")]


def hostile_manifest(tmp: str, count: int) -> tuple[str, list[tuple[str, str]]]:
    """The synthetic set plus every kind of hostile input, as JSON Lines.

    Returns the manifest path and, for the rows the manifest stage must quarantine,
    (image_id as quarantined, words of the reason).
    """
    data = os.path.join(tmp, "data")
    images = os.path.join(data, "images")
    records = codecs.read_parquet(write_synthetic_set(data, num_images=count, seed=11, num_classes=4,
                                                      min_size=64, max_size=80)).to_pylist()
    labels = {r["image_id"]: r["labels"] for r in records}
    files = {**_broken_files(storage.read_bytes(os.path.join(images, "syn-000001.png"))),
             **_converted_files(lambda i: decode_image(storage.read_bytes(os.path.join(images, f"{i}.png"))))}
    for name, data_bytes in files.items():
        storage.write_bytes(os.path.join(images, name), data_bytes)
    records += [{"image_id": i, "uri": f"images/{name}", "labels": ["disc"]} for i, (name, _) in BROKEN.items()]
    expected = [(i, "unsafe characters") for i in unsafe_ids(tmp)]
    records += [{"image_id": i, "uri": "images/syn-000002.png", "labels": ["disc"]} for i in unsafe_ids(tmp)]
    records += [{"image_id": "", "uri": "images/syn-000002.png", "labels": ["disc"]},
                {"image_id": 42, "uri": "images/syn-000002.png", "labels": ["disc"]},
                {"image_id": "no-uri", "labels": ["disc"]},
                {"image_id": "syn-000003", "uri": "images/syn-000004.png", "labels": ["diamond"]},
                {"image_id": "unicorn-1", "uri": "images/syn-000002.png", "labels": ["unicorn"]}]
    expected += [("", "missing image_id"), ("42", "must be a string"), ("no-uri", "missing uri"),
                 ("syn-000003", "duplicate image_id"), ("unicorn-1", "unknown class")]
    lines = [json.dumps(r).encode() + b"\n" for r in records]
    # Malformed lines in the middle: the rows after them are still read.
    lines += [b"{not json\n", b"[1, 2]\n", b'{"image_id": "bad-\xff-bytes"}\n']
    expected += [("", "is not valid JSON"), ("", "is not a JSON object"), ("", "is not valid UTF-8")]
    lines += [json.dumps({"image_id": i, "uri": f"images/{name}", "labels": labels[original]}).encode() + b"\n"
              for i, (original, name) in {**CONVERTED, **CMYK}.items()]
    path = os.path.join(data, "manifest.jsonl")
    storage.write_bytes(path, b"".join(lines))
    return path, expected


def files_outside(tmp: str, root: str) -> dict[str, int]:
    """Relative path -> mtime (ns) of every file under ``tmp`` except inside the run root."""
    found = {}
    for directory, subdirs, names in os.walk(tmp):
        subdirs[:] = [d for d in subdirs if os.path.join(directory, d) != root]
        for name in names:
            path = os.path.join(directory, name)
            found[os.path.relpath(path, tmp)] = os.stat(path).st_mtime_ns
    return found
