"""``python -m bench.video`` and ``python -m bench.photos`` end to end, briefly: well-formed results,
the pipeline's faces found, every way of analysing the photos agreeing with the API."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import photos as bench_photos
from bench import video as bench_video
from tests.utils.service import clean_service_env, write_model


def read(path: Path, name: str) -> dict:
    record = json.loads(path.read_text())
    assert set(record) == {"benchmark", "machine", "command", "created_at", "results"}
    assert record["benchmark"] == name and record["command"].startswith(f"python -m bench.{name} ")
    return dict(record["results"])


@pytest.mark.slow
def test_video_benchmark(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    clean_service_env(monkeypatch)
    out = tmp_path / "video.json"
    assert bench_video.main(["--seconds", "1", "--rounds", "1", "--threads", "2", "--output", str(out)]) == 0
    results = read(out, "video")
    assert results["found"] == {"tracks": 1, "faces_per_frame": 1.0, "smoothed_emotions": ["happy"]}
    assert results["same_tracks_both_ways"] is True and results["speedup_every_frame"] > 0
    for name in ("frames_in_parallel", "one_frame_at_a_time"):
        every, sampled = results[name]["end_to_end"]["every_frame"], results[name]["end_to_end"]["sampled"]
        assert (every["frames_analysed"], sampled["frames_analysed"]) == (30, 10)
        assert every["analysed_fps"] > 0 and sampled["times_real_time"] > 0
        assert set(results[name]["steps_ms_per_frame"]) == {"decode", "detect", "classify", "track"}
        assert all(ms > 0 for ms in results[name]["steps_ms_per_frame"].values())
        assert sum(results[name]["steps_share"].values()) == pytest.approx(1, abs=0.01)
    assert "analysed frames/s" in capsys.readouterr().out


@pytest.mark.slow
def test_photos_benchmark(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clean_service_env(monkeypatch)
    model = write_model(tmp_path / "tiny.onnx")  # any model: only the faces and their agreement are checked
    out = tmp_path / "photos.json"
    argv = ["--photos", "10", "--rounds", "1", "--batch", "4", "--concurrency", "2", "--threads", "2"]
    assert bench_photos.main([*argv, "--model", str(model), "--output", str(out)]) == 0
    results = read(out, "photos")
    assert results["photos"]["count"] == 10 and results["photos"]["with_a_face"] == 8
    assert results["photos"]["faces_found"] >= 8  # the astronaut in each of the 8 (the detector is not the tiny model)
    ways = results["ways"]
    assert set(ways) == {"api", "api_files", "cli", "http_sequential", "http_concurrent", "http_batch"}
    assert all(row["same_faces_as_api"] and row["photos_per_s"] > 0 for row in ways.values()), ways
    assert ways["api"]["vs_api"] == 1.0
