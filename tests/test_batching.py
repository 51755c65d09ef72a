"""Micro-batching (app.batching): the batcher on its own with a fake predictor whose calls can be
held at a gate, then the app with BATCH_MAX_SIZE set, against the same app without it.

No test asserts that something happens within a time: order is forced with gates and events,
and the only clock reading (the wait for company) is a lower bound."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from app.batching import MicroBatcher
from app.deps import get_predictor
from app.errors import ModelNotReady
from app.main import create_app
from app.metrics import Metrics
from fercore.labels import CLASS_NAMES
from tests.utils.photos import photo_jpeg
from tests.utils.service import clean_service_env, gray_png, post_batch, post_image, running_app

HANG_S = 60  # only turns a hang into a failure
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    clean_service_env(monkeypatch)


class FakePredictor:
    """Each "crop" is a string; its prediction's emotion is that string. Records the crops of each
    call; ``gate``: every call waits for it (``entered`` is released first)."""

    def __init__(self, gated: bool = False, fail: BaseException | None = None) -> None:
        self.calls: list[list[str]] = []
        self.threads: set[str] = set()
        self.entered = threading.Semaphore(0)
        self.gate = threading.Event()
        if not gated:
            self.gate.set()
        self.fail = fail

    def predict_faces(self, crops: Sequence[Any]) -> list[dict[str, Any]]:
        self.calls.append(list(crops))
        self.threads.add(threading.current_thread().name)
        self.entered.release()
        assert self.gate.wait(HANG_S), "never released"
        if self.fail is not None:
            raise self.fail
        return [{"emotion": crop, "confidence": 1.0, "scores": {}} for crop in crops]


def run(scenario) -> None:
    asyncio.run(asyncio.wait_for(scenario(), HANG_S))


async def until_entered(predictor: FakePredictor) -> None:
    """Wait (off the loop) until a call of ``predictor`` has entered it."""
    assert await asyncio.to_thread(predictor.entered.acquire, True, HANG_S)


async def until_queued(batcher: MicroBatcher, n: int) -> None:
    while batcher.waiting < n:
        await asyncio.sleep(0)


def emotions(predictions: list[dict[str, Any]]) -> list[str]:
    return [p["emotion"] for p in predictions]


# --- the batcher ------------------------------------------------------------------------------


def test_concurrent_requests_share_a_forward_pass() -> None:
    async def scenario() -> None:
        predictor = FakePredictor(gated=True)
        batcher = MicroBatcher(max_size=32, max_wait_s=0)
        batcher.start()
        first = asyncio.create_task(batcher.predict(predictor, ["a"]))
        await until_entered(predictor)  # the first pass runs, alone: a lone request does not wait
        others = [asyncio.create_task(batcher.predict(predictor, [f"b{i}"])) for i in range(5)]
        await until_queued(batcher, 5)
        predictor.gate.set()
        assert emotions(await first) == ["a"]
        assert [emotions(await task) for task in others] == [[f"b{i}"] for i in range(5)]
        assert predictor.calls == [["a"], ["b0", "b1", "b2", "b3", "b4"]]  # queued while the first ran: one pass
        assert len(predictor.threads) == 1 and next(iter(predictor.threads)).startswith("fer-batch")
        await batcher.stop()

    run(scenario)


def test_each_caller_gets_its_own_predictions() -> None:
    async def scenario() -> None:
        predictor = FakePredictor(gated=True)
        batcher = MicroBatcher(max_size=100, max_wait_s=0)
        batcher.start()
        blocker = asyncio.create_task(batcher.predict(predictor, ["x"]))
        await until_entered(predictor)
        requests = {f"r{i}": [f"r{i}-face{j}" for j in range(i % 4 + 1)] for i in range(12)}  # 1 to 4 faces each
        tasks = {name: asyncio.create_task(batcher.predict(predictor, crops)) for name, crops in requests.items()}
        await until_queued(batcher, len(requests))
        predictor.gate.set()
        await blocker
        for name, task in tasks.items():
            assert emotions(await task) == requests[name]
        assert len(predictor.calls) == 2  # all twelve in one pass
        await batcher.stop()

    run(scenario)


def test_max_size_is_respected_and_requests_are_not_split() -> None:
    async def scenario() -> None:
        predictor = FakePredictor(gated=True)
        batcher = MicroBatcher(max_size=4, max_wait_s=0)
        batcher.start()
        blocker = asyncio.create_task(batcher.predict(predictor, ["x"]))
        await until_entered(predictor)
        sizes = [1, 2, 1, 3, 1, 1, 6, 1]  # 6 is more than max_size: a batch of its own
        tasks = [asyncio.create_task(batcher.predict(predictor, [f"{i}.{j}" for j in range(n)])) for i, n in enumerate(sizes)]
        await until_queued(batcher, len(sizes))
        predictor.gate.set()
        await blocker
        for i, (task, n) in enumerate(zip(tasks, sizes, strict=True)):
            assert emotions(await task) == [f"{i}.{j}" for j in range(n)]
        # In arrival order, each pass as full as the next request allows, never over 4 (but the 6):
        # [1, 2, 1] [3, 1] [1] [6] [1]
        assert [len(call) for call in predictor.calls] == [1, 4, 4, 1, 6, 1]
        await batcher.stop()

    run(scenario)


def test_the_oldest_request_waits_for_company_until_the_batch_is_full() -> None:
    async def scenario() -> None:
        predictor = FakePredictor()
        batcher = MicroBatcher(max_size=3, max_wait_s=3600)  # a wait no test would sit out
        batcher.start()
        first = asyncio.create_task(batcher.predict(predictor, ["a"]))
        second = asyncio.create_task(batcher.predict(predictor, ["b"]))
        for _ in range(20):
            await asyncio.sleep(0.005)
        assert predictor.calls == []  # two faces of three: still waiting
        third = asyncio.create_task(batcher.predict(predictor, ["c"]))
        assert [emotions(await t) for t in (first, second, third)] == [["a"], ["b"], ["c"]]  # full: it ran
        assert predictor.calls == [["a", "b", "c"]]
        await batcher.stop()

    run(scenario)


def test_a_lone_request_runs_once_max_wait_has_passed() -> None:
    async def scenario() -> None:
        predictor = FakePredictor()
        batcher = MicroBatcher(max_size=32, max_wait_s=0.05)
        batcher.start()
        started = time.perf_counter()
        assert emotions(await batcher.predict(predictor, ["a"])) == ["a"]
        assert time.perf_counter() - started >= 0.05  # it did wait for company (a lower bound only)
        assert predictor.calls == [["a"]]
        await batcher.stop()

    run(scenario)


def test_a_queued_request_waits_for_a_requests_own_pass_then_runs_in_the_batcher() -> None:
    """A pass running inline (in a request's slot) holds the pass lock: the collector waits for it
    without blocking the loop, then runs the queued request in its own worker; a request arriving
    while the inline pass runs is not run inline."""

    async def scenario() -> None:
        predictor = FakePredictor(gated=True)
        batcher = MicroBatcher(max_size=32, max_wait_s=0)
        batcher.start()
        assert batcher.idle
        inline = asyncio.create_task(asyncio.to_thread(batcher.predict_inline, predictor, ["a"]))
        await until_entered(predictor)
        assert not batcher.idle and batcher.predict_inline(predictor, ["x"]) is None  # busy: join the queue
        queued = asyncio.create_task(batcher.predict(predictor, ["b"]))
        await until_queued(batcher, 1)
        for _ in range(20):  # the loop runs on: the collector takes the request, finds the lock held, waits
            await asyncio.sleep(0)
        assert not queued.done() and predictor.calls == [["a"]]
        predictor.gate.set()
        assert emotions(await inline) == ["a"] and emotions(await queued) == ["b"]
        assert predictor.calls == [["a"], ["b"]]
        assert any(name.startswith("fer-batch") for name in predictor.threads)
        assert any(not name.startswith("fer-batch") for name in predictor.threads)  # the inline pass's own thread
        await batcher.stop()

    run(scenario)


def test_a_failed_pass_fails_each_of_its_callers_and_the_next_pass_runs() -> None:
    async def scenario() -> None:
        predictor = FakePredictor(gated=True, fail=ValueError("model output shape (2, 5) does not fit 7 classes"))
        batcher = MicroBatcher(max_size=32, max_wait_s=0)
        batcher.start()
        first = asyncio.create_task(batcher.predict(predictor, ["a"]))
        await until_entered(predictor)
        others = [asyncio.create_task(batcher.predict(predictor, [name])) for name in "bc"]
        await until_queued(batcher, 2)
        predictor.gate.set()
        for task in (first, *others):
            with pytest.raises(ValueError, match="does not fit 7 classes"):
                await task
        predictor.fail = None
        assert emotions(await batcher.predict(predictor, ["d"])) == ["d"]  # the batcher lives on
        await batcher.stop()

    run(scenario)


def test_requests_for_another_predictor_go_in_another_pass() -> None:
    async def scenario() -> None:
        old, new = FakePredictor(gated=True), FakePredictor()
        batcher = MicroBatcher(max_size=32, max_wait_s=0)
        batcher.start()
        blocker = asyncio.create_task(batcher.predict(old, ["x"]))
        await until_entered(old)
        tasks = [asyncio.create_task(batcher.predict(p, [name])) for p, name in ((old, "a"), (new, "b"), (old, "c"))]
        await until_queued(batcher, 3)
        old.gate.set()
        await blocker
        assert [emotions(await t) for t in tasks] == [["a"], ["b"], ["c"]]
        assert old.calls == [["x"], ["a"], ["c"]] and new.calls == [["b"]]  # a reload between requests
        await batcher.stop()

    run(scenario)


def test_a_cancelled_request_is_left_out() -> None:
    async def scenario() -> None:
        predictor = FakePredictor(gated=True)
        batcher = MicroBatcher(max_size=32, max_wait_s=0)
        batcher.start()
        blocker = asyncio.create_task(batcher.predict(predictor, ["x"]))
        await until_entered(predictor)
        gone = asyncio.create_task(batcher.predict(predictor, ["gone"]))
        kept = asyncio.create_task(batcher.predict(predictor, ["kept"]))
        await until_queued(batcher, 2)
        gone.cancel()
        predictor.gate.set()
        await blocker
        assert emotions(await kept) == ["kept"]
        assert predictor.calls == [["x"], ["kept"]]
        await batcher.stop()

    run(scenario)


def test_stop_finishes_queued_requests_then_refuses() -> None:
    async def scenario() -> None:
        predictor = FakePredictor(gated=True)
        metrics = Metrics()
        batcher = MicroBatcher(max_size=32, max_wait_s=0, metrics=metrics)
        batcher.start()
        tasks = [asyncio.create_task(batcher.predict(predictor, [name])) for name in "abc"]
        await until_entered(predictor)
        stopping = asyncio.create_task(batcher.stop())
        await asyncio.sleep(0)
        predictor.gate.set()
        await stopping
        assert [emotions(await t) for t in tasks] == [["a"], ["b"], ["c"]]
        with pytest.raises(ModelNotReady):
            await batcher.predict(predictor, ["late"])
        assert await batcher.predict(predictor, []) == []  # no faces, no pass, no refusal
        assert metrics.batch_size._sum.get() == 3 and metrics.batch_wait._sum.get() >= 0

    run(scenario)


def test_a_broken_collector_fails_its_requests_rather_than_leaving_them_waiting(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        predictor = FakePredictor()
        batcher = MicroBatcher(max_size=32, max_wait_s=0)

        def broken() -> list[Any]:
            raise RuntimeError("a bug in the collector")

        batcher._take_batch = broken  # type: ignore[method-assign]
        batcher.start()
        with pytest.raises(RuntimeError, match="a bug in the collector"):
            await batcher.predict(predictor, ["a"])
        with pytest.raises(ModelNotReady):  # refused at once, not queued for a collector that is gone
            await batcher.predict(predictor, ["b"])
        await batcher.stop()  # does not raise
        assert predictor.calls == []

    with caplog.at_level(logging.ERROR):
        run(scenario)
    assert any("micro-batcher stopped unexpectedly" in rec.getMessage() for rec in caplog.records)


def test_nonsense_bounds_are_refused() -> None:
    with pytest.raises(ValueError):
        MicroBatcher(max_size=0, max_wait_s=0)
    with pytest.raises(ValueError):
        MicroBatcher(max_size=4, max_wait_s=-1)


# --- the app with BATCH_MAX_SIZE ----------------------------------------------------------------


class GatedPredictor:
    """The app's real predictor behind a gate: the first call waits to be let through, the others
    run at once. Records the number of faces of each call."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.info = real.info
        self.sizes: list[int] = []
        self.entered = threading.Event()
        self.release = threading.Event()
        self.fail: Exception | None = None

    def predict_faces(self, faces: list[Any]) -> list[Any]:
        self.sizes.append(len(faces))
        self.entered.set()
        assert self.release.wait(HANG_S), "never released"
        if self.fail is not None:
            raise self.fail
        return self.real.predict_faces(faces)


def metric(client: TestClient, name: str) -> float:
    """The value of the sample ``name`` (a series without labels) in the app's ``/metrics``."""
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for sample in family.samples:
            if sample.name == name:
                return sample.value
    raise AssertionError(f"{name} not in /metrics")


def assert_same_faces(got: list[dict[str, Any]], want: list[dict[str, Any]]) -> None:
    assert [face["box"] for face in got] == [face["box"] for face in want]
    for g, w in zip(got, want, strict=True):
        assert g["emotion"] == w["emotion"]
        for name in CLASS_NAMES:
            assert g["scores"][name] == pytest.approx(w["scores"][name], abs=1e-5)


def batching_env(model_path: Path, **extra: str) -> dict[str, str]:
    return {"MODEL_URI": str(model_path), "BATCH_MAX_SIZE": "16", "BATCH_MAX_WAIT_MS": "0", **extra}


def wait_until(condition, what: str) -> None:
    deadline = time.monotonic() + HANG_S
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.005)


