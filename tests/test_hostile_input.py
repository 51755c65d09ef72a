"""Hostile and malformed uploads: the corpus of ``tests/utils/corpus.py`` through a real uvicorn
process (``bench/fuzz_corpus.py``, which also measures the server's memory), the same corpus
through :func:`app.images.decode_image` directly, and a Hypothesis fuzz of ``decode_image``.

The rule everywhere: a file gets a 2xx or a 4xx with one of the service's stable ``detail``
strings; never a 5xx, a hang, a crash, or memory out of proportion to MAX_IMAGE_PIXELS.
"""

from __future__ import annotations

import functools
import json
import tracemalloc
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFile

from app import decode_work
from app.errors import ImageTooCostly, ServiceError
from app.faces import whole_image_crop
from app.images import configure_pillow, decode_image, to_gray_or_rgb
from bench import fuzz_corpus
from tests.utils import corpus
from tests.utils.service import clean_service_env, write_model

# Small limits keep the corpus's largest images (at the pixel limit) and its oversized upload cheap.
MAX_PIXELS = 4_000_000
MAX_UPLOAD = 2_000_000
# Cases the route answers before decoding: an empty upload, one over MAX_UPLOAD_BYTES.
ROUTE_ONLY = {"empty", "file_over_upload_limit"}


@functools.cache
def cases() -> dict[str, corpus.Case]:
    return {case.name: case for case in corpus.build_corpus(MAX_PIXELS, MAX_UPLOAD)}


@contextmanager
def pillow_configured() -> Iterator[None]:
    """Pillow's limits as the service sets them (app.main's lifespan), undone afterwards."""
    saved = Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # Pillow's "Corrupt EXIF data": what the corpus is made of
        configure_pillow(MAX_PIXELS)
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def decode_status(data: bytes) -> int:
    """What ``POST /predict`` answers for ``data`` as far as decoding goes: 200, or the error's status."""
    try:
        image = decode_image(data, MAX_PIXELS)
    except ServiceError as exc:
        assert exc.detail in corpus.FILE_ERRORS[exc.status_code], exc.detail
        return exc.status_code
    assert image.mode in ("L", "RGB") and image.width * image.height <= MAX_PIXELS
    return 200


# --- the corpus through a real server ------------------------------------------------------


@pytest.mark.slow
def test_corpus_through_a_real_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every case to ``/predict`` and, mixed in batches, to ``/predict/batch``: one uvicorn process."""
    clean_service_env(monkeypatch)
    out = tmp_path / "fuzz_corpus.json"
    env = {"INFERENCE_THREADS": "1", "MAX_IMAGE_PIXELS": str(MAX_PIXELS), "MAX_UPLOAD_BYTES": str(MAX_UPLOAD)}
    argv = ["--model", str(write_model(tmp_path / "model.pt")), "--output", str(out)]
    argv += [arg for name, value in env.items() for arg in ("--server-env", f"{name}={value}")]
    status = fuzz_corpus.main(argv)
    record = json.loads(out.read_text())
    assert record["benchmark"] == "fuzz_corpus" and record["command"].startswith("python -m bench.fuzz_corpus ")
    results = record["results"]
    assert results["failures"] == [] and status == 0
    assert results["server_alive"] is True
    assert results["corpus"]["cases"] == len(cases()) >= 90
    assert set(results["batch"]["request_statuses"]) == {"200"}  # a bad file never fails its batch
    for outcome in results["cases"]:  # each outcome also checked here, not only by the bench
        for answer in (outcome["predict"], outcome["batch"]):
            assert answer["status"] in outcome["expect"], outcome
            assert answer["status"] == 200 or answer["detail"] in corpus.FILE_ERRORS[answer["status"]], outcome
    statuses = results["predict"]["statuses"]
    assert {"200", "400", "413", "415"} <= set(statuses) and not any(code.startswith("5") for code in statuses)

    # Memory. Decoding one image at the pixel limit peaks at ~13 bytes per pixel (an RGBA PNG or a
    # float TIFF: the decoded image, its array or converted copy, the result); the corpus has three
    # such images, a batch may hold several of them, and the worker threads' malloc arenas keep some
    # freed memory. 64 bytes per pixel of MAX_IMAGE_PIXELS, plus room for copies of the oversized
    # upload, is more than twice what this needs (measured: ~25 B/px of growth), and a single
    # decoded bomb (10 Gpx declared) would be gigabytes over it.
    memory = results["memory"]
    budget_mib = (64 * MAX_PIXELS + 8 * MAX_UPLOAD) / 2**20
    grown_mib = memory["after_corpus"]["peak_rss_mib"] - memory["after_warm_up"]["rss_mib"]
    assert grown_mib < budget_mib, f"the server's peak RSS grew {grown_mib:.0f} MiB over the corpus (budget {budget_mib:.0f})"


# --- the corpus through decode_image, in process -------------------------------------------


@pytest.mark.parametrize("name", [name for name in cases() if name not in ROUTE_ONLY])
def test_decode_image_on_the_corpus(name: str) -> None:
    case = cases()[name]
    with pillow_configured():
        assert decode_status(case.data) in case.expect


def test_corpus_is_the_same_bytes_every_time() -> None:
    again = corpus.build_corpus(MAX_PIXELS, MAX_UPLOAD)
    assert [(c.name, c.data) for c in again] == [(c.name, c.data) for c in cases().values()]


# --- a Hypothesis fuzz of decode_image -----------------------------------------------------

# Small valid files of every allowed format, and a few hostile ones, to mutate.
SEEDS = [make() for make, _ in corpus.BASE_FORMATS.values()] + [
    cases()[name].data for name in ("png_bomb_ihdr", "tiff_bomb_ifd", "jpeg_exif_ifd_loop", "tiff_float_nan_inf", "apng")
]


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A seed file with a few bytes overwritten, bytes inserted, and maybe cut short."""
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(0, 4))):
        at = draw(st.integers(0, len(data) - 1))
        patch = draw(st.binary(min_size=1, max_size=8))
        if draw(st.booleans()):
            data[at : at + len(patch)] = patch  # overwrite
        else:
            data[at:at] = patch  # insert
    if draw(st.booleans()):
        del data[draw(st.integers(0, len(data))) :]
    return bytes(data)


