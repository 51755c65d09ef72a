"""bench.overhead end to end with a handful of requests: the service and the floor over HTTP, the
forward pass and the plumbing in process, written as a result file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import overhead
from tests.utils.service import clean_service_env


@pytest.mark.slow
def test_overhead_benchmark(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    clean_service_env(monkeypatch)
    out = tmp_path / "overhead.json"
    argv = ["--rounds", "1", "--starts", "1", "--warmup", "2", "--requests", "5", "--plumbing-runs", "5", "--output", str(out)]
    assert overhead.main(argv) == 0
    record = json.loads(out.read_text())
    assert record["benchmark"] == "overhead" and record["command"].startswith("python -m bench.overhead ")
    summary = record["results"]["summary"]
    assert set(summary["servers"]) == {"service", "bare"}
    for name in ("service", "bare"):
        (row,) = record["results"]["rounds"][name]
        assert row["crop"]["statuses"] == {"200": 5} and row["crop"]["count"] == 5
    assert summary["servers"]["bare"]["over_floor"] == 1.0
    assert summary["service_over_floor"] > 0 and summary["service_ready_s"] > 0
    (plumbing,) = record["results"]["plumbing_in_process"]["service"]
    assert plumbing["service_noop_model"]["count"] == plumbing["bare"]["count"] == 5
    assert set(summary["forward_pass_p50_ms"]) == {"one_thread", "service_threads"}
    assert "| service |" in capsys.readouterr().out


def test_the_noop_predictor_answers_in_the_models_shape() -> None:
    class Real:
        info = object()
        classes = ("angry", "happy")

    predictor = overhead.NoOpPredictor(Real())
    (prediction,) = predictor.predict_faces([None])
    assert prediction == {"emotion": "angry", "confidence": 1.0, "scores": {"angry": 0.5, "happy": 0.5}}
