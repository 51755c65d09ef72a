"""The served model artefact: where it is, whether it is intact, and what it says about itself.

Training publishes a run as ``<prefix>/<run-id>/`` (the PyTorch checkpoint ``model.pt`` and its
ONNX exports) and points ``<prefix>/latest.json`` at the file the service runs, with its sha256
(:mod:`fercore.storage`). :func:`resolve_model` turns any model reference (a file, a folder holding
``latest.json``, or their ``gs://`` forms) into a verified local file: the service and the
evaluation both go through it, so both refuse the same tampered or half-copied model.

An ONNX file carries everything the service needs to run it in its metadata (``metadata_props``,
written by :mod:`training.export`): the class names, the preprocessing spec, the architecture and
the run's metrics. :func:`onnx_metadata` writes that map and :class:`ServedModel` reads it back.
Neither needs torch or onnx: the service reads the map through ONNX Runtime.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from fercore import storage
from fercore.preprocessing import PreprocessSpec

log = logging.getLogger(__name__)

ONNX_FORMAT = "fer-onnx"
ONNX_FORMAT_VERSION = 1
# Suffixes of a model file named directly (not through latest.json).
MODEL_SUFFIXES = (".onnx", ".pt")
_SHA256 = re.compile(r"[0-9a-f]{64}")


class ModelLoadError(RuntimeError):
    """The model cannot be used; the message says which file and why.

    ``transient``: trying again may succeed (GCS unreachable, a timeout, a 5xx). A corrupt or
    mismatching model is not transient: loading it again would refuse it again.
    """

    def __init__(self, message: str, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


@dataclass(frozen=True)
class ResolvedModel:
    """A local model file whose integrity is established, and where it came from."""

    path: Path
    sha256: str
    run_id: str = ""  # from latest.json; empty for a file named directly


def resolve_model(uri: str, timeout: float | None = None) -> ResolvedModel:
    """A verified local copy of the model ``uri`` names: a model file, a folder holding
    ``latest.json``, or their ``gs://`` forms (downloaded once into the cache).

    A model found through ``latest.json`` is refused unless its sha256 matches the pointer's.
    ``timeout``: seconds for each request to GCS, which then makes one try (the caller retries on
    a transient :class:`ModelLoadError`); None: the client's own timeouts and retries.
    """
    if storage.is_gcs(uri):
        return _fetch_gcs(uri, timeout)
    local = Path(uri).expanduser()
    if local.is_dir():
        path, pointer = _resolve_latest(local)
        actual = storage.sha256_file(path)
        if actual != pointer.sha256:
            raise ModelLoadError(
                f"{path}: sha256 {actual} does not match {pointer.sha256} in {local / storage.LATEST}; refusing to use it"
            )
        return ResolvedModel(path, actual, pointer.run_id)
    if local.is_file():
        return ResolvedModel(local, storage.sha256_file(local))
    raise ModelLoadError(f"{uri}: no such model file or folder")


def source_sha256(uri: str, timeout: float | None = None) -> str | None:
    """The sha256 of the model ``uri`` names right now, where that is known without fetching the
    model: the one in ``latest.json`` (folder or gs:// prefix), or a local file's own. None for
    a gs:// file (only a download tells) or a path that does not exist (loading it will say why).
    """
    if storage.is_gcs(uri):
        if uri.endswith(MODEL_SUFFIXES):
            return None
        try:
            return storage.read_latest(uri, timeout=timeout).sha256
        except Exception as exc:  # see _fetch_gcs
            raise ModelLoadError(
                f"{storage.join(uri, storage.LATEST)}: cannot read it ({type(exc).__name__}: {exc})",
                transient=storage.is_transient(exc),
            ) from None
    local = Path(uri).expanduser()
    if local.is_dir():
        try:
            return storage.read_latest(local).sha256
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"{local / storage.LATEST}: unreadable ({exc})") from None
    if local.is_file():
        return storage.sha256_file(local)
    return None


def _resolve_latest(folder: Path) -> tuple[Path, storage.LatestPointer]:
    """The model file ``folder/latest.json`` names, which must lie inside ``folder``."""
    try:
        pointer = storage.read_latest(folder)
    except FileNotFoundError:
        raise ModelLoadError(f"{folder}: folder has no {storage.LATEST}") from None
    except (OSError, ValueError) as exc:  # JSONDecodeError is a ValueError
        raise ModelLoadError(f"{folder / storage.LATEST}: unreadable ({exc})") from None
    path = Path(pointer.model_uri(folder)).resolve()
    if not path.is_relative_to(folder.resolve()):
        raise ModelLoadError(f"{folder / storage.LATEST}: model path {pointer.path!r} leaves the folder")
    if not path.is_file():
        raise ModelLoadError(f"{path}: named by {folder / storage.LATEST} but missing")
    return path, pointer


def _fetch_gcs(uri: str, timeout: float | None = None) -> ResolvedModel:
    """A verified local copy of a gs:// model."""
    try:
        if uri.endswith(MODEL_SUFFIXES):  # a file, not a prefix: nothing to verify it against
            path = storage.fetch_to_cache(uri, timeout=timeout)
            return ResolvedModel(path, storage.sha256_file(path))
        pointer = storage.read_latest(uri, timeout=timeout)
        if not _SHA256.fullmatch(pointer.sha256):
            raise ModelLoadError(f"{storage.join(uri, storage.LATEST)}: sha256 {pointer.sha256!r} is not a sha256 digest")
        dest = storage.cache_dir() / "models" / pointer.sha256 / PurePosixPath(pointer.path).name
        if dest.is_file() and storage.sha256_file(dest) == pointer.sha256:
            log.info("using cached %s for %s", dest, uri)
        else:
            log.info("downloading %s to %s", pointer.model_uri(uri), dest)
            storage.download(pointer.model_uri(uri), dest, expected_sha256=pointer.sha256, timeout=timeout)
        return ResolvedModel(dest, pointer.sha256, pointer.run_id)
    except ModelLoadError:
        raise
    except Exception as exc:  # network, auth, missing object, sha256 mismatch: all mean "cannot serve"
        # Only the network and GCS's 5xx are worth another try; a mismatch or a 404 is final.
        raise ModelLoadError(
            f"{uri}: cannot fetch the model ({type(exc).__name__}: {exc})", transient=storage.is_transient(exc)
        ) from None


# ---------------------------------------------------------------------------- ONNX metadata


@dataclass(frozen=True)
class ServedModel:
    """What an ONNX model file says about itself (its ``metadata_props``)."""

    classes: tuple[str, ...]
    preprocessing: PreprocessSpec
    architecture: dict[str, Any]  # {"name": registry name, "kwargs": {...}}
    precision: str  # "fp32" or "int8"
    run_id: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    created_at: str = ""
    code_version: str = ""
    dataset_fingerprint: str = ""
    # Softmax temperature fitted on the validation split (fercore.calibration); 1: uncalibrated, as
    # every file written before calibration existed (its metadata has no such key).
    temperature: float = 1.0

    @classmethod
    def from_props(cls, props: dict[str, str], where: str) -> ServedModel:
        """Parse and validate the metadata map; :class:`ModelLoadError` says what is wrong."""
        if props.get("format") != ONNX_FORMAT:
            raise ModelLoadError(f"{where}: not a {ONNX_FORMAT} model (no fer metadata; export it with training.export)")
        if props.get("format_version") != str(ONNX_FORMAT_VERSION):
            raise ModelLoadError(f"{where}: format version {props.get('format_version')!r} is not {ONNX_FORMAT_VERSION}")
        try:
            classes = tuple(json.loads(props["classes"]))
            model = cls(
                classes=classes,
                preprocessing=PreprocessSpec.from_dict(json.loads(props["preprocessing"])),
                architecture=dict(json.loads(props["architecture"])),
                precision=props["precision"],
                run_id=props.get("run_id", ""),
                metrics=dict(json.loads(props.get("metrics", "{}"))),
                created_at=props.get("created_at", ""),
                code_version=props.get("code_version", ""),
                dataset_fingerprint=props.get("dataset_fingerprint", ""),
                temperature=float(props.get("temperature", "1")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelLoadError(f"{where}: malformed metadata ({type(exc).__name__}: {exc})") from None
        if not classes or not all(isinstance(c, str) and c for c in classes) or len(set(classes)) != len(classes):
            raise ModelLoadError(f"{where}: class names must be unique non-empty strings")
        if not (math.isfinite(model.temperature) and model.temperature > 0):
            raise ModelLoadError(f"{where}: temperature must be a positive number, got {model.temperature!r}")
        return model

    def to_props(self) -> dict[str, str]:
        """The metadata map written into the ONNX file."""
        return {
            "format": ONNX_FORMAT,
            "format_version": str(ONNX_FORMAT_VERSION),
            "classes": json.dumps(list(self.classes)),
            "preprocessing": json.dumps(self.preprocessing.to_dict()),
            "architecture": json.dumps(self.architecture),
            "precision": self.precision,
            "run_id": self.run_id,
            "metrics": json.dumps(self.metrics),
            "created_at": self.created_at,
            "code_version": self.code_version,
            "dataset_fingerprint": self.dataset_fingerprint,
            "temperature": repr(self.temperature),
        }
