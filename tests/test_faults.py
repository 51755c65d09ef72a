"""GCS misbehaving between the real google-cloud-storage client and the bucket.

A fault-injecting proxy (:mod:`tests.utils.faultproxy`, the ``gcs_proxy`` fixture) sits between
the client and the gcp-storage-emulator: it refuses connections, answers 500 or 503, stalls
before or in the middle of a response, or cuts a download short, with or without the
``Content-Length`` and ``X-Goog-Hash`` headers that would let the client notice. Checked here:

* downloads: a body cut short never reaches the destination path, and leaves no temp file;
* the service's startup: transient faults are retried with backoff, then the model is served
  (or, when they last, the service stays unready or serves the bundled model);
* reloads: the old model keeps serving, ``GET /model`` and the metrics show the failure, and a
  later reload, once GCS behaves, serves the new model.

``tests/test_reload.py`` has the simpler cases (a refused port, a listener that never answers,
refused models); this file adds the faults only a proxy can make.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
from google.api_core import exceptions as api_exceptions
from google.cloud.storage import Bucket

from fercore import storage
from tests.utils.faultproxy import Fault, FaultProxy
from tests.utils.service import (
    clean_service_env,
    gray_png,
    loads,
    messages,
    post_image,
    publish,
    retry_warnings,
    running_app,
    write_model,
)

TOKEN = "test-admin-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
# Each request to GCS may take this long; a "slow" fault stalls for longer.
GCS_TIMEOUT_S = 2.0
STALL_S = 5.0
# Requests about objects: not the client's background fetches of bucket metadata, which come
# and go as they please (google.cloud.storage._bucket_metadata_cache).
OBJECTS = r"/o/"
MODEL_MEDIA = r"model\.onnx.*alt=media"  # the model's download, not its metadata nor latest.json

# name -> (fault, what the error message says). The first three hit the first request of a
# load, the read of latest.json; the others let it through and hit the model's download.
FAULTS: dict[str, tuple[Fault, str]] = {
    "500": (Fault("error", match=OBJECTS, status=500), "500"),
    "503": (Fault("error", match=OBJECTS, status=503), "503"),
    "slow": (Fault("slow", match=OBJECTS, delay_s=STALL_S), "timed out"),
    "slowbody": (Fault("slow", match=MODEL_MEDIA, delay_s=STALL_S, where="body"), "timed out"),
    "cut": (Fault("cut", match=MODEL_MEDIA), "IncompleteRead"),  # urllib3 counts the bytes
    "cutclose": (Fault("cut", match=MODEL_MEDIA, framing="close"), "Checksum mismatch"),  # the client's crc32c
    # No length, no checksum: only the size check in fercore.storage notices.
    "cutnohash": (Fault("cut", match=MODEL_MEDIA, framing="close", drop_headers=("x-goog-hash",)), "IncompleteDownload"),
}
CUTS = ["cut", "cutclose", "cutnohash"]


def fault(name: str, times: int | None = None) -> Fault:
    """A fresh copy of ``FAULTS[name]`` (a fault counts down its ``times``)."""
    return replace(FAULTS[name][0], times=times)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    clean_service_env(monkeypatch)


@pytest.fixture
def prefix(gcs_proxy: FaultProxy, gcs: Bucket) -> str:
    return f"gs://{gcs.name}/models"


def cached_files() -> list[Path]:
    """Every file in this test's download cache (FER_CACHE_DIR)."""
    return sorted(p for p in Path(os.environ["FER_CACHE_DIR"]).rglob("*") if p.is_file())


def assert_cache_holds_only(*models: Path) -> None:
    """The cache holds a verified copy of each of ``models`` and nothing else: no partial
    download, no temp file."""
    files = cached_files()
    assert sorted(storage.sha256_file(p) for p in files) == sorted(storage.sha256_file(m) for m in models), files
    assert all(p.name == "model.onnx" for p in files), files


# --- downloads ----------------------------------------------------------------------------


