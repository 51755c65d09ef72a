"""The service, run for real: ``TestClient(app)`` as a context manager runs the lifespan, which
loads a tiny real checkpoint written to ``tmp_path``; images are made in code, and the photos
for face detection are the public-domain ones scikit-image ships."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from app.concurrency import InferenceLimiter
from app.deps import get_predictor
from app.errors import ServerBusy
from app.images import decode_image, to_gray_or_rgb
from app.main import create_app
from app.model import ModelLoadError, Predictor
from app.routes import predict as predict_routes
from app.settings import BUNDLED_MODEL, ConfigError, Settings, load_settings
from fercore.cpus import available_cpus, cgroup_cpu_quota
from fercore.framing import SERVED_FRAME, expand_box
from fercore.labels import CLASS_NAMES
from fercore.registry import publish_promoted
from fercore.storage import LATEST, sha256_file
from tests.utils.photos import assert_astronaut_face, photo, photo_jpeg
from tests.utils.service import (
    SETTINGS_ENV,
    clean_service_env,
    encode,
    face_pixels,
    gray_png,
    post_batch,
    post_image,
    running_app,
    uvicorn_server,
    write_model,
)

ROOT = Path(__file__).resolve().parent.parent


# --- fixtures and helpers ---------------------------------------------------------------


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    clean_service_env(monkeypatch)


def rgb_png() -> bytes:
    gray = face_pixels()
    return encode(Image.fromarray(np.stack([gray, 255 - gray, gray // 2], axis=-1), mode="RGB"), "PNG")


def rgb_jpeg() -> bytes:
    gray = face_pixels()
    return encode(Image.fromarray(np.stack([gray, gray, 255 - gray], axis=-1), mode="RGB"), "JPEG", quality=90)


def rgba_png() -> bytes:
    gray = face_pixels()
    alpha = np.where(gray > 100, 255, 0).astype(np.uint8)
    return encode(Image.fromarray(np.stack([gray, gray, gray, alpha], axis=-1), mode="RGBA"), "PNG")


def palette_png() -> bytes:
    image = Image.fromarray(np.stack([face_pixels()] * 3, axis=-1), mode="RGB").quantize(16)
    return encode(image, "PNG", transparency=0)


def png_16bit() -> bytes:
    return encode(Image.fromarray(face_pixels().astype(np.uint16) * 257), "PNG")


def animated_gif() -> bytes:
    frames = [Image.fromarray(face_pixels(), mode="L"), Image.new("L", (64, 48), 255)]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def bmp() -> bytes:
    return encode(Image.fromarray(face_pixels(), mode="L"), "BMP")


def webp() -> bytes:
    return encode(Image.fromarray(face_pixels(), mode="L").convert("RGB"), "WEBP")


def png_claiming_size(width: int, height: int) -> bytes:
    """A few hundred bytes whose PNG header claims ``width`` x ``height``: a decompression bomb."""
    data = encode(Image.new("L", (8, 8)), "PNG")
    ihdr = bytearray(data[8 : 8 + 25])  # length, b"IHDR", 13 bytes of fields, crc
    ihdr[8:16] = struct.pack(">II", width, height)
    ihdr[21:25] = struct.pack(">I", zlib.crc32(bytes(ihdr[4:21])))
    return data[:8] + bytes(ihdr) + data[33:]


def assert_valid_scores(face: dict) -> None:
    scores = face["scores"]
    assert list(scores) == list(CLASS_NAMES)
    assert sum(scores.values()) == pytest.approx(1.0, abs=1e-5)
    assert all(0.0 <= p <= 1.0 for p in scores.values())
    assert face["emotion"] == max(scores, key=scores.__getitem__)
    assert face["confidence"] == pytest.approx(max(scores.values()))


# --- probes and model info --------------------------------------------------------------


def test_healthz(client: TestClient) -> None:
    r = client.get("/healthz")
    assert r.status_code == 200
    assert r.json() == {"status": "ok"}


def test_readyz_once_model_loaded(client: TestClient) -> None:
    r = client.get("/readyz")
    assert r.status_code == 200
    assert r.json() == {"status": "ready"}


def test_readyz_before_lifespan_is_503(monkeypatch: pytest.MonkeyPatch, model_path: Path) -> None:
    monkeypatch.setenv("MODEL_URI", str(model_path))
    client = TestClient(create_app())  # not entered: the lifespan has not run, no model yet
    assert client.get("/readyz").status_code == 503
    assert client.get("/healthz").status_code == 200
    assert post_image(client, gray_png()).status_code == 503
    assert post_batch(client, [("a.png", gray_png())]).status_code == 503


def test_openapi_documents_the_routes(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/healthz", "/readyz", "/model", "/predict", "/predict/batch"} <= set(paths)
    predict = paths["/predict"]["post"]
    assert {"200", "400", "413", "415", "422", "503"} <= set(predict["responses"])
    assert '"faces": []' in predict["description"]  # no face found is a 200, and says so
    for op in (predict, paths["/predict/batch"]["post"]):
        (detect,) = [p for p in op["parameters"] if p["name"] == "detect"]
        assert detect["in"] == "query" and detect["schema"]["default"] is True
    assert {"200", "413", "422", "503"} <= set(paths["/predict/batch"]["post"]["responses"])


def local_asset_urls(html: str) -> list[str]:
    urls = re.findall(r"""(?:src|href)\s*=\s*["']([^"']+)["']""", html)
    assert urls, "the page loads no assets at all"
    return urls


@pytest.mark.parametrize(
    ("page", "needs"),
    [("/docs", {"javascript", "text/css", "image/png"}), ("/redoc", {"javascript", "image/png"})],
)
def test_api_docs_are_served_without_a_cdn(client: TestClient, page: str, needs: set[str]) -> None:
    r = client.get(page)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/html")
    assert "://" not in r.text  # no absolute URL: no CDN, no Google Fonts, no validator badge
    seen: set[str] = set()
    for url in local_asset_urls(r.text):
        assert url.startswith("/") and not url.startswith("//"), url
        asset = client.get(url)
        assert asset.status_code == 200, url
        kind = asset.headers["content-type"]
        expected = {".js": "javascript", ".css": "text/css", ".png": "image/png"}[Path(url).suffix]
        assert expected in kind, (url, kind)
        seen.add(expected)
    assert seen == needs
    if page == "/docs":
        assert '"validatorUrl": null' in r.text
        assert "url: '/openapi.json'" in r.text


def test_swagger_ui_is_version_5(client: TestClient) -> None:
    """Swagger UI 4 cannot render the file inputs of FastAPI's OpenAPI 3.1 document."""
    (js,) = [u for u in local_asset_urls(client.get("/docs").text) if u.endswith(".js")]
    match = re.search(r'PACKAGE_VERSION:"(\d+)\.', client.get(js).text)
    assert match and int(match.group(1)) >= 5


