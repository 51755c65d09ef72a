"""The service under load, and the ``fer`` library side by side on the same images.

    python -m bench.service                                         # the bundled model, no fer
    python -m bench.service --model runs/<run>/model.int8.onnx --fer-python .venv-fer/bin/python
    python -m bench.service --write-images /tmp/fer-images          # only write the two images

The real service (``uvicorn --factory app.main:serve_app``) runs as a subprocess on a free 127.0.0.1 port, with
``MODEL_URI=--model`` and its other settings at their defaults (``--server-env`` overrides them;
service variables set in this shell are not passed on). Measured:

* start-up: from ``Popen`` to the first ``/readyz`` 200 (polled every 20 ms), median of ``--starts``
  fresh processes; the last one serves the rest;
* memory: the server process's resident set (``/proc``) after ``--warmup`` requests per image,
  and after the load, with its peak;
* sequential latency, one keep-alive connection, ``--requests`` per image: (a) ``crop``, a 48x48
  grey face crop with ``detect=false``, (b) ``photo``, skimage's 512x512 astronaut photo with
  detection. Both are PNG (lossless: every decoder sees the same pixels);
* load: an asyncio httpx client at each ``--concurrency`` (default 1, 8, 32) per image, at most
  ``--load-requests`` requests and ``--load-duration`` seconds per level; throughput counts 200s,
  503s (busy: every inference slot and the queue full) and other failures are counted apart.
  Client and server share this machine's CPUs;
* in process, one thread: ``Predictor.predict_faces`` on the decoded crop, and face detection plus
  ``predict_faces`` on the decoded photo (decoding excluded), ``--requests`` calls each;
* with ``--fer-python`` (an interpreter of the environment ``bench/requirements-fer.txt`` makes):
  ``bench.fer_baseline`` on the same two images (fer's latency, load time and PublicTest accuracy),
  written to ``bench/results/fer_baseline.json`` with our PublicTest report from
  ``training.evaluate`` beside it. Without it, the fer part is skipped and says why.

Writes ``bench/results/service.json`` (``--output`` overrides) and prints markdown tables.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import io
import json
import logging
import os
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import httpx
from PIL import Image

from app.faces import Detection, FaceDetector, crop_faces, whole_image_crop
from app.images import decode_image
from app.model import Prediction, Predictor
from app.settings import BUNDLED_MODEL, Settings
from bench.machine import RESULTS_DIR, command_line, memory_mib, write_result
from bench.timing import latency_summary, positive_int, time_calls

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "fer2013.zip"
FER_BACKENDS = "tflite,keras"

# The astronaut's face in skimage's photo, (x, y, width, height): the box app.faces.FaceDetector
# finds, (177, 67, 93, 93), grown by its CROP_MARGIN. Fixed here so the crop does not change when
# the detector does.
ASTRONAUT_FACE_BOX = (168, 58, 111, 111)
CROP_SIDE = 48
READY_POLL_S = 0.02
LOG_TAIL_CHARS = 4000
MAX_IMAGE_PIXELS: int = Settings.model_fields["max_image_pixels"].default  # the service's default limit


@dataclass(frozen=True)
class BenchImage:
    """One image the service, our model in process and fer are all given."""

    name: str  # "crop" or "photo"
    data: bytes  # PNG
    detect: bool  # the service's `detect` parameter
    description: str

    @property
    def filename(self) -> str:
        return f"{self.name}.png"


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def bench_images() -> list[BenchImage]:
    """The 48x48 face crop and the photo, made from ``skimage.data.astronaut()`` (public domain)."""
    from skimage import data as skdata  # the dev extra

    photo = Image.fromarray(skdata.astronaut())  # RGB, 512x512
    x, y, w, h = ASTRONAUT_FACE_BOX
    crop = photo.convert("L").crop((x, y, x + w, y + h)).resize((CROP_SIDE, CROP_SIDE), Image.Resampling.BOX)
    return [
        BenchImage("crop", _png(crop), False, "48x48 grey face crop of skimage's astronaut, classified whole (detect=false)"),
        BenchImage("photo", _png(photo), True, "skimage's 512x512 RGB astronaut photo, one face, with face detection"),
    ]


def write_images(images: list[BenchImage], folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for image in images:
        paths[image.name] = folder / image.filename
        paths[image.name].write_bytes(image.data)
    return paths


def image_info(image: BenchImage) -> dict[str, Any]:
    with Image.open(io.BytesIO(image.data)) as decoded:
        size, mode = decoded.size, decoded.mode
    return {
        "file": image.filename,
        "description": image.description,
        "bytes": len(image.data),
        "sha256": hashlib.sha256(image.data).hexdigest(),
        "width": size[0],
        "height": size[1],
        "mode": mode,
        "detect": image.detect,
    }


# --- the server --------------------------------------------------------------------------------


def free_port() -> int:
    """A 127.0.0.1 port that was free a moment ago, for a server that binds its port itself.
    Another process may take it before the server does: servers that can be handed a listening
    socket get one instead (:func:`listening_socket`), the others retry
    (:func:`tests.utils.service.serve_process`)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def listening_socket() -> socket.socket:
    """A socket listening on a port of 127.0.0.1 the kernel picked, for ``uvicorn --fd``: the
    server inherits it, so no other process can take the port between choosing and serving."""
    sock = socket.socket()
    # uvicorn takes an --fd socket for a Unix one, so asyncio never sets TCP_NODELAY on its
    # connections; set here, the accepted connections inherit it (Linux). Without it, Nagle's
    # algorithm and the client's delayed ACK add ~40 ms to a response written in two parts.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(socket.SOMAXCONN)
    return sock


