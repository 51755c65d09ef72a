"""The page at ``GET /`` and ``POST /predict?explain=true`` behind its heatmaps.

The page itself in a real browser: the app under uvicorn with the bundled model, Debian's
Chromium driven headless by Playwright, its fake camera playing a video made from a photo. Every
browser test fails if the page requests anything outside the service's origin, or if the
browser reports a Content-Security-Policy violation.
"""

from __future__ import annotations

import base64
import io
import re
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from playwright.sync_api import Browser, BrowserContext, Page

from app import explain
from app.faces import whole_image_crop
from app.model import Predictor
from app.routes.page import CSP
from tests.utils.browser import TIMEOUT_MS, camera_video, chromium, expect, fake_camera_args, require_chromium
from tests.utils.photos import assert_astronaut_face, photo, photo_jpeg
from tests.utils.service import clean_service_env, encode, post_image, uvicorn_server

# The astronaut's head and shoulders, 4:3: her face is about 190 px wide in the fake camera's 640x480.
CAMERA_REGION = (40, 0, 360, 240)


def decode_png(data: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(data)))
    assert image.format == "PNG"
    image.load()  # a truncated or corrupt file fails here
    return image


# --- the page's files and headers (TestClient) ----------------------------------------------------


def test_page_is_served_with_a_strict_content_security_policy(client: TestClient) -> None:
    response = client.get("/")
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    assert response.headers["content-security-policy"] == CSP
    policy = dict(part.strip().split(" ", 1) for part in CSP.split(";"))
    assert policy["default-src"] == "'none'" and policy["script-src"] == "'self'" and policy["connect-src"] == "'self'"
    assert "unsafe" not in CSP
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["x-frame-options"] == "DENY"
    html = response.text
    for ref in re.findall(r'(?:src|href)="([^"]*)"', html):  # everything the page loads is its own
        assert not urlsplit(ref).netloc and not ref.startswith("//"), ref
    assert not re.search(r"<script(?![^>]*\bsrc=)", html), "inline script: the CSP would block it"
    assert not re.search(r"\son[a-z]+=", html), "inline event handler: the CSP would block it"


@pytest.mark.parametrize(("path", "media_type"), [("/static/app.js", "text/javascript"), ("/static/style.css", "text/css")])
def test_page_assets_are_served_nosniff(client: TestClient, path: str, media_type: str) -> None:
    response = client.get(path)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith(media_type)
    assert response.headers["x-content-type-options"] == "nosniff"
    assert client.get("/static/other.js").status_code == 404  # only the page's own files


def test_api_routes_keep_their_headers(client: TestClient) -> None:
    assert "content-security-policy" not in client.get("/healthz").headers
    assert "content-security-policy" not in client.get("/docs").headers  # Swagger UI needs its inline script