@pytest.mark.parametrize("how", CUTS)
@pytest.mark.parametrize("call", ["download", "fetch_to_cache"])
def test_cut_download_leaves_nothing(gcs_proxy: FaultProxy, gcs: Bucket, tmp_path: Path, how: str, call: str) -> None:
    data = os.urandom(200_000)
    gcs.blob("m/model.onnx").upload_from_string(data)
    uri = f"gs://{gcs.name}/m/model.onnx"
    dest = tmp_path / "dl" / "model.onnx"

    def fetch() -> Path:
        if call == "download":
            return storage.download(uri, dest, expected_sha256=hashlib.sha256(data).hexdigest(), timeout=GCS_TIMEOUT_S)
        return storage.fetch_to_cache(uri, timeout=GCS_TIMEOUT_S)

    gcs_proxy.inject(fault(how))
    with pytest.raises(Exception) as caught:
        fetch()
    assert storage.is_transient(caught.value), repr(caught.value)  # worth another try, not a bad object
    assert FAULTS[how][1] in f"{type(caught.value).__name__}: {caught.value}"
    assert len(gcs_proxy.seen(MODEL_MEDIA)) == 1  # the client did not retry by itself
    assert list(dest.parent.glob("*")) == []  # download's destination: no file, no temp file
    assert cached_files() == []  # fetch_to_cache's

    gcs_proxy.clear()
    path = fetch()
    assert path.read_bytes() == data
    assert len(list(path.parent.iterdir())) == 1


def test_cached_copy_of_the_wrong_size_is_fetched_again(gcs: Bucket) -> None:
    """A copy cut short, kept by a version without the size check, is not served from the cache."""
    data = os.urandom(50_000)
    gcs.blob("m/model.pt").upload_from_string(data)
    first = storage.fetch_to_cache(f"gs://{gcs.name}/m/model.pt")
    first.write_bytes(data[:1000])
    again = storage.fetch_to_cache(f"gs://{gcs.name}/m/model.pt")
    assert again == first and again.read_bytes() == data


def test_exhausted_client_retries_are_transient() -> None:
    """Without a ``timeout`` the client retries by itself and ends with a RetryError: as
    transient as its cause."""
    assert storage.is_transient(api_exceptions.RetryError("deadline", cause=ConnectionError("reset")))
    assert not storage.is_transient(api_exceptions.RetryError("deadline", cause=api_exceptions.NotFound("gone")))
    assert not storage.is_transient(api_exceptions.RetryError("deadline", cause=None))


# --- startup ------------------------------------------------------------------------------


@pytest.mark.parametrize("how", list(FAULTS))
def test_startup_retries_through_faults(
    monkeypatch: pytest.MonkeyPatch,
    gcs_proxy: FaultProxy,
    prefix: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    how: str,
) -> None:
    model = publish(prefix, tmp_path, "run-1")
    gcs_proxy.inject(fault(how, times=2))  # the first two attempts fail, the third succeeds
    env = {"MODEL_LOAD_RETRIES": "3", "MODEL_LOAD_BACKOFF_S": "0.01", "GCS_TIMEOUT_S": str(GCS_TIMEOUT_S)}
    with running_app(monkeypatch, MODEL_URI=prefix, **env) as client:
        assert client.get("/readyz").status_code == 200
        info = client.get("/model").json()
        assert (info["version"], info["sha256"], info["fallback"]) == ("run-1", storage.sha256_file(model), False)
        assert loads(client) == (1, 0, 2)
    warnings = retry_warnings(caplog)
    assert len(warnings) == 2 and all(FAULTS[how][1] in w for w in warnings), warnings
    assert_cache_holds_only(model)


def test_startup_waits_out_an_outage(monkeypatch: pytest.MonkeyPatch, gcs_proxy: FaultProxy, prefix: str, tmp_path: Path) -> None:
    publish(prefix, tmp_path, "run-1")
    gcs_proxy.down()  # connections refused until the loader says it will retry: then storage is back
    back = _OnRetry(gcs_proxy.up)
    loader_log = logging.getLogger("app.loader")
    loader_log.addHandler(back)
    try:
        env = {"MODEL_LOAD_RETRIES": "6", "MODEL_LOAD_BACKOFF_S": "0.2", "GCS_TIMEOUT_S": str(GCS_TIMEOUT_S)}
        with running_app(monkeypatch, MODEL_URI=prefix, **env) as client:
            assert client.get("/readyz").status_code == 200
            assert loads(client) == (1, 0, 1)  # refused once, loaded on the retry
    finally:
        loader_log.removeHandler(back)