def test_model_info(client: TestClient, model_path: Path) -> None:
    r = client.get("/model")
    assert r.status_code == 200
    info = r.json()
    assert info["version"] == info["run_id"] == "test-run"
    assert info["source"] == str(model_path)
    assert info["sha256"] == sha256_file(model_path)
    assert info["architecture"] == "compact"
    assert info["classes"] == list(CLASS_NAMES)
    assert info["metrics"] == {"val_accuracy": 0.5}
    assert info["preprocessing"]["input_size"] == 48
    assert info["loaded_at"] and info["created_at"]


# --- predictions ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [gray_png, rgb_png, rgb_jpeg, rgba_png, palette_png, png_16bit, animated_gif, bmp, webp],
    ids=lambda f: f.__name__,
)
def test_predict_image_formats(client: TestClient, make) -> None:
    r = post_image(client, make(), detect=False)
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["faces"]) == 1
    face = body["faces"][0]
    assert face["box"] == [0, 0, 64, 48]
    assert_valid_scores(face)
    assert body["model"]["version"] == "test-run"
    assert body["model"]["architecture"] == "compact"


def test_predict_matches_the_model(client: TestClient, model_path: Path) -> None:
    """The route returns exactly what the checkpoint's model says about the image."""
    image = Image.fromarray(face_pixels(), mode="L")
    expected = Predictor.from_uri(str(model_path)).predict_face(image)
    face = post_image(client, encode(image, "PNG"), detect=False).json()["faces"][0]
    assert face["emotion"] == expected["emotion"]
    for name in CLASS_NAMES:
        assert face["scores"][name] == pytest.approx(expected["scores"][name], abs=1e-6)


def test_exif_orientation_is_applied(client: TestClient) -> None:
    stored = np.full((20, 40), 30, dtype=np.uint8)  # 40 wide, 20 high as stored
    stored[:10, :10] = 230  # bright block in the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    data = encode(Image.fromarray(stored, mode="L"), "JPEG", quality=95, exif=exif.tobytes())

    upright = np.asarray(decode_image(data, 10_000).convert("L"))
    assert upright.shape == (40, 20)  # now 20 wide, 40 high
    assert upright[:10, -10:].mean() > 180  # the block moved to the top-right corner
    assert upright[:10, :10].mean() < 80

    r = post_image(client, data, "rotated.jpg", detect=False)
    assert r.status_code == 200
    assert r.json()["faces"][0]["box"] == [0, 0, 20, 40]


def test_16bit_image_is_scaled_not_clipped() -> None:
    pixels = face_pixels().astype(np.uint16) * 257  # 8-bit values spread over 0..65535
    decoded = decode_image(encode(Image.fromarray(pixels), "PNG"), 10_000)
    assert decoded.mode == "L"
    np.testing.assert_array_equal(np.asarray(decoded), face_pixels())


def test_gif_first_frame_is_used() -> None:
    frames = [Image.new("L", (16, 16), 0), Image.new("L", (16, 16), 255)]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100)
    assert np.asarray(decode_image(data, 10_000).convert("L")).max() == 0


def test_transparency_is_flattened_onto_white() -> None:
    clear = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    assert np.asarray(decode_image(encode(clear, "PNG"), 10_000)).min() == 255
    palette = Image.new("P", (8, 8), 0)
    palette.putpalette([0, 0, 0] * 256)
    assert np.asarray(decode_image(encode(palette, "PNG", transparency=0), 10_000)).min() == 255


@pytest.mark.parametrize("mode", ["1", "L", "LA", "I", "F", "CMYK", "YCbCr", "RGBA", "P"])
def test_every_mode_becomes_gray_or_rgb(mode: str) -> None:
    image = Image.fromarray(face_pixels(), mode="L").convert(mode)
    assert to_gray_or_rgb(image).mode in ("L", "RGB")