def test_concurrent_requests_get_the_predictions_of_sequential_ones(monkeypatch: pytest.MonkeyPatch, model_path: Path) -> None:
    uploads = [(gray_png(), False), (photo_jpeg("astronaut"), None), (photo_jpeg("coffee"), None)] * 3
    files = [(f"{i}.img", data) for i, (data, _) in enumerate(uploads[:3])]
    with running_app(monkeypatch, MODEL_URI=str(model_path), BATCH_MAX_SIZE="1") as client:
        assert client.app.state.batcher is None  # off
        sequential = [post_image(client, data, detect=detect).json()["faces"] for data, detect in uploads]
        batch_sequential = [item["faces"] for item in post_batch(client, files).json()["results"]]
    # Requests that reach the batcher: those with a face (coffee has none); the batch counts once.
    queued = sum(1 for faces in sequential if faces) + 1
    faces = sum(len(faces) for faces in sequential) + sum(len(faces) for faces in batch_sequential)
    assert (queued, faces) == (7, 7)

    with running_app(monkeypatch, **batching_env(model_path, MAX_QUEUE="32")) as client:
        gate = GatedPredictor(client.app.state.predictor)
        client.app.dependency_overrides[get_predictor] = lambda: gate
        with ThreadPoolExecutor(len(uploads) + 2) as pool:
            first = pool.submit(post_image, client, gray_png(), "first.png", False)
            assert gate.entered.wait(HANG_S)  # the first pass holds the batcher's worker
            futures = [pool.submit(post_image, client, data, f"{i}.img", detect) for i, (data, detect) in enumerate(uploads)]
            batch = pool.submit(post_batch, client, files)
            wait_until(lambda: client.app.state.batcher.waiting == queued, "every request with a face queued")
            gate.release.set()
            concurrent = [future.result().json()["faces"] for future in futures]
            batch_concurrent = [item["faces"] for item in batch.result().json()["results"]]
            assert first.result().status_code == 200
        for got, want in zip([*concurrent, *batch_concurrent], [*sequential, *batch_sequential], strict=True):
            assert_same_faces(got, want)
        assert gate.sizes == [1, faces]  # the first pass alone, then every other face in one
        assert metric(client, "fer_inference_batch_size_count") == 2
        assert metric(client, "fer_inference_batch_size_sum") == 1 + faces
        assert metric(client, "fer_batch_wait_seconds_count") == 1 + queued
        assert client.app.state.limiter.admitted == 0


