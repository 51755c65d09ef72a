"""The page (``GET /``) in a real browser: how fast it loads from a warm service, how many webcam
frames per second it sustains, and what ``explain=true`` costs.

    python -m bench.page                                  # the bundled model
    python -m bench.page --screenshots docs/screenshots   # also the three modes' screenshots

One real service (``uvicorn --factory app.main:serve_app``, default settings, ``--model``) and Debian's Chromium
(headless, driven by Playwright, its fake camera playing a Y4M video made from skimage's astronaut
photo, 640x480 at 10 frames/s, looped) share this machine's CPUs. Measured in one run:

* page load, warm service: ``--loads`` navigations to ``/`` after 3 unmeasured ones, each in a
  fresh browser context (first visit, nothing cached), then as many reloads of one page; medians of
  the document's request-to-response-end time and of the ``load`` event from the navigation's
  start (page, script and stylesheet fetched, parsed and run), from the Navigation Timing API;
* webcam: after the page has had ``--warmup-frames`` frames answered, the frames answered in
  ``--duration`` seconds (the page sends the next frame when the last is answered: one request
  in flight), and the round trip the page shows, sampled every 0.25 s: median. Once with
  explanations off, once on;
* the API alone, from Python: ``POST /predict`` on the astronaut JPEG with and without
  ``explain=true``, ``--requests`` each, interleaved, medians.

The page does not wait for a new camera frame: it sends whatever the video shows when the last
answer arrives, so the figure is the page-and-service loop's rate, not the camera's (10 frames/s).

Writes ``bench/results/page.json`` (``--output`` overrides) and prints a summary.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from PIL import Image
from playwright.sync_api import Browser, Page, ViewportSize

from app.settings import BUNDLED_MODEL
from bench.machine import RESULTS_DIR, command_line, write_result
from bench.service import run_server
from tests.utils.browser import camera_video, chromium, fake_camera_args, find_chromium
from tests.utils.photos import photo, photo_jpeg

log = logging.getLogger(__name__)

CAMERA_REGION = (40, 0, 360, 240)  # the astronaut's head and shoulders, 4:3 (as tests/test_page.py)
VIEWPORT: ViewportSize = {"width": 1200, "height": 900}
TIMEOUT_MS = 60_000
CAMERA_FPS = 10


def median(values: list[float]) -> float:
    return round(statistics.median(values), 2)


NAVIGATION_TIMING = (
    "() => { const t = performance.getEntriesByType('navigation')[0];"
    " return [t.responseEnd - t.requestStart, t.loadEventStart]; }"
)


def page_load(browser: Browser, base_url: str, loads: int) -> dict[str, Any]:
    """Navigation timings of ``loads`` loads of ``/`` (after 3 unmeasured ones): each in a fresh
    context (a first visit: nothing cached), and reloads of one page (a returning visitor: the
    files revalidated, ``Cache-Control: no-cache``)."""
    fresh: list[list[float]] = []
    for i in range(loads + 3):
        context = browser.new_context(viewport=VIEWPORT)
        page = context.new_page()
        page.goto(base_url + "/", wait_until="load")
        if i >= 3:
            fresh.append(page.evaluate(NAVIGATION_TIMING))
        context.close()
    context = browser.new_context(viewport=VIEWPORT)
    page = context.new_page()
    reloaded: list[list[float]] = []
    for i in range(loads + 3):
        page.goto(base_url + "/", wait_until="load")
        if i >= 3:
            reloaded.append(page.evaluate(NAVIGATION_TIMING))
    context.close()
    return {
        "loads": loads,
        "first_visit": {
            "document_ms_median": median([t[0] for t in fresh]),
            "load_event_ms_median": median([t[1] for t in fresh]),
        },
        "reload": {
            "document_ms_median": median([t[0] for t in reloaded]),
            "load_event_ms_median": median([t[1] for t in reloaded]),
        },
    }


def webcam_rate(page: Page, explain: bool, warmup_frames: int, duration: float) -> dict[str, Any]:
    """Frames per second and round trip of the page's webcam mode, on a page already loaded."""
    if explain:
        page.locator('[data-action="explain"]').check()
    page.locator('[data-action="webcam"]').click()
    # Pressed once the camera runs: the page has reset its frame counter by then (the last run's
    # count would otherwise pass the wait below at once).
    page.wait_for_selector('[data-action="webcam"][aria-pressed="true"]', timeout=TIMEOUT_MS)
    stats = page.locator("#stats")
    page.wait_for_function(
        f"() => Number(document.getElementById('stats').dataset.frames) >= {warmup_frames}", timeout=TIMEOUT_MS
    )
    start_frames, start = int(stats.get_attribute("data-frames") or 0), time.perf_counter()
    rtts: list[float] = []
    while (elapsed := time.perf_counter() - start) < duration:
        rtts.append(float(stats.get_attribute("data-rtt-ms") or "nan"))
        page.wait_for_timeout(250)
    frames = int(stats.get_attribute("data-frames") or 0) - start_frames
    faces = page.locator("[data-emotion]").count()
    page.locator('[data-action="webcam"]').click()
    return {
        "explain": explain,
        "frames": frames,
        "seconds": round(elapsed, 2),
        "frames_per_second": round(frames / elapsed, 2),
        "round_trip_ms_median": median(rtts),
        "faces_in_last_frame": faces,
    }


