"""bench.service end to end with a tiny checkpoint and a handful of requests, and the parts of
bench.fer_baseline that need no fer (fer itself lives in .venv-fer, not in the project's environment)."""

from __future__ import annotations

import io
import json
import sys
import zipfile
from pathlib import Path

import httpx
import pytest
from PIL import Image

from bench import fer_baseline, service
from fercore.labels import CLASS_NAMES
from tests.utils import synthetic
from tests.utils.service import clean_service_env, write_checkpoint


def _read(path: Path) -> dict:
    record = json.loads(path.read_text())
    assert set(record) == {"benchmark", "machine", "command", "created_at", "results"}
    assert record["benchmark"] == "service"
    assert record["command"].startswith("python -m bench.service ")
    assert "hostname" not in record["machine"]
    return record


def test_bench_images() -> None:
    crop, photo = service.bench_images()
    with Image.open(io.BytesIO(crop.data)) as img:
        assert (img.format, img.mode, img.size) == ("PNG", "L", (48, 48))
    with Image.open(io.BytesIO(photo.data)) as img:
        assert (img.format, img.mode, img.size) == ("PNG", "RGB", (512, 512))
    assert not crop.detect and photo.detect
    assert service.bench_images()[0].data == crop.data  # the same bytes every run


def test_write_images(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert service.main(["--write-images", str(tmp_path / "images")]) == 0
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == ["crop.png", "photo.png"]
    assert "crop.png" in capsys.readouterr().out


@pytest.mark.slow
def test_service_benchmark(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    clean_service_env(monkeypatch)
    checkpoint = write_checkpoint(tmp_path / "tiny.pt")
    out, fer_out = tmp_path / "service.json", tmp_path / "fer.json"
    argv = ["--model", str(checkpoint), "--starts", "1", "--warmup", "1", "--requests", "3"]
    argv += ["--concurrency", "2", "--load-requests", "10", "--load-duration", "60", "--no-accuracy"]
    argv += ["--server-env", "TORCH_THREADS=1", "--output", str(out), "--fer-output", str(fer_out)]
    assert service.main(argv) == 0

    results = _read(out)["results"]
    assert results["settings"]["server_env"] == {"TORCH_THREADS": "1"}
    assert set(results["settings"]["images"]) == {"crop", "photo"}
    server = results["server"]
    assert len(server["startup"]["ready_s"]) == 1 and server["startup"]["median_ready_s"] > 0
    assert server["model"]["version"] == "test-run"
    for memory in (server["memory_after_warmup"], server["memory_after_load"]):
        assert 0 < memory["rss_mib"] <= memory["peak_rss_mib"]
    for name, faces in (("crop", 1), ("photo", 1)):  # the whole crop; the astronaut's one face
        seq = server["sequential"][name]
        assert seq["statuses"] == {"200": 3} and seq["count"] == 3 and seq["faces"] == faces
        assert 0 < seq["p50_ms"] <= seq["p99_ms"] <= seq["max_ms"]
        assert results["in_process"][name]["count"] == 3 and results["in_process"][name]["faces"] == faces
    assert results["in_process"]["threads"] == 1 and results["in_process"]["load_s"] > 0

    assert [(row["image"], row["concurrency"]) for row in server["load"]] == [("crop", 2), ("photo", 2)]
    for row in server["load"]:
        assert row["requests"] == 10 and row["ok"] == 10 and row["busy_503"] == 0 and row["stopped_by"] == "count"
        assert row["other_non_200"] == {} and row["transport_errors"] == {}
        assert row["throughput_rps"] > 0 and row["latency"]["count"] == 10

    assert results["fer"] == {"skipped": "--fer-python not given"}
    assert results["accuracy"] == {"ours": {"skipped": "--no-accuracy"}, "fer": {"skipped": "--fer-python not given"}}
    assert [row["path"] for row in results["latency_comparison"]] == ["ours, HTTP (sequential)", "ours, in process (1 thread)"]
    assert not fer_out.exists()
    printed = capsys.readouterr().out
    assert "| ours, HTTP (sequential) |" in printed and "fer: --fer-python not given" in printed


def test_load_test_counts_busy_and_failed_requests() -> None:
    calls = 0

    def answer(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        if calls % 3 == 0:
            return httpx.Response(503, json={"detail": "server busy"})
        if calls % 5 == 0:
            return httpx.Response(500, json={"detail": "internal error"})
        return httpx.Response(200, json={"faces": []})

    crop = service.bench_images()[0]
    row = service.load_test("http://127.0.0.1:9", crop, 2, 10, 30.0, transport=httpx.MockTransport(answer))
    # calls 3, 6, 9 are busy; 5 and 10 fail; the other five succeed
    assert row["requests"] == 10 and row["ok"] == 5 and row["busy_503"] == 3 and row["other_non_200"] == {"500": 2}
    assert row["latency"]["count"] == 5


def test_fer_skip_reasons(tmp_path: Path) -> None:
    assert service.fer_skip_reason(None) == "--fer-python not given"
    assert "no such interpreter" in str(service.fer_skip_reason(tmp_path / "python"))
    assert "fer is not installed" in str(service.fer_skip_reason(Path(sys.executable)))  # never in the project's venv


def test_missing_model_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        service.main(["--model", str(tmp_path / "missing.pt")])


@pytest.mark.parametrize("wrapper", ["", "archive/"])
def test_fer_baseline_reads_only_publictest(tmp_path: Path, wrapper: str) -> None:
    source = synthetic.write_zip(tmp_path / "a.zip", synthetic.default_splits(per_class=3), wrapper=wrapper)
    with zipfile.ZipFile(source) as zf:
        members = fer_baseline.publictest_members(zf.namelist())
    assert len(members) == 7  # one test face per class; the train faces are never read
    for name, label in members:
        assert name.startswith(f"{wrapper}test/{CLASS_NAMES[label]}/")
    subset = fer_baseline.evenly_spaced(members, 3)
    assert len(subset) == 3 and subset[0] == members[0] and subset[-1] == members[-1]
    assert fer_baseline.evenly_spaced(members, None) == members
