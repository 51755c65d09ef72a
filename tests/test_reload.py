"""Loading the model from GCS when GCS misbehaves, and replacing it while serving.

Everything here runs the real google-cloud-storage client against a real gcp-storage-emulator
process (the ``gcs`` fixture); "GCS down" is the client pointed at a port nobody listens on,
"GCS slow" one whose listener never answers. Runs are published with
:func:`fercore.registry.publish_promoted`, as training publishes them.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from google.cloud.storage import Bucket
from PIL import Image
from starlette.datastructures import State

from app.main import create_app
from app.model import Prediction
from app.settings import ConfigError
from fercore.registry import publish_promoted
from fercore.storage import sha256_file
from tests.conftest import refused_port
from tests.utils.service import (
    clean_service_env,
    gray_png,
    loads,
    messages,
    post_image,
    publish,
    retry_warnings,
    running_app,
    scrape,
    served_versions,
    write_mismatched_model,
    write_model,
)

TOKEN = "test-admin-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
FAST_RETRIES = {"MODEL_LOAD_RETRIES": "3", "MODEL_LOAD_BACKOFF_S": "0.01"}


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    clean_service_env(monkeypatch)


@pytest.fixture
def prefix(gcs: Bucket) -> str:
    return f"gs://{gcs.name}/models"


def publish_broken(prefix: str, tmp_path: Path, gcs: Bucket, run_id: str, how: str) -> None:
    """Publish run ``run_id`` whose model cannot be served, in one of three ways."""
    if how == "sha256_mismatch":  # latest.json names other bytes than the object holds
        publish(prefix, tmp_path, run_id)
        other = write_model(tmp_path / f"{run_id}-other.onnx", run_id=run_id, seed=99)
        gcs.blob(f"models/{run_id}/model.onnx").upload_from_filename(str(other))
    elif how == "not_a_model":
        junk = tmp_path / run_id / "model.onnx"
        junk.parent.mkdir(parents=True, exist_ok=True)
        junk.write_bytes(b"this is not an ONNX file")
        publish_promoted(prefix, run_id, {"model.onnx": junk}, model_name="model.onnx")
    elif how == "wrong_signature":  # the metadata names 5 classes, the graph gives 7 scores
        path = write_mismatched_model(tmp_path / run_id / "model.onnx", run_id=run_id)
        publish_promoted(prefix, run_id, {"model.onnx": path}, model_name="model.onnx")
    else:
        raise ValueError(how)


REFUSALS = {
    "sha256_mismatch": "does not match",
    "not_a_model": "not a loadable ONNX model",
    "wrong_signature": "does not fit 5 classes",
}


def state(client: TestClient) -> State:
    """The app's ``app.state`` (``TestClient.app`` is typed as any ASGI app)."""
    app = client.app
    assert isinstance(app, FastAPI)
    return app.state


@pytest.fixture
def down_address() -> Iterator[str]:
    """An address that refuses every connection at once, for the length of the test: GCS down."""
    with refused_port() as port:
        yield f"http://127.0.0.1:{port}"


@pytest.fixture
def gcs_down(monkeypatch: pytest.MonkeyPatch, down_address: str) -> str:
    """The client pointed at :func:`down_address`."""
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", down_address)
    monkeypatch.setenv("GOOGLE_CLOUD_PROJECT", "test")
    return down_address


