from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from bench.service import free_port
from tests.utils import synthetic

torch.set_num_threads(1)  # tiny models: threads cost more than they give, and CI has 2 cores


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test gets its own dataset/download cache, never the user's."""
    monkeypatch.setenv("FER_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture
def splits() -> dict:
    return synthetic.default_splits(per_class=6)


@pytest.fixture
def fer_zip(tmp_path: Path, splits: dict) -> Path:
    return synthetic.write_zip(tmp_path / "archive.zip", splits)


@contextmanager
def refused_port() -> Iterator[int]:
    """A 127.0.0.1 port that refuses every connection while the ``with`` block runs: bound here,
    never listened on, so no other process can start listening on it meanwhile."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield int(s.getsockname()[1])


def wait_for_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> bool:
    """Whether ``proc`` listens on ``port`` within ``timeout``; False if it exited first (e.g.
    another process took the port)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return True
        time.sleep(0.1)
    raise TimeoutError(f"nothing listening on port {port} after {timeout}s")


@pytest.fixture(scope="session")
def gcs_emulator() -> Iterator[str]:
    """A real gcp-storage-emulator process; the real google-cloud-storage client talks to it. It
    binds its port itself: if another process took that port first, it starts again on another."""
    for _ in range(3):
        port = free_port()
        command = [sys.executable, "-m", "gcp_storage_emulator", "start", "--host", "127.0.0.1", "--port", str(port)]
        proc = subprocess.Popen([*command, "--in-memory", "-q"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            if wait_for_port(port, proc):
                yield f"http://127.0.0.1:{port}"
                return
        finally:
            proc.terminate()
            proc.wait(timeout=10)
    raise RuntimeError("gcp-storage-emulator exited three times before listening")


@pytest.fixture
def gcs(gcs_emulator: str, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest):
    """A fresh bucket on the emulator, with the environment pointing the client at it."""
    from fercore import storage

    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_emulator)
    monkeypatch.setenv("GOOGLE_CLOUD_PROJECT", "test")
    client = storage.gcs_client()
    name = "b-" + request.node.name.lower().replace("_", "-").replace("[", "-").replace("]", "")[:40] + f"-{os.getpid()}"
    bucket = client.bucket(name)
    if not bucket.exists():
        client.create_bucket(name)
    return client.bucket(name)


@pytest.fixture
def model_path(tmp_path: Path) -> Path:
    """A tiny real served model (compact, width 4, exported to ONNX)."""
    from tests.utils.service import write_model

    return write_model(tmp_path / "model.onnx")


@pytest.fixture
def client(monkeypatch: pytest.MonkeyPatch, model_path: Path) -> Iterator:
    """The app on ``model_path``, its lifespan running."""
    from tests.utils.service import running_app

    with running_app(monkeypatch, MODEL_URI=str(model_path)) as c:
        yield c


@pytest.fixture
def gcs_proxy(gcs, gcs_emulator: str, monkeypatch: pytest.MonkeyPatch) -> Iterator:
    """``gcs``, with the client talking to the emulator through a fault-injecting proxy
    (:class:`tests.utils.faultproxy.FaultProxy`) that passes everything through until told otherwise."""
    from tests.utils.faultproxy import fault_proxy

    with fault_proxy(gcs_emulator) as proxy:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.url)
        yield proxy


@pytest.fixture(scope="module")
def module_monkeypatch() -> Iterator[pytest.MonkeyPatch]:
    """``monkeypatch`` for a module's shared fixtures: undone after its last test."""
    with pytest.MonkeyPatch.context() as patch:
        yield patch


@pytest.fixture(scope="module")
def bundled_client(module_monkeypatch: pytest.MonkeyPatch) -> Iterator:
    """The app on the bundled model, shared by a module's tests (a real classifier: skimage's
    astronaut is happy), its lifespan running."""
    from app.settings import BUNDLED_MODEL
    from tests.utils.service import clean_service_env, running_app

    clean_service_env(module_monkeypatch)
    with running_app(module_monkeypatch, MODEL_URI=str(BUNDLED_MODEL)) as c:
        yield c
