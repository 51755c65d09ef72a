"""Models the service must refuse: a PyTorch checkpoint that would run code when unpickled, a
truncated ONNX file, one without the fer metadata, one whose metadata does not fit its graph, one
whose preprocessing would make the service allocate a huge input, one whose weights are kept in an
external file (which could name any file on disk), and a ``latest.json`` whose sha256 is not the
file's. Each is refused with a message saying why, at startup (the service stays unready, or serves
the bundled model with FALLBACK_TO_BUNDLED) and on a hot reload (``POST /admin/reload``: the old
model keeps serving, ``GET /model`` says what failed).

These use a local model folder (``latest.json`` + runs, as ``fercore.registry.publish_promoted`` writes
it); ``tests/test_reload.py`` covers broken runs through GCS. Also here: PyTorch checkpoints that
training, evaluation and the exporter must refuse (what they would allocate, their preprocessing).
"""

from __future__ import annotations

import json
import logging
import resource
from pathlib import Path

import onnx
import pytest
import torch
from onnx.external_data_helper import convert_model_to_external_data

from fercore.checkpoint import CheckpointError, build_model, load_checkpoint, make_checkpoint
from fercore.models import ModelConfig, create_model
from fercore.registry import publish_promoted
from fercore.storage import LATEST, sha256_file
from tests.utils.checkpoints import checkpoint_bytes
from tests.utils.service import clean_service_env, gray_png, post_image, running_app, write_mismatched_model, write_model

TOKEN = "hostile-ckpt-admin-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}

# What each broken run is refused with (a part of the message).
REFUSALS = {
    "pytorch_pickle": "a PyTorch checkpoint; the service runs ONNX models",
    "truncated": "not a loadable ONNX model",
    "no_metadata": "not a fer-onnx model",
    "wrong_signature": "does not fit 5 classes",
    "unsafe_preprocessing": "malformed metadata",
    "external_weights": "not a loadable ONNX model",
    "wrong_sha256": "does not match",
}


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    clean_service_env(monkeypatch)