def test_batching_keeps_the_bound_on_requests_in_progress(monkeypatch: pytest.MonkeyPatch, model_path: Path) -> None:
    """A request waiting for its pass holds no inference slot but still counts against the bound:
    with one slot and a queue of one, the second request decodes while the first's pass runs, and
    the third is refused."""
    env = batching_env(model_path, MAX_CONCURRENT_INFERENCES="1", MAX_QUEUE="1")
    with running_app(monkeypatch, **env) as client, ThreadPoolExecutor(2) as pool:
        gate = GatedPredictor(client.app.state.predictor)
        client.app.dependency_overrides[get_predictor] = lambda: gate
        limiter, batcher = client.app.state.limiter, client.app.state.batcher
        first = pool.submit(post_image, client, gray_png(), "a.png", False)
        assert gate.entered.wait(HANG_S)
        second = pool.submit(post_image, client, gray_png(), "b.png", False)
        wait_until(lambda: batcher.waiting == 1, "the second request decoded in the free slot and queued for a pass")
        assert limiter.admitted == 2
        r = post_image(client, gray_png(), detect=False)
        assert (r.status_code, r.json()) == (503, {"detail": "server busy"})
        gate.release.set()
        assert first.result().status_code == 200 and second.result().status_code == 200
        assert gate.sizes == [1, 1]
        assert limiter.admitted == 0


