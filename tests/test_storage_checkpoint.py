from __future__ import annotations

import ast
import json
import os
import pickle
from pathlib import Path

import pytest
import torch

from fercore import registry, storage
from fercore.checkpoint import CheckpointError, build_model, load_checkpoint, make_checkpoint, save_checkpoint
from fercore.labels import CLASS_NAMES
from fercore.models import ModelConfig, create_model
from fercore.preprocessing import PreprocessSpec
from tests.utils.checkpoints import checkpoint_bytes


def tiny_checkpoint(run_id: str = "run-1", width: int = 4):
    torch.manual_seed(0)
    model = create_model("compact", width=width)
    return make_checkpoint(model, ModelConfig("compact", {"width": width}), run_id=run_id, metrics={"val_accuracy": 0.5}), model


def test_checkpoint_round_trip_with_weights_only(tmp_path: Path) -> None:
    ckpt, model = tiny_checkpoint()
    path = tmp_path / "model.pt"
    save_checkpoint(ckpt, path)
    assert path.stat().st_mode & 0o777 == 0o644  # readable by the service's user, not only the writer's
    raw = torch.load(path, weights_only=True)  # plain tensors and builtins only
    assert raw["format"] == "fer-checkpoint" and raw["classes"] == list(CLASS_NAMES)
    loaded = load_checkpoint(path)
    assert loaded.preprocessing == PreprocessSpec() and loaded.run_id == "run-1"
    assert loaded.metrics == {"val_accuracy": 0.5} and loaded.created_at and loaded.code_version
    rebuilt = build_model(loaded)
    x = torch.randn(3, 1, 48, 48)
    torch.testing.assert_close(rebuilt(x), model.eval()(x))
    assert not rebuilt.training
    assert load_checkpoint(path.read_bytes()).model == ModelConfig("compact", {"width": 4})


def test_pickled_object_is_refused(tmp_path: Path) -> None:
    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    path = tmp_path / "evil.pt"
    torch.save({"format": "fer-checkpoint", "payload": Evil()}, path)
    with pytest.raises(CheckpointError, match="refused, not a plain-tensor checkpoint"):
        load_checkpoint(path)
    path.write_bytes(pickle.dumps(Evil()))
    with pytest.raises(CheckpointError):
        load_checkpoint(path)
    assert not (tmp_path / "pwned").exists()


def test_truncated_wrong_and_mismatching_checkpoints(tmp_path: Path) -> None:
    ckpt, _ = tiny_checkpoint()
    data = checkpoint_bytes(ckpt)
    with pytest.raises(CheckpointError, match="unreadable or truncated"):
        load_checkpoint(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="unreadable or truncated"):
        load_checkpoint(b"this is not a torch file")
    with pytest.raises(CheckpointError, match="no such file"):
        load_checkpoint(tmp_path / "missing.pt")
    path = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError, match="not a fer-checkpoint"):
        load_checkpoint(path)
    # Weights of one width declared as another architecture: refused when rebuilding.
    ckpt.model = ModelConfig("compact", {"width": 8})
    with pytest.raises(CheckpointError, match="weights do not fit model 'compact'"):
        build_model(load_checkpoint(checkpoint_bytes(ckpt)))
    raw = ckpt.to_dict()
    raw["format_version"] = 99
    torch.save(raw, path)
    with pytest.raises(CheckpointError, match="format version 99"):
        load_checkpoint(path)


def test_atomic_save_leaves_old_file_when_writing_fails(tmp_path: Path) -> None:
    ckpt, _ = tiny_checkpoint("old")
    path = tmp_path / "last.pt"
    save_checkpoint(ckpt, path)
    bad, _ = tiny_checkpoint("new")
    bad.metrics = {"oops": lambda: 0}  # torch.save cannot pickle it: fails half-way
    with pytest.raises((AttributeError, pickle.PicklingError)):
        save_checkpoint(bad, path)
    assert load_checkpoint(path).run_id == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temp file left behind