def service_env(model: Path | None, extra: dict[str, str]) -> dict[str, str]:
    """This process's environment without the service's own variables (a shell may have set some),
    with ``MODEL_URI`` (unless ``model`` is None) and ``extra``."""
    names = {name.upper() for name in Settings.model_fields}
    env = {k: v for k, v in os.environ.items() if k.upper() not in names and not k.upper().startswith("OTEL_")}
    return {**env, **({"MODEL_URI": str(model)} if model is not None else {}), **extra}


def _tail(path: Path) -> str:
    try:
        return path.read_text(errors="replace")[-LOG_TAIL_CHARS:]
    except OSError:
        return ""


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    base_url: str
    ready_s: float  # from Popen to the first /readyz 200
    log_path: Path


def wait_ready(process: subprocess.Popen[bytes], base_url: str, started: float, timeout: float, log_path: Path) -> float:
    """Seconds from ``started`` to the first ``/readyz`` 200; RuntimeError if the server dies or is late."""
    with httpx.Client(base_url=base_url, timeout=1.0) as client:  # one client: a new one per poll costs CPU
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the server exited with {process.returncode} before it was ready:\n{_tail(log_path)}")
            try:
                if client.get("/readyz").status_code == 200:
                    return time.perf_counter() - started
            except httpx.TransportError:
                pass  # not listening yet
            if time.perf_counter() - started > timeout:
                raise RuntimeError(f"the server was not ready after {timeout:.0f} s:\n{_tail(log_path)}")
            time.sleep(READY_POLL_S)


def stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


SERVICE_ARGS = ("--factory", "app.main:serve_app")  # uvicorn's arguments for the service


@contextlib.contextmanager
def run_server(
    model: Path | None,
    log_path: Path,
    extra_env: dict[str, str],
    ready_timeout: float = 180.0,
    app_args: tuple[str, ...] = SERVICE_ARGS,
    cwd: Path = ROOT,
) -> Iterator[Server]:
    """The service (``uvicorn --factory app.main:serve_app``, or uvicorn with ``app_args`` in ``cwd``)
    serving ``model`` on a loopback port (:func:`listening_socket`), from start to ready, stopped on
    exit. Its output goes to ``log_path`` (appended)."""
    env = service_env(model, extra_env)
    with log_path.open("ab") as log_file:
        started = time.perf_counter()
        base_url, process = start_uvicorn([*app_args, "--log-level", "warning"], env=env, stdout=log_file, cwd=cwd)
        try:
            ready_s = wait_ready(process, base_url, started, ready_timeout, log_path)
            yield Server(process, base_url, ready_s, log_path)
        finally:
            stop(process)


