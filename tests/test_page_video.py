"""The page's video upload and webcam timeline in a real Chromium, against a real uvicorn with the
bundled model: a video (skimage's astronaut panned and brightening, written with PyAV as WebM) gets
a timeline per face drawn from ``POST /predict/video``'s own tracks, boxes that follow the playback,
a refused video the service's reason; the webcam session a timeline of its frames. The page, the
browser and the server are tests/test_page.py's fixtures (one home): every test here also fails if
the page reaches beyond the service or breaks its Content-Security-Policy."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Locator, Page

from tests import test_page
from tests.utils.browser import expect
from tests.utils.photos import photo_jpeg
from tests.utils.videos import moving_face_frames, moving_face_video, two_faces_video, video_bytes

pytestmark = pytest.mark.browser

# tests/test_page.py's fixtures, by their names: its fake camera, browser, server and watched page.
camera_video_file, browser, server, page = test_page.camera_video_file, test_page.browser, test_page.server, test_page.page

# app.js's CHART: the drawing area of a timeline, in SVG units.
CHART_TOP, CHART_HEIGHT, CHART_BOTTOM, CHART_LEFT = 8, 150, 34, 30
WIDTH, HEIGHT = 640, 360


@pytest.fixture(scope="module")
def clip() -> bytes:
    """2 s at 30 frames/s of a face moving left and back, as VP8 in WebM (Chromium plays it)."""
    return video_bytes(moving_face_frames(60), fps=30, codec="libvpx", fmt="webm")


def analysed(server: str, data: bytes, name: str) -> dict:
    r = httpx.post(f"{server}/predict/video", params={"fps": 5}, files={"file": (name, data)}, timeout=120)
    assert r.status_code == 200, r.text
    return dict(r.json())


def probabilities(points: str) -> list[float]:
    """The probabilities a timeline's polyline draws, from its SVG points."""
    ys = [float(pair.split(",")[1]) for pair in points.split()]
    return [1 - (y - CHART_TOP) / (CHART_HEIGHT - CHART_TOP - CHART_BOTTOM) for y in ys]


def test_a_video_gets_a_timeline_per_face_and_boxes_that_follow_it(page: Page, server: str, clip: bytes, tmp_path: Path) -> None:
    (track,) = analysed(server, clip, "clip.webm")["tracks"]
    path = tmp_path / "clip.webm"
    path.write_bytes(clip)
    page.locator("input[type=file]").set_input_files(path)

    status = page.locator("#status")
    expect(status).to_have_attribute("data-state", "faces")
    expect(status).to_contain_text("1 face followed through 10 frames over 1.8 s: #1 mostly happy")
    chart = page.locator("figure.timeline")
    expect(chart).to_have_count(1)
    expect(chart).to_have_attribute("data-track", "1")
    expect(chart).to_have_attribute("data-points", str(len(track["faces"])))
    expect(chart).to_have_attribute("data-mostly", "happy")
    expect(chart.locator("figcaption")).to_have_text(f"Face #1: 0.0–1.8 s, {len(track['faces'])} frames, mostly happy (100%)")
    expect(chart.locator("polyline.series")).to_have_count(7)
    expect(chart.locator("rect.strip")).to_have_count(len(track["faces"]))
    drawn = probabilities(chart.locator('polyline[data-class="happy"]').get_attribute("points") or "")
    assert drawn == pytest.approx([f["smoothed_scores"]["happy"] for f in track["faces"]], abs=0.01)
    expect(page.locator("#legend li")).to_have_count(7)

    # The first sampled frame's face, boxed over the video with its track and smoothed emotion.
    box = page.locator("[data-emotion]")
    expect(box).to_have_count(1)
    expect(box).to_have_attribute("data-emotion", track["faces"][0]["smoothed_emotion"])
    expect(box).to_contain_text("#1 · happy")
    assert left_percent(box) == pytest.approx(100 * track["faces"][0]["box"][0] / WIDTH, abs=0.1)
    # Seek to 1 s: the box moves to the face of the frame sampled there, the cursor with it.
    page.locator("#video").evaluate("video => { video.currentTime = 1.0; }")
    at_one = next(f for f in track["faces"] if f["time_s"] == 1.0)
    expect(box).to_have_attribute("aria-label", re.compile("Face 1: happy"))
    page.wait_for_function(
        "x => Math.abs(parseFloat(document.querySelector('[data-emotion]').style.left) - x) < 0.1",
        arg=100 * at_one["box"][0] / WIDTH,
    )
    cursor = float(chart.locator("line.cursor").get_attribute("x1") or "0")
    assert cursor > CHART_LEFT + 100  # a little over half the time axis


