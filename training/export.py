r"""Export a checkpoint to what the service runs: ONNX (fp32) and a calibrated int8 version, each checked.

    python -m training.export --checkpoint runs/<run-id>/model.pt --data ../shared/data/fer2013.zip

writes ``model.onnx`` and ``model.int8.onnx`` beside the checkpoint and says which one to serve:

* fp32: ``torch.onnx.export`` with a dynamic batch axis, checked against the PyTorch network on
  real faces (largest difference of any class probability, which must stay under
  :data:`MAX_PROB_DIFF`);
* int8: ONNX Runtime's static quantisation (QDQ, per-channel int8 weights, uint8 activations
  calibrated on :data:`CALIBRATION_FACES` training faces), checked by validation accuracy beside
  the fp32 model's. It is served only if it loses at most ``--int8-tolerance`` (default 0.5 point);
  otherwise the fp32 model is, and the export says so;
* calibration: a softmax temperature fitted on the validation split with the served file's logits
  (:mod:`fercore.calibration`), written into both files, so that the service's ``confidence`` means
  what it says; the expected calibration error before and after goes into the metrics.

Both files carry the classes, preprocessing, architecture and metrics in their metadata
(:class:`fercore.artifact.ServedModel`): the service needs nothing else. Training calls
:func:`export_for_serving` when it publishes a run.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static

from fercore.artifact import ServedModel
from fercore.calibration import calibration_report, fit_temperature
from fercore.checkpoint import Checkpoint, build_model, load_checkpoint
from fercore.classifier import OnnxClassifier
from fercore.preprocessing import normalize
from fercore.storage import atomic_write
from training.data import FerData, Split, load_fer2013, train_val_split

log = logging.getLogger(__name__)

FP32_NAME = "model.onnx"
INT8_NAME = "model.int8.onnx"
OPSET = 17
# Training faces the int8 activation ranges are calibrated on (seeded sample).
CALIBRATION_FACES = 512
# Accuracy the int8 model may lose against fp32 on the validation split and still be served.
DEFAULT_INT8_TOLERANCE = 0.005
# Largest difference of any class probability between ONNX fp32 and PyTorch: float rounding only.
MAX_PROB_DIFF = 1e-4


class ExportError(RuntimeError):
    """The exported model does not match the checkpoint."""


@dataclass(frozen=True)
class Export:
    """The files a run publishes for serving, which one the service runs, and the checks' figures."""

    files: dict[str, Path]  # published name -> local file (model.pt, model.onnx, model.int8.onnx)
    serve: str  # the name of the file the service runs
    metrics: dict[str, Any]


def export_for_serving(
    checkpoint_path: Path, data: FerData | str | None, int8_tolerance: float = DEFAULT_INT8_TOLERANCE, threads: int = 1
) -> Export:
    """Write ``model.onnx`` (and, given data to calibrate and check it on, ``model.int8.onnx``)
    beside ``checkpoint_path``; each is checked as the module docstring says."""
    ckpt = load_checkpoint(checkpoint_path)
    folder = checkpoint_path.parent
    fp32 = export_onnx(ckpt, folder / FP32_NAME)
    files = {"model.pt": checkpoint_path, FP32_NAME: fp32}
    if data is None:
        metrics: dict[str, Any] = {"served_precision": "fp32", "int8": "not exported: no data to calibrate it on"}
        log.warning("no --data: exported fp32 only (int8 needs training faces to calibrate on)")
        _write_metadata(fp32, ckpt, "fp32", metrics)
        return Export(files, FP32_NAME, metrics)
    if isinstance(data, str):
        data = load_fer2013(data, ckpt.preprocessing)
    train, val, val_desc = train_val_split(data)
    model = build_model(ckpt)
    metrics = {"onnx_max_prob_diff": _max_prob_diff(model, fp32, val, threads), "export_val_split": val_desc}
    int8 = quantize_int8(fp32, folder / INT8_NAME, _calibration_inputs(train, ckpt), threads)
    metrics["onnx_fp32_val_accuracy"] = accuracy(OnnxClassifier.load(fp32, threads), val)
    metrics["onnx_int8_val_accuracy"] = accuracy(OnnxClassifier.load(int8, threads), val)
    loss = metrics["onnx_fp32_val_accuracy"] - metrics["onnx_int8_val_accuracy"]
    serve = INT8_NAME if loss <= int8_tolerance else FP32_NAME
    metrics["served_precision"] = "int8" if serve == INT8_NAME else "fp32"
    if serve == FP32_NAME:
        log.warning("int8 loses %.2f points of accuracy (tolerance %.2f): serving fp32", 100 * loss, 100 * int8_tolerance)
    files[INT8_NAME] = int8
    logits = val_logits(OnnxClassifier.load(folder / serve, threads), val)  # the served file's, calibrated
    calibration = calibration_report(logits, val.labels, fit_temperature(logits, val.labels))
    metrics.update({f"calibration_{key}": value for key, value in calibration.items()})
    for path, precision in ((fp32, "fp32"), (int8, "int8")):
        _write_metadata(path, ckpt, precision, metrics, calibration["temperature"])
    log.info("export: %s", json.dumps(metrics))
    return Export(files, serve, metrics)


