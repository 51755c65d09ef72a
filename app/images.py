"""Uploaded bytes -> one upright PIL image in mode ``L`` or ``RGB``.

Untrusted input: the format is sniffed from the bytes (never the client's content type),
only a few plain raster formats are opened (no EPS, which would run Ghostscript), the pixel
count is checked from the header before anything is decoded, and so is the work the file's
structure asks of the decoder (:mod:`app.decode_work`: progressive JPEG scans, PNG chunks), and
every decoder failure becomes a 4xx :class:`~app.failures.ServiceError`. A broken EXIF block is
ignored (the image is used as stored), not refused. ``tests/utils/corpus.py`` holds the hostile files this is tested on.
"""

from __future__ import annotations

import io
import logging
import math
import warnings
from collections.abc import Callable, Iterator

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from app.decode_work import check_decode_work
from app.failures import CorruptImage, ImageTooLarge, UnsupportedImage

log = logging.getLogger(__name__)

# MPO is how older Pillows name many camera JPEGs (they embed a second, preview image).
ALLOWED_FORMATS = ("JPEG", "MPO", "PNG", "GIF", "BMP", "TIFF", "WEBP", "PPM")
# Background that transparent pixels are flattened onto (what a browser shows them on).
BACKGROUND = (255, 255, 255)
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
# 32-bit samples (integer or float: TIFFs from scientific cameras, HDR tools) get half the pixels: their
# decode takes about twice a photo's memory, and at the full limit one deflated float32 TIFF alone had
# the service OOM-killed under --memory 512m (bench/results/container-float-tiff-full-limit.json).
WIDE_SAMPLE_MODES = ("I", "F", "I;32", "I;32L", "I;32B", "F;32", "F;32F", "F;32BF")
WIDE_SAMPLE_PIXEL_SHARE = 2


def configure_pillow(max_pixels: int) -> None:
    """Make Pillow's own decompression-bomb guard use our limit, and turn its warning (issued
    between 1x and 2x the limit) into an exception, as it is above 2x. Process-wide."""
    Image.MAX_IMAGE_PIXELS = max_pixels
    warnings.simplefilter("error", Image.DecompressionBombWarning)


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """Decode the first frame of ``data``, upright per its EXIF orientation, as ``L`` or ``RGB``."""
    return decode_image_reduced(data, max_pixels, None)[0]


def decode_image_reduced(data: bytes, max_pixels: int, max_side: int | None) -> tuple[Image.Image, float]:
    """:func:`decode_image`, except that a JPEG whose longer side is over ``max_side`` is decoded at
    1/2, 1/4 or 1/8 of its size (the JPEG decoder's own reduction, Pillow's draft mode: a fraction
    of the full decode's time), the smallest of these whose longer side is still ``max_side`` or more.

    Returns the image and the scale from its pixels to the file's (1.0 when decoded at full size):
    a box found in the image, multiplied by it, is in the original photo's pixels.
    """
    check_decode_work(data)  # too many scans, segments or chunks: refused before Pillow walks them
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
    if width * height > pixel_limit(image.mode, max_pixels):  # the header alone is read so far: nothing decoded yet
        raise ImageTooLarge()
    if width == 0 or height == 0:
        raise CorruptImage()
    try:
        image.seek(0)  # animated GIF/WebP/APNG, multi-page TIFF: the first frame
        if max_side is not None and image.format in ("JPEG", "MPO") and max(width, height) > max_side:
            ratio = max_side / max(width, height)
            image.draft(None, (math.ceil(width * ratio), math.ceil(height * ratio)))  # before load: no full decode
        image.load()
        scale = width / image.width  # the same on both axes: the reduction is by a power of two
        return to_gray_or_rgb(_upright(image)), scale
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageTooLarge() from None
    except Exception as exc:  # truncated data, decoder errors: the client's file
        log.info("image data rejected: %r", exc)
        raise CorruptImage() from None


def pixel_limit(mode: str, max_pixels: int) -> int:
    """The most pixels an image of ``mode`` may have: ``max_pixels``, or a share of it for 32-bit samples."""
    return max_pixels // WIDE_SAMPLE_PIXEL_SHARE if mode in WIDE_SAMPLE_MODES else max_pixels


def _upright(image: Image.Image) -> Image.Image:
    """``image`` turned as its EXIF orientation says; as it is when the EXIF block cannot be parsed.

    A broken EXIF block (editors write them; a PNG eXIf or WebP EXIF chunk that is not TIFF data)
    says nothing about the pixels, which have decoded: the image is used unturned, not refused.
    """
    try:
        # In place: without an orientation to apply, the default would return a copy of the image.
        ImageOps.exif_transpose(image, in_place=True)
    except Exception as exc:  # Pillow's EXIF parser raises SyntaxError, ValueError, struct.error...
        log.info("EXIF ignored, image used as stored: %r", exc)
    return image


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
        return _bands_to_gray(np.asarray(image), lambda band: np.clip(band, 0, 65535) >> 8)
    if mode == "F":
        pixels = np.asarray(image)
        # nan -> 0, +-inf -> the largest float32 (nan_to_num); the range is taken in float64, where it cannot overflow.
        lo = min(float(np.nan_to_num(band).min()) for band in _bands(pixels))
        hi = max(float(np.nan_to_num(band).max()) for band in _bands(pixels))
        scale = 255.0 / (hi - lo) if hi > lo else 0.0
        return _bands_to_gray(pixels, lambda band: np.rint((np.nan_to_num(band).astype(np.float64) - lo) * scale))
    if mode == "LA":  # flattened in gray: through RGBA it would take 4 more bytes per pixel
        flat = Image.new("L", image.size, BACKGROUND[0])
        flat.paste(image.convert("L"), mask=image.getchannel("A"))
        return flat
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    elif mode in ("La", "PA", "RGBa"):
        image = image.convert("RGBA")
    if image.mode == "RGBA":
        flat = Image.new("RGB", image.size, BACKGROUND)
        flat.paste(image, mask=image.getchannel("A"))
        return flat
    if image.mode == "RGB":
        return image
    return image.convert("RGB")  # CMYK, YCbCr, LAB, ...; raises ValueError if Pillow cannot


# Pixels converted at a time from a 16-bit, 32-bit or float image: a full-size temporary in int64
# or float64 would take 8 bytes per pixel, 320 MB for an image at the default MAX_IMAGE_PIXELS.
_BAND_PIXELS = 1 << 20


def _bands(pixels: np.ndarray) -> Iterator[np.ndarray]:
    """Views of the (H, W) array ``pixels``, a band of about ``_BAND_PIXELS`` rows' worth at a time."""
    rows = max(1, _BAND_PIXELS // max(1, pixels.shape[1]))
    return (pixels[top : top + rows] for top in range(0, pixels.shape[0], rows))


def _bands_to_gray(pixels: np.ndarray, to_0_255: Callable[[np.ndarray], np.ndarray]) -> Image.Image:
    """An ``L`` image of ``to_0_255`` applied to (H, W) ``pixels`` a band of rows at a time."""
    out = np.empty(pixels.shape, dtype=np.uint8)
    for band, out_band in zip(_bands(pixels), _bands(out), strict=True):
        out_band[...] = to_0_255(band)
    return Image.fromarray(out, mode="L")
