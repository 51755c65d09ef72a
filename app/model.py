"""The served model: a loaded checkpoint, its network in ``eval()`` mode, and where it came from.

Loading goes through :mod:`fercore` only: the checkpoint rebuilds its network through the
same registry training used, and faces are preprocessed with the spec saved inside it, so
serving cannot drift from training.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any, TypedDict

import numpy as np
import torch
from opentelemetry.trace import NoOpTracer, Tracer
from PIL import Image
from torch import nn

from fercore import storage
from fercore.checkpoint import Checkpoint, CheckpointError, build_model, load_checkpoint
from fercore.optimize import optimize_for_inference
from fercore.preprocessing import normalize, prepare_face

log = logging.getLogger(__name__)

_SHA256 = re.compile(r"[0-9a-f]{64}")


class ModelLoadError(RuntimeError):
    """The model at MODEL_URI cannot be served; the message says which file and why.

    ``transient``: trying again may succeed (GCS unreachable, a timeout, a 5xx). A corrupt or
    mismatching model is not transient: loading it again would refuse it again.
    """

    def __init__(self, message: str, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


class Prediction(TypedDict):
    emotion: str
    confidence: float
    scores: dict[str, float]  # class name -> probability, in the checkpoint's class order


@dataclass(frozen=True)
class ModelInfo:
    """What ``GET /model`` reports: which model answers and where it was loaded from."""

    version: str  # the run id, or the file's sha256 prefix when the checkpoint has none
    run_id: str
    source: str
    sha256: str
    architecture: str
    classes: tuple[str, ...]
    metrics: dict[str, Any] = field(default_factory=dict)
    preprocessing: dict[str, Any] = field(default_factory=dict)
    created_at: str = ""
    code_version: str = ""
    loaded_at: str = ""
    # Served in place of MODEL_URI's model, which failed to load for ``fallback_error``
    # (FALLBACK_TO_BUNDLED); empty when MODEL_URI's model is served.
    fallback_error: str = ""

    @property
    def fallback(self) -> bool:
        return bool(self.fallback_error)


class Predictor:
    """Classifies face crops: preprocess -> infer -> postprocess. Thread-safe (read-only model)."""

    def __init__(self, checkpoint: Checkpoint, model: nn.Module, info: ModelInfo) -> None:
        self.checkpoint = checkpoint
        self.model = model
        self.info = info
        self.spec = checkpoint.preprocessing
        self.classes = checkpoint.classes
        # Traces preprocess and inference; the app sets its own once the model is warmed up.
        self.tracer: Tracer = NoOpTracer()

    @classmethod
    def from_uri(cls, uri: str, timeout: float | None = None, optimize: bool = True) -> Predictor:
        """Load from a checkpoint file, a folder holding ``latest.json``, or their gs:// forms.

        A model found through ``latest.json`` is refused unless its sha256 matches the pointer.
        ``timeout``: seconds for each request to GCS, which makes one try (the caller retries
        on a transient :class:`ModelLoadError`); None: the client's own timeouts and retries.
        ``optimize``: see :meth:`from_file`.
        """
        if storage.is_gcs(uri):
            path, run_id, sha256 = _fetch_gcs(uri, timeout)
            return cls.from_file(path, source=uri, sha256=sha256, run_id=run_id, optimize=optimize)
        local = Path(uri).expanduser()
        if local.is_dir():
            path, pointer = _resolve_latest(local)
            actual = storage.sha256_file(path)
            if actual != pointer.sha256:
                raise ModelLoadError(
                    f"{path}: sha256 {actual} does not match {pointer.sha256} in {local / storage.LATEST}; refusing to serve it"
                )
            return cls.from_file(path, source=uri, sha256=actual, run_id=pointer.run_id, optimize=optimize)
        if local.is_file():
            return cls.from_file(local, source=uri, optimize=optimize)
        raise ModelLoadError(f"{uri}: no such checkpoint file or folder")

    @classmethod
    def from_file(cls, path: Path, source: str, sha256: str = "", run_id: str = "", optimize: bool = True) -> Predictor:
        """Load a checkpoint file whose integrity the caller has already established (if needed).

        ``optimize``: serve the network rewritten for CPU inference (BatchNorm folded, oneDNN
        convolutions with fused ReLU; see :mod:`fercore.optimize`), which gives the same
        probabilities up to float rounding; False: the network exactly as the checkpoint builds it.
        Either way in ``channels_last``: several times faster for one small face on a CPU thread.
        """
        try:
            checkpoint = load_checkpoint(path)
            model = build_model(checkpoint)
        except CheckpointError as exc:
            raise ModelLoadError(str(exc)) from None
        if optimize:
            size = checkpoint.preprocessing.input_size
            optimized = optimize_for_inference(model, (1, size, size))
            model = optimized.model
            if optimized.applied:
                log.info("%s: serving the network rewritten for inference: %s", source, ", ".join(optimized.applied))
            else:
                log.warning("%s: serving the plain network: %s", source, optimized.reason)
        else:
            model = model.to(memory_format=torch.channels_last)
        sha256 = sha256 or storage.sha256_file(path)
        run_id = checkpoint.run_id or run_id
        info = ModelInfo(
            version=run_id or f"sha256-{sha256[:12]}",
            run_id=run_id,
            source=source,
            sha256=sha256,
            architecture=checkpoint.model.name,
            classes=tuple(checkpoint.classes),
            metrics=dict(checkpoint.metrics),
            preprocessing=checkpoint.preprocessing.to_dict(),
            created_at=checkpoint.created_at,
            code_version=checkpoint.code_version,
            loaded_at=datetime.now(UTC).isoformat(timespec="seconds"),
        )
        return cls(checkpoint, model, info)

    def warm_up(self) -> None:
        """One dummy inference: allocates buffers now, and proves the output fits the classes."""
        size = self.spec.input_size
        try:
            self.predict_face(Image.new("L", (size, size), 128))
        except (RuntimeError, ValueError) as exc:
            raise ModelLoadError(f"{self.info.source}: warm-up inference failed: {exc}") from None

    def predict_face(self, face: Image.Image) -> Prediction:
        """Classify one face crop (any size, any mode Pillow can turn into grayscale)."""
        return self.predict_faces([face])[0]

    def predict_faces(self, faces: Sequence[Image.Image]) -> list[Prediction]:
        """Classify a batch of face crops in one forward pass."""
        if not faces:
            return []
        with self.tracer.start_as_current_span("preprocess", attributes={"fer.faces": len(faces)}):
            x = self.inputs(faces)
        with self.tracer.start_as_current_span("inference", attributes={"fer.batch_size": len(faces)}):
            probs = self.probabilities(x)
        return [self._postprocess(row) for row in probs.tolist()]

    def inputs(self, faces: Sequence[Image.Image]) -> np.ndarray:
        """The model input for ``faces``: float32 (N, 1, S, S), preprocessed with the model's spec."""
        crops = np.stack([prepare_face(face, self.spec) for face in faces])  # uint8 (N, S, S)
        return normalize(torch.from_numpy(crops), self.spec).numpy()

    def probabilities(self, x: np.ndarray) -> np.ndarray:
        """Class probabilities, float32 (N, num_classes), for model input ``x`` (see :meth:`inputs`)."""
        with torch.inference_mode():
            logits = self.model(torch.from_numpy(x).contiguous(memory_format=torch.channels_last))  # (N, num_classes)
            if logits.shape != (len(x), len(self.classes)):
                raise ValueError(f"model output shape {tuple(logits.shape)} does not fit {len(self.classes)} classes")
            return torch.softmax(logits.float(), dim=1).numpy()

    def _postprocess(self, probs: list[float]) -> Prediction:
        best = max(range(len(probs)), key=probs.__getitem__)
        return Prediction(
            emotion=self.classes[best],
            confidence=probs[best],
            scores=dict(zip(self.classes, probs, strict=True)),
        )


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