@pytest.fixture
def gcs_silent(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The client pointed at a port that accepts connections and never answers: GCS hanging."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)  # connections complete in the kernel's backlog; nothing reads them
        address = f"http://127.0.0.1:{listener.getsockname()[1]}"
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", address)
        monkeypatch.setenv("GOOGLE_CLOUD_PROJECT", "test")
        yield address


# --- startup ----------------------------------------------------------------------------


def test_gcs_prefix_resolves_latest_json(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, prefix: str) -> None:
    model = publish(prefix, tmp_path, "run-1")
    with running_app(monkeypatch, MODEL_URI=prefix) as client:
        assert client.get("/readyz").status_code == 200
        info = client.get("/model").json()
        assert (info["run_id"], info["version"], info["source"]) == ("run-1", "run-1", prefix)
        assert info["sha256"] == sha256_file(model)
        assert info["fallback"] is False and info["fallback_error"] is None
        assert info["last_reload_at"] is None and info["last_reload_error"] is None
        assert loads(client) == (1, 0, 0)


@pytest.mark.parametrize("how", list(REFUSALS))
def test_unservable_model_is_refused_without_retries(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, prefix: str, gcs: Bucket, caplog: pytest.LogCaptureFixture, how: str
) -> None:
    publish_broken(prefix, tmp_path, gcs, "run-1", how)
    with caplog.at_level(logging.INFO), running_app(monkeypatch, MODEL_URI=prefix, **FAST_RETRIES) as client:
        assert client.get("/healthz").status_code == 200
        assert client.get("/readyz").status_code == 503
        assert client.get("/model").status_code == 503
        assert loads(client) == (0, 1, 0)
    errors = messages(caplog, logging.ERROR)
    assert any("will not become ready" in m and REFUSALS[how] in m for m in errors), errors
    assert retry_warnings(caplog) == []  # a bad model is bad the next time too
    if how == "sha256_mismatch":  # the download was verified before its rename: nothing left behind
        assert not list(Path(os.environ["FER_CACHE_DIR"]).rglob("model.onnx"))


def test_unreachable_gcs_is_retried_then_unready(
    monkeypatch: pytest.MonkeyPatch, gcs_down: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO), running_app(monkeypatch, MODEL_URI="gs://bucket/models", **FAST_RETRIES) as client:
        assert client.get("/readyz").status_code == 503
        assert client.get("/readyz").json() == {"detail": "model not loaded"}
        assert loads(client) == (0, 1, 3)
    warnings = retry_warnings(caplog)
    assert [w.split(")")[0] for w in warnings] == [f"loading the model failed (attempt {n} of 4" for n in (1, 2, 3)]
    assert all("ConnectionError" in w for w in warnings)
    (error,) = messages(caplog, logging.ERROR)
    assert "will not become ready" in error and "gave up after 4 attempts" in error and "gs://bucket/models" in error


def test_hanging_gcs_times_out_and_is_retried(
    monkeypatch: pytest.MonkeyPatch, gcs_silent: str, caplog: pytest.LogCaptureFixture
) -> None:
    env = {"MODEL_LOAD_RETRIES": "1", "MODEL_LOAD_BACKOFF_S": "0.01", "GCS_TIMEOUT_S": "0.3"}
    started = time.monotonic()
    with caplog.at_level(logging.INFO), running_app(monkeypatch, MODEL_URI="gs://bucket/models", **env) as client:
        assert client.get("/readyz").status_code == 503
        assert loads(client) == (0, 1, 1)
    assert time.monotonic() - started < 20  # two attempts of 0.3 s each, not the client's 60 s x retries
    (warning,) = retry_warnings(caplog)
    assert "Timeout" in warning
    assert any("gave up after 2 attempts" in m for m in messages(caplog, logging.ERROR))


def test_fallback_to_bundled_when_gcs_is_down(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, prefix: str, caplog: pytest.LogCaptureFixture, down_address: str
) -> None:
    publish(prefix, tmp_path, "run-1")
    emulator = os.environ["STORAGE_EMULATOR_HOST"]
    bundled = write_model(tmp_path / "bundled.onnx", run_id="bundled-run", seed=5)
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", down_address)  # GCS down at startup
    env = {"FALLBACK_TO_BUNDLED": "true", "BUNDLED_MODEL_PATH": str(bundled), "ADMIN_TOKEN": TOKEN, **FAST_RETRIES}
    with caplog.at_level(logging.INFO), running_app(monkeypatch, MODEL_URI=prefix, **env) as client:
        assert client.get("/readyz").status_code == 200
        info = client.get("/model").json()
        assert (info["version"], info["source"], info["sha256"]) == ("bundled-run", str(bundled), sha256_file(bundled))
        assert info["fallback"] is True
        assert "gave up after 4 attempts" in info["fallback_error"] and "ConnectionError" in info["fallback_error"]
        assert post_image(client, gray_png(), detect=False).json()["model"]["version"] == "bundled-run"
        assert loads(client) == (1, 1, 3)  # MODEL_URI failed, the bundled model loaded
        assert served_versions(client) == ["bundled-run"]
        assert any("falling back to the bundled model" in m for m in messages(caplog, logging.ERROR))

        # GCS is back: a reload replaces the fallback with MODEL_URI's model.
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", emulator)
        r = client.post("/admin/reload", headers=AUTH)
        assert r.json() == {"reloaded": True, "version": "run-1", "error": None}
        info = client.get("/model").json()
        assert (info["version"], info["fallback"], info["fallback_error"]) == ("run-1", False, None)
        assert served_versions(client) == ["run-1"]


def test_without_fallback_a_failed_load_stays_unready(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, gcs_down: str) -> None:
    bundled = write_model(tmp_path / "bundled.onnx", run_id="bundled-run")
    env = {"BUNDLED_MODEL_PATH": str(bundled), **FAST_RETRIES}  # FALLBACK_TO_BUNDLED defaults to false
    with running_app(monkeypatch, MODEL_URI="gs://bucket/models", **env) as client:
        assert client.get("/readyz").status_code == 503


def test_fallback_also_covers_a_refused_model(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, prefix: str, gcs: Bucket) -> None:
    publish_broken(prefix, tmp_path, gcs, "run-1", "sha256_mismatch")
    bundled = write_model(tmp_path / "bundled.onnx", run_id="bundled-run")
    env = {"FALLBACK_TO_BUNDLED": "true", "BUNDLED_MODEL_PATH": str(bundled)}
    with running_app(monkeypatch, MODEL_URI=prefix, **env) as client:
        info = client.get("/model").json()
        assert info["version"] == "bundled-run" and info["fallback"] is True
        assert "does not match" in info["fallback_error"] and "gave up" not in info["fallback_error"]
        assert loads(client) == (1, 1, 0)


# --- reload -----------------------------------------------------------------------------


def test_admin_reload_serves_a_newer_run(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, prefix: str) -> None:
    publish(prefix, tmp_path, "run-1")
    with running_app(monkeypatch, MODEL_URI=prefix, ADMIN_TOKEN=TOKEN) as client:
        assert client.get("/model").json()["version"] == "run-1"
        run2 = publish(prefix, tmp_path, "run-2", seed=1)
        r = client.post("/admin/reload", headers=AUTH)
        assert r.status_code == 200
        assert r.json() == {"reloaded": True, "version": "run-2", "error": None}
        info = client.get("/model").json()
        assert (info["run_id"], info["sha256"]) == ("run-2", sha256_file(run2))
        assert info["last_reload_at"] and info["last_reload_error"] is None
        assert post_image(client, gray_png(), detect=False).json()["model"]["version"] == "run-2"
        metrics = scrape(client)
        (series,) = metrics["fer_model_info"]  # the run-1 series is gone
        assert series.labels == {"version": "run-2", "run_id": "run-2", "architecture": "compact", "sha256": sha256_file(run2)}
        assert loads(client) == (2, 0, 0)


def test_reload_of_the_same_run_loads_nothing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, prefix: str) -> None:
    publish(prefix, tmp_path, "run-1")
    with running_app(monkeypatch, MODEL_URI=prefix, ADMIN_TOKEN=TOKEN) as client:
        before = state(client).predictor
        r = client.post("/admin/reload", headers=AUTH)
        assert r.status_code == 200
        assert r.json() == {"reloaded": False, "version": "run-1", "error": None}
        assert state(client).predictor is before
        info = client.get("/model").json()
        assert info["last_reload_at"] and info["last_reload_error"] is None
        assert loads(client) == (1, 0, 0)