def start_uvicorn(
    args: list[str], env: dict[str, str], stdout: IO[bytes], cwd: Path = ROOT
) -> tuple[str, subprocess.Popen[bytes]]:
    """``python -m uvicorn *args`` on :func:`listening_socket`'s port (``--fd``): its base URL and
    process. The process's copy of the socket is the only one left open: once it exits, the port
    refuses connections."""
    with listening_socket() as sock:
        command = [sys.executable, "-m", "uvicorn", *args, "--fd", str(sock.fileno())]
        process = subprocess.Popen(command, cwd=cwd, env=env, stdout=stdout, stderr=subprocess.STDOUT, pass_fds=[sock.fileno()])
        return f"http://127.0.0.1:{sock.getsockname()[1]}", process


# --- requests ----------------------------------------------------------------------------------


def upload(image: BenchImage) -> tuple[dict[str, str], dict[str, tuple[str, bytes, str]]]:
    """Query parameters and multipart file of ``POST /predict`` for ``image``."""
    return {"detect": "true" if image.detect else "false"}, {"file": (image.filename, image.data, "image/png")}


def _faces(response: httpx.Response) -> tuple[int, str | None]:
    faces = response.json()["faces"]
    return len(faces), faces[0]["emotion"] if faces else None


def warm_up(base_url: str, images: list[BenchImage], requests: int, timeout: float) -> dict[str, int]:
    """``requests`` untimed requests per image; their statuses."""
    statuses: Counter[str] = Counter()
    with httpx.Client(base_url=base_url, timeout=timeout) as client:
        for image in images:
            params, files = upload(image)
            for _ in range(requests):
                statuses[str(client.post("/predict", params=params, files=files).status_code)] += 1
    return dict(statuses)


def sequential_latency(base_url: str, image: BenchImage, requests: int, timeout: float) -> dict[str, Any]:
    """``requests`` requests one after the other on one keep-alive connection; latency of the 200s."""
    params, files = upload(image)
    statuses: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    seconds = []
    last_ok: httpx.Response | None = None
    with httpx.Client(base_url=base_url, timeout=timeout) as client:
        for _ in range(requests):
            start = time.perf_counter()
            try:
                response = client.post("/predict", params=params, files=files)
            except httpx.HTTPError as exc:  # connection refused or reset, timeout
                errors[type(exc).__name__] += 1
                continue
            elapsed = time.perf_counter() - start
            statuses[str(response.status_code)] += 1
            if response.status_code == 200:
                seconds.append(elapsed)
                last_ok = response
    faces, emotion = _faces(last_ok) if last_ok is not None else (None, None)
    return {
        **latency_summary(seconds),
        "requests": requests,
        "statuses": dict(statuses),
        "transport_errors": dict(errors),
        "faces": faces,
        "emotion": emotion,
    }


async def _load(
    base_url: str,
    image: BenchImage,
    concurrency: int,
    max_requests: int,
    max_duration_s: float,
    timeout: float,
    transport: httpx.AsyncBaseTransport | None = None,
    keep_seconds: bool = False,
) -> dict[str, Any]:
    params, files = upload(image)
    seconds: list[float] = []
    statuses: Counter[int] = Counter()
    errors: Counter[str] = Counter()
    sent = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base_url, timeout=timeout, limits=limits, transport=transport) as client:
        started = time.perf_counter()
        deadline = started + max_duration_s

        async def worker() -> None:
            nonlocal sent
            # No await between the check and the increment: the count is exact across workers.
            while sent < max_requests and time.perf_counter() < deadline:
                sent += 1
                start = time.perf_counter()
                try:
                    response = await client.post("/predict", params=params, files=files)
                except httpx.HTTPError as exc:  # connection refused or reset, timeout
                    errors[type(exc).__name__] += 1
                    continue
                statuses[response.status_code] += 1
                if response.status_code == 200:
                    seconds.append(time.perf_counter() - start)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        duration = time.perf_counter() - started
    ok = statuses.pop(200, 0)
    busy = statuses.pop(503, 0)
    return {
        "image": image.name,
        "concurrency": concurrency,
        "requests": sent,
        "stopped_by": "count" if sent >= max_requests else "duration",
        "ok": ok,
        "busy_503": busy,
        "other_non_200": {str(code): n for code, n in sorted(statuses.items())},
        "transport_errors": dict(errors),
        "duration_s": duration,
        "throughput_rps": ok / duration if duration > 0 else 0.0,
        "latency": latency_summary(seconds),
        **({"seconds": seconds} if keep_seconds else {}),
    }


