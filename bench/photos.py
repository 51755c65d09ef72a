"""A folder of photos through the Python API and the command line, against the same photos through
the HTTP service: photos per second, side by side in one run.

    python -m bench.photos                        # 1,000 photos; writes bench/results/photos.json
    python -m bench.photos --photos 200 --rounds 1

The photos (``--photos``, written as JPEG into a temporary folder): skimage's astronaut photo,
each one cropped, scaled (384 to 768 px on its longer side), mirrored or not and brightened or
darkened differently, so every file is another photo of one face; every fifth is a photo without
a face (skimage's coffee, rocket, chelsea, hubble_deep_field, immunohistochemistry, likewise varied).

Measured in each of ``--rounds`` rounds, in turn, so the machine's load falls on all alike:

* ``api``: ``ferkit.Analyzer.analyze(path)`` on each file in turn, one process;
* ``api_files``: ``ferkit.Analyzer.analyze_files(paths)``: several files at once, one per thread
  (``--threads`` of them), in order;
* ``cli``: ``fer-analyze FOLDER --output faces.csv`` in process (``ferkit.cli.main``), which runs
  ``analyze_files``, with the folder listed and the rows written (the model's load included);
* ``http_sequential``: the real service (``uvicorn --factory app.main:serve_app``, default
  settings, the same model) with one client posting each file to ``POST /predict`` in turn on a
  keep-alive connection;
* ``http_concurrent``: the same with ``--concurrency`` requests in flight (an asyncio client);
* ``http_batch``: ``POST /predict/batch`` with ``--batch`` files per request, in turn.

Client and server share this machine's CPUs, as a user's would on one machine. Every way's faces
are checked against the API's (the same boxes and emotions, photo by photo). Photos per second is
the photos over the median round's seconds; ``vs_api`` that rate over the API's.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import logging
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import httpx
from PIL import Image, ImageEnhance, ImageOps

from app.settings import BUNDLED_MODEL
from bench.machine import RESULTS_DIR, command_line, write_result
from bench.service import run_server
from bench.timing import positive_int
from fercore.cpus import available_cpus
from ferkit import Analyzer, cli
from tests.utils.photos import photo

log = logging.getLogger(__name__)

NO_FACE = ("coffee", "rocket", "chelsea", "hubble_deep_field", "immunohistochemistry")
TIMEOUT_S = 120.0

# What each way of analysing found, per photo: (box, emotion) of each face, in order.
Found = list[list[tuple[tuple[int, ...], str]]]


def make_photo(rng: random.Random, index: int) -> Image.Image:
    """The ``index``-th photo: a varied copy of the astronaut, or every fifth of a photo without a face."""
    source = photo(NO_FACE[(index // 5) % len(NO_FACE)] if index % 5 == 4 else "astronaut").convert("RGB")
    w, h = source.size
    left, top = rng.randint(0, w // 10), rng.randint(0, h // 10)
    image = source.crop((left, top, w - rng.randint(0, w // 10), h - rng.randint(0, h // 10)))
    side = rng.randint(384, 768)
    scale = side / max(image.size)
    image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BILINEAR)
    if rng.random() < 0.5:
        image = ImageOps.mirror(image)
    return ImageEnhance.Brightness(image).enhance(rng.uniform(0.7, 1.3))


def write_photos(folder: Path, count: int, seed: int = 0) -> list[Path]:
    rng = random.Random(seed)
    paths = []
    for i in range(count):
        path = folder / f"photo-{i:05d}.jpg"
        make_photo(rng, i).save(path, format="JPEG", quality=rng.randint(80, 95))
        paths.append(path)
    return paths


def faces_of(body: dict[str, Any]) -> list[tuple[tuple[int, ...], str]]:
    return [(tuple(face["box"]), face["emotion"]) for face in body["faces"]]


def via_api(analyzer: Analyzer, paths: Sequence[Path]) -> Found:
    return [[(tuple(f.box), f.emotion) for f in analyzer.analyze(path)] for path in paths]


def via_api_files(analyzer: Analyzer, paths: Sequence[Path]) -> Found:
    found: Found = []
    for _, faces in analyzer.analyze_files(paths):
        if not isinstance(faces, list):
            raise faces
        found.append([(tuple(f.box), f.emotion) for f in faces])
    return found


def via_cli(folder: Path, model: Path, out: Path) -> Found:
    status = cli.main([str(folder), "--output", str(out), "--model", str(model)])
    if status != 0:
        raise RuntimeError(f"fer-analyze exited {status}")
    found: dict[str, list[tuple[tuple[int, ...], str]]] = {}
    with out.open(newline="") as f:
        for row in csv.DictReader(f):
            box = tuple(int(row[k]) for k in ("x", "y", "width", "height"))
            found.setdefault(Path(row["file"]).name, []).append((box, row["emotion"]))
    return [found.get(p.name, []) for p in sorted(folder.iterdir())]


def via_http(base_url: str, paths: Sequence[Path]) -> Found:
    with httpx.Client(base_url=base_url, timeout=TIMEOUT_S) as client:
        return [faces_of(post(client, path)) for path in paths]


def post(client: httpx.Client, path: Path) -> dict[str, Any]:
    response = client.post("/predict", files={"file": (path.name, path.read_bytes(), "image/jpeg")})
    response.raise_for_status()
    return dict(response.json())


def via_http_concurrent(base_url: str, paths: Sequence[Path], concurrency: int) -> Found:
    async def run() -> Found:
        found: Found = [[] for _ in paths]
        queue = iter(range(len(paths)))
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        async with httpx.AsyncClient(base_url=base_url, timeout=TIMEOUT_S, limits=limits) as client:

            async def worker() -> None:
                for i in queue:  # shared: each index is taken by one worker
                    files = {"file": (paths[i].name, paths[i].read_bytes(), "image/jpeg")}
                    response = await client.post("/predict", files=files)
                    response.raise_for_status()
                    found[i] = faces_of(response.json())

            await asyncio.gather(*(worker() for _ in range(concurrency)))
        return found

    return asyncio.run(run())


def via_http_batch(base_url: str, paths: Sequence[Path], batch: int) -> Found:
    found: Found = []
    with httpx.Client(base_url=base_url, timeout=TIMEOUT_S) as client:
        for start in range(0, len(paths), batch):
            chunk = paths[start : start + batch]
            parts = [("files", (p.name, p.read_bytes(), "image/jpeg")) for p in chunk]
            response = client.post("/predict/batch", files=parts)
            response.raise_for_status()
            found += [faces_of(result) for result in response.json()["results"]]
    return found


def timed(fn: Callable[[], Found]) -> tuple[float, Found]:
    start = time.perf_counter()
    found = fn()
    return time.perf_counter() - start, found


def same_faces(ours: Found, reference: Found) -> bool:
    """The same faces photo by photo: emotions equal, boxes within a pixel (rounding)."""
    if len(ours) != len(reference):
        return False
    for a, b in zip(ours, reference, strict=True):
        if len(a) != len(b):
            return False
        for (box_a, emotion_a), (box_b, emotion_b) in zip(a, b, strict=True):
            if emotion_a != emotion_b or max(abs(x - y) for x, y in zip(box_a, box_b, strict=True)) > 1:
                return False
    return True


def bench(args: argparse.Namespace, folder: Path, paths: list[Path], work: Path) -> tuple[dict[str, Any], int]:
    """Each way's seconds per pass and photos/s, and the faces the API found in all the photos."""
    analyzer = Analyzer(args.model, threads=args.threads or available_cpus())
    reference = via_api(analyzer, paths[:5])  # warm-up
    times: dict[str, list[float]] = {}
    checks: dict[str, bool] = {}
    with run_server(args.model, work / "server.log", {}) as server:
        via_http(server.base_url, paths[:5])  # warm-up
        runs: dict[str, Callable[[], Found]] = {
            "api": lambda: via_api(analyzer, paths),
            "api_files": lambda: via_api_files(analyzer, paths),
            "cli": lambda: via_cli(folder, args.model, work / "faces.csv"),
            "http_sequential": lambda: via_http(server.base_url, paths),
            "http_concurrent": lambda: via_http_concurrent(server.base_url, paths, args.concurrency),
            "http_batch": lambda: via_http_batch(server.base_url, paths, args.batch),
        }
        for round_ in range(args.rounds):
            for name, way in runs.items():
                took, found = timed(way)
                times.setdefault(name, []).append(took)
                if name == "api":
                    reference = found
                checks[name] = checks.get(name, True) and same_faces(found, reference)
                log.info("round %d %s: %.1f s", round_ + 1, name, took)
    api_rate = len(paths) / statistics.median(times["api"])
    ways = {
        name: {
            "median_s": round(statistics.median(t), 2),
            "photos_per_s": round(len(paths) / statistics.median(t), 1),
            "vs_api": round(len(paths) / statistics.median(t) / api_rate, 2),
            "same_faces_as_api": checks[name],
            "rounds_s": [round(x, 2) for x in t],
        }
        for name, t in times.items()
    }
    return ways, sum(len(f) for f in reference)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", type=positive_int, default=1000)
    parser.add_argument("--rounds", type=positive_int, default=2, help="timed passes of each way (median)")
    parser.add_argument("--concurrency", type=positive_int, default=4, help="requests in flight for http_concurrent")
    parser.add_argument("--batch", type=positive_int, default=16, help="files per POST /predict/batch (MAX_BATCH_FILES)")
    parser.add_argument("--threads", type=int, default=0, help="the API's ONNX Runtime threads (0: the usable CPUs)")
    parser.add_argument("--model", type=Path, default=BUNDLED_MODEL)
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "photos.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per request
    with tempfile.TemporaryDirectory(prefix="fer-photos-") as tmp:
        folder = Path(tmp) / "photos"
        folder.mkdir()
        paths = write_photos(folder, args.photos)
        size_mb = sum(p.stat().st_size for p in paths) / 2**20
        ways, faces = bench(args, folder, paths, Path(tmp))
    with_a_face = sum(1 for i in range(args.photos) if i % 5 != 4)
    results = {
        "photos": {"count": args.photos, "megabytes": round(size_mb, 1), "with_a_face": with_a_face, "faces_found": faces},
        "threads": args.threads or available_cpus(),
        "concurrency": args.concurrency,
        "batch": args.batch,
        "ways": ways,
        "load_average_1_5_15_min": os.getloadavg(),
    }
    write_result(args.output, "photos", results, command_line("bench.photos", argv))
    for name, row in ways.items():
        print(f"{name}: {row['photos_per_s']} photos/s ({row['vs_api']}x the API), same faces: {row['same_faces_as_api']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