def export_onnx(ckpt: Checkpoint, path: Path) -> Path:
    """The checkpoint's network as an fp32 ONNX graph with a dynamic batch axis, at ``path``."""
    model = build_model(ckpt)
    size = ckpt.preprocessing.input_size
    dummy = torch.zeros(1, 1, size, size)
    # The TorchScript exporter: one self-contained file (weights inline), BatchNorm folded in eval
    # mode, and fast (the torch.export-based one takes ~3x as long and writes weights apart by
    # default). torch 2.9+ warns that it is legacy: that warning is expected here.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        _export(model, dummy, path)
    _write_metadata(path, ckpt, "fp32", {})
    return path


def _export(model: torch.nn.Module, dummy: torch.Tensor, path: Path) -> None:
    torch.onnx.export(
        model,
        (dummy,),
        str(path),
        dynamo=False,
        opset_version=OPSET,
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
    )


class _Faces(CalibrationDataReader):
    """Calibration batches for ONNX Runtime's quantiser."""

    def __init__(self, inputs: np.ndarray, batch_size: int = 64) -> None:
        self._batches = iter([{"input": inputs[i : i + batch_size]} for i in range(0, len(inputs), batch_size)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


def quantize_int8(fp32: Path, path: Path, calibration: np.ndarray, threads: int = 1) -> Path:
    """Static int8 quantisation of ``fp32`` (QDQ, per-channel weights), calibrated on ``calibration``."""
    quantize_static(
        str(fp32),
        str(path),
        _Faces(calibration),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        weight_type=QuantType.QInt8,
        activation_type=QuantType.QUInt8,
        calibrate_method=CalibrationMethod.MinMax,
    )
    return path


def accuracy(classifier: OnnxClassifier, split: Split, batch_size: int = 512) -> float:
    """Top-1 accuracy of ``classifier`` on the preprocessed faces of ``split``."""
    return float((val_logits(classifier, split, batch_size).argmax(1) == split.labels).mean())


def val_logits(classifier: OnnxClassifier, split: Split, batch_size: int = 512) -> np.ndarray:
    """``classifier``'s raw outputs (N, classes) on the preprocessed faces of ``split``."""
    return np.concatenate(
        [classifier.logits(_inputs(split.images[i : i + batch_size], classifier)) for i in range(0, len(split), batch_size)]
    )


def _inputs(images: np.ndarray, classifier: OnnxClassifier) -> np.ndarray:
    return np.ascontiguousarray(normalize(images, classifier.spec))


def _calibration_inputs(train: Split, ckpt: Checkpoint, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(train), size=min(CALIBRATION_FACES, len(train)), replace=False)
    return np.ascontiguousarray(normalize(train.images[np.sort(idx)], ckpt.preprocessing))


def _max_prob_diff(model: torch.nn.Module, fp32: Path, val: Split, threads: int, faces: int = 512) -> float:
    """Largest |p_onnx - p_torch| over the first ``faces`` validation faces and every class."""
    classifier = OnnxClassifier.load(fp32, threads)
    x = _inputs(val.images[:faces], classifier)
    with torch.inference_mode():
        expected = torch.softmax(model(torch.from_numpy(x)).float(), 1).numpy()
    diff = float(np.abs(classifier.probabilities(x) - expected).max())
    if diff > MAX_PROB_DIFF:
        raise ExportError(f"{fp32}: ONNX probabilities differ from PyTorch's by {diff:.2e} (> {MAX_PROB_DIFF})")
    return diff


def _write_metadata(
    path: Path, ckpt: Checkpoint, precision: str, export_metrics: dict[str, Any], temperature: float = 1.0
) -> None:
    """Write the fer metadata (:class:`ServedModel`) into the ONNX file at ``path``, atomically."""
    meta = ServedModel(
        classes=tuple(ckpt.classes),
        preprocessing=ckpt.preprocessing,
        architecture=ckpt.model.to_dict(),
        precision=precision,
        run_id=ckpt.run_id,
        metrics={**ckpt.metrics, **export_metrics},
        created_at=ckpt.created_at,
        code_version=ckpt.code_version,
        dataset_fingerprint=ckpt.dataset_fingerprint,
        temperature=temperature,
    )
    graph = onnx.load(str(path))
    del graph.metadata_props[:]
    for key, value in meta.to_props().items():
        graph.metadata_props.add(key=key, value=value)
    with atomic_write(path) as f:
        f.write(graph.SerializeToString())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, type=Path, help="a model.pt (fer-checkpoint)")
    parser.add_argument("--data", help="FER2013 source: calibrates and checks the int8 model (without it: fp32 only)")
    parser.add_argument("--int8-tolerance", type=float, default=DEFAULT_INT8_TOLERANCE, help="accuracy int8 may lose (0.005)")
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads for the checks")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    result = export_for_serving(args.checkpoint, args.data, args.int8_tolerance, args.threads)
    print(json.dumps({"serve": str(result.files[result.serve]), **result.metrics}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