def test_inference_runs_off_the_event_loop(client: TestClient) -> None:
    real = client.app.state.predictor
    on_loop: list[bool] = []

    class Spy:
        info = real.info

        def predict_faces(self, faces: list[Image.Image]):
            try:
                asyncio.get_running_loop()
                on_loop.append(True)
            except RuntimeError:  # a worker thread has no running loop
                on_loop.append(False)
            return real.predict_faces(faces)

    client.app.dependency_overrides[get_predictor] = Spy
    assert post_image(client, gray_png(), detect=False).status_code == 200
    assert on_loop == [False]


# --- face detection ---------------------------------------------------------------------


def test_predict_finds_the_face_in_a_photo(client: TestClient) -> None:
    r = post_image(client, photo_jpeg("astronaut"), "astronaut.jpg")
    assert r.status_code == 200, r.text
    (face,) = r.json()["faces"]
    assert_astronaut_face(face["box"])
    assert_valid_scores(face)


@pytest.mark.parametrize("name", ["coffee", "rocket"])
def test_photo_without_people_has_no_faces(client: TestClient, name: str) -> None:
    r = post_image(client, photo_jpeg(name), f"{name}.jpg")
    assert r.status_code == 200
    assert r.json()["faces"] == []
    assert r.json()["model"]["version"] == "test-run"


def test_detect_false_takes_the_whole_image(client: TestClient) -> None:
    (face,) = post_image(client, photo_jpeg("astronaut"), detect=False).json()["faces"]
    assert face["box"] == [0, 0, 512, 512]
    assert_valid_scores(face)
    assert post_image(client, photo_jpeg("coffee"), detect=False).json()["faces"][0]["box"] == [0, 0, 600, 400]


def test_detect_must_be_a_boolean(client: TestClient) -> None:
    r = client.post("/predict", files={"file": ("a.png", gray_png())}, params={"detect": "maybe"})
    assert r.status_code == 422


def spy_on_crops(client: TestClient) -> list[tuple[int, int]]:
    """The sizes of the crops the model is given from now on, in order."""
    real = client.app.state.predictor
    seen: list[tuple[int, int]] = []

    class Spy:
        info = real.info

        def predict_faces(self, faces: list[Image.Image]):
            seen.extend(face.size for face in faces)
            return real.predict_faces(faces)

    client.app.dependency_overrides[get_predictor] = Spy
    return seen


def test_each_face_is_classified_from_its_aligned_crop(client: TestClient) -> None:
    """The model sees the face, squared and framed from its keypoints, not the whole photo."""
    seen = spy_on_crops(client)
    (face,) = post_image(client, photo_jpeg("astronaut")).json()["faces"]
    assert set(face["landmarks"]) == {"right_eye", "left_eye", "nose_tip", "mouth", "right_ear", "left_ear"}
    (right_x, right_y), (left_x, left_y) = face["landmarks"]["right_eye"], face["landmarks"]["left_eye"]
    assert right_x < left_x and abs(right_y - left_y) < 10  # her right eye on the image's left, both level
    ((w, h),) = seen
    # A square about the box's size (fercore.framing.SERVED_FRAME: 0.85 of FER2013's framing, which is larger).
    assert w == h and 0.7 * face["box"][2] < w < 1.6 * face["box"][2]


def test_without_alignment_the_crop_is_the_box_with_the_served_margin(monkeypatch: pytest.MonkeyPatch, model_path: Path) -> None:
    with running_app(monkeypatch, MODEL_URI=str(model_path), FACE_ALIGN="false") as client:
        seen = spy_on_crops(client)
        (face,) = post_image(client, photo_jpeg("astronaut")).json()["faces"]
    _, _, w, h = expand_box(tuple(face["box"]), SERVED_FRAME.margin, 512, 512)
    assert seen == [(w, h)]
    assert (w, h) == tuple(face["box"][2:])  # the served margin is none: the detector's box as it is


def test_faces_are_found_in_the_upright_image(client: TestClient) -> None:
    """A camera JPEG stored sideways with an EXIF orientation: boxes are in upright pixels."""
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    upright = photo("astronaut")
    stored = upright.rotate(90, expand=True)  # counter-clockwise: what the sensor wrote
    r = post_image(client, encode(stored, "JPEG", quality=90, exif=exif.tobytes()), "sideways.jpg")
    (face,) = r.json()["faces"]
    assert_astronaut_face(face["box"])


# --- several images at once -------------------------------------------------------------


def test_batch_keeps_order_and_reports_bad_files(client: TestClient) -> None:
    truncated = rgb_jpeg()[:300]
    files = [
        ("astronaut.jpg", photo_jpeg("astronaut")),
        ("notes.txt", b"not an image at all"),
        ("coffee.jpg", photo_jpeg("coffee")),
        ("empty.png", b""),
        ("broken.jpg", truncated),
        ("again.jpg", photo_jpeg("astronaut")),
    ]
    r = post_batch(client, files)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"]["version"] == "test-run"
    results = body["results"]
    assert [item["filename"] for item in results] == [name for name, _ in files]
    (face,) = results[0]["faces"]
    assert_astronaut_face(face["box"])
    assert_valid_scores(face)
    assert results[1] == {"filename": "notes.txt", "error": {"status": 415, "detail": "unsupported image format"}}
    assert results[2] == {"filename": "coffee.jpg", "faces": []}
    assert results[3] == {"filename": "empty.png", "error": {"status": 400, "detail": "empty file"}}
    assert results[4] == {"filename": "broken.jpg", "error": {"status": 400, "detail": "corrupt image"}}
    assert results[5]["faces"] == results[0]["faces"]  # same photo, same answer