def load_test(
    base_url: str,
    image: BenchImage,
    concurrency: int,
    max_requests: int,
    max_duration_s: float,
    timeout: float = 30.0,
    transport: httpx.AsyncBaseTransport | None = None,
    keep_seconds: bool = False,
) -> dict[str, Any]:
    """``concurrency`` clients posting ``image`` until ``max_requests`` are sent or ``max_duration_s``
    has passed (requests in flight then finish). Throughput and latency count the 200s only;
    ``keep_seconds``: the row also holds each 200's latency, in seconds (``seconds``)."""
    return asyncio.run(_load(base_url, image, concurrency, max_requests, max_duration_s, timeout, transport, keep_seconds))


def bench_server(model: Path, images: list[BenchImage], args: argparse.Namespace, log_path: Path) -> dict[str, Any]:
    """Start-ups, memory, sequential latency and load of the real service."""
    ready = []
    out: dict[str, Any] = {}
    for i in range(args.starts):
        last = i == args.starts - 1
        with run_server(model, log_path, args.server_env) as server:
            ready.append(server.ready_s)
            log.info("start %d/%d: ready after %.2f s", i + 1, args.starts, server.ready_s)
            if not last:
                continue
            pid = server.process.pid
            out["model"] = httpx.get(f"{server.base_url}/model", timeout=args.timeout).json()
            out["warmup_statuses"] = warm_up(server.base_url, images, args.warmup, args.timeout)
            out["memory_after_warmup"] = memory_mib(pid)
            out["sequential"] = {}
            for image in images:
                log.info("sequential: %d requests of %s", args.requests, image.name)
                out["sequential"][image.name] = sequential_latency(server.base_url, image, args.requests, args.timeout)
            out["load"] = []
            for image in images:
                for concurrency in args.concurrency:
                    log.info("load: %s at concurrency %d", image.name, concurrency)
                    row = load_test(server.base_url, image, concurrency, args.load_requests, args.load_duration, args.timeout)
                    out["load"].append(row)
            out["memory_after_load"] = memory_mib(pid)
    out["startup"] = {"ready_s": ready, "median_ready_s": statistics.median(ready)}
    return out


# --- in process --------------------------------------------------------------------------------


def bench_in_process(model: Path, images: list[BenchImage], runs: int, warmup: int) -> dict[str, Any]:
    """Our model in this process, one ONNX Runtime thread each for detection and classification,
    on the decoded images."""
    start = time.perf_counter()
    predictor = Predictor.from_uri(str(model), threads=1)
    predictor.warm_up()
    out: dict[str, Any] = {"threads": 1, "load_s": time.perf_counter() - start}
    detector = FaceDetector(threads=1)
    for image in images:
        decoded = decode_image(image.data, MAX_IMAGE_PIXELS)  # as the service decodes it
        call = _classifier(predictor, detector if image.detect else None, decoded)
        detections, predictions = call()
        out[image.name] = {
            **latency_summary(time_calls(call, runs, warmup)),
            "faces": len(detections),
            "emotion": predictions[0]["emotion"] if predictions else None,
        }
    return out


