"""Helpers for tests of the service (app/): a tiny real checkpoint (and a run published with it),
the app run under ``TestClient`` with a given environment or under a real uvicorn process, images
made in code, the upload calls, and what ``/metrics`` and the logs say about model loads."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import httpx
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from app.main import create_app
from bench.service import SERVICE_ARGS, start_uvicorn, stop
from fercore.checkpoint import load_checkpoint, make_checkpoint, save_checkpoint
from fercore.models import ModelConfig, create_model
from fercore.registry import publish_promoted
from tests.conftest import free_port
from training.export import export_onnx

ROOT = Path(__file__).resolve().parents[2]

# The variables app.settings reads that a developer's shell might have set.
SETTINGS_ENV = (
    "MODEL_URI",
    "MAX_UPLOAD_BYTES",
    "MAX_IMAGE_PIXELS",
    "INFERENCE_THREADS",
    "MAX_BATCH_FILES",
    "MAX_CONCURRENT_INFERENCES",
    "MAX_QUEUE",
    "BATCH_MAX_SIZE",
    "BATCH_MAX_WAIT_MS",
    "MODEL_LOAD_RETRIES",
    "MODEL_LOAD_BACKOFF_S",
    "GCS_TIMEOUT_S",
    "FALLBACK_TO_BUNDLED",
    "BUNDLED_MODEL_PATH",
    "RELOAD_INTERVAL_S",
    "ADMIN_TOKEN",
    "SHUTDOWN_TIMEOUT_S",
    "FACE_SCORE_THRESHOLD",
    "FACE_NMS_IOU",
    "FACE_DETECT_MAX_SIDE",
    "FACE_ALIGN",
    "FACE_DETECT_GRID",
)


def clean_service_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only what a test sets reaches the app (no tracing unless asked for); Pillow's global limit
    is restored afterwards."""
    for name in SETTINGS_ENV:
        monkeypatch.delenv(name, raising=False)
    for name in [name for name in os.environ if name.startswith("OTEL_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("INFERENCE_THREADS", "1")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)


def write_checkpoint(path: Path, run_id: str = "test-run", seed: int = 0) -> Path:
    """A tiny real checkpoint (compact, width 4) at ``path``."""
    torch.manual_seed(seed)
    model = create_model("compact", width=4)
    ckpt = make_checkpoint(model, ModelConfig("compact", {"width": 4}), run_id=run_id, metrics={"val_accuracy": 0.5})
    save_checkpoint(ckpt, path, with_training_state=False)
    return path


def write_model(path: Path, run_id: str = "test-run", seed: int = 0) -> Path:
    """A tiny real served model: :func:`write_checkpoint` exported by ``training.export`` to ONNX at
    ``path`` with the suffix ``.onnx`` (the checkpoint beside it, suffix ``.pt``); the ONNX path."""
    checkpoint = write_checkpoint(path.with_suffix(".pt"), run_id=run_id, seed=seed)
    return export_onnx(load_checkpoint(checkpoint), path.with_suffix(".onnx"))


def write_mismatched_model(path: Path, run_id: str = "test-run") -> Path:
    """:func:`write_model` whose metadata names 5 classes while its graph gives 7 scores."""
    import onnx

    write_model(path, run_id=run_id)
    graph = onnx.load(str(path))
    for prop in graph.metadata_props:
        if prop.key == "classes":
            prop.value = json.dumps(["a", "b", "c", "d", "e"])
    onnx.save(graph, str(path))
    return path


def publish(prefix: str, tmp_path: Path, run_id: str, seed: int = 0) -> Path:
    """Publish a tiny model as run ``run_id`` under ``prefix``; the local ONNX file it came from."""
    model = write_model(tmp_path / run_id / "model.onnx", run_id=run_id, seed=seed)
    publish_promoted(prefix, run_id, {"model.onnx": model}, model_name="model.onnx", metrics={"val_accuracy": 0.5})
    return model


@contextmanager
def running_app(monkeypatch: pytest.MonkeyPatch, **env: str) -> Iterator[TestClient]:
    """A new app, created with ``env`` set, its lifespan running for the ``with`` block."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with TestClient(create_app()) as client:
        yield client


@contextmanager
def uvicorn_server(log_path: Path, ready_timeout: float = 90.0, **env: str) -> Iterator[str]:
    """The real app (``app.main:serve_app``) served by a uvicorn process on a 127.0.0.1 port it was
    handed already listening (:func:`bench.service.start_uvicorn`), with ``env`` added to this
    process's environment. Yields the base URL once ``/readyz`` answers 200; the server's output goes
    to ``log_path`` and is shown if it dies before that."""

    def start(log_file: IO[bytes]) -> tuple[str, subprocess.Popen[bytes]]:
        return start_uvicorn([*SERVICE_ARGS, "--log-level", "warning"], env={**os.environ, **env}, stdout=log_file)

    with _serving(start, log_path, ready_timeout) as (base, _):
        yield base


class PortTaken(Exception):
    """Another process bound the port between :func:`tests.conftest.free_port` and the server."""


@contextmanager
def serve_process(log_path: Path, ready_timeout: float = 90.0, **env: str) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """The service image's entry point, ``python -m app.serve``, on a free ``PORT``: as
    :func:`uvicorn_server`, and the process is yielded too (to be signalled). ``app.serve`` binds
    the port itself, so another process may take it first: then it starts again on another."""

    def start(log_file: IO[bytes]) -> tuple[str, subprocess.Popen[bytes]]:
        port = free_port()
        command = [sys.executable, "-m", "app.serve"]
        proc = subprocess.Popen(
            command, cwd=ROOT, env={**os.environ, **env, "PORT": str(port)}, stdout=log_file, stderr=subprocess.STDOUT
        )
        return f"http://127.0.0.1:{port}", proc

    for attempt in range(1, BIND_ATTEMPTS + 1):
        try:
            with _serving(start, log_path, ready_timeout) as served:
                yield served
            return
        except PortTaken:
            if attempt == BIND_ATTEMPTS:
                raise


BIND_ATTEMPTS = 3


@contextmanager
def _serving(
    start: Callable[[IO[bytes]], tuple[str, subprocess.Popen[bytes]]], log_path: Path, ready_timeout: float
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    with log_path.open("wb") as log_file:
        base, proc = start(log_file)
        try:
            deadline = time.monotonic() + ready_timeout
            while True:
                if proc.poll() is not None:
                    log = log_path.read_text(errors="replace")
                    if "address already in use" in log.lower():
                        raise PortTaken(log)
                    raise AssertionError(f"the server exited with {proc.returncode} before it was ready:\n{log}")
                try:
                    if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, f"the server did not become ready in {ready_timeout:.0f} s"
                time.sleep(0.2)
            yield base, proc
        finally:
            stop(proc)


def encode(image: Image.Image, fmt: str, **params: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **params)
    return buf.getvalue()


def face_pixels(width: int = 64, height: int = 48) -> np.ndarray:
    """A uint8 gradient with a bright block: not constant, so equalisation has work to do."""
    ys, xs = np.mgrid[0:height, 0:width]
    img = ((xs * 3 + ys * 2) % 200).astype(np.uint8)
    img[height // 4 : height // 2, width // 4 : width // 2] = 250
    return img


def gray_png() -> bytes:
    return encode(Image.fromarray(face_pixels(), mode="L"), "PNG")


def post_image(
    client: TestClient,
    data: bytes,
    name: str = "face.png",
    detect: bool | None = None,
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    """``POST /predict``; ``detect`` is sent only when given (the server's default is true)."""
    params = {} if detect is None else {"detect": str(detect).lower()}
    return client.post("/predict", files={"file": (name, data, "application/octet-stream")}, params=params, headers=headers)


def post_batch(client: TestClient, files: Sequence[tuple[str, bytes]], detect: bool | None = None) -> httpx.Response:
    params = {} if detect is None else {"detect": str(detect).lower()}
    parts = [("files", (name, data, "application/octet-stream")) for name, data in files]
    return client.post("/predict/batch", files=parts, params=params)


# --- what the service says about its model ------------------------------------------------------


def scrape(client: httpx.Client) -> dict[str, list[Sample]]:
    """``/metrics`` of the app behind ``client`` (a ``TestClient`` or a client of a real server)."""
    text = client.get("/metrics").text
    return {family.name: family.samples for family in text_string_to_metric_families(text)}


def value(samples: dict[str, list[Sample]], family: str, name: str, **labels: str) -> float:
    (sample,) = [s for s in samples[family] if s.name == name and labels.items() <= s.labels.items()]
    return sample.value


def loads(client: httpx.Client) -> tuple[float, float, float]:
    """(successful loads, failed loads, retried attempts) from ``/metrics``."""
    metrics = scrape(client)
    return (
        value(metrics, "fer_model_loads", "fer_model_loads_total", result="success"),
        value(metrics, "fer_model_loads", "fer_model_loads_total", result="failure"),
        value(metrics, "fer_model_load_retries", "fer_model_load_retries_total"),
    )


def served_versions(client: httpx.Client) -> list[str]:
    """The ``version`` label of every ``fer_model_info`` series: one, the model being served."""
    return [s.labels["version"] for s in scrape(client)["fer_model_info"]]


def messages(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [rec.getMessage() for rec in caplog.records if rec.levelno == level]


def retry_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [m for m in messages(caplog, logging.WARNING) if "retrying in" in m]
