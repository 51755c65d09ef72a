"""The face detector beside the Haar cascade it replaced, on the same photos, in one run.

    python -m bench.faces                      # writes bench/results/faces.json
    python -m bench.faces --runs 30 --requests 50

Photos, all made from ``skimage.data`` (public domain) and encoded as JPEG (quality 90): a 512x512
portrait (the astronaut), a 2560x1912 photo (the astronaut enlarged 3x on an enlarged coffee
photo), the astronaut turned 45 degrees, the cameraman (a 3/4-view face in a grey photo), a
1600x600 group of six pasted heads, and three photos without people (coffee, rocket, cat).

* ``in_process``: what a request does before classifying, one thread: decode the JPEG and find
  the faces, median of ``--runs`` calls. BlazeFace: ``app.images.decode_image_reduced`` (JPEG draft
  mode to FACE_DETECT_MAX_SIDE) and ``app.faces.FaceDetector``; Haar: the full decode and the
  cascade exactly as ``app.faces`` ran it before (``haarcascade_frontalface_default.xml`` from
  ``opencv-python-headless``, downscaled to 1024 px, scale factor 1.1, 5 neighbours, smallest face
  max(48 px, 5% of the shorter side)). The faces each found, beside the faces there are.
* ``http``: the real service (one inference thread, one inference slot, the bundled model),
  ``POST /predict`` of the portrait and the large JPEG, one request at a time, p50; with
  ``--haar-checkout`` (a checkout of the service as it was with the Haar cascade and PyTorch, e.g.
  ``git worktree add /tmp/haar c9fbf10``), the same for it, run from that checkout, in the same run.
"""

from __future__ import annotations

import argparse
import functools
import io
import logging
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import httpx
import numpy as np
from cv2.data import haarcascades
from PIL import Image, ImageOps
from skimage import data as skdata

from app.faces import DETECT_MAX_SIDE, FaceDetector
from app.images import decode_image, decode_image_reduced
from app.settings import Settings
from bench.machine import RESULTS_DIR, command_line, write_result
from bench.service import SERVICE_ARGS, run_server
from bench.timing import latency_summary, positive_int, time_calls

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
MAX_PIXELS: int = Settings.model_fields["max_image_pixels"].default
HAAR_PATH = Path(haarcascades) / "haarcascade_frontalface_default.xml"


def photo(name: str) -> Image.Image:
    return Image.fromarray(getattr(skdata, name)())


