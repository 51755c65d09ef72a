"""A real Chromium for the browser tests and the page benchmark: Debian's ``/usr/bin/chromium``
driven by Playwright, kept from reaching anything on its own, and a fake camera fed a video file
made in code from a photo (Chromium's ``--use-file-for-fake-video-capture`` reads Y4M)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from PIL import Image
from playwright.sync_api import Browser, Expect, sync_playwright

TIMEOUT_MS = 30_000
# Playwright's own ``expect`` gives up after 5 s whatever the context's default timeout: this one
# waits as long as everything else (software rendering on a loaded machine), without changing the
# shared instance.
expect = Expect()
expect.set_options(timeout=TIMEOUT_MS)
# Keep Chromium from reaching anything on its own (updates, sync, QUIC probes): the tests assert
# that the page itself talks to 127.0.0.1 only.
CHROMIUM_ARGS = [
    "--no-sandbox",  # CI runs as root, where Chromium's sandbox refuses to start
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def find_chromium() -> str | None:
    """Debian's ``/usr/bin/chromium`` first, else a Chromium or Chrome on ``PATH``."""
    if os.access("/usr/bin/chromium", os.X_OK):
        return "/usr/bin/chromium"
    return next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)


def require_chromium() -> str:
    """The Chromium to drive; the test is skipped without one, except in CI (``CI=true``), where
    that is a failure: ``.ci/run`` installs it."""
    executable = find_chromium()
    if executable is None:
        reason = "no Chromium executable (/usr/bin/chromium or chromium/google-chrome on PATH); apt-get install chromium"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{reason}: CI must run the browser test (.ci/run installs it)", pytrace=False)
        pytest.skip(reason)
    return executable


def fake_camera_args(video: Path) -> list[str]:
    """Chromium flags: a camera that plays ``video`` (Y4M, looped), granted without a prompt."""
    return [
        "--use-fake-device-for-media-stream",
        "--use-fake-ui-for-media-stream",
        f"--use-file-for-fake-video-capture={video}",
    ]


@contextmanager
def chromium(executable: str, extra_args: list[str] | None = None) -> Iterator[Browser]:
    """Headless Chromium at ``executable`` with :data:`CHROMIUM_ARGS` (and ``extra_args``)."""
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=executable, headless=True, args=CHROMIUM_ARGS + (extra_args or []), timeout=TIMEOUT_MS
        )
        try:
            yield browser
        finally:
            browser.close()


def write_y4m(path: Path, frames: list[Image.Image], fps: int = 10) -> Path:
    """``frames`` (same even size) as a Y4M video: the header line, then per frame ``FRAME`` and
    its I420 planes (full-range BT.601, as Pillow's YCbCr, hence ``C420jpeg``; chroma halved)."""
    width, height = frames[0].size
    assert width % 2 == 0 and height % 2 == 0, "I420 needs an even width and height"
    with path.open("wb") as out:
        out.write(f"YUV4MPEG2 W{width} H{height} F{fps}:1 Ip A1:1 C420jpeg\n".encode("ascii"))
        for frame in frames:
            assert frame.size == (width, height), "every frame has the first one's size"
            y, cb, cr = frame.convert("RGB").convert("YCbCr").split()
            half = (width // 2, height // 2)
            out.write(b"FRAME\n")
            for plane in (y, cb.resize(half, Image.Resampling.BOX), cr.resize(half, Image.Resampling.BOX)):
                out.write(plane.tobytes())
    return path


def camera_video(path: Path, photo: Image.Image, region: tuple[int, int, int, int], frames: int = 10) -> Path:
    """A 640x480 Y4M of ``photo``'s ``region`` (left, top, right, bottom; 4:3), drifting a few
    pixels right and back so consecutive frames differ, as a camera's would."""
    shifts = [4 * min(i, frames - i) for i in range(frames)]
    left, top, right, bottom = region
    images = [photo.crop((left + dx, top, right + dx, bottom)).resize((640, 480), Image.Resampling.BILINEAR) for dx in shifts]
    return write_y4m(path, images)
