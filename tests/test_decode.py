import numpy as np
import pytest
from hostile import encode
from PIL import Image

from pipeline.data.images import ImageDecodeError, decode_image, image_size


def _rgb(h=12, w=20):
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def test_rgb_png_is_exact():
    array = _rgb()
    out = decode_image(encode(Image.fromarray(array)))
    assert out.dtype == np.uint8 and out.shape == (12, 20, 3) and np.array_equal(out, array)


def test_exif_orientation_is_applied():
    array = np.zeros((10, 30, 3), np.uint8)
    array[:, :10] = 255  # white on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    data = encode(Image.fromarray(array), "JPEG", exif=exif, quality=100)
    out = decode_image(data)
    assert out.shape == (30, 10, 3)
    assert image_size(data) == (30, 10)
    assert out[:8].mean() > 200 and out[-8:].mean() < 50  # left edge became the top


@pytest.mark.parametrize("mode", ["L", "P", "CMYK", "LA", "RGBA", "1"])
def test_other_modes_become_rgb(mode):
    image = Image.fromarray(_rgb()).convert(mode)
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    out = decode_image(encode(image, fmt))
    assert out.shape == (12, 20, 3) and out.dtype == np.uint8


def test_rgba_transparent_pixels_are_black():
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 255  # red, but fully transparent
    out = decode_image(encode(Image.fromarray(rgba, "RGBA")))
    assert out.max() == 0


def test_sixteen_bit_greyscale_keeps_the_top_byte():
    values = np.array([[0, 257 * 10], [257 * 128, 65535]], np.uint16)
    out = decode_image(encode(Image.fromarray(values)))
    assert out[..., 0].tolist() == [[0, 10], [128, 255]] and (out[..., 0] == out[..., 2]).all()


def test_zero_byte():
    with pytest.raises(ImageDecodeError, match="empty file"):
        decode_image(b"")


def test_not_an_image():
    with pytest.raises(ImageDecodeError, match="not a recognised image"):
        decode_image(b"this is a text file, not a picture" * 10)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated(fmt):
    data = encode(Image.fromarray(_rgb(64, 64)), fmt)
    with pytest.raises(ImageDecodeError, match="truncated|corrupt|unreadable"):
        decode_image(data[: len(data) // 2])


def test_oversized_is_refused_before_decoding():
    bomb = encode(Image.new("1", (12000, 12000)))  # a few KB that would expand to 144 Mpx
    assert len(bomb) < 100_000
    with pytest.raises(ImageDecodeError, match="over the limit"):
        decode_image(bomb, max_pixels=40_000_000)
    with pytest.raises(ImageDecodeError, match="data.max_pixels"):
        decode_image(encode(Image.fromarray(_rgb())), max_pixels=100)
