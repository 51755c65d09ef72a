"""An exported model run with ONNX Runtime: what the service serves and what the exporter checks.

:class:`OnnxClassifier` loads a ``fer-onnx`` file (:mod:`fercore.artifact`), checks that its graph
fits what its metadata says (input ``(N, 1, S, S)``, output ``(N, classes)``), and turns face crops
into class probabilities with the preprocessing stored inside it. ONNX Runtime's graph optimiser
folds BatchNorm into the convolutions and fuses the activations at load time.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image

from fercore.artifact import ModelLoadError, ServedModel
from fercore.calibration import softmax
from fercore.preprocessing import normalize, prepare_face

# PyTorch checkpoints are zip files; the service runs their ONNX exports instead.
_ZIP_MAGIC = b"PK\x03\x04"


class OnnxClassifier:
    """Face crops -> class probabilities. Thread-safe: ONNX Runtime sessions allow concurrent runs."""

    def __init__(self, session: ort.InferenceSession, meta: ServedModel) -> None:
        self.session = session
        self.meta = meta
        self.spec = meta.preprocessing
        self.classes = meta.classes
        self._input = session.get_inputs()[0].name

    @classmethod
    def load(cls, path: Path, threads: int = 1) -> OnnxClassifier:
        """Load ``path``; :class:`ModelLoadError` says why it cannot be served.

        The file is read into memory and the session built from its bytes: a graph that names
        external weight files (which could point anywhere on disk) cannot load them.
        ``threads``: ONNX Runtime's intra-op threads for one forward pass.
        """
        data = _read(path)
        if data.startswith(_ZIP_MAGIC):
            raise ModelLoadError(
                f"{path}: a PyTorch checkpoint; the service runs ONNX models: export it with "
                f"`python -m training.export --checkpoint {path} --data <FER2013>` and serve the .onnx file"
            )
        try:
            session = ort.InferenceSession(data, session_options(threads), providers=["CPUExecutionProvider"])
        except Exception as exc:  # ORT raises its own Fail/InvalidGraph/InvalidProtobuf... on bad files
            raise ModelLoadError(f"{path}: not a loadable ONNX model ({type(exc).__name__}: {_first_line(exc)})") from None
        meta = ServedModel.from_props(session.get_modelmeta().custom_metadata_map, str(path))
        _check_signature(session, meta, str(path))
        return cls(session, meta)

    def inputs(self, faces: Sequence[Image.Image]) -> np.ndarray:
        """The model input for ``faces``: float32 (N, 1, S, S), preprocessed with the model's spec."""
        crops = np.stack([prepare_face(face, self.spec) for face in faces])  # uint8 (N, S, S)
        return np.ascontiguousarray(normalize(crops, self.spec))

    def probabilities(self, x: np.ndarray) -> np.ndarray:
        """Class probabilities, float32 (N, classes), for model input ``x`` (see :meth:`inputs`), at
        the temperature the exporter calibrated (:mod:`fercore.calibration`)."""
        return softmax(self.logits(x), self.meta.temperature)

    def logits(self, x: np.ndarray) -> np.ndarray:
        """The graph's raw output, float32 (N, classes), for model input ``x``."""
        (logits,) = self.session.run(None, {self._input: x})  # (N, classes)
        if logits.shape != (len(x), len(self.classes)):
            raise ValueError(f"model output shape {logits.shape} does not fit {len(self.classes)} classes")
        return logits  # type: ignore[no-any-return]


def session_options(threads: int) -> ort.SessionOptions:
    """Options for a service-side session: ``threads`` intra-op threads that sleep when idle.

    ORT's threads spin after each run by default; in a service that is CPU taken from the next
    request's decoding and face detection, and with micro-batching there is always a next one.
    """
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def _check_signature(session: ort.InferenceSession, meta: ServedModel, where: str) -> None:
    """The graph takes one (N, 1, S, S) float input and gives (N, classes), as the metadata says."""
    inputs, outputs = session.get_inputs(), session.get_outputs()
    size = meta.preprocessing.input_size
    if len(inputs) != 1 or len(outputs) != 1:
        raise ModelLoadError(f"{where}: expected one input and one output, got {len(inputs)} and {len(outputs)}")
    if inputs[0].type != "tensor(float)" or list(inputs[0].shape[1:]) != [1, size, size]:
        raise ModelLoadError(f"{where}: input {inputs[0].type} {inputs[0].shape} is not float (N, 1, {size}, {size})")
    if list(outputs[0].shape[1:]) != [len(meta.classes)]:
        raise ModelLoadError(f"{where}: output {outputs[0].shape} does not fit {len(meta.classes)} classes")


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ModelLoadError(f"{path}: cannot read it ({exc.strerror or exc})") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__