def _classifier(
    predictor: Predictor, detector: FaceDetector | None, image: Image.Image
) -> Callable[[], tuple[list[Detection], list[Prediction]]]:
    """What ``POST /predict`` does after decoding: find the faces (or take the whole image), classify them."""

    def call() -> tuple[list[Detection], list[Prediction]]:
        if detector is None:
            detections, crops = [Detection((0, 0, *image.size), 1.0)], [whole_image_crop(image)]
        else:
            detections = detector.detect(image)
            crops = crop_faces(image, detections, detector.align)
        return detections, predictor.predict_faces(crops) if crops else []

    return call


# --- accuracy and fer --------------------------------------------------------------------------


def evaluate_ours(model: Path, data: Path, output: Path, log_path: Path, timeout: float) -> dict[str, Any]:
    """Our model's PublicTest report from ``training.evaluate`` (a subprocess: it sets its own threads)."""
    args = ["--checkpoint", str(model), "--data", str(data), "--split", "test", "--output-json", str(output)]
    with log_path.open("ab") as log_file:
        proc = subprocess.run(
            [sys.executable, "-m", "training.evaluate", *args],
            cwd=ROOT,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            timeout=timeout,
        )
    command = shlex.join(["python", "-m", "training.evaluate", *args])
    if proc.returncode != 0:
        return {"error": f"training.evaluate exited with {proc.returncode}", "command": command, "log_tail": _tail(log_path)}
    report: dict[str, Any] = {**json.loads(output.read_text()), "command": command}
    output.write_text(json.dumps(report, indent=2))  # what bench.fer_baseline puts beside fer's figures
    return report


def fer_skip_reason(fer_python: Path | None) -> str | None:
    """Why the fer baseline cannot run with ``fer_python``, or None if it can."""
    if fer_python is None:
        return "--fer-python not given"
    if not (fer_python.is_file() and os.access(fer_python, os.X_OK)):
        return f"{fer_python}: no such interpreter"
    probe = "import importlib.util, sys; sys.exit(importlib.util.find_spec('fer') is None)"
    if subprocess.run([str(fer_python), "-c", probe], capture_output=True, timeout=60).returncode != 0:
        return f"{fer_python}: fer is not installed there (see bench/requirements-fer.txt)"
    return None


def run_fer(
    fer_python: Path, paths: dict[str, Path], ours_eval: Path | None, args: argparse.Namespace, log_path: Path
) -> dict[str, Any]:
    """``bench.fer_baseline`` in fer's environment on the same images; its results record, or the error."""
    command = [str(fer_python), "-m", "bench.fer_baseline", "--crop", str(paths["crop"]), "--photo", str(paths["photo"])]
    command += ["--runs", str(args.requests), "--warmup", str(args.warmup), "--backends", args.fer_backends]
    command += ["--output", str(args.fer_output)]
    if args.accuracy:
        command += ["--data", str(args.data)] + (["--limit", str(args.fer_limit)] if args.fer_limit else [])
    else:
        command += ["--no-accuracy"]
    if ours_eval is not None:
        command += ["--ours-eval", str(ours_eval)]
    log.info("fer: %s", shlex.join(command))
    with log_path.open("ab") as log_file:
        proc = subprocess.run(command, cwd=ROOT, stdout=log_file, stderr=subprocess.STDOUT, timeout=args.fer_timeout)
    if proc.returncode != 0:
        return {"error": f"bench.fer_baseline exited with {proc.returncode}", "log_tail": _tail(log_path)}
    record: dict[str, Any] = json.loads(args.fer_output.read_text())
    return record


# --- report ------------------------------------------------------------------------------------


def _p50_p99(stats: dict[str, Any] | None) -> str:
    if not stats or "p50_ms" not in stats:
        return "-"
    return f"{stats['p50_ms']:.2f} / {stats['p99_ms']:.2f}"