def source_sha256(uri: str, timeout: float | None = None) -> str | None:
    """The sha256 of the model ``uri`` names right now, where that is known without fetching the
    model: the one in ``latest.json`` (folder or gs:// prefix), or a local file's own. None for
    a gs:// file (only a download tells) or a path that does not exist (loading it will say why).
    """
    if storage.is_gcs(uri):
        if uri.endswith(".pt"):
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


def _fetch_gcs(uri: str, timeout: float | None = None) -> tuple[Path, str, str]:
    """A verified local copy of a gs:// model: (path, run_id, sha256)."""
    try:
        if uri.endswith(".pt"):  # a file, not a prefix: nothing to verify it against
            path = storage.fetch_to_cache(uri, timeout=timeout)
            return path, "", storage.sha256_file(path)
        pointer = storage.read_latest(uri, timeout=timeout)
        if not _SHA256.fullmatch(pointer.sha256):
            raise ModelLoadError(f"{storage.join(uri, storage.LATEST)}: sha256 {pointer.sha256!r} is not a sha256 digest")
        dest = storage.cache_dir() / "models" / pointer.sha256 / PurePosixPath(pointer.path).name
        if dest.is_file() and storage.sha256_file(dest) == pointer.sha256:
            log.info("using cached %s for %s", dest, uri)
        else:
            log.info("downloading %s to %s", pointer.model_uri(uri), dest)
            storage.download(pointer.model_uri(uri), dest, expected_sha256=pointer.sha256, timeout=timeout)
        return dest, pointer.run_id, pointer.sha256
    except ModelLoadError:
        raise
    except Exception as exc:  # network, auth, missing object, sha256 mismatch: all mean "cannot serve"
        # Only the network and GCS's 5xx are worth another try; a mismatch or a 404 is final.
        raise ModelLoadError(
            f"{uri}: cannot fetch the model ({type(exc).__name__}: {exc})", transient=storage.is_transient(exc)
        ) from None