def _run_files(tmp_path: Path, run_id: str) -> dict[str, Path]:
    ckpt, _ = tiny_checkpoint(run_id)
    src = tmp_path / "src" / run_id
    save_checkpoint(ckpt, src / "model.pt", with_training_state=False)
    (src / "metrics.json").write_text(json.dumps({"val_accuracy": 0.5}))
    return {"model.pt": src / "model.pt", "metrics.json": src / "metrics.json"}


def test_publish_local_then_resolve_latest(tmp_path: Path) -> None:
    out = tmp_path / "out"
    p1 = registry.publish_promoted(out, "r1", _run_files(tmp_path, "r1"), metrics={"val_accuracy": 0.5})
    p2 = registry.publish_promoted(out, "r2", _run_files(tmp_path, "r2"))
    latest = storage.read_latest(out)
    assert latest == p2 and latest.path == "r2/model.pt"
    assert storage.sha256_file(latest.model_uri(out)) == latest.sha256
    assert load_checkpoint(latest.model_uri(out)).run_id == "r2"
    assert (out / p1.path).is_file()


def test_publish_to_gcs_and_resolve(gcs, tmp_path: Path) -> None:
    prefix = f"gs://{gcs.name}/models"
    registry.publish_promoted(prefix, "r1", _run_files(tmp_path, "r1"), metrics={"val_accuracy": 0.5})
    latest = storage.read_latest(prefix)
    assert latest.run_id == "r1" and latest.metrics == {"val_accuracy": 0.5}
    assert gcs.blob("models/r1/metrics.json").exists()
    dest = storage.download(latest.model_uri(prefix), tmp_path / "dl" / "model.pt", expected_sha256=latest.sha256)
    assert load_checkpoint(dest).run_id == "r1"


def test_gcs_download_with_wrong_sha_leaves_nothing(gcs, tmp_path: Path) -> None:
    prefix = f"gs://{gcs.name}/m"
    registry.publish_promoted(prefix, "r1", _run_files(tmp_path, "r1"))
    dest = tmp_path / "dl" / "model.pt"
    with pytest.raises(ValueError, match="does not match"):
        storage.download(f"{prefix}/r1/model.pt", dest, expected_sha256="0" * 64)
    assert not dest.exists() and list(dest.parent.iterdir()) == []


def test_failed_model_upload_never_moves_latest(gcs, tmp_path: Path) -> None:
    prefix = f"gs://{gcs.name}/m"
    registry.publish_promoted(prefix, "r1", _run_files(tmp_path, "r1"))
    files = _run_files(tmp_path, "r2")
    files["model.pt"].unlink()  # the upload of the model fails
    with pytest.raises(FileNotFoundError):
        registry.publish_promoted(prefix, "r2", files)
    latest = storage.read_latest(prefix)
    assert latest.run_id == "r1"
    assert gcs.blob(f"m/{latest.path}").exists()


def test_uri_helpers() -> None:
    assert storage.split_gcs("gs://b/a/b.pt") == ("b", "a/b.pt")
    assert storage.join("gs://b/p/", "r", "model.pt") == "gs://b/p/r/model.pt"
    with pytest.raises(ValueError):
        storage.split_gcs("gs:///x")


def test_publishing_serves_nothing(tmp_path: Path) -> None:
    """Publishing writes the run and its candidate pointer; serving it is the registry's (one direction:
    fercore.registry is built on fercore.storage, never the other way)."""
    out = tmp_path / "out"
    candidate = storage.publish_run(out, "r1", _run_files(tmp_path, "r1"), metrics={"val_accuracy": 0.5})
    assert not (out / storage.LATEST).exists()
    assert storage.read_run(out, "r1") == candidate and candidate.promotion == {}
    served = registry.publish_promoted(out, "r2", _run_files(tmp_path, "r2"))
    assert storage.read_latest(out) == served and served.run_id == "r2" and served.promotion
    imported = set()  # every module and name storage imports, inside functions too
    for node in ast.walk(ast.parse(Path(storage.__file__).read_text())):
        if isinstance(node, ast.Import | ast.ImportFrom):
            imported |= {node.module or ""} if isinstance(node, ast.ImportFrom) else set()
            imported |= {alias.name for alias in node.names}
    assert not any("registry" in name for name in imported)