def test_openapi_documents_explain_and_hides_the_page(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    params = {p["name"]: p for p in schema["paths"]["/predict"]["post"]["parameters"]}
    assert params["explain"]["schema"]["default"] is False
    assert "forward passes" in params["explain"]["description"] or "model inputs" in params["explain"]["description"]
    assert "explanation" in schema["components"]["schemas"]["Face"]["properties"]
    assert "/" not in schema["paths"]


# --- explanations through the API (TestClient) -----------------------------------------------------


def test_explain_is_off_by_default(client: TestClient) -> None:
    (face,) = post_image(client, photo_jpeg("astronaut"), "astronaut.jpg").json()["faces"]
    assert face["explanation"] is None


def test_explain_gives_a_heatmap_png_of_the_crop_size(client: TestClient) -> None:
    response = client.post("/predict", params={"explain": "true"}, files={"file": ("a.jpg", photo_jpeg("astronaut"))})
    assert response.status_code == 200
    (face,) = response.json()["faces"]
    assert_astronaut_face(face["box"])
    heat = face["explanation"]
    assert heat["method"] == "occlusion" and heat["emotion"] == face["emotion"]
    assert heat["forward_passes"] == explain.GRID**2 + 1
    x, y, w, h = heat["box"]
    fx, fy, fw, fh = face["box"]
    # The crop is the face, framed as FER2013 frames faces: around the face box's centre, of its size.
    assert x <= fx + fw / 2 <= x + w and y <= fy + fh / 2 <= y + h
    assert 0.8 < w / fw < 1.5 and 0.8 < h / fh < 1.5
    image = decode_png(heat["png"])
    assert image.size == (w, h) and image.mode == "RGBA"
    alpha = np.asarray(image)[..., 3]
    assert alpha.max() > 0 and alpha.min() < alpha.max()  # somewhere hot, somewhere not


def test_explain_without_detection_covers_the_whole_image(client: TestClient) -> None:
    big = photo("astronaut").resize((1200, 1200))
    response = client.post(
        "/predict", params={"explain": "true", "detect": "false"}, files={"file": ("big.png", encode(big, "PNG"))}
    )
    heat = response.json()["faces"][0]["explanation"]
    assert heat["box"] == [0, 0, 1200, 1200]
    assert decode_png(heat["png"]).size == whole_image_crop(big).size  # the crop the model saw, shrunk


def test_explain_is_bounded_to_the_largest_faces(client: TestClient) -> None:
    # Five astronauts, the middle one smaller: only the four largest faces are explained.
    head = photo("astronaut").crop((120, 20, 330, 230))
    sizes = [210, 210, 150, 210, 210]
    row = Image.new("RGB", (sum(sizes) + 20 * len(sizes), 230), "white")
    left = 10
    for size in sizes:
        row.paste(head.resize((size, size)), (left, 10))
        left += size + 20
    response = client.post("/predict", params={"explain": "true"}, files={"file": ("row.png", encode(row, "PNG"))})
    faces = response.json()["faces"]
    assert len(faces) == 5, [f["box"] for f in faces]
    explained = [f["explanation"] is not None for f in faces]
    assert explained == [True, True, False, True, True]


# --- app.explain on its own -----------------------------------------------------------------------


class TopLeftModel:
    """A model that only looks at the top-left quarter of its input: class 0's logit is that
    quarter's brightness. Its explanation must be hot there and nowhere else."""

    def __init__(self, size: int = 48) -> None:
        self.size = size
        self.batches: list[int] = []

    def inputs(self, faces: list[Image.Image]) -> np.ndarray:
        return np.stack([np.ones((1, self.size, self.size), np.float32) for _ in faces])

    def probabilities(self, x: np.ndarray) -> np.ndarray:
        self.batches.append(len(x))
        half = self.size // 2
        logit = 4 * x[:, 0, :half, :half].mean(axis=(1, 2))
        logits = np.stack([logit, np.zeros_like(logit)], axis=1)
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def test_occlusion_finds_the_region_the_model_uses() -> None:
    model = TopLeftModel()
    crops = [Image.new("L", (90, 60)), Image.new("L", (30, 40))]
    (first, second) = explain.explain(model, crops)
    assert model.batches == [2 * (explain.GRID**2 + 1)]  # one batched forward pass, a documented size
    assert first.class_index == 0 and first.heat.shape == (60, 90) and second.heat.shape == (40, 30)
    heat = first.heat
    top_left, bottom_right = heat[:30, :45].mean(), heat[30:, 45:].mean()
    assert top_left > 0.4 and bottom_right < 0.05, (top_left, bottom_right)
    assert 0 < first.max_drop <= 1
    png = Image.open(io.BytesIO(first.png()))
    assert png.size == (90, 60) and png.mode == "RGBA"


def test_explain_runs_on_the_served_predictor(model_path: Path) -> None:
    predictor = Predictor.from_uri(str(model_path))
    crop = photo("astronaut").crop((160, 50, 290, 180))
    (heatmap,) = explain.explain(predictor, [crop])
    assert heatmap.heat.shape == (130, 130) and heatmap.heat.dtype == np.float32
    assert predictor.classes[heatmap.class_index] == predictor.predict_face(crop)["emotion"]
    assert explain.explain(predictor, []) == []


# --- the page in a real browser ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def camera_video_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return camera_video(tmp_path_factory.mktemp("camera") / "astronaut.y4m", photo("astronaut"), CAMERA_REGION)


@pytest.fixture(scope="module")
def browser(camera_video_file: Path) -> Iterator[Browser]:
    with chromium(require_chromium(), fake_camera_args(camera_video_file)) as browser:
        yield browser


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The real app under uvicorn with its default (bundled) model."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        clean_service_env(monkeypatch)
        with uvicorn_server(tmp_path_factory.mktemp("server") / "uvicorn.log") as base:
            yield base


@pytest.fixture
def page(browser: Browser, server: str) -> Iterator[Page]:
    """A fresh page; afterwards, the test fails if it requested anything off the service's origin
    or the browser reported a CSP violation."""
    origin = urlsplit(server).netloc
    requested: list[str] = []
    problems: list[str] = []
    context: BrowserContext = browser.new_context(viewport={"width": 1280, "height": 900})
    context.set_default_timeout(TIMEOUT_MS)
    context.on("request", lambda request: requested.append(request.url))
    page = context.new_page()
    # A CSP violation is reported as a console error "Refused to ..."; an uncaught error as a pageerror.
    page.on("console", lambda msg: problems.append(msg.text) if msg.type == "error" and "Refused to" in msg.text else None)
    page.on("pageerror", lambda error: problems.append(str(error)))
    try:
        page.goto(server + "/", wait_until="load")
        yield page
    finally:
        context.close()
    foreign = [url for url in requested if urlsplit(url).scheme not in ("data", "blob") and urlsplit(url).netloc != origin]
    assert not foreign, f"the page reached beyond {origin}: {foreign}"
    assert not problems, problems


def api_predict(server: str, data: bytes, explain: bool = False) -> dict:
    response = httpx.post(
        f"{server}/predict", params={"explain": str(explain).lower()}, files={"file": ("a.jpg", data)}, timeout=60
    )
    assert response.status_code == 200, response.text
    return response.json()


@pytest.mark.browser
def test_upload_shows_each_face_with_the_emotion_the_api_gives(page: Page, server: str, tmp_path: Path) -> None:
    (api_face,) = api_predict(server, photo_jpeg("astronaut"))["faces"]
    path = tmp_path / "astronaut.jpg"
    path.write_bytes(photo_jpeg("astronaut"))
    page.locator("input[type=file]").set_input_files(path)

    faces = page.locator("[data-emotion]")
    expect(faces).to_have_count(1)
    expect(faces).to_have_attribute("data-emotion", api_face["emotion"])
    assert float(faces.get_attribute("data-confidence") or "nan") == pytest.approx(api_face["confidence"], abs=1e-4)
    expect(faces).to_contain_text(api_face["emotion"])  # as text, not only as a colour
    expect(page.locator("#status")).to_contain_text("1 face found")
    bars = page.locator("#scores li")
    expect(bars).to_have_count(7)
    expect(page.locator(f'#scores li[data-class="{api_face["emotion"]}"]')).to_contain_text(
        f"{round(100 * api_face['confidence'])}%"
    )
    faces.focus()  # keyboard-usable: the box is a button that selects its face
    page.keyboard.press("Enter")
    expect(faces).to_have_attribute("aria-pressed", "true")


@pytest.mark.browser
def test_a_photo_without_faces_says_so(page: Page, tmp_path: Path) -> None:
    path = tmp_path / "coffee.jpg"
    path.write_bytes(photo_jpeg("coffee"))
    page.locator("input[type=file]").set_input_files(path)
    expect(page.locator("#status")).to_have_text(re.compile("no face found", re.IGNORECASE))
    expect(page.locator("#status")).to_have_attribute("data-state", "no-face")
    expect(page.locator("[data-emotion]")).to_have_count(0)


@pytest.mark.browser
def test_a_file_that_is_not_an_image_shows_the_services_reason(page: Page, tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("not an image")
    page.locator("input[type=file]").set_input_files(path)
    expect(page.locator("#status")).to_contain_text("unsupported image format")
    expect(page.locator("#status")).to_have_attribute("data-state", "error")


@pytest.mark.browser
def test_webcam_frames_show_faces_that_update(page: Page) -> None:
    button = page.locator('[data-action="webcam"]')
    button.click()
    expect(button).to_have_attribute("aria-pressed", "true")
    face = page.locator("[data-emotion]")
    expect(face).to_have_count(1)
    stats = page.locator("#stats")
    expect(stats).to_contain_text("frames/s")
    for _ in range(3):  # each answered frame redraws the results and counts itself
        frames = stats.get_attribute("data-frames")
        expect(stats).not_to_have_attribute("data-frames", frames or "0")
        expect(page.locator("[data-emotion]")).to_have_count(1)
    expect(stats).to_contain_text(re.compile(r"\d+ ms round trip"))
    button.click()
    expect(button).to_have_attribute("aria-pressed", "false")
    expect(page.locator("#status")).to_have_text("Webcam off.")


@pytest.mark.browser
def test_explanation_overlay_shows_the_apis_heatmap(page: Page, server: str, tmp_path: Path) -> None:
    (api_face,) = api_predict(server, photo_jpeg("astronaut"), explain=True)["faces"]
    heat = decode_png(api_face["explanation"]["png"])
    assert heat.size == tuple(api_face["explanation"]["box"][2:])

    path = tmp_path / "astronaut.jpg"
    path.write_bytes(photo_jpeg("astronaut"))
    page.locator("input[type=file]").set_input_files(path)
    expect(page.locator("[data-emotion]")).to_have_count(1)
    expect(page.locator(".heatmap")).to_have_count(0)  # off until asked for
    page.locator('[data-action="explain"]').check()
    overlay = page.locator(".heatmap")
    expect(overlay).to_be_visible()
    expect(overlay).to_have_attribute("src", f"data:image/png;base64,{api_face['explanation']['png']}")
    assert overlay.evaluate("img => [img.naturalWidth, img.naturalHeight]") == list(heat.size)  # decoded by the browser
    page.locator('[data-action="explain"]').uncheck()
    expect(overlay).to_have_count(0)