def test_batch_matches_single_predictions(client: TestClient) -> None:
    files = [("a.png", gray_png()), ("b.jpg", rgb_jpeg()), ("c.jpg", photo_jpeg("astronaut"))]
    for detect in (True, False):
        results = post_batch(client, files, detect=detect).json()["results"]
        for (name, data), item in zip(files, results, strict=True):
            single = post_image(client, data, name, detect=detect).json()["faces"]
            assert [f["box"] for f in item["faces"]] == [f["box"] for f in single]
            for got, want in zip(item["faces"], single, strict=True):
                for cls in CLASS_NAMES:
                    assert got["scores"][cls] == pytest.approx(want["scores"][cls], abs=1e-5)
    whole = post_batch(client, files, detect=False).json()["results"]
    assert [item["faces"][0]["box"] for item in whole] == [[0, 0, 64, 48], [0, 0, 64, 48], [0, 0, 512, 512]]


def test_batch_classifies_all_faces_in_one_forward_pass(client: TestClient) -> None:
    real = client.app.state.predictor
    calls: list[int] = []

    class Spy:
        info = real.info

        def predict_faces(self, faces: list[Image.Image]):
            calls.append(len(faces))
            return real.predict_faces(faces)

    client.app.dependency_overrides[get_predictor] = Spy
    files = [("a.jpg", photo_jpeg("astronaut")), ("bad", b"xx"), ("b.jpg", photo_jpeg("astronaut")), ("c.png", gray_png())]
    r = post_batch(client, files)
    assert r.status_code == 200
    assert calls == [2]
    assert post_batch(client, [("c.jpg", photo_jpeg("coffee"))]).json()["results"][0]["faces"] == []
    assert calls == [2]  # no face, no forward pass


def test_batch_over_file_count_is_413(monkeypatch: pytest.MonkeyPatch, model_path: Path) -> None:
    with running_app(monkeypatch, MODEL_URI=str(model_path), MAX_BATCH_FILES="2") as client:
        r = post_batch(client, [(f"{i}.png", gray_png()) for i in range(3)])
        assert r.status_code == 413
        assert r.json() == {"detail": "too many files"}
        assert post_batch(client, [(f"{i}.png", gray_png()) for i in range(2)]).status_code == 200


def test_batch_needs_files(client: TestClient) -> None:
    assert client.post("/predict/batch", files={"file": ("a.png", gray_png())}).status_code == 422
    assert client.post("/predict/batch").status_code == 422


def test_batch_file_over_limit_is_its_own_error(monkeypatch: pytest.MonkeyPatch, model_path: Path) -> None:
    with running_app(monkeypatch, MODEL_URI=str(model_path), MAX_UPLOAD_BYTES="2000") as client:
        r = post_batch(client, [("big.bin", b"\x00" * 2001), ("ok.png", gray_png())], detect=False)
        assert r.status_code == 200
        big, ok = r.json()["results"]
        assert big == {"filename": "big.bin", "error": {"status": 413, "detail": "file too large"}}
        assert ok["faces"][0]["box"] == [0, 0, 64, 48]


def test_batch_body_limit_scales_with_file_count(monkeypatch: pytest.MonkeyPatch, model_path: Path) -> None:
    env = {"MODEL_URI": str(model_path), "MAX_UPLOAD_BYTES": "100000", "MAX_BATCH_FILES": "3"}
    with running_app(monkeypatch, **env) as client:
        # 3 x 90 kB: more than one file's body limit, within three files'
        r = post_batch(client, [(f"{i}.bin", b"\x01" * 90_000) for i in range(3)])
        assert r.status_code == 200
        assert [item["error"]["status"] for item in r.json()["results"]] == [415, 415, 415]
        assert post_image(client, b"\x01" * 270_000).status_code == 413  # /predict keeps one file's limit
        r = post_batch(client, [(f"{i}.bin", b"\x01" * 200_000) for i in range(3)])  # over three files' limit
        assert r.status_code == 413
        assert r.json() == {"detail": "file too large"}


# --- bounded concurrency ----------------------------------------------------------------


class GatedPredictor:
    """The real predictor behind a gate: each call announces itself, then waits to be let through."""

    def __init__(self, real: Predictor) -> None:
        self.real = real
        self.info = real.info
        self.entered = threading.Semaphore(0)
        self.release = threading.Event()

    def predict_faces(self, faces: list[Image.Image]):
        self.entered.release()
        assert self.release.wait(60), "never released"
        return self.real.predict_faces(faces)


def wait_until(condition, what: str) -> None:
    """Poll for a state another thread brings about; the timeout only turns a hang into a failure."""
    deadline = time.monotonic() + 30
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.005)