class _Payload:
    """Pickles to a call of ``os.system``: what a malicious "checkpoint" carries."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        import os

        return (os.system, (f"touch {self.marker}",))


def publish_good(folder: Path, build: Path, run_id: str, seed: int = 0) -> Path:
    model = write_model(build / run_id / "model.onnx", run_id=run_id, seed=seed)
    publish_promoted(folder, run_id, {"model.onnx": model}, model_name="model.onnx")
    return folder / run_id / "model.onnx"


def _edit(path: Path, edit: object) -> None:
    graph = onnx.load(str(path))
    edit(graph)  # type: ignore[operator]
    onnx.save(graph, str(path))


def _set_prop(graph: onnx.ModelProto, key: str, value: str | None) -> None:
    props = {p.key: p.value for p in graph.metadata_props}
    if value is None:
        props.pop(key)
    else:
        props[key] = value
    del graph.metadata_props[:]
    for k, v in props.items():
        graph.metadata_props.add(key=k, value=v)


def _external_weights(path: Path) -> None:
    """Weights moved out of the graph into ``path``'s sibling file (ONNX's external data)."""
    graph = onnx.load(str(path))
    convert_model_to_external_data(graph, all_tensors_to_one_file=True, location="weights.bin", size_threshold=0)
    onnx.save(graph, str(path))


def publish_broken(folder: Path, build: Path, run_id: str, how: str, marker: Path) -> None:
    """Publish run ``run_id`` to the model folder ``folder`` (its latest.json now names it), broken ``how``."""
    path = build / run_id / "model.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    if how == "pytorch_pickle":  # never unpickled: any torch file is refused from its first bytes
        torch.save({"format": "fer-checkpoint", "format_version": 1, "state_dict": _Payload(marker)}, path)
    elif how == "wrong_signature":
        write_mismatched_model(path, run_id=run_id)
    else:
        write_model(path, run_id=run_id, seed=7)
    if how == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif how == "no_metadata":
        _edit(path, lambda g: _set_prop(g, "format", None))
    elif how == "unsafe_preprocessing":  # the warm-up would build a 10-gigapixel face
        spec = {"input_size": 100_000, "grayscale": True, "contrast": "equalize", "mean": 0.5, "std": 0.29}
        _edit(path, lambda g: _set_prop(g, "preprocessing", json.dumps(spec)))
    elif how == "external_weights":
        _external_weights(path)
    publish_promoted(folder, run_id, {"model.onnx": path}, model_name="model.onnx")
    if how == "wrong_sha256":
        pointer = json.loads((folder / LATEST).read_text())
        pointer["sha256"] = "0" * 64
        (folder / LATEST).write_text(json.dumps(pointer))


def error_messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [rec.getMessage() for rec in caplog.records if rec.levelno == logging.ERROR]


@pytest.mark.parametrize("how", list(REFUSALS))
def test_broken_model_at_startup(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture, how: str
) -> None:
    folder, marker = tmp_path / "registry", tmp_path / "pwned"
    publish_broken(folder, tmp_path / "build", "run-1", how, marker)

    with caplog.at_level(logging.ERROR), running_app(monkeypatch, MODEL_URI=str(folder)) as client:
        assert client.get("/healthz").status_code == 200
        assert client.get("/readyz").status_code == 503
        assert client.get("/model").status_code == 503
        assert post_image(client, gray_png(), detect=False).json() == {"detail": "model not loaded"}
    assert any("will not become ready" in m and REFUSALS[how] in m for m in error_messages(caplog)), error_messages(caplog)

    # The same model with FALLBACK_TO_BUNDLED: the bundled model serves, and /model says why.
    bundled = write_model(tmp_path / "bundled.onnx", run_id="bundled-run", seed=5)
    env = {"FALLBACK_TO_BUNDLED": "true", "BUNDLED_MODEL_PATH": str(bundled)}
    with running_app(monkeypatch, MODEL_URI=str(folder), **env) as client:
        assert client.get("/readyz").status_code == 200
        info = client.get("/model").json()
        assert (info["version"], info["fallback"]) == ("bundled-run", True)
        assert REFUSALS[how] in info["fallback_error"]
        assert post_image(client, gray_png(), detect=False).json()["model"]["version"] == "bundled-run"
    assert not marker.exists()


@pytest.mark.parametrize("how", list(REFUSALS))
def test_broken_model_on_reload_keeps_the_old_one(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture, how: str
) -> None:
    folder, build, marker = tmp_path / "registry", tmp_path / "build", tmp_path / "pwned"
    served = publish_good(folder, build, "run-1")
    with running_app(monkeypatch, MODEL_URI=str(folder), ADMIN_TOKEN=TOKEN) as client, caplog.at_level(logging.ERROR):
        publish_broken(folder, build, "run-2", how, marker)
        r = client.post("/admin/reload", headers=AUTH)
        assert r.status_code == 200
        body = r.json()
        assert (body["reloaded"], body["version"]) == (False, "run-1")
        assert REFUSALS[how] in body["error"], body["error"]
        info = client.get("/model").json()
        assert (info["version"], info["sha256"]) == ("run-1", sha256_file(served))
        assert REFUSALS[how] in info["last_reload_error"]
        assert client.get("/readyz").status_code == 200
        r = post_image(client, gray_png(), detect=False)
        assert r.status_code == 200 and r.json()["model"]["version"] == "run-1"
        assert any("still serving run-1" in m and REFUSALS[how] in m for m in error_messages(caplog))

        publish_good(folder, build, "run-3", seed=3)  # a good run afterwards is served, and the error cleared
        assert client.post("/admin/reload", headers=AUTH).json() == {"reloaded": True, "version": "run-3", "error": None}
        assert client.get("/model").json()["last_reload_error"] is None
    assert not marker.exists()


# --- checkpoints that would make loading allocate far more than the file holds -------------


def _max_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def test_architecture_far_larger_than_its_weights_is_refused_before_it_is_built() -> None:
    """A file with a tiny network's weights that names ``compact`` at width 400 (a 1.2 GB network):
    refused from the shapes alone, without the network ever being allocated."""
    weights = create_model("compact", width=4)
    ckpt = load_checkpoint(checkpoint_bytes(make_checkpoint(weights, ModelConfig("compact", {"width": 400}))))
    before = _max_rss_mib()
    with pytest.raises(
        CheckpointError, match=r"weights do not fit model 'compact' \(\{'width': 400\}, 7 classes\): .*of the wrong shape"
    ):
        build_model(ckpt)
    assert _max_rss_mib() - before < 200  # built for real, its weights alone would be ~1.2 GB


def test_missing_and_unexpected_weights_are_named() -> None:
    ckpt = make_checkpoint(create_model("compact", width=4), ModelConfig("compact", {"width": 4}))
    ckpt.state_dict["extra.weight"] = torch.zeros(1)
    del ckpt.state_dict["head.3.bias"]
    with pytest.raises(CheckpointError, match=r"1 missing \(first: head\.3\.bias\); 1 unexpected \(first: extra\.weight\)"):
        build_model(ckpt)


@pytest.mark.parametrize(
    ("field", "value"),
    [("input_size", 100_000), ("input_size", 0), ("input_size", 48.5), ("std", 0.0), ("mean", float("nan"))],
)
def test_preprocessing_that_would_break_serving_is_refused(field: str, value: object) -> None:
    """``input_size`` 100000 would make the warm-up build a 10-gigapixel face; a zero std divides by zero."""
    raw = make_checkpoint(create_model("compact", width=4), ModelConfig("compact", {"width": 4})).to_dict()
    raw["preprocessing"][field] = value
    with pytest.raises(CheckpointError, match=f"malformed field .*{field}"):
        load_checkpoint(_saved(raw))


def _saved(raw: dict) -> bytes:
    import io

    buf = io.BytesIO()
    torch.save(raw, buf)
    return buf.getvalue()
