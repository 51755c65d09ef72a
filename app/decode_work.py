"""How much work decoding a file will take, read from its structure before Pillow opens it.

The pixel count (MAX_IMAGE_PIXELS, checked from the header) bounds most decoders' work: they
touch each pixel a few times. Two structures multiply it, and are bounded here:

* a progressive JPEG is decoded scan by scan, and each scan goes over every block of the image:
  the work is pixels x scans. Encoders write about 10 scans (Pillow's libjpeg: 6 for gray, 10 for
  colour); a crafted file repeats a 14-byte scan header thousands of times (libjpeg only warns,
  and fills the missing data with zeros): 20,000 scans of a 1-megapixel image, 300 kB, take 1.5 s
  to decode on the 2-core development machine, and a 10 MB file of them over a 36-megapixel image
  would take hours. More than :data:`MAX_JPEG_SCANS` is refused: at the limit, a 36-megapixel image
  decodes in about twice the time of its ordinary progressive encoding (0.47 s against 0.22 s);
* a PNG is read chunk by chunk by Pillow's Python code (a CRC check each), when the file is
  opened: 100,000 empty chunks (1.2 MB) take 0.3 s whatever the image's size, a 10 MB file of them
  over 4 s. More than :data:`MAX_PNG_CHUNKS` is refused (libpng writes 8 KiB data chunks: 20,000
  of them hold 160 MB);
* a JPEG's segments before its first scan are read one by one by Pillow's Python code, when the
  file is opened: 2.4 million empty comments (9.6 MB) took 3.8 s. More than
  :data:`MAX_JPEG_SEGMENTS` is refused (an ordinary file has about 10; a colour profile split
  over 64 KiB segments, a few more).

All are counted by walking the file's markers or chunk headers (a few microseconds per segment),
before :func:`PIL.Image.open` (which would already pay for the segments and chunks), stopping as
soon as a limit is passed. The format is sniffed from the file's first bytes.
"""

from __future__ import annotations

import re

from app.failures import ImageTooCostly

MAX_JPEG_SCANS = 100
MAX_JPEG_SEGMENTS = 1_000
MAX_PNG_CHUNKS = 20_000

_JPEG_SOI = b"\xff\xd8"

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Inside a scan's entropy-coded data 0xFF is followed by 0x00 (a stuffed byte), a restart marker
# (0xD0-0xD7) or more 0xFF fill bytes; anything else starts the next marker.
_END_OF_SCAN = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
_STANDALONE_MARKERS = frozenset({0x01, *range(0xD0, 0xD8)})  # no length field
_SOS, _EOI = 0xDA, 0xD9


def check_decode_work(data: bytes) -> None:
    """:class:`~app.failures.ImageTooCostly` if opening and decoding ``data`` would take more than
    its size justifies: too many JPEG scans or segments, too many PNG chunks."""
    if data.startswith(_JPEG_SOI):  # JPEG and MPO
        scans, segments = jpeg_structure(data, MAX_JPEG_SCANS + 1, MAX_JPEG_SEGMENTS + 1)
        if scans > MAX_JPEG_SCANS or segments > MAX_JPEG_SEGMENTS:
            raise ImageTooCostly()
    elif data.startswith(_PNG_SIGNATURE) and png_chunks(data, MAX_PNG_CHUNKS + 1) > MAX_PNG_CHUNKS:
        raise ImageTooCostly()


def jpeg_scans(data: bytes, stop_at: int) -> int:
    """Start-of-scan markers in the first image of ``data``, counted up to ``stop_at``."""
    return jpeg_structure(data, stop_at, len(data))[0]


def jpeg_structure(data: bytes, max_scans: int, max_segments: int) -> tuple[int, int]:
    """Start-of-scan markers and segments (markers with a length, scans included) in the first image
    of ``data`` (up to its end-of-image marker), counted until either count reaches its maximum. A
    structure that is not a JPEG's ends the count: the decoder judges it."""
    pos, scans, segments = 2, 0, 0  # after the start-of-image marker
    while scans < max_scans and segments < max_segments and pos + 1 < len(data):
        if data[pos] != 0xFF:
            break
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        if marker == _EOI:
            break
        if marker in _STANDALONE_MARKERS:
            pos += 2
            continue
        segments += 1
        pos += 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")  # the segment's length counts itself
        if marker == _SOS:
            scans += 1
            end = _END_OF_SCAN.search(data, pos)  # past the scan's entropy-coded data
            if end is None:
                break
            pos = end.start()
    return scans, segments


def png_chunks(data: bytes, stop_at: int) -> int:
    """Chunks in ``data`` (a PNG) up to IEND or the end of the data, counted up to ``stop_at``."""
    if not data.startswith(_PNG_SIGNATURE):
        return 0
    pos, chunks = len(_PNG_SIGNATURE), 0
    while chunks < stop_at and pos + 8 <= len(data):
        length = int.from_bytes(data[pos : pos + 4], "big")
        chunks += 1
        if data[pos + 4 : pos + 8] == b"IEND":
            break
        pos += 12 + length  # length, type, data, CRC
    return chunks