def api_latency(base_url: str, requests: int) -> dict[str, Any]:
    """``POST /predict`` on the astronaut with and without ``explain=true``, interleaved."""
    data = photo_jpeg("astronaut")
    times: dict[str, list[float]] = {"plain": [], "explain": []}
    with httpx.Client(base_url=base_url, timeout=60) as client:
        for i in range(requests + 2):
            for name in times:
                started = time.perf_counter()
                response = client.post(
                    "/predict", params={"explain": str(name == "explain").lower()}, files={"file": ("a.jpg", data)}
                )
                response.raise_for_status()
                if i >= 2:  # two warm-up rounds
                    times[name].append((time.perf_counter() - started) * 1000)
    plain, explained = median(times["plain"]), median(times["explain"])
    return {
        "requests": requests,
        "plain_ms_median": plain,
        "explain_ms_median": explained,
        "explain_extra_ms": round(explained - plain, 2),
    }


def screenshots(browser: Browser, base_url: str, folder: Path) -> list[str]:
    """The three modes: a photo, the webcam, a head-and-shoulders photo with its heatmap."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    with tempfile.TemporaryDirectory() as tmp:
        pictures = {"upload": Path(tmp) / "astronaut.jpg", "explanation": Path(tmp) / "astronaut-head.jpg"}
        pictures["upload"].write_bytes(photo_jpeg("astronaut"))
        head = photo("astronaut").crop(CAMERA_REGION).resize((640, 480), Image.Resampling.BILINEAR)
        head.save(pictures["explanation"], quality=90)
        for mode in ("upload", "webcam", "explanation"):
            context = browser.new_context(viewport=VIEWPORT, device_scale_factor=1)
            page = context.new_page()
            page.goto(base_url + "/", wait_until="load")
            if mode == "webcam":
                page.locator('[data-action="webcam"]').click()
                page.wait_for_function("() => Number(document.getElementById('stats').dataset.frames) >= 20", timeout=TIMEOUT_MS)
            else:
                if mode == "explanation":
                    page.locator('[data-action="explain"]').check()
                page.locator("input[type=file]").set_input_files(pictures[mode])
                page.locator(".heatmap" if mode == "explanation" else "[data-emotion]").first.wait_for()
            path = folder / f"{mode}.png"
            page.screenshot(path=path)
            written.append(str(path))
            context.close()
    return written


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model", type=Path, default=BUNDLED_MODEL, help="the model the service serves (default: the bundled one)"
    )
    parser.add_argument("--loads", type=int, default=20, help="measured page loads")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of webcam frames counted, per setting")
    parser.add_argument("--warmup-frames", type=int, default=10, help="webcam frames answered before counting")
    parser.add_argument("--requests", type=int, default=30, help="API requests per variant")
    parser.add_argument("--screenshots", type=Path, help="also write upload.png, webcam.png, explanation.png here")
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "page.json")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    load_before = os.getloadavg()
    executable = find_chromium()
    if executable is None:
        raise SystemExit("no Chromium: apt-get install chromium")
    with tempfile.TemporaryDirectory(prefix="bench-page-") as tmp:
        video = camera_video(Path(tmp) / "camera.y4m", photo("astronaut"), CAMERA_REGION)
        with (
            run_server(args.model, Path(tmp) / "server.log", {}) as server,
            chromium(executable, fake_camera_args(video)) as browser,
        ):
            log.info("service ready in %.1f s at %s", server.ready_s, server.base_url)
            results: dict[str, Any] = {"page_load": page_load(browser, server.base_url, args.loads)}
            context = browser.new_context(viewport=VIEWPORT)
            page = context.new_page()
            page.goto(server.base_url + "/", wait_until="load")
            results["webcam"] = [webcam_rate(page, explain, args.warmup_frames, args.duration) for explain in (False, True)]
            context.close()
            results["api"] = api_latency(server.base_url, args.requests)
            if args.screenshots:
                results["screenshots"] = screenshots(browser, server.base_url, args.screenshots)
    results["settings"] = {
        "model": str(args.model),
        # Other work on this 2-core machine (a training run, other tests) slows browser and service alike.
        "load_average_1_5_15min": {"start": load_before, "end": os.getloadavg()},
        "camera": f"Chromium fake camera, 640x480 at {CAMERA_FPS} frames/s (the page sends frames of at most 320 px)",
        "browser": executable,
        "duration_s": args.duration,
    }
    write_result(args.output, "page", results, command_line("bench.page", argv))
    load = results["page_load"]
    print(
        f"page load (warm service, median, to the load event): first visit {load['first_visit']['load_event_ms_median']} ms,"
        f" reload {load['reload']['load_event_ms_median']} ms"
    )
    for row in results["webcam"]:
        print(
            f"webcam, explain={row['explain']}: {row['frames_per_second']} frames/s, {row['round_trip_ms_median']} ms round trip"
        )
    api = results["api"]
    print(f"POST /predict astronaut: {api['plain_ms_median']} ms, with explain=true {api['explain_ms_median']} ms")
    print(f"written to {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
