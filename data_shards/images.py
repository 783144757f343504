"""One way to turn an image file into pixels: the 8-bit RGB picture a viewer would show.

Converters, loaders and ``predict`` all call :func:`open_rgb`, so an image means the same
pixels everywhere. PIL's ``convert("RGB")`` alone gets several modes wrong; the rules here:

- transparency (RGBA, LA, PA, palette or gray with a ``transparency`` key) is composited on
  :data:`BACKGROUND` (white, as image viewers and browsers show it on a page) instead of dropping
  the alpha channel, which shows the hidden colour of transparent pixels;
- 16-bit gray (``I;16*``) is scaled to 8 bits (``v * 255 / 65535``) instead of clipped at 255;
  32-bit integer gray (``I``, how older PIL read 16-bit PNGs) is read on the same 16-bit scale;
  float gray (``F``) is taken as [0, 1] when it lies there, else as [0, 255], then clipped;
- CMYK, YCbCr, 1-bit, palette and the rest go through PIL's conversion;
- EXIF orientation is applied (``ImageOps.exif_transpose``), as every current viewer and browser
  does. Embedded ICC profiles are *not* applied (PIL's default, and the reference's).

The size limit is explicit: an image of more than ``max_pixels`` pixels is refused (PIL's
``DecompressionBombWarning`` becomes this error) before any pixel is decoded.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

#: pixels above which an image is refused (PIL's own warning threshold, ~89.5 MP)
DEFAULT_MAX_PIXELS = 89_478_485
#: what transparent pixels are composited on
BACKGROUND = (255, 255, 255)

ImageSource = bytes | bytearray | memoryview | str | Path


def _describe(source: ImageSource, where: str | None) -> str:
    if where:
        return where
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<{len(source)} bytes>"
    return str(source)


def check_size(width: int, height: int, max_pixels: int, where: str) -> None:
    """ValueError naming ``where`` if ``width x height`` is over ``max_pixels``."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image {where}: empty size {width}x{height}")
    if width * height > max_pixels:
        raise ValueError(f"image {where}: {width}x{height} = {width * height} pixels is over the limit of "
                         f"{max_pixels} (a decompression bomb or a huge scan; to allow it, raise the limit: "
                         "--max-pixels of sst-dist shards, max_pixels in Python)")


def open_image(source: ImageSource, *, max_pixels: int = DEFAULT_MAX_PIXELS, where: str | None = None):
    """Open ``source`` lazily (header only) after the pixel-limit check; ValueError if unreadable."""
    from PIL import Image

    name = _describe(source, where)
    try:
        if isinstance(source, (bytes, bytearray, memoryview)):
            fp = io.BytesIO(bytes(source))
        else:
            path = Path(source)
            if not path.is_file():
                raise FileNotFoundError(f"image not found: {path}")
            fp = io.BytesIO(path.read_bytes())
        with warnings.catch_warnings():  # our own limit below replaces PIL's warning
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(fp)
    except FileNotFoundError:
        raise
    except Image.DecompressionBombError as err:
        raise ValueError(f"image {name}: over the pixel limit of {max_pixels}: {err}") from err
    except Exception as err:  # PIL raises many types (OSError, SyntaxError, struct.error, ...)
        raise ValueError(f"cannot read image {name}: {err}") from err
    check_size(im.width, im.height, max_pixels, name)
    return im


def _sixteen_bit_to_8(im):
    import numpy as np
    from PIL import Image

    arr = np.asarray(im, dtype=np.float64)
    out = np.clip(np.rint(arr * (255.0 / 65535.0)), 0, 255).astype(np.uint8)
    return Image.fromarray(out, "L")


def _float_to_8(im):
    import numpy as np
    from PIL import Image

    arr = np.nan_to_num(np.asarray(im, dtype=np.float64))
    if arr.size and arr.min() >= 0.0 and arr.max() <= 1.0:
        arr = arr * 255.0
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L")


def to_rgb(im):
    """A loaded PIL image -> 8-bit RGB as a viewer shows it (module docstring has the rules)."""
    from PIL import Image, ImageOps

    im = ImageOps.exif_transpose(im)
    mode = im.mode
    if mode.startswith("I;16") or mode == "I":
        im = _sixteen_bit_to_8(im)
    elif mode == "F":
        im = _float_to_8(im)
    elif mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
            "transparency" in im.info and mode in ("P", "L", "RGB", "1")) or (
            mode == "P" and im.palette is not None and im.palette.mode == "RGBA"):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if im.mode != "RGB":
        im = im.convert("RGB")
    return im


def open_rgb(source: ImageSource, *, max_pixels: int = DEFAULT_MAX_PIXELS, where: str | None = None):
    """Decode ``source`` (encoded bytes or a file path) to a fully loaded 8-bit RGB PIL image.

    Raises ValueError naming the source (``where`` if given) for an undecodable or truncated
    image and for one over ``max_pixels``; FileNotFoundError for a missing file.
    """
    name = _describe(source, where)
    im = open_image(source, max_pixels=max_pixels, where=name)
    try:
        im.load()
        out = to_rgb(im)
        out.load()
    except Exception as err:
        raise ValueError(f"cannot decode image {name}: {err}") from err
    return out