def test_busy_server_answers_503(monkeypatch: pytest.MonkeyPatch, model_path: Path) -> None:
    env = {"MODEL_URI": str(model_path), "MAX_CONCURRENT_INFERENCES": "1", "MAX_QUEUE": "0"}
    with running_app(monkeypatch, **env) as client, ThreadPoolExecutor(1) as pool:
        gate = GatedPredictor(client.app.state.predictor)
        client.app.dependency_overrides[get_predictor] = lambda: gate
        first = pool.submit(post_image, client, gray_png(), "a.png", False)
        assert gate.entered.acquire(timeout=60)  # the only slot is taken

        async def never_called(*args: object) -> bytes:
            raise AssertionError("a refused request's upload was read")

        with monkeypatch.context() as patch:
            patch.setattr(predict_routes, "read_upload", never_called)
            for r in (post_image(client, gray_png(), detect=False), post_batch(client, [("b.png", gray_png())])):
                assert r.status_code == 503
                assert r.json() == {"detail": "server busy"}
                assert r.headers["retry-after"] == "1"
        gate.release.set()
        assert first.result().status_code == 200
        assert post_image(client, gray_png(), detect=False).status_code == 200  # the slot is free again
        assert client.app.state.limiter.admitted == 0


def post_endless_upload(client: TestClient, path: str) -> tuple[int, dict[str, object], int]:
    """POST an upload at the ASGI level, 64 KiB at a time: (status, JSON body, chunks the app read)."""
    reads: list[int] = []
    sent: list[Any] = []

    async def receive() -> dict[str, object]:
        reads.append(1)  # 3 chunks, then it ends
        return {"type": "http.request", "body": b"x" * 65536, "more_body": len(reads) < 3}

    async def send(message: Any) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"testserver"), (b"content-type", b"multipart/form-data; boundary=b")],
        "client": ("127.0.0.1", 1),
        "server": ("testserver", 80),
    }
    assert client.portal is not None
    client.portal.call(client.app, scope, receive, send)
    return sent[0]["status"], json.loads(b"".join(m.get("body", b"") for m in sent[1:])), len(reads)


def test_busy_server_refuses_before_reading_the_upload(monkeypatch: pytest.MonkeyPatch, model_path: Path) -> None:
    # A refused client must not have to send its whole upload first (FastAPI parses a multipart
    # body before the route runs): counted at the ASGI level.
    env = {"MODEL_URI": str(model_path), "MAX_CONCURRENT_INFERENCES": "1", "MAX_QUEUE": "0"}
    with running_app(monkeypatch, **env) as client, ThreadPoolExecutor(1) as pool:
        gate = GatedPredictor(client.app.state.predictor)
        client.app.dependency_overrides[get_predictor] = lambda: gate
        first = pool.submit(post_image, client, gray_png(), "a.png", False)
        assert gate.entered.acquire(timeout=60)  # the only slot is taken
        for path in ("/predict", "/predict/batch"):
            assert post_endless_upload(client, path) == (503, {"detail": "server busy"}, 0), path
        gate.release.set()
        assert first.result().status_code == 200


def test_requests_wait_in_a_bounded_queue(monkeypatch: pytest.MonkeyPatch, model_path: Path) -> None:
    env = {"MODEL_URI": str(model_path), "MAX_CONCURRENT_INFERENCES": "1", "MAX_QUEUE": "1"}
    with running_app(monkeypatch, **env) as client, ThreadPoolExecutor(2) as pool:
        gate = GatedPredictor(client.app.state.predictor)
        client.app.dependency_overrides[get_predictor] = lambda: gate
        limiter = client.app.state.limiter
        running = pool.submit(post_image, client, gray_png(), "a.png", False)
        assert gate.entered.acquire(timeout=60)
        waiting = pool.submit(post_image, client, gray_png(), "b.png", False)
        wait_until(lambda: limiter.admitted == 2, "the second request waits for the slot")
        assert not gate.entered.acquire(blocking=False)  # waiting, not running
        r = post_image(client, gray_png(), detect=False)
        assert (r.status_code, r.json()) == (503, {"detail": "server busy"})
        gate.release.set()
        assert running.result().status_code == 200
        assert waiting.result().status_code == 200
        assert gate.entered.acquire(timeout=60)  # the waiting one ran after all
        assert limiter.admitted == 0


def test_limiter_admits_running_plus_waiting() -> None:
    async def scenario() -> None:
        limiter = InferenceLimiter(max_running=1, max_waiting=1)
        started, release = threading.Event(), threading.Event()

        def block() -> str:
            started.set()
            release.wait(60)
            return "first"

        first = asyncio.create_task(limiter.run(block))
        await asyncio.to_thread(started.wait, 60)
        second = asyncio.create_task(limiter.run(lambda: "second"))
        await asyncio.sleep(0)  # the second is admitted and waits on the semaphore
        assert limiter.admitted == 2
        with pytest.raises(ServerBusy):
            await limiter.run(lambda: "third")
        release.set()
        assert (await first, await second) == ("first", "second")
        assert limiter.admitted == 0
        assert await limiter.run(lambda: "again") == "again"

    asyncio.run(scenario())


def test_limiter_rejects_nonsense_bounds() -> None:
    with pytest.raises(ValueError):
        InferenceLimiter(0, 1)
    with pytest.raises(ValueError):
        InferenceLimiter(1, -1)


# --- bad input: always 4xx, stable details ----------------------------------------------


def test_empty_file_is_400(client: TestClient) -> None:
    r = post_image(client, b"")
    assert r.status_code == 400
    assert r.json() == {"detail": "empty file"}