def jpeg(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def large_photo() -> Image.Image:
    """2560x1912: the coffee photo enlarged, the astronaut enlarged 3x pasted on it."""
    scene = photo("coffee").resize((2560, 1912), Image.Resampling.BICUBIC)
    scene.paste(photo("astronaut").resize((1536, 1536), Image.Resampling.BICUBIC), (600, 200))
    return scene


def group_photo() -> Image.Image:
    """Six heads (the astronaut's, mirrored, grey, at several sizes) along a 1600x600 coffee photo."""
    scene = photo("coffee").resize((1600, 600))
    head = photo("astronaut").crop((150, 30, 300, 200))
    heads = [head, ImageOps.mirror(head), head.convert("L").convert("RGB")]
    for i, side in enumerate([150, 130, 180, 140, 160, 135]):
        scene.paste(heads[i % 3].resize((side, round(side * 1.13))), (40 + i * 260, 60 + (i % 3) * 90))
    return scene


def bench_photos() -> dict[str, tuple[bytes, int]]:
    """name -> (JPEG bytes, number of faces in it)."""
    turned = photo("astronaut").rotate(45, resample=Image.Resampling.BILINEAR, fillcolor=(0, 0, 0))
    return {
        "portrait_512": (jpeg(photo("astronaut")), 1),
        "large_2560x1912": (jpeg(large_photo()), 1),
        "turned_45deg": (jpeg(turned), 1),
        "cameraman_3_4_view_grey": (jpeg(photo("camera")), 1),
        "group_of_6": (jpeg(group_photo()), 6),
        "coffee": (jpeg(photo("coffee")), 0),
        "rocket": (jpeg(photo("rocket")), 0),
        "cat": (jpeg(photo("chelsea")), 0),
    }


class HaarBaseline:
    """The detector app/faces.py used before BlazeFace, as it ran then (see the module docstring)."""

    def __init__(self) -> None:
        self.cascade = cv2.CascadeClassifier(str(HAAR_PATH))

    def detect(self, image: Image.Image) -> list[tuple[int, int, int, int]]:
        gray = np.asarray(image.convert("L"))
        height, width = gray.shape
        scale = min(1.0, DETECT_MAX_SIDE / max(height, width))
        if scale < 1.0:
            gray = cv2.resize(gray, (round(width * scale), round(height * scale)), interpolation=cv2.INTER_AREA)
        min_side = max(48, round(0.05 * min(gray.shape)))
        if min(gray.shape) < min_side:
            return []
        found = self.cascade.detectMultiScale(
            cv2.equalizeHist(gray), scaleFactor=1.1, minNeighbors=5, minSize=(min_side, min_side)
        )
        return [tuple(round(v / scale) for v in box) for box in found]  # type: ignore[misc]


def in_process(photos: dict[str, tuple[bytes, int]], runs: int, warmup: int) -> dict[str, Any]:
    """Decode + detect, one thread, per photo and detector: median ms and faces found."""
    cv2.setNumThreads(1)
    blaze, haar = FaceDetector(threads=1), HaarBaseline()
    calls: dict[str, Callable[[bytes], int]] = {
        "blazeface_onnx": lambda data: len(blaze.detect(decode_image_reduced(data, MAX_PIXELS, DETECT_MAX_SIDE)[0])),
        "haar": lambda data: len(haar.detect(decode_image(data, MAX_PIXELS))),
    }
    out: dict[str, Any] = {}
    for name, (data, faces) in photos.items():
        row: dict[str, Any] = {"faces_present": faces}
        for detector, call in calls.items():
            seconds = time_calls(functools.partial(call, data), runs, warmup)
            row[detector] = {"faces_found": call(data), "median_ms": statistics.median(seconds) * 1000}
        log.info("%s: %s", name, row)
        out[name] = row
    return out


def http(
    photos: dict[str, tuple[bytes, int]], names: list[str], requests: int, warmup: int, roots: dict[str, Path]
) -> dict[str, Any]:
    """``POST /predict`` of each named photo, one request at a time, on the real service run from
    each checkout in ``roots`` (this one; the Haar one, if given), one after the other."""
    out: dict[str, Any] = {}
    for service, root in roots.items():
        out[service] = {}
        # The Haar checkout is the PyTorch service: its own app, thread setting and bundled model.
        haar = root != ROOT
        env = {"INFERENCE_THREADS": "1", "TORCH_THREADS": "1", "MAX_CONCURRENT_INFERENCES": "1", "PYTHONPATH": str(root)}
        app_args = ("app.main:app",) if haar else SERVICE_ARGS
        with (
            tempfile.TemporaryDirectory() as tmp,
            run_server(None, Path(tmp) / "server.log", env, app_args=app_args, cwd=root) as server,
            httpx.Client(base_url=server.base_url, timeout=60) as client,
        ):
            for name in names:
                out[service][name] = sequential(client, name, photos[name][0], requests, warmup)
                log.info("http %s %s: %s", service, name, out[service][name])
    return out


def sequential(client: httpx.Client, name: str, data: bytes, requests: int, warmup: int) -> dict[str, Any]:
    """Latency of ``requests`` requests one after the other (after ``warmup``), and the faces found."""
    files = {"file": (f"{name}.jpg", data, "image/jpeg")}
    seconds, faces = [], -1
    for i in range(warmup + requests):
        start = time.perf_counter()
        response = client.post("/predict", files=files)
        elapsed = time.perf_counter() - start
        response.raise_for_status()
        faces = len(response.json()["faces"])
        if i >= warmup:
            seconds.append(elapsed)
    return {**latency_summary(seconds), "faces": faces}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=positive_int, default=20, help="timed calls per photo and detector (median)")
    parser.add_argument("--warmup", type=positive_int, default=3)
    parser.add_argument("--requests", type=positive_int, default=40, help="timed HTTP requests per photo")
    parser.add_argument(
        "--haar-checkout",
        type=Path,
        help="a checkout of the service before BlazeFace, to time over HTTP too "
        "(e.g. mkdir /tmp/haar && git archive 94924df | tar -x -C /tmp/haar)",
    )
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "faces.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    photos = bench_photos()
    roots = {"blazeface_onnx": ROOT} | ({"haar": args.haar_checkout.resolve()} if args.haar_checkout else {})
    results: dict[str, Any] = {
        "in_process": in_process(photos, args.runs, args.warmup),
        "http": http(photos, ["portrait_512", "large_2560x1912"], args.requests, args.warmup, roots),
        "opencv": cv2.__version__,
        "load_average_1_5_15_min": os.getloadavg(),  # the machine is shared: how busy it was at the end
    }
    write_result(args.output, "faces", results, command_line("bench.faces", argv))
    for name, row in results["in_process"].items():
        print(
            f"{name:26s} faces {row['faces_present']}: BlazeFace {row['blazeface_onnx']['faces_found']} in "
            f"{row['blazeface_onnx']['median_ms']:.1f} ms, Haar {row['haar']['faces_found']} in {row['haar']['median_ms']:.1f} ms"
        )
    for service, rows in results["http"].items():
        for name, row in rows.items():
            print(f"HTTP {service} {name}: p50 {row['p50_ms']:.1f} ms, {row['faces']} face(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
