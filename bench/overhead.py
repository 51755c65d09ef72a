"""The service's own overhead: a 48x48 crop through ``POST /predict?detect=false`` against the floor
(:mod:`bench.bare_app`, an ``async def`` FastAPI endpoint that reads and decodes the same upload)
and the int8 forward pass alone, side by side in one run.

    python -m bench.overhead                               # bench/results/overhead.json
    python -m bench.overhead --ablations                   # and the service with parts switched off
    python -m bench.overhead --profile                     # and a cProfile of the service's event loop
    python -m bench.overhead --rounds 1 --requests 50 --output /tmp/overhead.json

Real uvicorn processes on loopback (:func:`bench.service.run_server`), measured in turn, the whole
set repeated ``--rounds`` times so the machine's drift falls on all alike; figures are medians over
rounds of each round's p50:

* ``service``: the service as it is served (``app.main:serve_app``, default settings: micro-batching
  on, JSON access log on stderr, metrics, tracing off as no ``OTEL_*`` variable asks for it);
* ``bare``: the floor;
* with ``--before COMMIT``: the service at that commit (a temporary git worktree), for a before
  and after measured side by side;
* with ``--ablations``, the service with one part changed, to see what each costs (bench-only
  factories in this module, nothing the service can be configured to do): ``no-telemetry`` (the
  metrics and access-log middleware removed), ``no-batching`` (``BATCH_MAX_SIZE=1``),
  ``one-thread`` (``INFERENCE_THREADS=1``), ``tracing`` (spans exported over OTLP/HTTP to a sink in
  this process, as a deployment with tracing on does);
* in this process: ``Predictor.predict_faces`` on the decoded crop, with one ONNX Runtime thread and
  with the service's default (one per usable CPU);
* in this process, the plumbing alone: the served app with a no-op model and the floor called as ASGI
  apps (no socket, no client: far less noise than over HTTP), ``--plumbing-runs`` calls each; with
  ``--before``, that commit's app too, in a subprocess.

Start-up is from ``Popen`` to the first ``/readyz`` 200, median of ``--starts`` per round.
``--profile``: the service run in this process under cProfile while a client process sends
``--profile-requests`` crops; the event loop's functions by cumulative time go into the result.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import http.server
import io
import json
import logging
import os
import pstats
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI

from app.access import RequestTelemetry
from app.faces import whole_image_crop
from app.images import decode_image
from app.main import serve_app
from app.model import Predictor
from app.settings import BUNDLED_MODEL
from bench.machine import RESULTS_DIR, command_line, write_result
from bench.service import MAX_IMAGE_PIXELS, ROOT, SERVICE_ARGS, BenchImage, bench_images, run_server, sequential_latency
from bench.serving import torch_checkout as checkout
from bench.timing import latency_summary, positive_int, time_calls
from fercore.cpus import available_cpus

log = logging.getLogger(__name__)

BARE_ARGS = ("--factory", "bench.bare_app:create_app")


@dataclass(frozen=True)
class Contender:
    name: str
    app_args: tuple[str, ...]  # uvicorn's
    env: tuple[tuple[str, str], ...] = ()
    cwd: Path = ROOT  # where its code is: this tree, or a checkout of another commit


def app_without_telemetry() -> FastAPI:
    """Bench only: the served app without :class:`app.access.RequestTelemetry` (metrics and access log)."""
    app = serve_app()
    app.user_middleware = [m for m in app.user_middleware if m.cls is not RequestTelemetry]
    return app


class _SpanSink(http.server.BaseHTTPRequestHandler):
    """Answers every OTLP/HTTP export 200, and keeps nothing."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length", 0)))
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:  # one line per export otherwise
        pass