@pytest.mark.parametrize(
    "data",
    [b"not an image at all", os.urandom(2048), b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n"],
    ids=["text", "random", "eps"],
)
def test_undecodable_is_415(client: TestClient, data: bytes) -> None:
    r = post_image(client, data)
    assert r.status_code == 415
    assert r.json() == {"detail": "unsupported image format"}


def test_truncated_image_is_400(client: TestClient) -> None:
    data = rgb_jpeg()
    r = post_image(client, data[: len(data) // 2])
    assert r.status_code == 400
    assert r.json() == {"detail": "corrupt image"}


def test_missing_file_field_is_422(client: TestClient) -> None:
    assert client.post("/predict", files={"image": ("a.png", gray_png())}).status_code == 422
    assert client.post("/predict", content=gray_png(), headers={"content-type": "image/png"}).status_code == 422


def test_malformed_multipart_is_400(client: TestClient) -> None:
    r = client.post("/predict", content=b"--x\r\ngarbage", headers={"content-type": "multipart/form-data; boundary=x"})
    assert 400 <= r.status_code < 500


def test_file_over_limit_is_413(monkeypatch: pytest.MonkeyPatch, model_path: Path) -> None:
    with running_app(monkeypatch, MODEL_URI=str(model_path), MAX_UPLOAD_BYTES="1000") as client:
        r = post_image(client, b"\x00" * 1001)  # small body: passes the body limit, caught on read
        assert r.status_code == 413
        assert r.json() == {"detail": "file too large"}
        assert post_image(client, b"\x00" * 1000).status_code == 415  # at the limit: read, then judged


def test_body_over_limit_is_413_before_reading(monkeypatch: pytest.MonkeyPatch, model_path: Path) -> None:
    async def never_called(*args: object) -> bytes:
        raise AssertionError("the route ran: the body was read in full")

    monkeypatch.setattr(predict_routes, "read_upload", never_called)
    with running_app(monkeypatch, MODEL_URI=str(model_path), MAX_UPLOAD_BYTES="1000") as client:
        r = post_image(client, b"\x00" * 200_000)  # Content-Length alone says it is too big
        assert r.status_code == 413
        assert r.json() == {"detail": "file too large"}

        def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it streams
            yield b"--x\r\nContent-Disposition: form-data; name=file; filename=a.png\r\n\r\n"
            for _ in range(10):
                yield b"\x00" * 20_000

        r = client.post("/predict", content=chunks(), headers={"content-type": "multipart/form-data; boundary=x"})
        assert r.status_code == 413
        assert r.json() == {"detail": "file too large"}


def test_image_over_pixel_limit_is_413(monkeypatch: pytest.MonkeyPatch, model_path: Path) -> None:
    with running_app(monkeypatch, MODEL_URI=str(model_path), MAX_IMAGE_PIXELS="10000") as client:
        at_limit = encode(Image.new("L", (100, 100), 90), "PNG")
        assert post_image(client, at_limit).status_code == 200
        for size in [(101, 100), (150, 150)]:  # Pillow warns below 2x the limit and raises above
            r = post_image(client, encode(Image.new("L", size, 90), "PNG"))
            assert r.status_code == 413
            assert r.json() == {"detail": "image has too many pixels"}


def test_decompression_bomb_is_413(client: TestClient) -> None:
    bomb = png_claiming_size(20_000, 20_000)  # 400 Mpx claimed in a few hundred bytes
    assert len(bomb) < 1000
    r = post_image(client, bomb)
    assert r.status_code == 413
    assert r.json() == {"detail": "image has too many pixels"}


def test_unexpected_error_is_logged_500(monkeypatch: pytest.MonkeyPatch, model_path: Path, caplog) -> None:
    class Broken:
        def predict_faces(self, faces: list[Image.Image]):
            raise RuntimeError("boom")

    monkeypatch.setenv("MODEL_URI", str(model_path))
    app = create_app()
    app.dependency_overrides[get_predictor] = Broken
    with TestClient(app, raise_server_exceptions=False) as client, caplog.at_level(logging.ERROR):
        r = post_image(client, gray_png(), detect=False)
    assert r.status_code == 500
    assert r.json() == {"detail": "internal error"}
    assert any(rec.exc_info and "boom" in str(rec.exc_info[1]) for rec in caplog.records)


# --- where the model comes from ---------------------------------------------------------


def publish(tmp_path: Path, run_id: str = "run-7") -> tuple[Path, Path]:
    """A model registry folder as training publishes it: ``<out>/<run_id>/model.onnx`` + latest.json."""
    model = write_model(tmp_path / "build" / "model.onnx", run_id=run_id)
    out = tmp_path / "registry"
    publish_promoted(out, run_id, {"model.onnx": model}, model_name="model.onnx", metrics={"val_accuracy": 0.5})
    return out, out / run_id / "model.onnx"


def test_folder_with_latest_json(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    folder, model = publish(tmp_path)
    with running_app(monkeypatch, MODEL_URI=str(folder)) as client:
        assert client.get("/readyz").status_code == 200
        info = client.get("/model").json()
        assert info["version"] == "run-7"
        assert info["sha256"] == sha256_file(model)
        assert info["source"] == str(folder)
        assert post_image(client, gray_png()).json()["model"]["version"] == "run-7"


def test_sha256_mismatch_is_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog) -> None:
    """Documented choice: the process starts, logs the reason at ERROR, and never becomes ready."""
    folder, model = publish(tmp_path)
    write_model(model, run_id="run-7", seed=1)  # same name, different bytes
    with caplog.at_level(logging.ERROR), running_app(monkeypatch, MODEL_URI=str(folder)) as client:
        assert client.get("/healthz").status_code == 200
        assert client.get("/readyz").status_code == 503
        assert client.get("/readyz").json() == {"detail": "model not loaded"}
        assert client.get("/model").status_code == 503
        assert post_image(client, gray_png()).status_code == 503
    messages = [rec.getMessage() for rec in caplog.records if rec.levelno == logging.ERROR]
    assert any("sha256" in m and "does not match" in m and str(model) in m for m in messages)


def test_sha256_mismatch_raises_from_predictor(tmp_path: Path) -> None:
    folder, model = publish(tmp_path)
    model.write_bytes(model.read_bytes() + b"tampered")
    with pytest.raises(ModelLoadError, match="does not match"):
        Predictor.from_uri(str(folder))


def _break_pointer(folder: Path) -> None:
    pointer = json.loads((folder / LATEST).read_text())
    pointer["path"] = "../outside.onnx"
    (folder / LATEST).write_text(json.dumps(pointer))


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("missing", "no such model file or folder"),
        ("no_latest", "has no latest.json"),
        ("bad_latest", "unreadable"),
        ("escaping_path", "leaves the folder"),
        ("model_gone", "missing"),
        ("not_a_model", "not a loadable ONNX model"),
    ],
)
def test_unloadable_model_keeps_service_unready(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog, case: str, reason: str
) -> None:
    folder, model = publish(tmp_path)
    uri = str(folder)
    if case == "missing":
        uri = str(tmp_path / "nowhere.onnx")
    elif case == "no_latest":
        (folder / LATEST).unlink()
    elif case == "bad_latest":
        (folder / LATEST).write_text("{not json")
    elif case == "escaping_path":
        _break_pointer(folder)
        write_model(folder.parent / "outside.onnx")
    elif case == "model_gone":
        model.unlink()
    elif case == "not_a_model":
        uri = str(tmp_path / "junk.onnx")
        Path(uri).write_bytes(b"this is not an ONNX file")
    with caplog.at_level(logging.ERROR), running_app(monkeypatch, MODEL_URI=uri) as client:
        assert client.get("/healthz").status_code == 200
        assert client.get("/readyz").status_code == 503
    assert any(reason in rec.getMessage() for rec in caplog.records if rec.levelno == logging.ERROR)


def test_gcs_prefix_is_downloaded_verified_and_cached(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, gcs) -> None:
    prefix = f"gs://{gcs.name}/models"
    model = write_model(tmp_path / "model.onnx", run_id="gcs-run")
    publish_promoted(prefix, "gcs-run", {"model.onnx": model}, model_name="model.onnx")
    with running_app(monkeypatch, MODEL_URI=prefix) as client:
        info = client.get("/model").json()
        assert (info["version"], info["sha256"], info["source"]) == ("gcs-run", sha256_file(model), prefix)
    cached = list(Path(os.environ["FER_CACHE_DIR"]).rglob("model.onnx"))
    assert len(cached) == 1 and sha256_file(cached[0]) == sha256_file(model)


def test_gcs_sha256_mismatch_is_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, gcs, caplog) -> None:
    prefix = f"gs://{gcs.name}/models"
    publish_promoted(prefix, "gcs-run", {"model.onnx": write_model(tmp_path / "model.onnx")}, model_name="model.onnx")
    gcs.blob("models/gcs-run/model.onnx").upload_from_filename(str(write_model(tmp_path / "other.onnx", seed=1)))
    with caplog.at_level(logging.ERROR), running_app(monkeypatch, MODEL_URI=prefix) as client:
        assert client.get("/readyz").status_code == 503
    assert any("does not match" in rec.getMessage() for rec in caplog.records if rec.levelno == logging.ERROR)
    assert not list(Path(os.environ["FER_CACHE_DIR"]).rglob("model.onnx"))


