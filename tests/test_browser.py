"""Swagger UI at ``/docs`` in a real browser: the app under uvicorn with a tiny real checkpoint,
Debian's Chromium driven headless by Playwright, an image uploaded through ``POST /predict``'s
"Try it out" form. Skipped where no Chromium is installed, except in CI (``CI=true``), where
that is a failure: ``.ci/run`` installs it."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from PIL import Image
from playwright.sync_api import Browser

from fercore.labels import CLASS_NAMES
from tests.utils.browser import TIMEOUT_MS, chromium, expect, require_chromium
from tests.utils.service import clean_service_env, encode, face_pixels, uvicorn_server, write_model

pytestmark = pytest.mark.browser

# FastAPI's operation id for POST /predict; Swagger UI names the block after tag and id.
PREDICT_BLOCK = "#operations-predict-predict_predict_post"


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with chromium(require_chromium()) as browser:
        yield browser


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[str]:
    clean_service_env(monkeypatch)
    checkpoint = write_model(tmp_path / "model.pt")
    with uvicorn_server(tmp_path / "uvicorn.log", MODEL_URI=str(checkpoint)) as base:
        yield base


def test_swagger_ui_predicts_an_uploaded_image(browser: Browser, server: str, tmp_path: Path) -> None:
    image_path = tmp_path / "face.png"
    image_path.write_bytes(encode(Image.fromarray(face_pixels(), mode="L"), "PNG"))
    requested: list[str] = []
    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    context.on("request", lambda request: requested.append(request.url))
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    try:
        page.goto(f"{server}/docs", wait_until="load")
        expect(page).to_have_title(re.compile("FER2013 facial expression service"))
        expect(page.locator(".swagger-ui .info .title")).to_contain_text("FER2013 facial expression service")
        expect(page.locator(".opblock").first).to_be_visible()  # the operation list rendered

        block = page.locator(PREDICT_BLOCK)
        block.locator(".opblock-summary").first.click()
        block.get_by_role("button", name="Try it out").click()
        detect = block.locator('tr[data-param-name="detect"] select')
        has_detect = detect.count() > 0
        if has_detect:  # the whole image as one face crop: the synthetic image has no face to find
            detect.select_option("false")
        block.locator('input[type="file"]').set_input_files(image_path)
        block.get_by_role("button", name="Execute").click()

        response = block.locator(".live-responses-table tr.response")  # not the header row
        expect(response.locator(".response-col_status")).to_have_text("200")
        body = response.locator(".response-col_description pre").first
        expect(body).to_contain_text('"emotion"')
        screenshot = tmp_path / "swagger-predict.png"
        block.screenshot(path=screenshot)
        print(f"screenshot: {screenshot}")

        text = body.inner_text()
        assert re.search(r'"emotion":\s*"({})"'.format("|".join(CLASS_NAMES)), text), text
        if has_detect:
            expect(block.locator(".request-url")).to_contain_text("detect=false")
    finally:
        context.close()

    foreign = [url for url in requested if urlsplit(url).scheme not in ("data", "blob") and urlsplit(url).hostname != "127.0.0.1"]
    assert not foreign, f"the page reached beyond 127.0.0.1: {foreign}"
    assert any(urlsplit(url).path == "/openapi.json" for url in requested), requested