@contextlib.contextmanager
def span_sink() -> Iterator[str]:
    """An OTLP/HTTP endpoint on loopback that accepts spans, for the ``tracing`` contender."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _SpanSink)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def contenders(ablations: bool, sink: str | None, before: Path | None) -> list[Contender]:
    out = [Contender("service", SERVICE_ARGS), Contender("bare", BARE_ARGS)]
    if before is not None:
        out.append(Contender("before", SERVICE_ARGS, (("PYTHONPATH", str(before)),), before))
    if ablations:
        out += [
            Contender("no-telemetry", ("--factory", "bench.overhead:app_without_telemetry")),
            Contender("no-batching", SERVICE_ARGS, (("BATCH_MAX_SIZE", "1"),)),
            Contender("one-thread", SERVICE_ARGS, (("INFERENCE_THREADS", "1"),)),
        ]
        if sink is not None:
            otlp = (("OTEL_TRACES_EXPORTER", "otlp"), ("OTEL_EXPORTER_OTLP_ENDPOINT", sink))
            out.append(Contender("tracing", SERVICE_ARGS, (*otlp, ("OTEL_BSP_SCHEDULE_DELAY", "200"))))
    return out


def measure(contender: Contender, crop: BenchImage, args: argparse.Namespace, log_path: Path) -> dict[str, Any]:
    """One round for one server: start-up ``--starts`` times, then the crop's sequential latency."""
    ready = []
    out: dict[str, Any] = {}
    for i in range(args.starts):
        # OTEL_* reach the server only through the contender's own env (service_env drops the shell's).
        env = dict(contender.env)
        with run_server(None, log_path, env, app_args=contender.app_args, cwd=contender.cwd) as server:
            ready.append(server.ready_s)
            if i < args.starts - 1:
                continue
            sequential_latency(server.base_url, crop, args.warmup, args.timeout)
            out["crop"] = sequential_latency(server.base_url, crop, args.requests, args.timeout)
    out["ready_s"] = statistics.median(ready)
    return out


def forward_pass(crop: BenchImage, threads: int, runs: int, warmup: int) -> dict[str, Any]:
    """``Predictor.predict_faces`` on the decoded crop, as the service calls it (decoding excluded)."""
    predictor = Predictor.from_uri(str(BUNDLED_MODEL), threads=threads)
    predictor.warm_up()
    face = whole_image_crop(decode_image(crop.data, MAX_IMAGE_PIXELS))
    return {"threads": threads, **latency_summary(time_calls(lambda: predictor.predict_faces([face]), runs, warmup))}


# --- the plumbing in process --------------------------------------------------------------------

_BOUNDARY = b"bench-overhead"


def multipart_body(image: BenchImage) -> bytes:
    head = f'--bench-overhead\r\nContent-Disposition: form-data; name="file"; filename="{image.filename}"\r\n'
    return head.encode() + b"Content-Type: image/png\r\n\r\n" + image.data + b"\r\n--" + _BOUNDARY + b"--\r\n"


async def asgi_post(app: Any, body: bytes) -> None:
    """One ``POST /predict?detect=false`` straight into ``app`` (no socket, no HTTP parsing); 200 or AssertionError."""
    headers = [(b"host", b"bench"), (b"content-type", b"multipart/form-data; boundary=" + _BOUNDARY)]
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/predict",
        "raw_path": b"/predict",
        "root_path": "",
        "query_string": b"detect=false",
        "headers": [*headers, (b"content-length", str(len(body)).encode())],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }
    messages = [{"type": "http.request", "body": body, "more_body": False}]
    statuses = []

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop()
        await asyncio.Event().wait()  # the client never disconnects
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    await app(scope, receive, send)
    assert statuses == [200], statuses


class NoOpPredictor:
    """Answers every crop at once, as the served model's classes: the service's plumbing without its model."""

    def __init__(self, real: Any) -> None:
        self.info = real.info
        self.prediction = {
            "emotion": real.classes[0],
            "confidence": 1.0,
            "scores": dict.fromkeys(real.classes, 1 / len(real.classes)),
        }

    def predict_faces(self, faces: list[Any]) -> list[dict[str, Any]]:
        return [dict(self.prediction) for _ in faces]


async def _plumbing(image: BenchImage, runs: int, warmup: int) -> dict[str, Any]:
    from bench.bare_app import create_app as bare_app

    body = multipart_body(image)
    service = serve_app()
    bare = bare_app()
    out: dict[str, Any] = {}
    async with service.router.lifespan_context(service):
        service.state.predictor = NoOpPredictor(service.state.predictor)  # on app.state: an override costs per request
        for name, app in (("service_noop_model", service), ("bare", bare)):
            for _ in range(warmup):
                await asgi_post(app, body)
            seconds = []
            for _ in range(runs):
                start = time.perf_counter()
                await asgi_post(app, body)
                seconds.append(time.perf_counter() - start)
            out[name] = latency_summary(seconds)
    out["plumbing_p50_ms"] = out["service_noop_model"]["p50_ms"] - out["bare"]["p50_ms"]
    return out


