"""The served model: an exported ONNX graph run by ONNX Runtime, and where it came from.

Loading goes through :mod:`fercore` only: :func:`fercore.artifact.resolve_model` finds and verifies
the file, :class:`fercore.classifier.OnnxClassifier` runs it with the preprocessing spec and classes
stored inside it, so serving cannot drift from training. No torch here: training exports what the
service runs (:mod:`training.export`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypedDict

import numpy as np
from opentelemetry.trace import NoOpTracer, Tracer
from PIL import Image

from fercore import storage
from fercore.artifact import ModelLoadError, resolve_model, source_sha256
from fercore.classifier import OnnxClassifier

__all__ = ["ModelInfo", "ModelLoadError", "Prediction", "Predictor", "source_sha256"]

log = logging.getLogger(__name__)


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
    precision: str = ""  # of the served ONNX graph: "fp32" or "int8"

    @property
    def fallback(self) -> bool:
        return bool(self.fallback_error)


class Predictor:
    """Classifies face crops: preprocess -> infer -> postprocess. Thread-safe (read-only model)."""

    def __init__(self, classifier: OnnxClassifier, info: ModelInfo) -> None:
        self.classifier = classifier
        self.info = info
        self.spec = classifier.spec
        self.classes = classifier.classes
        # Traces preprocess and inference; the app sets its own once the model is warmed up.
        self.tracer: Tracer = NoOpTracer()

    @classmethod
    def from_uri(cls, uri: str, timeout: float | None = None, threads: int = 1) -> Predictor:
        """Load the ONNX model ``uri`` names: a file, a folder holding ``latest.json``, or their
        gs:// forms, verified as :func:`fercore.artifact.resolve_model` says. ``timeout``: seconds for
        each request to GCS (one try; the caller retries a transient :class:`ModelLoadError`).
        ``threads``: ONNX Runtime's intra-op threads for one forward pass."""
        resolved = resolve_model(uri, timeout)
        return cls.from_file(resolved.path, source=uri, sha256=resolved.sha256, run_id=resolved.run_id, threads=threads)

    @classmethod
    def from_file(cls, path: Path, source: str, sha256: str = "", run_id: str = "", threads: int = 1) -> Predictor:
        """Load a model file whose integrity the caller has already established (if needed)."""
        classifier = OnnxClassifier.load(path, threads)
        meta = classifier.meta
        sha256 = sha256 or storage.sha256_file(path)
        run_id = meta.run_id or run_id
        info = ModelInfo(
            version=run_id or f"sha256-{sha256[:12]}",
            run_id=run_id,
            source=source,
            sha256=sha256,
            architecture=str(meta.architecture.get("name", "")),
            classes=meta.classes,
            metrics=dict(meta.metrics),
            preprocessing=meta.preprocessing.to_dict(),
            created_at=meta.created_at,
            code_version=meta.code_version,
            loaded_at=datetime.now(UTC).isoformat(timespec="seconds"),
            precision=meta.precision,
        )
        return cls(classifier, info)

    def warm_up(self) -> None:
        """One dummy inference: allocates buffers now, and proves the output fits the classes."""
        size = self.spec.input_size
        try:
            self.predict_face(Image.new("L", (size, size), 128))
        except Exception as exc:  # ONNX Runtime's own errors, or an output that does not fit
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
        return self.classifier.inputs(faces)

    def probabilities(self, x: np.ndarray) -> np.ndarray:
        """Class probabilities, float32 (N, num_classes), for model input ``x`` (see :meth:`inputs`)."""
        return self.classifier.probabilities(x)

    def _postprocess(self, probs: list[float]) -> Prediction:
        best = max(range(len(probs)), key=probs.__getitem__)
        return Prediction(
            emotion=self.classes[best],
            confidence=probs[best],
            scores=dict(zip(self.classes, probs, strict=True)),
        )