def test_a_failed_pass_is_a_500_for_each_request_in_it(
    monkeypatch: pytest.MonkeyPatch, model_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    for name, value in batching_env(model_path).items():
        monkeypatch.setenv(name, value)
    app = create_app()
    with TestClient(app, raise_server_exceptions=False) as client, caplog.at_level(logging.ERROR):
        gate = GatedPredictor(client.app.state.predictor)
        gate.fail = RuntimeError("oneDNN said no")
        app.dependency_overrides[get_predictor] = lambda: gate
        with ThreadPoolExecutor(3) as pool:
            first = pool.submit(post_image, client, gray_png(), "a.png", False)
            assert gate.entered.wait(HANG_S)
            others = [pool.submit(post_image, client, gray_png(), f"{i}.png", False) for i in range(2)]
            wait_until(lambda: app.state.batcher.waiting == 2, "both queued")
            gate.release.set()
            for future in (first, *others):
                r = future.result()
                assert (r.status_code, r.json()) == (500, {"detail": "internal error"})
        assert gate.sizes == [1, 2]
        gate.fail = None
        assert post_image(client, gray_png(), detect=False).status_code == 200  # the batcher lives on
    failures = [rec for rec in caplog.records if rec.exc_info and "oneDNN said no" in str(rec.exc_info[1])]
    assert len(failures) == 3  # each request logged its 500


def test_batching_settings(monkeypatch: pytest.MonkeyPatch, model_path: Path) -> None:
    with running_app(monkeypatch, **batching_env(model_path, BATCH_MAX_WAIT_MS="2.5")) as client:
        batcher = client.app.state.batcher
        assert (batcher.max_size, batcher.max_wait_s) == (16, 0.0025)
        assert post_image(client, gray_png(), detect=False).status_code == 200
    assert client.app.state.batcher is None  # stopped with the lifespan
    assert batcher.waiting == 0


def test_app_with_batching_answers_like_the_app_without(monkeypatch: pytest.MonkeyPatch, model_path: Path) -> None:
    """One request at a time: the same answers, batched or not (a pass of one request each)."""
    files = [("a.png", gray_png()), ("b.jpg", photo_jpeg("astronaut")), ("c.jpg", photo_jpeg("coffee"))]
    with running_app(monkeypatch, MODEL_URI=str(model_path), BATCH_MAX_SIZE="1") as client:
        assert client.app.state.batcher is None
        unbatched = [item["faces"] for item in post_batch(client, files).json()["results"]]
        single = post_image(client, gray_png(), detect=False).json()["faces"]
    with running_app(monkeypatch, **batching_env(model_path)) as client:
        assert client.app.state.batcher is not None
        batched = [item["faces"] for item in post_batch(client, files).json()["results"]]
        assert_same_faces(post_image(client, gray_png(), detect=False).json()["faces"], single)
    for got, want in zip(batched, unbatched, strict=True):
        assert_same_faces(got, want)


def test_batching_is_on_by_default(client: TestClient) -> None:
    batcher = client.app.state.batcher
    assert batcher is not None and (batcher.max_size, batcher.max_wait_s) == (32, 0.0)


class ThreadRecorder:
    """The app's real predictor, recording the name of the thread each pass runs in."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.info = real.info
        self.threads: list[str] = []

    def predict_faces(self, faces: list[Any]) -> list[Any]:
        self.threads.append(threading.current_thread().name)
        return self.real.predict_faces(faces)


@pytest.mark.parametrize(("slots", "in_batcher"), [("2", False), ("1", True)])
def test_a_lone_request_runs_its_pass_in_its_own_slot_when_another_is_free(
    monkeypatch: pytest.MonkeyPatch, model_path: Path, slots: str, in_batcher: bool
) -> None:
    """Nothing to batch with: the pass runs right after the decoding, in the request's own slot (one
    thread hop), measured as a batch of one; with a single slot, in the batcher's worker, so that
    the slot is free for the next request's decoding while the pass runs."""
    with running_app(monkeypatch, **batching_env(model_path, MAX_CONCURRENT_INFERENCES=slots)) as client:
        recorder = ThreadRecorder(client.app.state.predictor)
        client.app.dependency_overrides[get_predictor] = lambda: recorder
        for _ in range(2):
            assert post_image(client, gray_png(), detect=False).status_code == 200
        assert [name.startswith("fer-batch") for name in recorder.threads] == [in_batcher, in_batcher]
        assert metric(client, "fer_inference_batch_size_count") == 2
        assert metric(client, "fer_batch_wait_seconds_count") == 2
        assert client.app.state.limiter.admitted == 0 and client.app.state.limiter.idle_slots == int(slots)