def plumbing_in_process(image: BenchImage, runs: int, warmup: int) -> dict[str, Any]:
    """The served app (its lifespan run, its model replaced by :class:`NoOpPredictor`) and the floor
    called as ASGI apps on uvloop in this process, in turn: what the service adds around its model,
    without the socket, the HTTP parser or the client. The access log goes to a discarded stream."""
    import uvloop

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    root.handlers.clear()  # serve_app sets up its JSON logging, as served
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            return uvloop.run(_plumbing(image, runs, warmup))
    finally:
        root.handlers[:], root.level = handlers, level


def plumbing_at(code: Path, runs: int, warmup: int) -> dict[str, Any]:
    """:func:`plumbing_in_process` in a subprocess with the ``app`` package of ``code`` (another commit's
    checkout): this module is copied beside it, as that commit may not have it."""
    script = (
        "import json, sys; from overhead_copy import plumbing_in_process; from bench.service import bench_images; "
        "print(json.dumps(plumbing_in_process(bench_images()[0], int(sys.argv[1]), int(sys.argv[2]))))"
    )
    with tempfile.TemporaryDirectory(prefix="bench-overhead-") as tmp:
        (Path(tmp) / "overhead_copy.py").write_text(Path(__file__).read_text())
        env = {**os.environ, "PYTHONPATH": f"{code}{os.pathsep}{tmp}"}
        command = [sys.executable, "-c", script, str(runs), str(warmup)]
        proc = subprocess.run(command, cwd=code, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"the plumbing at {code} failed:\n{proc.stderr[-4000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


# --- profile -----------------------------------------------------------------------------------

_PROFILE_CLIENT = """
import sys, time, httpx
from bench.service import bench_images
crop = bench_images()[0]
files = {"file": (crop.filename, crop.data, "image/png")}
with httpx.Client(base_url=sys.argv[1], timeout=60) as client:
    while True:
        try:
            if client.get("/readyz").status_code == 200:
                break
        except httpx.TransportError:
            pass
        time.sleep(0.02)
    for _ in range(int(sys.argv[2])):
        client.post("/predict", params={"detect": "false"}, files=files).raise_for_status()
"""


def profile_service(requests: int, top: int) -> dict[str, Any]:
    """cProfile of the served app's event loop (uvicorn in this thread) while a client process posts
    ``requests`` crops. A coroutine's cumulative time is its running time, not its waits: the
    worker threads' decode and forward pass are not in it."""
    import uvicorn

    from bench.service import listening_socket

    sock = listening_socket()
    base_url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    config = uvicorn.Config(serve_app, factory=True, log_level="warning")
    server = uvicorn.Server(config)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    client = subprocess.Popen([sys.executable, "-c", _PROFILE_CLIENT, base_url, str(requests)], cwd=ROOT, env=env)

    def stop_when_done() -> None:
        client.wait()
        server.should_exit = True

    threading.Thread(target=stop_when_done, daemon=True).start()
    profiler = cProfile.Profile()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    root.handlers.clear()  # so that serve_app sets up its JSON logging, as served
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # where that logging writes: a line per request
            profiler.runcall(server.run, sockets=[sock])
    finally:
        root.handlers[:], root.level = handlers, level
        sock.close()
    if client.returncode != 0:
        raise RuntimeError(f"the profile's client exited with {client.returncode}")
    return {"requests": requests, "top_cumulative": profile_rows(pstats.Stats(profiler), requests, top)}


def profile_rows(stats: pstats.Stats, requests: int, top: int) -> list[dict[str, Any]]:
    """The ``top`` functions by cumulative time, in microseconds per request, paths from site-packages or the repo."""
    rows = []
    for (path, line, name), (_, calls, _tottime, cumtime, _) in stats.stats.items():  # type: ignore[attr-defined]
        short = path.split("site-packages/")[-1].replace(str(ROOT) + "/", "")
        per_request_us = round(cumtime / requests * 1e6, 1)
        rows.append({"function": f"{short}:{line}({name})", "calls": calls, "cum_us_per_request": per_request_us})
    rows.sort(key=lambda row: -row["cum_us_per_request"])
    return rows[:top]


# --- main --------------------------------------------------------------------------------------


def summarize(
    rounds: dict[str, list[dict[str, Any]]], forward: dict[str, list[dict[str, Any]]], plumbing: dict[str, list[dict[str, Any]]]
) -> dict[str, Any]:
    def med(values: list[float]) -> float:
        return round(float(statistics.median(values)), 3)

    servers = {
        name: {"crop_p50_ms": med([r["crop"]["p50_ms"] for r in rows]), "ready_s": med([r["ready_s"] for r in rows])}
        for name, rows in rounds.items()
    }
    passes = {name: med([r["p50_ms"] for r in rows]) for name, rows in forward.items()}
    floor = servers["bare"]["crop_p50_ms"]
    for figures in servers.values():
        figures["over_floor"] = round(figures["crop_p50_ms"] / floor, 2)
    return {
        "servers": servers,
        "forward_pass_p50_ms": passes,
        "service_over_floor": servers["service"]["over_floor"],
        # What is neither the floor nor the forward pass at the service's thread count.
        "service_plumbing_ms": round(servers["service"]["crop_p50_ms"] - floor - passes["service_threads"], 3),
        "service_ready_s": servers["service"]["ready_s"],
        # In process, no model: the service's ASGI call minus the floor's (see plumbing_in_process).
        "plumbing_in_process_p50_ms": {name: med([r["plumbing_p50_ms"] for r in rows]) for name, rows in plumbing.items()},
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=positive_int, default=3, help="times every server is measured, in turn")
    parser.add_argument("--starts", type=positive_int, default=3, help="server starts timed to readiness, per round")
    parser.add_argument("--warmup", type=positive_int, default=50, help="untimed crop requests before the timed ones")
    parser.add_argument("--requests", type=positive_int, default=400, help="timed sequential crop requests per server")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds one request may take")
    parser.add_argument("--before", metavar="COMMIT", help="also the service at this commit")
    parser.add_argument("--plumbing-runs", type=positive_int, default=2000, help="in-process ASGI calls per app and round")
    parser.add_argument("--ablations", action="store_true", help="also the service with one part changed")
    parser.add_argument("--profile", action="store_true", help="also a cProfile of the service's event loop")
    parser.add_argument("--profile-requests", type=positive_int, default=1000)
    parser.add_argument("--profile-top", type=positive_int, default=40, help="functions kept from the profile")
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "overhead.json")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request otherwise
    crop = bench_images()[0]
    service_threads = available_cpus()
    results: dict[str, Any] = {"settings": {k: str(v) for k, v in vars(args).items()}, "image": crop.description}
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-overhead-"))
        sink = stack.enter_context(span_sink()) if args.ablations else None
        before = stack.enter_context(checkout(args.before)) if args.before else None
        log_path = Path(tmp) / "server.log"
        servers = contenders(args.ablations, sink, before)
        rounds: dict[str, list[dict[str, Any]]] = {c.name: [] for c in servers}
        forward: dict[str, list[dict[str, Any]]] = {"one_thread": [], "service_threads": []}
        plumbing: dict[str, list[dict[str, Any]]] = {"service": [], **({"before": []} if before is not None else {})}
        for i in range(args.rounds):
            for contender in servers:
                log.info("round %d/%d: %s", i + 1, args.rounds, contender.name)
                rounds[contender.name].append(measure(contender, crop, args, log_path))
            plumbing["service"].append(plumbing_in_process(crop, args.plumbing_runs, args.warmup))
            if before is not None:
                plumbing["before"].append(plumbing_at(before, args.plumbing_runs, args.warmup))
            forward["one_thread"].append(forward_pass(crop, 1, args.requests, args.warmup))
            forward["service_threads"].append(forward_pass(crop, service_threads, args.requests, args.warmup))
    results["rounds"] = rounds
    results["forward_pass"] = forward
    results["plumbing_in_process"] = plumbing
    results["summary"] = summarize(rounds, forward, plumbing)
    if args.profile:
        log.info("profile: %d crop requests", args.profile_requests)
        results["profile"] = profile_service(args.profile_requests, args.profile_top)
    write_result(args.output, "overhead", results, command=command_line("bench.overhead", argv))
    print(markdown(results["summary"]))
    return 0


def markdown(summary: dict[str, Any]) -> str:
    lines = ["| server | crop p50 (ms) | / floor | start to ready (s) |", "|---|---:|---:|---:|"]
    for name, figures in summary["servers"].items():
        lines.append(f"| {name} | {figures['crop_p50_ms']:.2f} | {figures['over_floor']:.2f} | {figures['ready_s']:.2f} |")
    passes = summary["forward_pass_p50_ms"]
    alone = f"{passes['one_thread']:.2f} ms (1 thread), {passes['service_threads']:.2f} ms (the service's threads)"
    lines += ["", f"forward pass alone: {alone}"]
    for name, ms in summary["plumbing_in_process_p50_ms"].items():
        lines.append(f"plumbing in process ({name}): {ms:.3f} ms over the floor")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
