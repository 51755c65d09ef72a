"""Uploaded bytes -> one upright PIL image in mode ``L`` or ``RGB``.

Untrusted input: the format is sniffed from the bytes (never the client's content type),
only a few plain raster formats are opened (no EPS, which would run Ghostscript), the pixel
count is checked from the header before anything is decoded, and every decoder failure
becomes a 4xx :class:`~app.errors.ServiceError`.
"""

from __future__ import annotations

import io
import logging
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from app.errors import CorruptImage, ImageTooLarge, UnsupportedImage

log = logging.getLogger(__name__)

# MPO is how older Pillows name many camera JPEGs (they embed a second, preview image).
ALLOWED_FORMATS = ("JPEG", "MPO", "PNG", "GIF", "BMP", "TIFF", "WEBP", "PPM")
# Background that transparent pixels are flattened onto (what a browser shows them on).
BACKGROUND = (255, 255, 255)
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def configure_pillow(max_pixels: int) -> None:
    """Make Pillow's own decompression-bomb guard use our limit, and turn its warning (issued
    between 1x and 2x the limit) into an exception, as it is above 2x. Process-wide."""
    Image.MAX_IMAGE_PIXELS = max_pixels
    warnings.simplefilter("error", Image.DecompressionBombWarning)


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """Decode the first frame of ``data``, upright per its EXIF orientation, as ``L`` or ``RGB``."""
    try:
        image = Image.open(io.BytesIO(data), formats=_registered_formats())
    except UnidentifiedImageError:
        raise UnsupportedImage() from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageTooLarge() from None
    except Exception as exc:  # Pillow's header parsers raise many kinds on crafted input
        log.info("image header rejected: %r", exc)
        raise CorruptImage() from None

    width, height = image.size
    if width * height > max_pixels:  # the header alone is read so far: nothing decoded yet
        raise ImageTooLarge()
    if width == 0 or height == 0:
        raise CorruptImage()
    try:
        image.seek(0)  # animated GIF/WebP/APNG, multi-page TIFF: the first frame
        image.load()
        upright = ImageOps.exif_transpose(image)
        return to_gray_or_rgb(upright)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageTooLarge() from None
    except Exception as exc:  # truncated data, broken EXIF, decoder errors: the client's file
        log.info("image data rejected: %r", exc)
        raise CorruptImage() from None


def _registered_formats() -> list[str]:
    """The allowed formats this Pillow build can open (asking for an unknown one is a KeyError)."""
    Image.init()
    return [name for name in ALLOWED_FORMATS if name in Image.OPEN]


def to_gray_or_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> ``L`` or ``RGB`` with 8 bits per channel, transparency flattened."""
    mode = image.mode
    if mode in ("L", "RGB"):
        return image
    if mode == "1":
        return image.convert("L")
    if mode in _SIXTEEN_BIT_MODES or mode == "I":
        # Pillow's convert("L") clips 16-bit values at 255 (a white image); scale instead.
        pixels = np.asarray(image).astype(np.int64)
        return Image.fromarray((np.clip(pixels, 0, 65535) >> 8).astype(np.uint8), mode="L")
    if mode == "F":
        pixels = np.asarray(image, dtype=np.float64)
        pixels = np.nan_to_num(pixels)
        lo, hi = float(pixels.min()), float(pixels.max())
        scaled = (pixels - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(pixels)
        return Image.fromarray(np.rint(scaled).astype(np.uint8), mode="L")
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    elif mode in ("LA", "La", "PA", "RGBa"):
        image = image.convert("RGBA")
    if image.mode == "RGBA":
        flat = Image.new("RGB", image.size, BACKGROUND)
        flat.paste(image, mask=image.getchannel("A"))
        return flat
    if image.mode == "RGB":
        return image
    return image.convert("RGB")  # CMYK, YCbCr, LAB, ...; raises ValueError if Pillow cannot