def latency_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per way of classifying the two images: ours over HTTP, ours in process, fer per backend."""
    server, ours = results["server"], results["in_process"]
    rows = [
        {"path": "ours, HTTP (sequential)", "crop": server["sequential"]["crop"], "photo": server["sequential"]["photo"]},
        {"path": "ours, in process (1 thread)", "crop": ours["crop"], "photo": ours["photo"]},
    ]
    fer = results["fer"]
    for name, backend in fer.get("results", {}).get("backends", {}).items():
        if "crop" in backend:
            rows.append({"path": f"fer {name}, in process", "crop": backend["crop"], "photo": backend["photo"]})
    return rows


def markdown(results: dict[str, Any]) -> str:
    server = results["server"]
    startup, before, after = server["startup"], server["memory_after_warmup"], server["memory_after_load"]
    model = server["model"]
    lines = [
        f"Service: {len(startup['ready_s'])} start(s), model {model.get('version')} ({model.get('architecture')})",
        "",
        "| start → /readyz 200, median s | RSS after warm-up MiB | RSS after load MiB | peak RSS MiB |",
        "|---:|---:|---:|---:|",
        f"| {startup['median_ready_s']:.2f} | {before['rss_mib']:.0f} | {after['rss_mib']:.0f} | {after['peak_rss_mib']:.0f} |",
        "",
        "| per image, ms p50 / p99 | 48x48 crop | photo (with detection) | faces in photo |",
        "|---|---:|---:|---:|",
    ]
    for row in latency_rows(results):
        lines.append(f"| {row['path']} | {_p50_p99(row['crop'])} | {_p50_p99(row['photo'])} | {row['photo'].get('faces', '-')} |")
    lines += [
        "",
        "| image | concurrency | requests | 200 | 503 | other | req/s | p50 ms | p99 ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in server["load"]:
        other = sum(row["other_non_200"].values()) + sum(row["transport_errors"].values())
        lat = row["latency"]
        p50 = f"{lat['p50_ms']:.1f}" if "p50_ms" in lat else "-"
        p99 = f"{lat['p99_ms']:.1f}" if "p99_ms" in lat else "-"
        lines.append(
            f"| {row['image']} | {row['concurrency']} | {row['requests']} | {row['ok']} | {row['busy_503']} | {other} "
            f"| {row['throughput_rps']:.1f} | {p50} | {p99} |"
        )
    lines += ["", "| PublicTest | accuracy | macro F1 | images |", "|---|---:|---:|---:|"]
    for name, report in results["accuracy"].items():
        if "accuracy" in report:
            lines.append(f"| {name} | {report['accuracy']:.4f} | {report['macro_f1']:.4f} | {report['num_samples']} |")
        else:
            lines.append(f"| {name} | {report.get('skipped') or report.get('error')} | | |")
    fer = results["fer"]
    if "skipped" in fer or "error" in fer:
        lines += ["", f"fer: {fer.get('skipped') or fer.get('error')}"]
    return "\n".join(lines)


def accuracy_section(ours: dict[str, Any], fer: dict[str, Any]) -> dict[str, Any]:
    """PublicTest reports by model: ours, then fer's per backend (or why each is missing)."""
    section = {"ours": ours}
    backends = fer.get("results", {}).get("backends")
    if backends is None:
        section["fer"] = {"skipped": fer.get("skipped") or fer.get("error") or "not run"}
    for name, backend in (backends or {}).items():
        section[f"fer {name}"] = backend["accuracy"]
    return section


# --- command line ------------------------------------------------------------------------------


def parse_concurrency(value: str) -> list[int]:
    try:
        levels = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        levels = []
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError(f"comma-separated positive integers, got {value!r}")
    return levels