@pytest.mark.parametrize("how", list(REFUSALS))
def test_failed_reload_keeps_serving_the_old_model(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, prefix: str, gcs: Bucket, caplog: pytest.LogCaptureFixture, how: str
) -> None:
    run1 = publish(prefix, tmp_path, "run-1")
    with running_app(monkeypatch, MODEL_URI=prefix, ADMIN_TOKEN=TOKEN) as client, caplog.at_level(logging.INFO):
        publish_broken(prefix, tmp_path, gcs, "run-2", how)
        r = client.post("/admin/reload", headers=AUTH)
        assert r.status_code == 200
        body = r.json()
        assert (body["reloaded"], body["version"]) == (False, "run-1") and REFUSALS[how] in body["error"]
        assert client.get("/readyz").status_code == 200
        info = client.get("/model").json()
        assert (info["version"], info["sha256"]) == ("run-1", sha256_file(run1))
        assert REFUSALS[how] in info["last_reload_error"] and info["last_reload_at"]
        assert post_image(client, gray_png(), detect=False).json()["model"]["version"] == "run-1"
        assert loads(client) == (1, 1, 0)  # one attempt: a reload is not retried
        assert served_versions(client) == ["run-1"]
        assert any("still serving run-1" in m for m in messages(caplog, logging.ERROR))

        # A good run afterwards is picked up, and the error is cleared.
        publish(prefix, tmp_path, "run-3", seed=3)
        assert client.post("/admin/reload", headers=AUTH).json() == {"reloaded": True, "version": "run-3", "error": None}
        assert client.get("/model").json()["last_reload_error"] is None


