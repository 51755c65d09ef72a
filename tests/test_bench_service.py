"""bench.service end to end with a tiny checkpoint and a handful of requests, and the parts of
bench.fer_baseline that need no fer (fer itself lives in .venv-fer, not in the project's environment)."""

from __future__ import annotations

import argparse
import io
import json
import sys
import zipfile
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from bench import fer_baseline, inference, service, service_configs, serving
from fercore.labels import CLASS_NAMES
from tests.utils import synthetic
from tests.utils.service import clean_service_env, write_model
from training.export import quantize_int8


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
    checkpoint = write_model(tmp_path / "tiny.pt")
    out, fer_out = tmp_path / "service.json", tmp_path / "fer.json"
    argv = ["--model", str(checkpoint), "--starts", "1", "--warmup", "1", "--requests", "3"]
    argv += ["--concurrency", "2", "--load-requests", "10", "--load-duration", "60", "--no-accuracy"]
    argv += ["--server-env", "INFERENCE_THREADS=1", "--output", str(out), "--fer-output", str(fer_out)]
    assert service.main(argv) == 0

    results = _read(out)["results"]
    assert results["settings"]["server_env"] == {"INFERENCE_THREADS": "1"}
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


def test_inference_benchmark(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fp32 = write_model(tmp_path / "tiny.onnx")  # tiny.pt beside it
    rng = np.random.default_rng(0)
    int8 = quantize_int8(fp32, tmp_path / "tiny.int8.onnx", rng.normal(0, 1, (16, 1, 48, 48)).astype(np.float32))
    out = tmp_path / "inference.json"
    argv = ["--model", str(int8), "--threads", "1", "--rounds", "2", "--calls", "2", "--warmup", "1"]
    argv += ["--batch-sizes", "1,4", "--output", str(out)]
    assert inference.main(argv) == 0
    record = json.loads(out.read_text())
    assert record["benchmark"] == "inference" and record["command"].startswith("python -m bench.inference ")
    results = record["results"]
    (run,) = results["runs"]
    assert run["threads"] == 1
    assert set(run["forward_per_face_ms"]) == {"pytorch", "onnx-fp32", "onnx-int8"}
    assert all(set(per_face) == {"1", "4"} and min(per_face.values()) > 0 for per_face in run["forward_per_face_ms"].values())
    assert results["preprocess_ms"] > 0
    agreement = results["agreement_with_pytorch_on_256_noisy_crops"]
    assert agreement["onnx-fp32"]["max_abs_prob_diff"] <= 1e-5 and agreement["onnx-fp32"]["same_top_class"] == 1.0
    assert 0 <= agreement["onnx-int8"]["max_abs_prob_diff"] <= 1
    assert "| 1 | onnx-int8 |" in capsys.readouterr().out


@pytest.mark.slow
def test_serving_benchmark(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The ONNX service and the bare endpoint (the PyTorch one needs the repository's history)."""
    clean_service_env(monkeypatch)
    out = tmp_path / "serving.json"
    argv = ["--contenders", "onnx,bare", "--rounds", "1", "--starts", "1", "--memory-requests", "5", "--requests", "5"]
    argv += ["--concurrency", "4", "--load-requests", "12", "--no-accuracy", "--output", str(out)]
    assert serving.main(argv) == 0
    summary = json.loads(out.read_text())["results"]["summary"]
    assert set(summary) == {"onnx", "bare"}
    onnx, bare = summary["onnx"], summary["bare"]
    assert not onnx["libtorch_mapped"] and onnx["photo_faces"] == 1 and bare["photo_faces"] == 0
    assert min(onnx["ready_s"], onnx["rss_mib_after_crops"], onnx["crop_p50_ms"], onnx["crop_c4_rps"]) > 0


@pytest.mark.slow
def test_service_configs_benchmark(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    clean_service_env(monkeypatch)
    checkpoint = write_model(tmp_path / "tiny.pt")
    out = tmp_path / "configs.json"
    argv = [
        "--model",
        str(checkpoint),
        "--config",
        "off:INFERENCE_THREADS=1,BATCH_MAX_SIZE=1",
        "--config",
        "on:INFERENCE_THREADS=1,BATCH_MAX_SIZE=8",
    ]
    argv += ["--baseline", "off", "--concurrency", "1,4", "--rounds", "2", "--requests", "8", "--warmup", "1"]
    argv += ["--output", str(out)]
    assert service_configs.main(argv) == 0
    record = json.loads(out.read_text())
    assert record["benchmark"] == "service_configs"
    results = record["results"]
    assert results["configs"]["on"]["env"] == {"INFERENCE_THREADS": "1", "BATCH_MAX_SIZE": "8"}
    assert results["configs"]["on"]["crop_scores_max_abs_diff"] <= 1e-5
    levels = {(row["config"], row["image"], row["concurrency"]): row for row in results["levels"]}
    assert set(levels) == {(c, i, n) for c in ("off", "on") for i in ("crop", "photo") for n in (1, 4)}
    for row in levels.values():
        assert row["rounds"] == 2 and row["requests"] == row["ok"] == 16 and row["busy_503"] == row["other_failures"] == 0
        assert row["latency"]["count"] == 16 and row["server_cpu_ms_per_request"] >= 0
        # /proc counts CPU time in 10 ms ticks: 16 crops may take less than one on a fast machine,
        # 16 photos (detection, then the model) take several.
        assert row["image"] == "crop" or row["server_cpu_ms_per_request"] > 0
        assert row["faces_per_forward_pass"] >= 1  # the crop and the astronaut: one face each
    for key in (("off", "crop", 1), ("off", "photo", 4)):
        assert levels[key]["faces_per_forward_pass"] == 1  # without batching, one request per pass
        assert levels[key]["vs_baseline"]["throughput"] == 1
    assert "| crop | 4 | on |" in capsys.readouterr().out


def test_service_configs_parse_their_arguments() -> None:
    assert service_configs.parse_config("a:") == ("a", {})
    assert service_configs.parse_config("b:X=1, Y=,Z=2") == ("b", {"X": "1", "Y": "", "Z": "2"})
    for bad in ("no-colon", ":X=1", "c:X"):
        with pytest.raises(argparse.ArgumentTypeError):
            service_configs.parse_config(bad)
    with pytest.raises(SystemExit):
        service_configs.main(["--config", "a:", "--config", "a:X=1"])  # names must be unique
    with pytest.raises(SystemExit):
        service_configs.main(["--config", "a:", "--baseline", "b"])