# --- settings ---------------------------------------------------------------------------


def test_settings_defaults() -> None:
    settings = Settings(_env_file=None, inference_threads=0)
    assert settings.model_uri is None
    assert settings.resolved_model_uri() == str(BUNDLED_MODEL)
    assert BUNDLED_MODEL == ROOT / "models" / "fer-compact.int8.onnx"
    assert settings.max_upload_bytes == 10 * 1024 * 1024
    assert settings.max_image_pixels == 40_000_000
    assert settings.resolved_inference_threads() == available_cpus() <= len(os.sched_getaffinity(0))
    assert settings.max_batch_files == 16
    assert settings.max_concurrent_inferences == 0
    assert settings.resolved_max_concurrent_inferences() == available_cpus()
    assert settings.max_queue == 64
    assert (settings.batch_max_size, settings.batch_max_wait_ms, settings.batching) == (32, 0.0, True)


@pytest.mark.parametrize(
    ("files", "quota"),
    [
        ({"cpu.max": "max 100000\n"}, None),
        ({"cpu.max": "150000 100000\n"}, 1.5),
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
        ({"cpu/cpu.cfs_quota_us": "100000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 1.0),
        ({}, None),
    ],
    ids=["v2-unlimited", "v2-1.5-cpus", "v1-unlimited", "v1-1-cpu", "no-cgroup"],
)
def test_cgroup_cpu_quota(tmp_path: Path, files: dict[str, str], quota: float | None) -> None:
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert cgroup_cpu_quota(tmp_path) == quota


def test_available_cpus_respects_the_cgroup_quota(tmp_path: Path) -> None:
    # A container with a quota of 1.5 CPUs on a bigger host: 2 threads, not one per host CPU.
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert available_cpus(tmp_path) == min(2, len(os.sched_getaffinity(0)))
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert available_cpus(tmp_path) == len(os.sched_getaffinity(0))


def test_settings_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODEL_URI", " gs://bucket/models ")
    monkeypatch.setenv("MAX_UPLOAD_BYTES", "2048")
    monkeypatch.setenv("MAX_IMAGE_PIXELS", "1000")
    monkeypatch.setenv("INFERENCE_THREADS", "3")
    monkeypatch.setenv("MAX_BATCH_FILES", "4")
    monkeypatch.setenv("MAX_CONCURRENT_INFERENCES", "2")
    monkeypatch.setenv("MAX_QUEUE", "0")
    settings = load_settings()
    assert settings.model_uri == "gs://bucket/models"
    assert (settings.max_upload_bytes, settings.max_image_pixels, settings.resolved_inference_threads()) == (2048, 1000, 3)
    assert (settings.max_batch_files, settings.resolved_max_concurrent_inferences(), settings.max_queue) == (4, 2, 0)


def test_empty_model_uri_means_bundled(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODEL_URI", "")
    assert load_settings().resolved_model_uri() == str(BUNDLED_MODEL)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("MAX_UPLOAD_BYTES", "0"),
        ("MAX_UPLOAD_BYTES", "ten"),
        ("MAX_IMAGE_PIXELS", "-5"),
        ("INFERENCE_THREADS", "-1"),
        ("MAX_BATCH_FILES", "0"),
        ("MAX_CONCURRENT_INFERENCES", "-1"),
        ("MAX_QUEUE", "-1"),
        ("BATCH_MAX_SIZE", "0"),
        ("BATCH_MAX_WAIT_MS", "-1"),
        ("BATCH_MAX_WAIT_MS", "5000"),
        ("MODEL_URI", "s3://bucket/model.pt"),
        ("MODEL_URI", "gs:///model.pt"),
    ],
)
def test_invalid_settings_stop_startup(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=name):
        create_app()


# --- the real server --------------------------------------------------------------------


@pytest.mark.slow
def test_uvicorn_serves_predictions(model_path: Path, tmp_path: Path) -> None:
    with uvicorn_server(tmp_path / "uvicorn.log", MODEL_URI=str(model_path), INFERENCE_THREADS="1") as base:
        r = httpx.post(
            f"{base}/predict", files={"file": ("face.jpg", rgb_jpeg(), "image/jpeg")}, params={"detect": "false"}, timeout=30
        )
        assert r.status_code == 200, r.text
        assert_valid_scores(r.json()["faces"][0])
        assert httpx.post(f"{base}/predict", files={"file": ("e.png", b"", "image/png")}, timeout=30).status_code == 400


class _Payload:
    """Pickles to a call of os.system: what a malicious "checkpoint" would carry."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        import os

        return (os.system, (f"touch {self.marker}",))


def test_malicious_checkpoint_is_refused_and_never_runs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "model.pt"
    torch.save({"format": "fer-checkpoint", "state_dict": _Payload(marker)}, path)
    with caplog.at_level(logging.ERROR), running_app(monkeypatch, MODEL_URI=str(path)) as client:
        assert client.get("/readyz").status_code == 503
    assert not marker.exists()
    # The service never unpickles: any PyTorch checkpoint is refused with how to export it.
    assert any("a PyTorch checkpoint; the service runs ONNX models" in rec.getMessage() for rec in caplog.records)


_PROCESS_WIDE = """
import logging, os, sys
import PIL.Image
env, root = dict(os.environ), logging.getLogger()
handlers, level, limit = list(root.handlers), root.level, PIL.Image.MAX_IMAGE_PIXELS
import app.main
from fastapi.testclient import TestClient
with TestClient(app.main.create_app()) as client:  # the bundled model, lifespan and all
    upload = {"file": ("f.png", sys.stdin.buffer.read())}
    assert client.post("/predict", params={"detect": "false"}, files=upload).status_code == 200
assert dict(os.environ) == env, "the environment changed"
assert (root.handlers, root.level) == (handlers, level), "logging changed"
assert PIL.Image.MAX_IMAGE_PIXELS == limit, "Pillow's limit changed"
heavy = sorted(name for name in sys.modules if name.split(".")[0] in ("torch", "torchvision", "training", "onnx"))
assert not heavy, heavy
print("ok")
"""


def test_building_and_serving_the_app_changes_nothing_process_wide_and_needs_no_torch() -> None:
    """Importing ``app.main``, building an app and serving a prediction leave the environment,
    logging and Pillow as they were, and never import torch or the training code: the service
    image has neither. A fresh interpreter: this one has loaded torch long ago."""
    env = {k: v for k, v in os.environ.items() if k.upper() not in SETTINGS_ENV and not k.startswith("OTEL_")}
    out = subprocess.run(
        [sys.executable, "-c", _PROCESS_WIDE], input=gray_png(), env=env, cwd=ROOT, capture_output=True, check=False
    )
    assert out.returncode == 0 and out.stdout.strip() == b"ok", out.stderr.decode()[-2000:]
