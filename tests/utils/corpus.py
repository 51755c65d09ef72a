"""Hostile and malformed uploads for ``POST /predict`` and ``POST /predict/batch``, made in code.

Every :class:`Case` is bytes a client could send, the content type it claims (often a lie: the
service sniffs the format from the bytes), and the statuses a correct service may answer. Where
the outcome is fixed (a decompression bomb is a 413, a PDF is a 415) there is one status; where a
corruption may or may not hit something the decoder needs (a few flipped bits), there are several.
The corpus is the same bytes on every call: corruptions come from a seeded RNG.

Families: truncated and corrupted files of every allowed format; decompression bombs (huge
dimensions declared in tiny headers, and compressed text/ICC chunks); empty and NUL files;
non-images claiming to be images; polyglots; broken EXIF; extreme sizes; unusual modes (16-bit,
float, CMYK, LAB, palette with transparency); animations and multi-page files; many faces in one
photo. Used by ``tests/test_hostile_input.py`` and ``bench/fuzz_corpus.py``.
"""

from __future__ import annotations

import io
import math
import random
import struct
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, PngImagePlugin

from tests.utils.photos import photo

OK, CORRUPT, TOO_LARGE, UNSUPPORTED = 200, 400, 413, 415
# A damaged file may still decode, or be refused as corrupt, or, when the damage is in a chunk
# Pillow checks while identifying the file (a PNG chunk's CRC), not be recognised at all.
DAMAGED = (OK, CORRUPT, UNSUPPORTED)
UNRECOGNISED = (CORRUPT, UNSUPPORTED)

# The ``detail`` of every 4xx a file can cause (app/errors.py); anything else is a regression.
FILE_ERRORS = {
    400: {"empty file", "corrupt image"},
    413: {"file too large", "image has too many pixels", "image too costly to decode"},
    415: {"unsupported image format"},
}

# Declared by the bombs: 10 Gpx, 250 times the default MAX_IMAGE_PIXELS (40 Mpx), in a few
# hundred bytes. Decoded, one would take 10 GB in mode L.
BOMB_SIDE = 100_000


@dataclass(frozen=True)
class Case:
    name: str
    data: bytes
    content_type: str  # what the client claims
    expect: tuple[int, ...]  # the statuses a correct service may answer
    filename: str = ""  # sent as the part's file name; the case name plus an extension if empty

    @property
    def upload_name(self) -> str:
        return self.filename or self.name


# --- well-formed images to start from ------------------------------------------------------------


