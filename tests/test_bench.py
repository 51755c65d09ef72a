"""The benchmark scripts run end to end with tiny settings and write well-formed results."""

from __future__ import annotations

import json
import os
from pathlib import Path

import httpx
import pytest

from bench import compact_widths, data_loading, soak, train_throughput
from bench.machine import describe_machine, write_result
from tests.utils import synthetic
from tests.utils.service import clean_service_env, write_model

MACHINE_KEYS = {"cpu_model", "cpus_usable", "memory_gib", "cpu_bf16_fast", "torch_threads", "cuda_device", "torch", "python"}


def _read(path: Path, name: str) -> dict:
    record = json.loads(path.read_text())
    assert set(record) == {"benchmark", "machine", "command", "created_at", "results"}
    assert record["benchmark"] == name
    assert set(record["machine"]) >= MACHINE_KEYS
    assert "hostname" not in record["machine"]
    assert record["command"].startswith(f"python -m bench.{name} ")
    return record


def test_describe_machine_and_write_result(tmp_path: Path) -> None:
    machine = describe_machine()
    assert machine["cpus_usable"] >= 1 and machine["torch_threads"] >= 1
    out = write_result(tmp_path / "sub" / "r.json", "demo", {"x": 1}, command="python -m bench.demo --x 1")
    record = _read(out, "demo")
    assert record["results"] == {"x": 1}


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_train_throughput(tmp_path: Path, capsys: pytest.CaptureFixture[str], precision: str) -> None:
    out = tmp_path / "tt.json"
    argv = ["--models", "compact", "--device", "cpu", "--precision", precision, "--steps", "2", "--warmup", "1"]
    argv += ["--batch-size", "8", "--latency-runs", "2", "--threads", "1", "--output", str(out)]
    assert train_throughput.main(argv) == 0

    record = _read(out, "train_throughput")
    assert "--models compact" in record["command"]
    settings = record["results"]["settings"]
    assert settings["device"] == "cpu" and settings["precision"] == precision and settings["threads"] == 1
    (row,) = record["results"]["models"]
    assert row["model"] == "compact" and row["batch_size"] == 8 and "error" not in row
    step = row["step"]
    assert 0 < step["p10_ms"] <= step["median_ms"] <= step["p90_ms"]
    assert row["images_per_s"] > 0 and row["fer2013_epoch_s"] > 0 and row["parameters"] > 0
    assert row["peak_device_memory_mb"] is None
    assert row["inference_1thread"]["median_ms"] > 0
    assert "| compact |" in capsys.readouterr().out


def test_train_throughput_rejects_unknown_models() -> None:
    with pytest.raises(SystemExit):
        train_throughput.main(["--models", "compact,nope"])


def test_recipe_kwargs_only_apply_to_the_recipes_model() -> None:
    recipe = {"model": "compact", "model_kwargs": {"width": 8}, "batch_size": 64, "erase_prob": 0.0}
    own = train_throughput.model_config("compact", recipe, None, "cpu", "fp32")
    other = train_throughput.model_config("vgg", recipe, 16, "cpu", "fp32")
    assert own.model_kwargs == {"width": 8} and own.batch_size == 64
    assert other.model_kwargs == {} and other.batch_size == 16 and other.erase_prob == 0.0