@given(data=mutated())
@settings(max_examples=300, derandomize=True, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
def test_decode_image_raises_only_documented_errors(data: bytes) -> None:
    """Any damage to any format: an ``L``/``RGB`` image within the limit, or one of the errors a
    file can cause with its stable detail (``decode_status``); any other exception fails."""
    with pillow_configured():
        decode_status(data)


# --- what the corpus found -----------------------------------------------------------------


@pytest.mark.parametrize("name", ["png_exif_chunk_garbage", "webp_exif_garbage", "jpeg_exif_ifd_loop"])
def test_broken_exif_is_ignored_not_refused(name: str) -> None:
    with pillow_configured():
        image = decode_image(cases()[name].data, MAX_PIXELS)
    assert image.size == (64, 48)  # as stored: no orientation could be read


@pytest.mark.parametrize(("mode", "limit"), [("I;16", 5), ("I", 10), ("F", 10)])
def test_deep_images_convert_without_a_full_size_wide_copy(mode: str, limit: float) -> None:
    """16-bit, 32-bit and float pixels become 8-bit a band of rows at a time: the peak allocation
    is the image's array and the 8-bit result (3-5 bytes per pixel), not int64 or float64 copies of
    the whole image (~30 bytes per pixel before)."""
    dtype = {"I;16": np.uint16, "I": np.int32, "F": np.float32}[mode]
    side = (3000, 2000)
    image = Image.fromarray(np.arange(side[0] * side[1]).reshape(side[1], side[0]).astype(dtype))
    assert image.mode == mode
    tracemalloc.start()  # numpy's buffers and Python's bytes are traced; Pillow's own image memory is not
    try:
        gray = to_gray_or_rgb(image)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert gray.mode == "L" and gray.size == image.size
    assert peak / (side[0] * side[1]) < limit, f"{peak / (side[0] * side[1]):.1f} bytes per pixel"


def test_whole_image_crop_is_shrunk() -> None:
    """``detect=false``: a batch holds each file's crop until its forward pass, so the crop of a big
    image is a reduced copy (longer side at most 1024), and a small image is used as it is."""
    big = Image.new("RGB", (4000, 1000))
    crop = whole_image_crop(big)
    assert crop.size == (1000, 250)
    small = Image.new("L", (1024, 10))
    assert whole_image_crop(small) is small


# --- decoding work bounded by the file's structure (app/decode_work.py) ---------------------------


@pytest.fixture
def no_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    """Opening the file with Pillow fails the test (its header parsers already walk every segment
    and chunk before the image data): a refusal must come from the file's structure alone."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("opened")

    monkeypatch.setattr(Image, "open", refuse)
    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)


def assert_too_costly(data: bytes) -> None:
    with pytest.raises(ImageTooCostly) as refused:
        decode_image(data, MAX_PIXELS)
    assert (refused.value.status_code, refused.value.detail) == (413, "image too costly to decode")


@pytest.mark.usefixtures("no_decoding")
def test_a_progressive_jpeg_scan_bomb_is_refused_before_decoding() -> None:
    assert_too_costly(corpus.jpeg_with_scans(corpus.gray(1000, 1000), 20_000))


@pytest.mark.usefixtures("no_decoding")
def test_a_png_chunk_flood_is_refused_before_decoding() -> None:
    assert_too_costly(corpus.png_with_empty_chunks(100_000))


@pytest.mark.usefixtures("no_decoding")
def test_a_jpeg_segment_flood_is_refused_before_decoding() -> None:
    assert_too_costly(corpus.jpeg_with_comments(corpus.gray(), 100_000))


def test_jpeg_segments_are_counted_up_to_the_limit() -> None:
    ordinary = corpus.encode(corpus.rgb(), "JPEG")
    segments = decode_work.jpeg_structure(ordinary, 1000, 1000)[1]
    assert 5 <= segments <= 12  # APP0, DQT x2, SOF, DHT x4, SOS: no comment
    at_limit = corpus.jpeg_with_comments(corpus.rgb(), decode_work.MAX_JPEG_SEGMENTS - segments)
    assert decode_image(at_limit, MAX_PIXELS).size == (64, 48)
    assert_too_costly(corpus.jpeg_with_comments(corpus.rgb(), decode_work.MAX_JPEG_SEGMENTS - segments + 1))


@pytest.mark.parametrize("image", [corpus.gray(300, 200), corpus.rgb(300, 200)], ids=["gray", "rgb"])
def test_scans_are_counted_up_to_the_limit(image: Image.Image) -> None:
    """Pillow's progressive encodings (6 scans in gray, 10 in colour) and a file of exactly
    MAX_JPEG_SCANS decode; one scan more is refused."""
    ordinary = corpus.encode(image, "JPEG", progressive=True)
    scans = decode_work.jpeg_scans(ordinary, 1000)
    assert scans == (6 if image.mode == "L" else 10)
    assert decode_image(ordinary, MAX_PIXELS).size == (300, 200)
    at_limit = corpus.jpeg_with_scans(image, decode_work.MAX_JPEG_SCANS - scans)
    assert decode_work.jpeg_scans(at_limit, 1000) == decode_work.MAX_JPEG_SCANS
    assert decode_image(at_limit, MAX_PIXELS).size == (300, 200)
    assert_too_costly(corpus.jpeg_with_scans(image, decode_work.MAX_JPEG_SCANS - scans + 1))


def test_scan_markers_inside_metadata_or_a_thumbnail_are_not_scans() -> None:
    """The count walks the segments: a comment full of start-of-scan bytes, or an EXIF block holding
    a progressive thumbnail, adds nothing."""
    baseline = corpus.encode(corpus.rgb(), "JPEG")
    comment = b"\xff\xfe" + (2 + 4000).to_bytes(2, "big") + b"\xff\xda" * 2000
    noisy = baseline[:2] + comment + baseline[2:]
    assert decode_work.jpeg_scans(noisy, 1000) == 1
    thumbnail = corpus.jpeg_with_scans(corpus.gray(), 500)
    exif = b"Exif\x00\x00" + thumbnail  # not a valid TIFF block: ignored by the decoder, skipped by the count
    with_exif = baseline[:2] + b"\xff\xe1" + (2 + len(exif)).to_bytes(2, "big") + exif + baseline[2:]
    assert decode_work.jpeg_scans(with_exif, 1000) == 1
    assert decode_image(with_exif, MAX_PIXELS).size == (64, 48)


def test_png_chunks_are_counted_up_to_the_limit() -> None:
    ordinary = corpus.encode(corpus.gray(), "PNG")
    assert decode_work.png_chunks(ordinary, 1000) == 3  # IHDR, IDAT, IEND
    at_limit = corpus.png_with_empty_chunks(decode_work.MAX_PNG_CHUNKS - 3)
    assert decode_image(at_limit, MAX_PIXELS).size == (64, 48)
    assert_too_costly(corpus.png_with_empty_chunks(decode_work.MAX_PNG_CHUNKS - 2))
