"""open_rgb: every mode PIL opens becomes the 8-bit RGB picture a viewer shows; explicit size limit."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from data_shards.images import BACKGROUND, open_rgb


def _encode(im: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    out = io.BytesIO()
    im.save(out, format=fmt, **kw)
    return out.getvalue()


def test_rgb_jpeg_and_path(tmp_path):
    arr = np.zeros((8, 10, 3), np.uint8)
    arr[..., 1] = 200
    p = tmp_path / "a.png"
    p.write_bytes(_encode(Image.fromarray(arr)))
    im = open_rgb(p)
    assert im.mode == "RGB" and im.size == (10, 8)
    assert np.array_equal(np.asarray(im), arr)


def test_rgba_transparent_pixels_show_the_background_not_the_hidden_colour():
    arr = np.zeros((4, 4, 4), np.uint8)
    arr[..., 0] = 255            # hidden red
    arr[..., 3] = 0              # fully transparent
    arr[0, 0] = (0, 0, 255, 255)  # one opaque blue pixel
    out = np.asarray(open_rgb(_encode(Image.fromarray(arr, "RGBA"))))
    assert tuple(out[1, 1]) == BACKGROUND
    assert tuple(out[0, 0]) == (0, 0, 255)


def test_half_transparent_la_blends_with_white():
    la = Image.fromarray(np.stack([np.zeros((2, 2), np.uint8), np.full((2, 2), 128, np.uint8)], -1), "LA")
    out = np.asarray(open_rgb(_encode(la)))
    assert 125 <= int(out[0, 0, 0]) <= 129 and out.shape == (2, 2, 3)


def test_palette_with_transparent_index():
    p = Image.new("P", (3, 3), 1)
    p.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)  # index 0 red, index 1 green
    p.putpixel((0, 0), 0)
    out = np.asarray(open_rgb(_encode(p, transparency=1)))
    assert tuple(out[0, 0]) == (255, 0, 0)
    assert tuple(out[2, 2]) == BACKGROUND


def test_sixteen_bit_gray_is_scaled_not_clipped():
    arr = np.array([[0, 257 * 128, 65535]], dtype=np.uint16)
    data = _encode(Image.fromarray(arr))
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    out = np.asarray(open_rgb(data))
    assert out[0, :, 0].tolist() == [0, 128, 255]
    assert (out[..., 0] == out[..., 2]).all()


def test_float_gray_in_unit_range():
    im = Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32), "F")
    out = np.asarray(open_rgb(_encode(im, "TIFF")))
    assert out[0, :, 0].tolist() == [0, 128, 255]


def test_cmyk_jpeg_becomes_rgb():
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # pure red in CMYK
    out = np.asarray(open_rgb(_encode(cmyk, "JPEG", quality=95)))
    r, g, b = out[4, 4].tolist()
    assert r > 200 and g < 60 and b < 60


def test_exif_orientation_is_applied():
    arr = np.zeros((4, 8, 3), np.uint8)
    arr[0, 0] = 255  # white top-left corner of the stored 8x4 picture
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW to display
    data = _encode(Image.fromarray(arr), "PNG", exif=exif)
    im = open_rgb(data)
    assert im.size == (4, 8)
    assert np.asarray(im)[0, -1].min() == 255  # the corner is now top-right


def test_undecodable_and_truncated_name_the_source(tmp_path):
    with pytest.raises(ValueError, match="shard x, key 7"):
        open_rgb(b"not an image at all", where="shard x, key 7")
    good = _encode(Image.fromarray(np.full((64, 64, 3), 9, np.uint8)))
    bad = tmp_path / "cut.png"
    bad.write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match="cut.png"):
        open_rgb(bad)
    with pytest.raises(FileNotFoundError, match="nope.png"):
        open_rgb(tmp_path / "nope.png")


def test_pixel_limit_is_explicit():
    data = _encode(Image.new("RGB", (20, 10)))
    assert open_rgb(data, max_pixels=200).size == (20, 10)
    with pytest.raises(ValueError, match="over the limit of 199"):
        open_rgb(data, max_pixels=199)


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (no real pixel data): a decompression bomb shape."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    body = chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + body


@pytest.mark.parametrize("side", [10_000, 14_000])  # between PIL's two limits, and above both
def test_decompression_bombs_are_errors_not_warnings(side):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning may escape either
        with pytest.raises(ValueError, match="limit"):
            open_rgb(_png_header_only(side, side))