def test_data_loading(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = synthetic.write_zip(tmp_path / "a.zip", synthetic.default_splits(per_class=3))
    out = tmp_path / "dl.json"
    cache_before = os.environ.get("FER_CACHE_DIR")
    assert data_loading.main(["--data", str(source), "--device", "cpu", "--repeats", "2", "--output", str(out)]) == 0
    assert os.environ.get("FER_CACHE_DIR") == cache_before  # the temporary cache does not leak

    results = _read(out, "data_loading")["results"]
    assert results["splits"] == {"train": 21, "test": 7}
    assert results["source_mb"] > 0 and results["cache_mb"] > 0
    assert len(results["cold"]["runs_s"]) == 1 and results["cold"]["median_s"] > 0 and results["cold"]["images_per_s"] > 0
    assert len(results["warm"]["runs_s"]) == 2 and results["warm"]["median_s"] > 0
    move = results["to_device"]
    assert move["device"] == "cpu" and move["median_ms"] > 0 and move["train_mb"] > 0 and move["gb_per_s"] is None
    assert "written to" in capsys.readouterr().out


def test_data_loading_missing_source(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        data_loading.main(["--data", str(tmp_path / "missing.zip")])


def test_soak_classifies_answers() -> None:
    kinds = soak.request_kinds()
    crop, photo, empty = kinds["crop"], kinds["photo"], kinds["empty"]

    def answer(status: int, body: object, **headers: str) -> httpx.Response:
        return httpx.Response(status, json=body, headers=headers)

    assert soak.classify(crop, answer(200, {"faces": [{"emotion": "happy"}]})) == "ok"
    assert soak.classify(photo, answer(200, {"faces": []})) == "wrong_faces"
    assert soak.classify(crop, answer(400, {"detail": "corrupt image"})) == "wrong_400"
    assert soak.classify(empty, answer(400, {"detail": "empty file"})) == "ok"
    assert soak.classify(empty, answer(400, {"detail": "corrupt image"})) == "wrong_detail"
    assert soak.classify(empty, answer(200, {"faces": []})) == "wrong_200"
    assert soak.classify(crop, answer(503, {"detail": "server busy"}, **{"Retry-After": "1"})) == "busy_503"
    assert soak.classify(crop, answer(503, {"detail": "server busy"})) == "busy_503_without_retry_after"
    assert soak.classify(crop, answer(503, {"detail": "model not loaded"})) == "status_503"
    assert soak.classify(crop, answer(500, {"detail": "internal error"})) == "status_500"
    plan = soak.schedule(kinds, soak.parse_mix("crop=1,photo=0,bad=1"), 400, seed=1)
    assert plan == soak.schedule(kinds, soak.parse_mix("crop=1,photo=0,bad=1"), 400, seed=1)  # seeded
    names = {kind.name for kind in plan}
    assert "photo" not in names and names >= {"crop", "empty", "not_an_image", "truncated_png", "pixel_bomb"}
    with pytest.raises(Exception, match="weights"):
        soak.parse_mix("crop=1,video=2")


@pytest.mark.slow
def test_soak_smoke(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    clean_service_env(monkeypatch)
    checkpoint = write_model(tmp_path / "tiny.pt")
    out, md = tmp_path / "soak.json", tmp_path / "soak.md"
    argv = ["--model", str(checkpoint), "--requests", "60", "--concurrency", "4", "--warmup", "6"]
    argv += ["--overload-requests", "24", "--overload-concurrency", "16", "--overload-queue", "1"]
    argv += ["--server-env", "INFERENCE_THREADS=1", "--output", str(out), "--markdown", str(md)]
    assert soak.main(argv) == 0, md.read_text()

    record = _read(out, "soak")
    results = record["results"]
    assert results["passed"] is True and all(results["checks"].values())
    run = results["soak"]
    assert run["requests"] == 60 and run["ok"] == 60 and run["unexpected"] == {}
    assert sum(row["sent"] for row in run["kinds"].values()) == 60
    assert run["kinds"]["crop"]["latency"]["count"] == run["kinds"]["crop"]["outcomes"]["ok"]
    server = run["server"]
    assert server["after_warmup"]["rss_mib"] > 0 and server["end"]["open_fds"] > 0 and server["rss_samples"]
    assert server["gauges_after"]["fer_inference_admitted"] == 0
    burst = results["overload"]
    assert burst["bound"] == 2 and burst["ok"] + burst["busy_503"] == 24 and burst["busy_503"] > 0
    assert burst["ok"] >= 1 and burst["unexpected"] == {}
    # A fast machine may serve the burst's few admitted requests between two scrapes: no lower bound.
    assert burst["metrics_scrapes"] > 0 and burst["max_admitted"] <= 2 and burst["admitted_after"] == 0
    summary = md.read_text()
    assert "| crop |" in summary and "| check | result |" in summary and "FAIL" not in summary
    assert summary in capsys.readouterr().out


def test_faces_bench_counts_each_detectors_faces() -> None:
    """bench.faces on its photos, one timed call each: BlazeFace finds every face and no other; the
    cascade misses the 3/4-view cameraman (the reason it was replaced)."""
    from bench.faces import bench_photos, in_process

    rows = in_process(bench_photos(), runs=1, warmup=1)
    for name, row in rows.items():
        assert row["blazeface_onnx"]["faces_found"] == row["faces_present"], name
        assert row["blazeface_onnx"]["median_ms"] > 0
    assert rows["cameraman_3_4_view_grey"]["haar"]["faces_found"] == 0


def test_alignment_sign_test() -> None:
    from bench.alignment import sign_test

    assert sign_test(0, 0) == 1.0
    assert sign_test(5, 5) == 1.0
    assert sign_test(10, 0) == pytest.approx(2 / 1024)
    assert sign_test(3, 12) == sign_test(12, 3) == pytest.approx(0.0352, abs=1e-4)


def test_train_speed_compares_each_option_with_the_default(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from bench import train_speed

    out = tmp_path / "speed.json"
    argv = ["--rounds", "2", "--steps", "1", "--warmup", "0", "--batch-size", "8", "--output", str(out)]
    # torch.compile's tracing alone takes most of a minute here: the test leaves it out.
    assert train_speed.main([*argv, "--options", "default,fp32,bf16_nchw,fp32_nchw"]) == 0
    rows = _read(out, "train_speed")["results"]["options"]
    assert rows.keys() == {"default", "fp32", "bf16_nchw", "fp32_nchw"}
    assert train_speed.options(2)["compile"] == {"compile": True}
    assert rows["default"]["ratio_to_default"] == 1.0 and len(rows["default"]["rounds"]) == 2
    assert all(row["images_per_s"] > 0 for row in rows.values())
    assert rows["fp32"]["changes"] == {"precision": "fp32"}
    assert "| fp32 | precision=fp32 |" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        train_speed.main([*argv, "--options", "fp32"])  # no default to compare with


def test_compact_widths_times_each_widths_served_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "widths.json"
    assert compact_widths.main(["--widths", "8,32", "--rounds", "2", "--calls", "2", "--output", str(out)]) == 0
    rows = _read(out, "compact_widths")["results"]["widths"]
    assert [r["width"] for r in rows] == [8, 32]
    narrow, bundled = rows
    assert bundled["parameters"] == 1_958_759  # the bundled network's count (models/MODEL_CARD.md)
    assert narrow["parameters"] < bundled["parameters"] and bundled["ratio_to_bundled"] == 1.0
    assert narrow["int8_forward_ms_per_face"] > 0
    assert "| 32 | 1,958,759 |" in capsys.readouterr().out