class _OnRetry(logging.Handler):
    """Calls ``action`` when the model loader logs that it will retry."""

    def __init__(self, action: Callable[[], None]) -> None:
        super().__init__(logging.WARNING)
        self.action = action

    def emit(self, record: logging.LogRecord) -> None:
        if "retrying in" in record.getMessage():
            self.action()


@pytest.mark.parametrize("how", ["503", "cutnohash"])
@pytest.mark.parametrize("fallback", [True, False])
def test_startup_gives_up_on_lasting_faults(
    monkeypatch: pytest.MonkeyPatch,
    gcs_proxy: FaultProxy,
    prefix: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    how: str,
    fallback: bool,
) -> None:
    publish(prefix, tmp_path, "run-1")
    bundled = write_model(tmp_path / "bundled.onnx", run_id="bundled-run", seed=5)
    gcs_proxy.inject(fault(how))
    env = {"MODEL_LOAD_RETRIES": "2", "MODEL_LOAD_BACKOFF_S": "0.01", "GCS_TIMEOUT_S": str(GCS_TIMEOUT_S)}
    env |= {"FALLBACK_TO_BUNDLED": str(fallback).lower(), "BUNDLED_MODEL_PATH": str(bundled)}
    with running_app(monkeypatch, MODEL_URI=prefix, **env) as client:
        if fallback:
            assert client.get("/readyz").status_code == 200
            info = client.get("/model").json()
            assert (info["version"], info["fallback"]) == ("bundled-run", True)
            assert "gave up after 3 attempts" in info["fallback_error"] and FAULTS[how][1] in info["fallback_error"]
            assert loads(client) == (1, 1, 2)
        else:
            assert client.get("/readyz").status_code == 503
            assert loads(client) == (0, 1, 2)
    assert len(retry_warnings(caplog)) == 2
    assert cached_files() == []  # three downloads cut short, none kept


# --- reload -------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["down", *FAULTS])
def test_reload_fault(
    monkeypatch: pytest.MonkeyPatch,
    gcs_proxy: FaultProxy,
    prefix: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    how: str,
) -> None:
    run1 = publish(prefix, tmp_path, "run-1")
    env = {"ADMIN_TOKEN": TOKEN, "GCS_TIMEOUT_S": str(GCS_TIMEOUT_S)}
    with running_app(monkeypatch, MODEL_URI=prefix, **env) as client:
        run2 = publish(prefix, tmp_path, "run-2", seed=1)
        if how == "down":
            gcs_proxy.down()
        else:
            gcs_proxy.inject(fault(how))
        expected = "ConnectionError" if how == "down" else FAULTS[how][1]

        body = client.post("/admin/reload", headers=AUTH).json()
        assert (body["reloaded"], body["version"]) == (False, "run-1") and expected in body["error"], body
        info = client.get("/model").json()
        assert (info["version"], info["sha256"]) == ("run-1", storage.sha256_file(run1))
        assert info["last_reload_error"] == body["error"] and info["last_reload_at"]
        assert client.get("/readyz").status_code == 200
        assert post_image(client, gray_png(), detect=False).json()["model"]["version"] == "run-1"
        assert loads(client) == (1, 1, 0)  # a reload makes one attempt: the next reload is the retry
        assert any("still serving run-1" in m for m in messages(caplog, logging.ERROR))
        assert_cache_holds_only(run1)  # nothing of run-2's model, whole or partial

        gcs_proxy.up()
        gcs_proxy.clear()
        assert client.post("/admin/reload", headers=AUTH).json() == {"reloaded": True, "version": "run-2", "error": None}
        info = client.get("/model").json()
        assert (info["version"], info["last_reload_error"]) == ("run-2", None)
        assert loads(client) == (2, 1, 0)
    assert_cache_holds_only(run1, run2)