def test_reload_while_gcs_is_down_keeps_serving(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, prefix: str, down_address: str
) -> None:
    publish(prefix, tmp_path, "run-1")
    with running_app(monkeypatch, MODEL_URI=prefix, ADMIN_TOKEN=TOKEN, GCS_TIMEOUT_S="2") as client:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", down_address)
        body = client.post("/admin/reload", headers=AUTH).json()
        assert (body["reloaded"], body["version"]) == (False, "run-1") and "ConnectionError" in body["error"]
        assert client.get("/readyz").status_code == 200
        assert loads(client) == (1, 1, 0)


def test_in_flight_request_finishes_on_the_model_it_started_with(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, prefix: str
) -> None:
    publish(prefix, tmp_path, "run-1")
    env = {"ADMIN_TOKEN": TOKEN, "MAX_CONCURRENT_INFERENCES": "2"}  # a slot for the held request, one for the next
    with running_app(monkeypatch, MODEL_URI=prefix, **env) as client:
        old = state(client).predictor
        started, release = threading.Event(), threading.Event()
        classify = old.predict_faces

        def held(
            faces: Sequence[Image.Image],
        ) -> list[Prediction]:  # the run-1 model, stopped mid-inference until the swap is done
            started.set()
            assert release.wait(30)
            return classify(faces)

        old.predict_faces = held
        with ThreadPoolExecutor(2) as pool:
            in_flight = pool.submit(post_image, client, gray_png(), detect=False)
            assert started.wait(30)
            publish(prefix, tmp_path, "run-2", seed=1)
            assert client.post("/admin/reload", headers=AUTH).json()["reloaded"] is True
            # Sent while the old model's pass is held: with micro-batching (one forward pass at a
            # time) it is classified once that pass is done, by the new model.
            after = pool.submit(post_image, client, gray_png(), detect=False)
            release.set()
            r = in_flight.result(timeout=30)
            assert after.result(timeout=30).json()["model"]["version"] == "run-2"
        assert r.status_code == 200 and r.json()["model"]["version"] == "run-1"