def left_percent(box: Locator) -> float:
    return float(box.evaluate("node => parseFloat(node.style.left)"))


def test_two_faces_get_a_timeline_each(page: Page, tmp_path: Path) -> None:
    path = tmp_path / "pair.mp4"
    path.write_bytes(two_faces_video(1.0))
    page.locator("input[type=file]").set_input_files(path)
    expect(page.locator("#status")).to_contain_text(
        "2 faces followed through 5 frames over 0.8 s: #1 mostly happy, #2 mostly happy"
    )
    charts = page.locator("figure.timeline")
    expect(charts).to_have_count(2)
    assert [charts.nth(i).get_attribute("data-track") for i in range(2)] == ["1", "2"]
    expect(charts.nth(1).locator("figcaption")).to_contain_text("Face #2: 0.0–0.8 s, 5 frames")


def test_a_video_without_faces_and_a_refused_video_say_so(page: Page, tmp_path: Path) -> None:
    truncated = moving_face_video(1.0)
    path = tmp_path / "broken.mp4"
    path.write_bytes(truncated[: len(truncated) // 2])
    page.locator("input[type=file]").set_input_files(path)
    status = page.locator("#status")
    expect(status).to_have_text("Could not analyse this video: corrupt video.")
    expect(status).to_have_attribute("data-state", "error")
    expect(page.locator("#timelines-section")).to_be_hidden()

    dark = tmp_path / "dark.webm"
    dark.write_bytes(
        video_bytes([frame.point(lambda _: 0) for frame in moving_face_frames(10)], fps=10, codec="libvpx", fmt="webm")
    )
    page.locator("input[type=file]").set_input_files(dark)
    expect(status).to_have_text("No face found in this video (5 frames over 0.8 s).")  # 10 frames at 10/s, sampled at 5/s
    expect(page.locator("figure.timeline")).to_have_count(0)


def test_the_webcam_session_gets_a_timeline(page: Page, tmp_path: Path) -> None:
    button = page.locator('[data-action="webcam"]')
    button.click()
    chart = page.locator("#session-timeline")
    expect(chart).to_have_attribute("data-points", re.compile(r"^([3-9]|\d{2,})$"))  # three frames answered, or more
    expect(chart.locator("polyline.series")).to_have_count(7)
    expect(chart.locator("figcaption")).to_contain_text("Webcam session:")
    expect(page.locator("#timelines-title")).to_contain_text("the largest face's emotions, frame by frame")
    happy = probabilities(chart.locator('polyline[data-class="happy"]').get_attribute("points") or "")
    assert all(0 <= p <= 1 for p in happy) and max(happy) > 0.5  # the astronaut smiles
    button.click()
    expect(page.locator("#status")).to_have_text("Webcam off.")
    expect(chart).to_be_visible()  # the session's timeline stays once the camera is off

    path = tmp_path / "astronaut.jpg"
    path.write_bytes(photo_jpeg("astronaut"))
    page.locator("input[type=file]").set_input_files(path)  # a photo has no timeline
    expect(page.locator("[data-emotion]")).to_have_count(1)
    expect(page.locator("#timelines-section")).to_be_hidden()
