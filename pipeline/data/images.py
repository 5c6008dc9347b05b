"""Image bytes -> RGB uint8 array, or one typed error with a readable reason; and the one way every
stage reads an input image (with its label PNG) or says why it cannot.

Every way an image can be bad (empty, truncated, not an image, too many pixels, an unsupported
mode) ends in :class:`ImageDecodeError`, which the stages turn into a quarantine row, so a bad file
never takes a worker down. :func:`read_inputs` reads an image and, optionally, a label PNG of the
same size; what it can raise for a bad or missing input is :data:`UNREADABLE`, and
:func:`unreadable_reason` says it in words.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pipeline.io import codecs, storage

DEFAULT_MAX_PIXELS = 40_000_000


class ImageDecodeError(ValueError):
    """The bytes are not a usable image; ``reason`` says why in words a user can act on."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _to_rgb(image: Image.Image) -> np.ndarray:
    """Any Pillow mode -> uint8 [H, W, 3]."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit / 32-bit greyscale: keep the top 8 bits of the 16-bit range.
        values = np.asarray(image, dtype=np.float64)
        grey = np.clip(values / 257.0, 0, 255).round().astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # Composite transparent pixels over black, so hidden colour values do not leak in.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return np.asarray(Image.alpha_composite(background, rgba).convert("RGB"), dtype=np.uint8)
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def image_size(data: bytes) -> tuple[int, int]:
    """(height, width) from the header only, after EXIF orientation; raises ImageDecodeError."""
    with _open(data, max_pixels=None) as image:
        width, height = image.size
        orientation = image.getexif().get(0x0112, 1)
        return (width, height) if orientation in (5, 6, 7, 8) else (height, width)


def _open(data: bytes, *, max_pixels: int | None) -> Image.Image:
    if not data:
        raise ImageDecodeError("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as err:
        raise ImageDecodeError(f"image too large to decode safely ({err})") from None
    except UnidentifiedImageError:
        raise ImageDecodeError("not a recognised image format") from None
    except Exception as err:  # noqa: BLE001 - any decoder failure is a bad input, not a crash
        raise ImageDecodeError(f"unreadable image header ({type(err).__name__}: {err})") from None
    width, height = image.size
    if width <= 0 or height <= 0:
        raise ImageDecodeError(f"image has no pixels ({width}x{height})")
    if max_pixels is not None and width * height > max_pixels:
        raise ImageDecodeError(
            f"image is {width}x{height} = {width * height} pixels, over the limit of {max_pixels} "
            f"(data.max_pixels)")
    return image


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode image bytes to uint8 [H, W, 3] RGB, EXIF orientation applied.

    Greyscale, palette, RGBA/LA (composited over black), CMYK, 16-bit greyscale (top 8 bits) and
    other Pillow modes are converted. Raises :class:`ImageDecodeError` for empty, truncated,
    non-image or over-``max_pixels`` input; no other exception escapes.
    """
    image = _open(data, max_pixels=max_pixels)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image.load()
            image = ImageOps.exif_transpose(image)
            return _to_rgb(image)
    except ImageDecodeError:
        raise
    except OSError as err:
        raise ImageDecodeError(f"truncated or corrupt image data ({err})") from None
    except Exception as err:  # noqa: BLE001
        raise ImageDecodeError(f"could not decode image ({type(err).__name__}: {err})") from None
    finally:
        image.close()


# What reading an input raises when the file is bad or gone (a decoder error, a missing or
# unreadable file, a label PNG of another size or kind): the readers that skip or quarantine a
# record catch exactly these; anything else is a fault of the code and propagates.
UNREADABLE = (ImageDecodeError, OSError, ValueError)


def read_inputs(image_uri: str, label_uri: str | None = None, *, max_pixels: int,
                label_name: str = "labels") -> tuple[np.ndarray, np.ndarray | None]:
    """The image at ``image_uri`` (:func:`decode_image`) and, with ``label_uri``, the label PNG
    there (class or instance ids), which must have the image's size. Raises one of
    :data:`UNREADABLE`; a size mismatch is a ValueError naming both sizes and ``label_name``."""
    image = decode_image(storage.read_bytes(str(image_uri)), max_pixels=max_pixels)
    if label_uri is None:
        return image, None
    label = read_label(label_uri)
    if label.shape != image.shape[:2]:
        raise ValueError(f"{label_name} {label.shape} do not match the image {image.shape[:2]}")
    return image, label


def read_label(uri: str) -> np.ndarray:
    """A label PNG (class ids, or 16-bit instance ids) as an integer array."""
    return codecs.decode_label_png(storage.read_bytes(str(uri)))


def unreadable_reason(err: BaseException, what: str = "reading") -> str:
    """Why an input could not be used, in words a user can act on (a quarantine reason)."""
    if isinstance(err, ImageDecodeError):
        return err.reason
    if isinstance(err, FileNotFoundError):
        return "image file not found"
    return f"{what} failed ({type(err).__name__}: {err})"
