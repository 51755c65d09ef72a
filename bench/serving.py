"""Serving on ONNX Runtime against serving on PyTorch, and against a bare endpoint, side by side.

    python -m bench.serving                       # bench/results/serving.json
    python -m bench.serving --rounds 1 --requests 50 --no-accuracy --output /tmp/serving.json

Three real uvicorn processes on loopback, each started ``--starts`` times, measured in turn, the
whole set repeated ``--rounds`` times (so drift on a shared machine hits all alike); figures are
medians over rounds:

* ``pytorch``: the service as it was before ONNX serving (git commit ``--torch-commit``, checked out
  into a temporary worktree, its own bundled PyTorch model, run by this Python);
* ``onnx``: the service now, on its bundled int8 ONNX model;
* ``bare``: :mod:`bench.bare_app`, a FastAPI endpoint that only reads and decodes the upload.

Per server: start to the first ``/readyz`` 200; resident memory after ``--memory-requests`` crop
requests; whether libtorch is mapped into the process; sequential latency of the 48x48 crop
(``detect=false``) and of the 512x512 photo (with detection); crop throughput at concurrency 1 and
``--concurrency``. With ``--accuracy``, PublicTest through HTTP (``/predict/batch?detect=false``, the
zip's JPEGs as uploads) for the int8 and the fp32 ONNX exports of the bundled model.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import statistics
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from app.settings import BUNDLED_MODEL
from bench.machine import RESULTS_DIR, command_line, memory_mib, write_result
from bench.service import DEFAULT_DATA, ROOT, SERVICE_ARGS, BenchImage, bench_images, load_test, run_server, sequential_latency
from bench.timing import positive_int
from fercore.labels import CLASS_INDEX

log = logging.getLogger(__name__)

# The last commit that served with PyTorch.
TORCH_COMMIT = "c9fbf10"
CONTENDERS = ("pytorch", "onnx", "bare")
BATCH_FILES = 16


@dataclass(frozen=True)
class Contender:
    name: str
    app_args: tuple[str, ...]  # uvicorn's
    cwd: Path
    model: Path | None  # MODEL_URI; None: the server's own default


@contextlib.contextmanager
def torch_checkout(commit: str) -> Iterator[Path]:
    """The repository at ``commit`` in a temporary git worktree (removed afterwards)."""
    with tempfile.TemporaryDirectory(prefix="bench-torch-") as tmp:
        path = Path(tmp) / "tree"
        subprocess.run(["git", "worktree", "add", "--detach", str(path), commit], cwd=ROOT, check=True, capture_output=True)
        try:
            yield path
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(path)], cwd=ROOT, check=False, capture_output=True)


def libtorch_mapped(pid: int) -> bool:
    """Whether any libtorch shared object is mapped into process ``pid``."""
    with open(f"/proc/{pid}/maps") as f:
        return any("libtorch" in line for line in f)


def measure(contender: Contender, images: list[BenchImage], args: argparse.Namespace, log_path: Path) -> dict[str, Any]:
    """One round of every figure for one server."""
    crop, photo = images
    ready = []
    env = {"PYTHONPATH": str(contender.cwd)}  # the checkout's packages, not the installed ones
    out: dict[str, Any] = {}
    for i in range(args.starts):
        with run_server(contender.model, log_path, env, app_args=contender.app_args, cwd=contender.cwd) as server:
            ready.append(server.ready_s)
            if i < args.starts - 1:
                continue
            pid = server.process.pid
            out["crop_memory"] = sequential_latency(server.base_url, crop, args.memory_requests, args.timeout)
            out["rss_mib"] = memory_mib(pid)["rss_mib"]
            out["libtorch_mapped"] = libtorch_mapped(pid)
            out["crop"] = sequential_latency(server.base_url, crop, args.requests, args.timeout)
            out["photo"] = sequential_latency(server.base_url, photo, args.requests, args.timeout)
            for concurrency in (1, args.concurrency):
                row = load_test(server.base_url, crop, concurrency, args.load_requests, args.load_duration, args.timeout)
                out[f"crop_c{concurrency}_rps"] = row["throughput_rps"]
                out[f"crop_c{concurrency}_busy"] = row["busy_503"]
    out["ready_s"] = statistics.median(ready)
    return out


def summarize(rounds: list[dict[str, Any]], concurrency: int) -> dict[str, Any]:
    """Medians over rounds of the figures the comparison reads."""

    def med(get: Any) -> float:
        return float(statistics.median(get(r) for r in rounds))

    return {
        "ready_s": med(lambda r: r["ready_s"]),
        "rss_mib_after_crops": med(lambda r: r["rss_mib"]),
        "libtorch_mapped": any(r["libtorch_mapped"] for r in rounds),
        "crop_p50_ms": med(lambda r: r["crop"]["p50_ms"]),
        "crop_p99_ms": med(lambda r: r["crop"]["p99_ms"]),
        "photo_p50_ms": med(lambda r: r["photo"]["p50_ms"]),
        "photo_faces": rounds[-1]["photo"]["faces"],
        "crop_c1_rps": med(lambda r: r["crop_c1_rps"]),
        f"crop_c{concurrency}_rps": med(lambda r: r[f"crop_c{concurrency}_rps"]),
        f"crop_c{concurrency}_over_c1": med(lambda r: r[f"crop_c{concurrency}_rps"] / r["crop_c1_rps"]),
    }


def publictest_uploads(data: Path) -> list[tuple[str, bytes, int]]:
    """(name, JPEG bytes, label) of every PublicTest face in the zip."""
    out = []
    with zipfile.ZipFile(data) as zf:
        for name in sorted(zf.namelist()):
            parts = name.split("/")
            if len(parts) == 3 and parts[0] == "test" and parts[2]:
                out.append((parts[2], zf.read(name), CLASS_INDEX[parts[1]]))
    return out


def http_accuracy(model: Path, uploads: list[tuple[str, bytes, int]], args: argparse.Namespace, log_path: Path) -> dict[str, Any]:
    """Accuracy of the service on ``model`` through ``POST /predict/batch?detect=false``."""
    batches = [uploads[i : i + BATCH_FILES] for i in range(0, len(uploads), BATCH_FILES)]
    with run_server(model, log_path, {}) as server, httpx.Client(base_url=server.base_url) as client:

        def post(batch: list[tuple[str, bytes, int]]) -> list[str]:
            files = [("files", (name, io.BytesIO(data), "image/jpeg")) for name, data, _ in batch]
            response = client.post("/predict/batch", params={"detect": "false"}, files=files, timeout=args.timeout)
            response.raise_for_status()
            return [result["faces"][0]["emotion"] for result in response.json()["results"]]

        with ThreadPoolExecutor(2) as pool:
            predicted = [emotion for batch in pool.map(post, batches) for emotion in batch]
        model_info = client.get("/model").json()
    classes = model_info["classes"]
    correct = sum(classes.index(p) == label for p, (_, _, label) in zip(predicted, uploads, strict=True))
    return {"model": str(model), "precision": model_info.get("precision"), "n": len(uploads), "accuracy": correct / len(uploads)}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=positive_int, default=2, help="times every server is measured, in turn")
    parser.add_argument("--starts", type=positive_int, default=3, help="server starts timed to readiness, per round")
    parser.add_argument("--memory-requests", type=positive_int, default=300, help="crop requests before the RSS reading")
    parser.add_argument("--requests", type=positive_int, default=200, help="timed sequential requests per image")
    parser.add_argument("--concurrency", type=positive_int, default=32, help="the loaded level (beside concurrency 1)")
    parser.add_argument("--load-requests", type=positive_int, default=600, help="most requests per load level")
    parser.add_argument("--load-duration", type=float, default=20.0, help="most seconds per load level")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds one request may take")
    parser.add_argument("--torch-commit", default=TORCH_COMMIT, help="the commit that served with PyTorch")
    parser.add_argument("--contenders", default=",".join(CONTENDERS), help="which servers, e.g. onnx,bare")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="FER2013 zip for the accuracy through HTTP")
    parser.add_argument("--no-accuracy", dest="accuracy", action="store_false", help="skip the accuracy through HTTP")
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "serving.json")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request otherwise
    images = bench_images()
    results: dict[str, Any] = {"settings": {k: str(v) for k, v in vars(args).items()}}
    names = args.contenders.split(",")
    with contextlib.ExitStack() as stack:
        old = stack.enter_context(torch_checkout(args.torch_commit)) if "pytorch" in names else ROOT
        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-serving-"))
        contenders = [
            Contender("pytorch", ("app.main:app",), old, None),
            Contender("onnx", SERVICE_ARGS, ROOT, None),
            Contender("bare", ("--factory", "bench.bare_app:create_app"), ROOT, None),
        ]
        contenders = [c for c in contenders if c.name in names]
        log_path = Path(tmp) / "server.log"
        rounds: dict[str, list[dict[str, Any]]] = {c.name: [] for c in contenders}
        for i in range(args.rounds):
            for contender in contenders:
                log.info("round %d/%d: %s", i + 1, args.rounds, contender.name)
                rounds[contender.name].append(measure(contender, images, args, log_path))
        results["rounds"] = rounds
        results["summary"] = {name: summarize(rows, args.concurrency) for name, rows in rounds.items()}
        if args.accuracy:
            uploads = publictest_uploads(args.data)
            fp32 = BUNDLED_MODEL.with_name(BUNDLED_MODEL.name.replace(".int8", ""))
            results["accuracy_http"] = [http_accuracy(m, uploads, args, log_path) for m in (BUNDLED_MODEL, fp32)]
    write_result(args.output, "serving", results, command_line("bench.serving", argv))
    for name, row in results["summary"].items():
        print(name, {k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()})
    for row in results.get("accuracy_http", []):
        print(row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