def test_reload_from_a_local_folder(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    folder = tmp_path / "registry"
    publish(str(folder), tmp_path / "build", "run-1")
    with running_app(monkeypatch, MODEL_URI=str(folder), ADMIN_TOKEN=TOKEN) as client:
        assert client.post("/admin/reload", headers=AUTH).json()["reloaded"] is False
        publish(str(folder), tmp_path / "build", "run-2", seed=1)
        assert client.post("/admin/reload", headers=AUTH).json() == {"reloaded": True, "version": "run-2", "error": None}


def test_periodic_check_picks_up_a_new_run(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, prefix: str) -> None:
    publish(prefix, tmp_path, "run-1")
    with running_app(monkeypatch, MODEL_URI=prefix, RELOAD_INTERVAL_S="0.2") as client:
        task = state(client).loader._task
        assert task is not None and not task.done()
        assert client.get("/model").json()["version"] == "run-1"
        publish(prefix, tmp_path, "run-2", seed=1)
        deadline = time.monotonic() + 30
        while (info := client.get("/model").json())["version"] != "run-2":
            assert time.monotonic() < deadline, f"run-2 not picked up in 30 s: {info}"
            time.sleep(0.1)
        assert info["last_reload_at"] and info["last_reload_error"] is None
        assert served_versions(client) == ["run-2"]
    assert task.done()  # cancelled at shutdown


def test_no_periodic_check_by_default(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, prefix: str) -> None:
    publish(prefix, tmp_path, "run-1")
    with running_app(monkeypatch, MODEL_URI=prefix) as client:
        assert state(client).loader._task is None


# --- the admin endpoint's auth ----------------------------------------------------------


def test_admin_endpoint_is_absent_without_a_token(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, prefix: str) -> None:
    publish(prefix, tmp_path, "run-1")
    with running_app(monkeypatch, MODEL_URI=prefix) as client:
        r = client.post("/admin/reload", headers=AUTH)
        assert r.status_code == 404
        assert "/admin/reload" not in client.get("/openapi.json").json()["paths"]


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong-token-wrong-token"},
        {"Authorization": f"Bearer {TOKEN}x"},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": TOKEN},
    ],
    ids=["missing", "wrong", "longer", "basic", "no_scheme"],
)
def test_admin_endpoint_needs_the_token(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, prefix: str, headers: dict[str, str]
) -> None:
    publish(prefix, tmp_path, "run-1")
    with running_app(monkeypatch, MODEL_URI=prefix, ADMIN_TOKEN=TOKEN) as client:
        r = client.post("/admin/reload", headers=headers)
        assert r.status_code == 401
        assert r.headers["www-authenticate"] == "Bearer"
        assert r.json() == {"detail": "invalid or missing bearer token"}
        assert client.get("/model").json()["last_reload_at"] is None  # nothing was attempted
        assert client.post("/admin/reload", headers=AUTH).status_code == 200
        assert "/admin/reload" in client.get("/openapi.json").json()["paths"]


@pytest.mark.parametrize("token", ["short", "  short-token  \n"])
def test_weak_admin_token_stops_startup_without_echoing_it(monkeypatch: pytest.MonkeyPatch, token: str) -> None:
    monkeypatch.setenv("ADMIN_TOKEN", token)
    with pytest.raises(ConfigError, match="ADMIN_TOKEN") as caught:
        create_app()
    assert token.strip() not in str(caught.value)


def test_reload_settings_defaults_and_validation(monkeypatch: pytest.MonkeyPatch) -> None:
    from app.settings import BUNDLED_MODEL, Settings, load_settings

    settings = Settings()  # the environment is clean (_clean_env), but for INFERENCE_THREADS
    assert (settings.model_load_retries, settings.model_load_backoff_s, settings.gcs_timeout_s) == (3, 1.0, 30.0)
    assert (settings.fallback_to_bundled, settings.reload_interval_s, settings.admin_token) == (False, 0.0, None)
    assert settings.bundled_model_path == BUNDLED_MODEL
    monkeypatch.setenv("ADMIN_TOKEN", f" {TOKEN}\n")  # a secret file's trailing newline is not part of it
    token = load_settings().admin_token
    assert token is not None and token.get_secret_value() == TOKEN
    for name, bad in [
        ("MODEL_LOAD_RETRIES", "-1"),
        ("MODEL_LOAD_BACKOFF_S", "-0.5"),
        ("GCS_TIMEOUT_S", "0"),
        ("RELOAD_INTERVAL_S", "-1"),
    ]:
        monkeypatch.setenv(name, bad)
        with pytest.raises(ConfigError, match=name):
            load_settings()
        monkeypatch.delenv(name)
