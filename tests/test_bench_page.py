"""``python -m bench.page`` end to end, briefly: its own server (a tiny checkpoint) and Chromium.

In a module of its own: Playwright's sync API runs one instance per thread, and tests/test_page.py
holds its browser for the whole module."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from bench import page as bench_page
from tests.utils.browser import require_chromium


@pytest.mark.browser
@pytest.mark.slow
def test_page_benchmark_smoke(model_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    require_chromium()
    out, shots = tmp_path / "page.json", tmp_path / "shots"
    argv = ["--model", str(model_path), "--loads", "2", "--duration", "3", "--warmup-frames", "2", "--requests", "2"]
    assert bench_page.main([*argv, "--screenshots", str(shots), "--output", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["command"].startswith("python -m bench.page --model")
    results = record["results"]
    assert results["page_load"]["first_visit"]["load_event_ms_median"] > 0
    assert [row["explain"] for row in results["webcam"]] == [False, True]
    plain, explained = results["webcam"]
    # The rates themselves depend on the machine's load; the plain mode answers frames within seconds.
    assert plain["frames"] > 0 and plain["faces_in_last_frame"] == 1, plain
    # A frame with explanations can take longer than the short run on a loaded machine.
    assert explained["frames"] == 0 or explained["round_trip_ms_median"] > 0, explained
    assert results["api"]["explain_ms_median"] > 0
    for name in ("upload", "webcam", "explanation"):
        assert Image.open(shots / f"{name}.png").size == (1200, 900)
    assert "frames/s" in capsys.readouterr().out