def _pixels(width: int = 64, height: int = 48) -> np.ndarray:
    """uint8 (height, width): a gradient with a bright block, so no encoder sees a flat image."""
    ys, xs = np.mgrid[0:height, 0:width]
    img = ((xs * 3 + ys * 2) % 200).astype(np.uint8)
    img[height // 4 : height // 2, width // 4 : width // 2] = 250
    return img


def gray(width: int = 64, height: int = 48) -> Image.Image:
    return Image.fromarray(_pixels(width, height), mode="L")


def rgb(width: int = 64, height: int = 48) -> Image.Image:
    g = _pixels(width, height)
    return Image.fromarray(np.stack([g, 255 - g, g // 2], axis=-1), mode="RGB")


def encode(image: Image.Image, fmt: str, **params: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **params)
    return buf.getvalue()


# The allowed formats, each a small valid file to damage; with the content type a browser sends.
BASE_FORMATS: dict[str, tuple[Callable[[], bytes], str]] = {
    "jpeg": (lambda: encode(rgb(), "JPEG", quality=90), "image/jpeg"),
    "png": (lambda: encode(rgb(), "PNG"), "image/png"),
    "webp": (lambda: encode(rgb(), "WEBP"), "image/webp"),
    "gif": (lambda: encode(gray(), "GIF"), "image/gif"),
    "tiff": (lambda: encode(rgb(), "TIFF"), "image/tiff"),
    "bmp": (lambda: encode(rgb(), "BMP"), "image/bmp"),
}


# --- damage ------------------------------------------------------------------------------------


def flip_bits(data: bytes, rng: random.Random, flips: int = 12, keep: int = 32) -> bytes:
    """``flips`` random bits flipped, none in the first ``keep`` bytes (the magic and main header)."""
    out = bytearray(data)
    for _ in range(flips):
        i = rng.randrange(min(keep, len(out) - 1), len(out))
        out[i] ^= 1 << rng.randrange(8)
    return bytes(out)


def garbage_in_middle(data: bytes, rng: random.Random, size: int = 64) -> bytes:
    """``size`` random bytes written over the middle of ``data``."""
    start = max(len(data) // 2 - size // 2, 0)
    return data[:start] + rng.randbytes(size) + data[start + size :]


def damaged(rng: random.Random) -> list[Case]:
    cases = []
    for fmt, (make, content_type) in BASE_FORMATS.items():
        data = make()
        cases += [
            Case(f"{fmt}_truncated_half", data[: len(data) // 2], content_type, (CORRUPT,)),
            Case(f"{fmt}_truncated_header", data[:20], content_type, UNRECOGNISED),
            Case(f"{fmt}_bit_flips", flip_bits(data, rng), content_type, DAMAGED),
            Case(f"{fmt}_garbage_in_middle", garbage_in_middle(data, rng), content_type, DAMAGED),
        ]
    return cases


# --- decompression bombs -----------------------------------------------------------------------


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_claiming(width: int, height: int) -> bytes:
    """An 8x8 PNG whose IHDR claims ``width`` x ``height`` (its CRC recomputed: a valid header)."""
    data = encode(Image.new("L", (8, 8)), "PNG")
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    return data[:8] + png_chunk(b"IHDR", ihdr) + data[33:]


def png_with_chunk(kind: bytes, body: bytes) -> bytes:
    """A small valid PNG with one more chunk right after IHDR (before the pixels)."""
    data = encode(gray(), "PNG")
    return data[:33] + png_chunk(kind, body) + data[33:]


def gif_claiming(width: int, height: int) -> bytes:
    """The smallest GIF (one pixel) with ``width`` x ``height`` in its screen and frame headers."""
    data = bytearray(
        b"GIF89a\x01\x00\x01\x00\x80\x00\x00\xff\xff\xff\x00\x00\x00,\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;"
    )
    data[6:10] = struct.pack("<HH", width, height)
    data[24:28] = struct.pack("<HH", width, height)
    return bytes(data)


def tiff_claiming(width: int, height: int, next_ifd: int = 0, extra: tuple[tuple[int, int, int], ...] = ()) -> bytes:
    """A little-endian 8-bit grayscale TIFF, uncompressed, one strip of 64 bytes, whose IFD says
    ``width`` x ``height``. ``next_ifd``: offset of the next IFD (8: itself, a loop). ``extra``:
    more (tag, type, value) entries."""
    pixels = bytes(range(64))
    n = 9 + len(extra)
    data_offset = 8 + 2 + 12 * n + 4
    entries = [
        (256, 4, width),  # ImageWidth, LONG
        (257, 4, height),  # ImageLength
        (258, 3, 8),  # BitsPerSample, SHORT
        (259, 3, 1),  # Compression: none
        (262, 3, 1),  # PhotometricInterpretation: black is zero
        (273, 4, data_offset),  # StripOffsets
        (277, 3, 1),  # SamplesPerPixel
        (278, 4, height),  # RowsPerStrip
        (279, 4, len(pixels)),  # StripByteCounts
        *extra,
    ]
    entries.sort()
    # One value of a SHORT or LONG fits the entry's 4-byte field: little-endian, left-justified.
    ifd = struct.pack("<H", n) + b"".join(struct.pack("<HHII", tag, kind, 1, value) for tag, kind, value in entries)
    return b"II*\x00" + struct.pack("<I", 8) + ifd + struct.pack("<I", next_ifd) + pixels


def bmp_claiming(width: int, height: int, bits: int = 24, compression: int = 0, colors: int = 0) -> bytes:
    """A BITMAPINFOHEADER BMP with 64 bytes of pixel data whose header says ``width`` x ``height``."""
    pixels = bytes(64)
    palette = bytes(4 * min(colors, 256))
    offset = 14 + 40 + len(palette)
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, bits, compression, len(pixels), 2835, 2835, colors, 0)
    return b"BM" + struct.pack("<IHHI", offset + len(pixels), 0, 0, offset) + info + palette + pixels


def jpeg_claiming(width: int, height: int) -> bytes:
    """A small baseline JPEG whose SOF0 header says ``width`` x ``height``."""
    data = bytearray(encode(gray(), "JPEG", quality=90))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def webp_claiming(width: int, height: int) -> bytes:
    """A small lossy WebP whose VP8 frame header says ``width`` x ``height`` (14 bits each)."""
    data = bytearray(encode(rgb(), "WEBP"))
    assert data[12:16] == b"VP8 ", "expected a simple lossy WebP"
    # RIFF header (12) + chunk header (8) + frame tag (3) + start code (3): then width, height.
    data[26:30] = struct.pack("<HH", width & 0x3FFF, height & 0x3FFF)
    return bytes(data)


def jpeg_with_scans(image: Image.Image, extra_scans: int) -> bytes:
    """A progressive JPEG of ``image`` whose first scan's header is repeated ``extra_scans`` times,
    with no data, before its end: libjpeg decodes each repeat over the whole image (it only warns
    that the scans make no sense, and fills the missing data with zeros). A scan bomb."""
    data = encode(image, "JPEG", progressive=True, quality=75)
    sos = data.index(b"\xff\xda")  # the first scan: its entropy-coded data follows the header
    header = data[sos : sos + 2 + int.from_bytes(data[sos + 2 : sos + 4], "big")]
    assert data.endswith(b"\xff\xd9")
    return data[:-2] + header * extra_scans + b"\xff\xd9"


def jpeg_with_comments(image: Image.Image, count: int) -> bytes:
    """A JPEG of ``image`` with ``count`` empty comment segments after its start: each one is read
    by Pillow's Python marker loop when the file is opened. A segment flood."""
    data = encode(image, "JPEG")
    return data[:2] + b"\xff\xfe\x00\x02" * count + data[2:]


def png_with_empty_chunks(count: int) -> bytes:
    """A small PNG with ``count`` empty private ancillary chunks before its image data: each one is
    read, and its CRC checked, by Pillow's Python code."""
    data = encode(gray(), "PNG")
    ihdr_end = 8 + 25  # signature, then IHDR: length, type, 13 bytes, CRC
    return data[:ihdr_end] + png_chunk(b"prVt", b"") * count + data[ihdr_end:]


def bombs(max_pixels: int) -> list[Case]:
    # Just over the limit, but below the 2x at which Pillow itself raises: the service's own check.
    over = math.isqrt(max_pixels) + 1
    zeros = zlib.compress(bytes(50_000_000), 9)  # 50 MB of text in ~50 kB
    return [
        Case("png_bomb_ihdr", png_claiming(BOMB_SIDE, BOMB_SIDE), "image/png", (TOO_LARGE,)),
        Case("png_bomb_one_row", png_claiming(max_pixels + 1, 1), "image/png", (TOO_LARGE,)),
        Case("png_just_over_pixel_limit", png_claiming(over, over), "image/png", (TOO_LARGE,)),
        Case("gif_bomb_screen", gif_claiming(65_535, 65_535), "image/gif", (TOO_LARGE,)),
        Case("tiff_bomb_ifd", tiff_claiming(BOMB_SIDE, BOMB_SIDE), "image/tiff", (TOO_LARGE,)),
        Case("bmp_bomb_header", bmp_claiming(BOMB_SIDE, BOMB_SIDE), "image/bmp", (TOO_LARGE,)),
        Case("bmp_bomb_top_down", bmp_claiming(BOMB_SIDE, -BOMB_SIDE), "image/bmp", (TOO_LARGE,)),
        Case("jpeg_bomb_sof", jpeg_claiming(65_500, 65_500), "image/jpeg", (TOO_LARGE,)),
        Case("webp_bomb_vp8", webp_claiming(16_383, 16_383), "image/webp", (TOO_LARGE,)),
        # Work multiplied by the file's structure, not its pixels (app/decode_work.py): decoded, 1.5 s
        # for 300 kB of scans over a 1-megapixel image, 0.3 s for 1.2 MB of chunks around a tiny one.
        Case("jpeg_scan_bomb", jpeg_with_scans(gray(1000, 1000), 20_000), "image/jpeg", (TOO_LARGE,)),
        Case("png_chunk_flood", png_with_empty_chunks(100_000), "image/png", (TOO_LARGE,)),
        Case("jpeg_segment_flood", jpeg_with_comments(gray(), 100_000), "image/jpeg", (TOO_LARGE,)),
        Case(
            "ppm_bomb_header",
            f"P5\n{BOMB_SIDE} {BOMB_SIDE}\n255\n".encode() + bytes(64),
            "image/x-portable-graymap",
            (TOO_LARGE,),
        ),
        # Pillow caps what it inflates of a text or ICC chunk (PngImagePlugin.MAX_TEXT_CHUNK).
        Case("png_ztxt_bomb", png_with_chunk(b"zTXt", b"Comment\x00\x00" + zeros), "image/png", (OK, CORRUPT)),
        Case("png_iccp_bomb", png_with_chunk(b"iCCP", b"icc\x00\x00" + zeros), "image/png", (OK, CORRUPT)),
    ]


def at_pixel_limit(max_pixels: int) -> list[Case]:
    """Real images of (nearly) their mode's pixel limit (``max_pixels``; half of it for 32-bit samples,
    app.images.pixel_limit), all zeros, in files of a few hundred kB: allowed, and the most memory one
    upload may make the service use. One per costliest mode to convert: RGBA (flattened onto white),
    16-bit (scaled to 8) and float (stretched to 0-255); and a float image just over its limit."""
    side = math.isqrt(max_pixels)
    wide = math.isqrt(max_pixels // 2)
    float_tiff = {"compression": "tiff_deflate"}
    return [
        Case("png_rgba_at_pixel_limit", encode(Image.new("RGBA", (side, side)), "PNG", compress_level=9), "image/png", (OK,)),
        Case("png_16bit_at_pixel_limit", encode(Image.new("I;16", (side, side)), "PNG", compress_level=9), "image/png", (OK,)),
        Case("tiff_float_at_pixel_limit", encode(Image.new("F", (wide, wide)), "TIFF", **float_tiff), "image/tiff", (OK,)),
        Case("tiff_float_over_limit", encode(Image.new("F", (wide + 1,) * 2), "TIFF", **float_tiff), "image/tiff", (TOO_LARGE,)),
    ]


# --- not images, polyglots ---------------------------------------------------------------------


def _zip(**members: bytes) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, content in members.items():
            zf.writestr(zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0)), content)  # no clock: the same bytes every run
    return buf.getvalue()


PDF = b"%PDF-1.7\n1 0 obj\n<< /Type /Catalog /Pages 2 0 R >>\nendobj\ntrailer\n<< /Root 1 0 R >>\n%%EOF\n"
SVG = (
    b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="100000" height="100000">'
    b'<rect width="10" height="10"/></svg>'
)
HTML = b"<!DOCTYPE html><html><body><img src=x onerror=alert(1)></body></html>"
EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n(pwned) print\n"


def not_images(rng: random.Random) -> list[Case]:
    return [
        Case("empty", b"", "image/png", (CORRUPT,)),
        Case("nul_bytes", bytes(1024), "image/jpeg", (UNSUPPORTED,)),
        Case("one_byte", b"\xff", "image/jpeg", (UNSUPPORTED,)),
        Case("random_bytes", rng.randbytes(4096), "image/png", (UNSUPPORTED,)),
        Case("text", b"just some text, not an image\n" * 10, "image/jpeg", (UNSUPPORTED,), filename="../../../etc/passwd"),
        Case("html", HTML, "image/png", (UNSUPPORTED,), filename='<script>alert("x")</script>.png'),
        Case("zip", _zip(**{"a.txt": b"hello" * 100}), "image/gif", (UNSUPPORTED,), filename="ünïcødé 表情 😀.gif"),
        Case("pdf_header", PDF, "image/tiff", (UNSUPPORTED,), filename="x" * 500 + ".tiff"),
        Case("svg", SVG, "image/svg+xml", (UNSUPPORTED,)),
        Case("eps", EPS, "image/jpeg", (UNSUPPORTED,)),  # Pillow would run Ghostscript on it: never opened
        Case("ico", encode(rgb(), "ICO"), "image/png", (UNSUPPORTED,)),  # a real image, not an allowed format
        Case("jpeg2000", encode(rgb(), "JPEG2000"), "image/jpeg", (UNSUPPORTED,)),
        Case("png_signature_only", b"\x89PNG\r\n\x1a\n", "image/png", UNRECOGNISED),
        Case("png_signature_then_html", b"\x89PNG\r\n\x1a\n" + HTML, "image/png", UNRECOGNISED),
        Case("zip_then_png", _zip(**{"a.txt": b"hello"}) + encode(gray(), "PNG"), "image/png", (UNSUPPORTED,)),
    ]


def polyglots() -> list[Case]:
    # GIF/JavaScript: the screen width is the bytes "/*", so after "GIF89a" a JS parser sees a
    # comment until "*/", then code. Still a valid 10799x1 GIF.
    gif_js = bytearray(gif_claiming(1, 1))
    gif_js[6:8] = b"/*"
    gif_js += b"*/=1;alert(document.domain)//"
    png_info = PngImagePlugin.PngInfo()
    png_info.add_text("Comment", "<?php system($_GET['c']); ?>")
    return [
        Case("gif_js_polyglot", bytes(gif_js), "image/gif", (OK,)),
        Case("png_then_zip", encode(gray(), "PNG") + _zip(**{"evil.jar": b"PK" * 100}), "image/png", (OK,)),
        Case("jpeg_html_comment", encode(rgb(), "JPEG", comment=HTML), "image/jpeg", (OK,)),
        Case("png_php_text_chunk", encode(gray(), "PNG", pnginfo=png_info), "image/png", (OK,)),
        Case("jpeg_then_pdf", encode(rgb(), "JPEG") + PDF, "application/pdf", (OK,)),
    ]


# --- EXIF --------------------------------------------------------------------------------------


def _jpeg_with_app1(payload: bytes) -> bytes:
    """A small JPEG with an APP1 segment holding ``payload`` right after SOI."""
    data = encode(rgb(), "JPEG", quality=90)
    return data[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + data[2:]


def _exif_orientation(value: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = value
    return exif.tobytes()


def exif_cases(rng: random.Random) -> list[Case]:
    # A TIFF-style EXIF block whose IFD0 claims 500 entries and holds none.
    truncated_ifd = b"Exif\x00\x00II*\x00" + struct.pack("<IH", 8, 500)
    # IFD0 with an Exif-IFD pointer (0x8769) to IFD0 itself, and a next-IFD offset to itself: a loop.
    looping = b"Exif\x00\x00II*\x00" + struct.pack("<IH", 8, 1) + struct.pack("<HHII", 0x8769, 4, 1, 8) + struct.pack("<I", 8)
    # One entry claiming 2^32 - 1 values at an offset far past the end.
    huge_count = (
        b"Exif\x00\x00II*\x00" + struct.pack("<IH", 8, 1) + struct.pack("<HHII", 0x010E, 2, 0xFFFFFFFF, 0x7FFFFFF0) + bytes(4)
    )
    png = encode(gray(), "PNG")
    return [
        *[
            Case(f"jpeg_exif_orientation_{v}", encode(rgb(), "JPEG", exif=_exif_orientation(v)), "image/jpeg", (OK,))
            for v in (0, 9, 65_535)
        ],
        Case("jpeg_exif_garbage", _jpeg_with_app1(b"Exif\x00\x00" + rng.randbytes(200)), "image/jpeg", (OK,)),
        Case("jpeg_exif_truncated_ifd", _jpeg_with_app1(truncated_ifd), "image/jpeg", (OK,)),
        Case("jpeg_exif_ifd_loop", _jpeg_with_app1(looping), "image/jpeg", (OK,)),
        Case("jpeg_exif_huge_count", _jpeg_with_app1(huge_count), "image/jpeg", (OK,)),
        Case("png_exif_chunk_garbage", png[:33] + png_chunk(b"eXIf", rng.randbytes(100)) + png[33:], "image/png", (OK,)),
        Case("webp_exif_garbage", encode(rgb(), "WEBP", exif=rng.randbytes(100)), "image/webp", (OK,)),
        Case("tiff_orientation_1000", encode(rgb(), "TIFF", tiffinfo={0x0112: 1000}), "image/tiff", (OK,)),
        Case("tiff_ifd_loop", tiff_claiming(8, 8, next_ifd=8), "image/tiff", (OK,)),
    ]


# --- sizes, modes, frames, faces ---------------------------------------------------------------


def _float_with_specials() -> Image.Image:
    values = np.linspace(-1e30, 1e30, 64 * 48, dtype=np.float32).reshape(48, 64)
    values[0, :8] = np.array([np.nan, np.inf, -np.inf, np.nan, 0, 1, -1, np.finfo(np.float32).max], dtype=np.float32)
    return Image.fromarray(values, mode="F")


def _lab() -> Image.Image:
    lab = rgb().convert("LAB")
    lab.info.pop("icc_profile", None)  # Pillow's LAB profile carries the time it was made: not the same bytes twice
    return lab


def _frames(count: int) -> list[Image.Image]:
    return [Image.fromarray(np.roll(_pixels(), 7 * i, axis=1), mode="L") for i in range(count)]


def many_faces(tiles: int = 3) -> bytes:
    """skimage's astronaut photo (one face) tiled ``tiles`` x ``tiles``: a crowd of the same face."""
    face = photo("astronaut")
    crowd = Image.new("RGB", (face.width * tiles, face.height * tiles))
    for i in range(tiles * tiles):
        crowd.paste(face, ((i % tiles) * face.width, (i // tiles) * face.height))
    return encode(crowd, "JPEG", quality=85)


def odd_images() -> list[Case]:
    frames = _frames(10)
    palette = rgb().quantize(16)
    return [
        Case("png_1x1", encode(Image.new("L", (1, 1), 7), "PNG"), "image/png", (OK,)),
        Case("jpeg_1x1", encode(Image.new("RGB", (1, 1)), "JPEG"), "image/jpeg", (OK,)),
        Case("gif_1x1", gif_claiming(1, 1), "image/gif", (OK,)),
        Case("png_10000x1", encode(gray(10_000, 1), "PNG"), "image/png", (OK,)),
        Case("png_1x10000", encode(gray(1, 10_000), "PNG"), "image/png", (OK,)),
        Case("jpeg_10000x1", encode(rgb(10_000, 1), "JPEG"), "image/jpeg", (OK,)),
        Case("png_16bit_gray", encode(Image.fromarray(_pixels().astype(np.uint16) * 257), "PNG"), "image/png", (OK,)),
        Case("tiff_16bit_gray", encode(Image.fromarray(_pixels().astype(np.uint16) * 257), "TIFF"), "image/tiff", (OK,)),
        Case("tiff_16bit_big_endian", encode(Image.fromarray(_pixels().astype(">u2") * 257), "TIFF"), "image/tiff", (OK,)),
        Case("tiff_int32_negative", encode(Image.fromarray(_pixels().astype(np.int32) - 1000), "TIFF"), "image/tiff", (OK,)),
        Case("tiff_float_nan_inf", encode(_float_with_specials(), "TIFF"), "image/tiff", (OK,)),
        Case("jpeg_cmyk", encode(rgb().convert("CMYK"), "JPEG"), "image/jpeg", (OK,)),
        Case("tiff_cmyk", encode(rgb().convert("CMYK"), "TIFF"), "image/tiff", (OK,)),
        Case("tiff_lab", encode(_lab(), "TIFF"), "image/tiff", (OK, UNSUPPORTED)),
        Case("tiff_ycbcr", encode(rgb().convert("YCbCr"), "TIFF"), "image/tiff", (OK,)),
        Case("tiff_1bit", encode(gray().convert("1"), "TIFF"), "image/tiff", (OK,)),
        Case("png_la", encode(gray().convert("LA"), "PNG"), "image/png", (OK,)),
        Case("png_rgba", encode(rgb().convert("RGBA"), "PNG"), "image/png", (OK,)),
        Case("png_palette_transparency", encode(palette, "PNG", transparency=0), "image/png", (OK,)),
        Case("gif_palette_transparency", encode(palette, "GIF", transparency=0), "image/gif", (OK,)),
        Case(
            "gif_animated",
            encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0),
            "image/gif",
            (OK,),
        ),
        Case(
            "webp_animated",
            encode(frames[0].convert("RGB"), "WEBP", save_all=True, append_images=frames[1:]),
            "image/webp",
            (OK,),
        ),
        Case("apng", encode(frames[0], "PNG", save_all=True, append_images=frames[1:]), "image/apng", (OK,)),
        Case("tiff_multipage", encode(frames[0], "TIFF", save_all=True, append_images=frames[1:]), "image/tiff", (OK,)),
        Case("bmp_rle8_corrupt", bmp_claiming(64, 48, bits=8, compression=1, colors=256), "image/bmp", (CORRUPT,)),
        Case("bmp_palette_overflow", bmp_claiming(8, 8, bits=8, colors=0xFFFFFFFF), "image/bmp", UNRECOGNISED),
        Case("ppm_16bit", b"P5\n8 8\n65535\n" + bytes(range(128)), "image/x-portable-graymap", (OK,)),
        Case("ppm_maxval_zero", b"P5\n8 8\n0\n" + bytes(64), "image/x-portable-graymap", UNRECOGNISED),
        Case("jpeg_many_faces", many_faces(), "image/jpeg", (OK,)),
        Case("jpeg_photo", encode(photo("astronaut"), "JPEG", quality=90), "image/jpeg", (OK,)),
    ]


def build_corpus(max_pixels: int = 40_000_000, max_upload_bytes: int = 10 * 1024 * 1024, seed: int = 0) -> list[Case]:
    """Every case, for a service configured with ``MAX_IMAGE_PIXELS`` and ``MAX_UPLOAD_BYTES``."""
    rng = random.Random(seed)
    oversize = encode(gray(), "PNG") + bytes(max_upload_bytes)  # one byte per byte over the limit, and more
    cases = [
        *damaged(rng),
        *bombs(max_pixels),
        *at_pixel_limit(max_pixels),
        Case("file_over_upload_limit", oversize, "image/png", (TOO_LARGE,)),
        *not_images(rng),
        *polyglots(),
        *exif_cases(rng),
        *odd_images(),
    ]
    names = [case.name for case in cases]
    assert len(set(names)) == len(names), "case names must be unique"
    return cases
