"""Calibration: making ``confidence`` mean what it says (temperature scaling, Guo et al., 2017).

A network trained with cross-entropy (and label smoothing, and distillation at a temperature) is
not calibrated: among the faces it gives 0.8, it need not be right on 80%. Temperature scaling
divides the logits by one number T, fitted on held-out faces to minimise their negative
log-likelihood; the argmax, so the accuracy, does not change. The exporter fits T on the
validation split and writes it into the served model's metadata (:mod:`fercore.artifact`), which
:class:`fercore.classifier.OnnxClassifier` applies; the benchmarks report the expected calibration
error before and after. numpy only: the service imports this.
"""

from __future__ import annotations

import math

import numpy as np

ECE_BINS = 15
# The range T is searched in; a network this far off would need more than a temperature.
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.05, 20.0


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax of ``logits / temperature`` in float32, computed stably (max subtracted)."""
    z = logits.astype(np.float32) / np.float32(temperature)
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)  # type: ignore[no-any-return]


def negative_log_likelihood(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    """Mean -log p(label) of ``logits`` (N, classes) at ``temperature``."""
    z = logits.astype(np.float64) / temperature
    z -= z.max(axis=1, keepdims=True)
    log_probs = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-log_probs[np.arange(len(labels)), labels].mean())


def fit_temperature(logits: np.ndarray, labels: np.ndarray, iterations: int = 60) -> float:
    """The T that minimises the negative log-likelihood of ``labels``: a golden-section search on
    log T (the likelihood is unimodal in it), to a relative precision far below what matters."""
    if len(labels) == 0:
        return 1.0
    lo, hi = math.log(MIN_TEMPERATURE), math.log(MAX_TEMPERATURE)
    ratio = (math.sqrt(5) - 1) / 2
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = (negative_log_likelihood(logits, labels, math.exp(v)) for v in (a, b))
    for _ in range(iterations):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = negative_log_likelihood(logits, labels, math.exp(a))
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = negative_log_likelihood(logits, labels, math.exp(b))
    return math.exp((lo + hi) / 2)


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> float:
    """The gap between confidence and accuracy over equal-width confidence bins, weighted by their size."""
    if len(confidence) == 0:
        return 0.0
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.clip(np.digitize(confidence, edges[1:-1]), 0, bins - 1)
    total = 0.0
    for b in range(bins):
        inside = index == b
        if inside.any():
            total += inside.sum() * abs(float(confidence[inside].mean()) - float(correct[inside].mean()))
    return total / len(confidence)


def calibration_report(logits: np.ndarray, labels: np.ndarray, temperature: float) -> dict[str, float]:
    """ECE and negative log-likelihood of ``logits`` as they are and at ``temperature``."""
    report = {"temperature": temperature}
    for name, t in (("uncalibrated", 1.0), ("calibrated", temperature)):
        probs = softmax(logits, t)
        correct = probs.argmax(axis=1) == labels
        report[f"ece_{name}"] = expected_calibration_error(probs.max(axis=1), correct)
        report[f"nll_{name}"] = negative_log_likelihood(logits, labels, t)
    return report