def parse_env(value: str) -> tuple[str, str]:
    name, sep, setting = value.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"KEY=VALUE, got {value!r}")
    return name, setting


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model", type=Path, default=BUNDLED_MODEL, help="checkpoint the service serves (default: the bundled one)"
    )
    parser.add_argument("--starts", type=positive_int, default=3, help="server starts timed to readiness")
    parser.add_argument("--warmup", type=int, default=10, help="untimed requests (and in-process calls) per image first")
    parser.add_argument(
        "--requests", type=positive_int, default=200, help="timed sequential requests / in-process calls per image"
    )
    parser.add_argument("--concurrency", type=parse_concurrency, default=[1, 8, 32], help="load levels, e.g. 1,8,32")
    parser.add_argument("--load-requests", type=positive_int, default=400, help="most requests per load level and image")
    parser.add_argument("--load-duration", type=float, default=30.0, help="most seconds per load level and image")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds one request may take")
    parser.add_argument("--server-env", type=parse_env, action="append", default=[], help="KEY=VALUE for the server (repeatable)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="FER2013 zip for the PublicTest accuracy")
    parser.add_argument("--no-accuracy", dest="accuracy", action="store_false", help="skip the PublicTest accuracy")
    parser.add_argument("--fer-python", type=Path, help="python of the fer environment, e.g. .venv-fer/bin/python")
    parser.add_argument("--fer-backends", default=FER_BACKENDS, help="fer backends: tflite (its default), keras")
    parser.add_argument("--fer-limit", type=positive_int, help="PublicTest images fer classifies (default: all)")
    parser.add_argument(
        "--fer-timeout", type=float, default=1800.0, help="seconds the fer baseline, and our evaluation, may each take"
    )
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "service.json")
    parser.add_argument("--fer-output", type=Path, default=RESULTS_DIR / "fer_baseline.json")
    parser.add_argument("--write-images", type=Path, metavar="DIR", help="only write crop.png and photo.png to DIR, then exit")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.server_env = dict(args.server_env)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    images = bench_images()
    if args.write_images:
        for path in write_images(images, args.write_images).values():
            print(path)
        return 0
    if not args.model.is_file():
        parser.error(
            f"--model {args.model}: no such model (export a checkpoint with training.export; try runs/<run>/model.int8.onnx)"
        )
    accuracy_skip = None if args.accuracy else "--no-accuracy"
    if args.accuracy and not args.data.is_file():
        accuracy_skip = f"{args.data} not found"
        args.accuracy = False
    fer_skip = fer_skip_reason(args.fer_python)

    with tempfile.TemporaryDirectory(prefix="bench-service-") as tmp:
        work = Path(tmp)
        log_path = work / "server.log"
        server = bench_server(args.model, images, args, log_path)
        log.info("in process: %d+%d calls per image", args.warmup, args.requests)
        in_process = bench_in_process(args.model, images, args.requests, args.warmup)
        ours_eval_path = work / "ours_eval.json"
        if args.accuracy:
            log.info("our PublicTest accuracy (training.evaluate)")
            ours = evaluate_ours(args.model, args.data, ours_eval_path, work / "evaluate.log", args.fer_timeout)
        else:
            ours = {"skipped": accuracy_skip}
        if fer_skip is None and args.fer_python is not None:
            paths = write_images(images, work / "images")
            ours_path = ours_eval_path if "accuracy" in ours else None
            fer_record = run_fer(args.fer_python, paths, ours_path, args, work / "fer.log")
            fer = fer_record if "error" in fer_record else {"result_file": str(args.fer_output), **fer_record}
        else:
            fer = {"skipped": fer_skip}

    results: dict[str, Any] = {
        "settings": {
            "model": str(args.model),
            "starts": args.starts,
            "warmup": args.warmup,
            "requests": args.requests,
            "concurrency": args.concurrency,
            "load_requests": args.load_requests,
            "load_duration_s": args.load_duration,
            "timeout_s": args.timeout,
            "server_env": args.server_env,
            "images": {image.name: image_info(image) for image in images},
        },
        "server": server,
        "in_process": in_process,
        "fer": fer,
    }
    results["accuracy"] = accuracy_section(ours, fer)
    results["latency_comparison"] = [
        {
            "path": row["path"],
            **{f"{image}_{stat}": row[image].get(stat) for image in ("crop", "photo") for stat in ("p50_ms", "p99_ms")},
            "photo_faces": row["photo"].get("faces"),
        }
        for row in latency_rows(results)
    ]
    write_result(args.output, "service", results, command_line("bench.service", argv))
    print(markdown(results))
    print(f"\nwritten to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
