"""fercore.calibration and the temperature an export writes into the served model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from fercore.artifact import ModelLoadError, ServedModel
from fercore.calibration import (
    calibration_report,
    expected_calibration_error,
    fit_temperature,
    negative_log_likelihood,
    softmax,
)
from fercore.classifier import OnnxClassifier
from tests.utils.service import write_checkpoint, write_model
from training.export import export_for_serving


def sampled(logits: np.ndarray, temperature: float, seed: int = 0) -> np.ndarray:
    """Labels drawn from softmax(logits / temperature): a model that is overconfident by that factor."""
    rng = np.random.default_rng(seed)
    probs = softmax(logits, temperature).astype(np.float64)
    return np.asarray([rng.choice(len(p), p=p / p.sum()) for p in probs])


def test_fit_temperature_recovers_the_temperature_labels_were_drawn_at() -> None:
    logits = np.random.default_rng(1).normal(0, 4, size=(4000, 7)).astype(np.float32)
    labels = sampled(logits, 2.5)
    fitted = fit_temperature(logits, labels)
    assert fitted == pytest.approx(2.5, rel=0.1)
    # It is the minimum: either side is worse.
    nll = negative_log_likelihood(logits, labels, fitted)
    assert nll < negative_log_likelihood(logits, labels, fitted * 1.2)
    assert nll < negative_log_likelihood(logits, labels, fitted / 1.2)
    report = calibration_report(logits, labels, fitted)
    assert report["ece_calibrated"] < report["ece_uncalibrated"] / 2
    assert report["nll_calibrated"] < report["nll_uncalibrated"]


def test_softmax_at_a_temperature_keeps_the_argmax() -> None:
    logits = np.array([[3.0, 1.0, 0.0], [0.0, 0.5, 2.0]], dtype=np.float32)
    for t in (0.5, 1.0, 4.0):
        probs = softmax(logits, t)
        np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-6)
        assert probs.argmax(axis=1).tolist() == [0, 2]
    assert softmax(logits, 4.0).max() < softmax(logits, 1.0).max()  # a higher temperature is less sure


def test_expected_calibration_error() -> None:
    confidence = np.array([0.9, 0.9, 0.9, 0.9, 0.3, 0.3])
    correct = np.array([1, 1, 1, 0, 0, 1], dtype=bool)
    # Two bins: 0.9 confident and 75% right (gap 0.15, 4 of 6), 0.3 and 50% right (gap 0.2, 2 of 6).
    assert expected_calibration_error(confidence, correct) == pytest.approx(0.15 * 4 / 6 + 0.2 * 2 / 6)
    assert expected_calibration_error(np.array([]), np.array([], dtype=bool)) == 0.0


def test_the_served_model_applies_the_temperature_in_its_metadata(tmp_path: Path) -> None:
    path = write_model(tmp_path / "model.onnx")
    x = np.random.default_rng(0).normal(size=(3, 1, 48, 48)).astype(np.float32)
    plain = OnnxClassifier.load(path)
    assert plain.meta.temperature == 1.0  # a file without the key: uncalibrated
    graph = onnx.load(str(path))
    for prop in graph.metadata_props:
        if prop.key == "temperature":
            prop.value = "2.0"
    onnx.save(graph, str(path))
    warm = OnnxClassifier.load(path)
    np.testing.assert_allclose(warm.probabilities(x), softmax(plain.logits(x), 2.0), rtol=1e-5)


@pytest.mark.parametrize("bad", ["0", "-1", "nan", "inf", "hot"])
def test_a_model_with_an_unusable_temperature_is_refused(tmp_path: Path, bad: str) -> None:
    props = ServedModel.from_props(OnnxClassifier.load(write_model(tmp_path / "m.onnx")).meta.to_props(), "m").to_props()
    with pytest.raises(ModelLoadError, match=r"temperature|malformed"):
        ServedModel.from_props({**props, "temperature": bad}, "m.onnx")


def test_export_fits_a_temperature_on_the_validation_split_and_writes_it(tmp_path: Path, fer_zip: Path) -> None:
    checkpoint = write_checkpoint(tmp_path / "run" / "model.pt")
    export = export_for_serving(checkpoint, str(fer_zip))
    temperature = export.metrics["calibration_temperature"]
    assert temperature > 0 and export.metrics["calibration_ece_calibrated"] >= 0
    for name in ("model.onnx", "model.int8.onnx"):
        assert OnnxClassifier.load(export.files[name]).meta.temperature == pytest.approx(temperature)
