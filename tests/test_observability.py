"""Metrics, traces and logs of the service, checked from the outside: ``/metrics`` parsed with
Prometheus' own parser, spans received by a real OTLP/HTTP endpoint on 127.0.0.1 and decoded
with the OTLP protobuf classes, log lines parsed as JSON."""

from __future__ import annotations

import gzip
import io
import json
import logging
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest, ExportTraceServiceResponse
from opentelemetry.proto.trace.v1.trace_pb2 import Span
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from app import logs
from app.deps import get_predictor
from app.logs import SPAN_FIELD, TRACE_FIELD, JsonFormatter, configure_logging
from app.main import create_app
from app.settings import ConfigError
from fercore.labels import CLASS_NAMES
from fercore.storage import sha256_file
from tests.utils.photos import photo_jpeg
from tests.utils.service import clean_service_env, gray_png, post_batch, post_image, running_app
from tests.utils.tools import require_tool

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
CALLER_SPAN_ID = "b7ad6b7169203331"
TRACEPARENT = f"00-{TRACE_ID}-{CALLER_SPAN_ID}-01"
STEPS = ("decode", "detect_faces", "preprocess", "inference")


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    clean_service_env(monkeypatch)
    monkeypatch.delenv("GOOGLE_CLOUD_PROJECT", raising=False)
    monkeypatch.delenv("K_SERVICE", raising=False)


# --- metrics ----------------------------------------------------------------------------


def scrape(client: TestClient) -> dict[str, list[Sample]]:
    """``GET /metrics``, parsed: samples by metric family name."""
    r = client.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    return {family.name: family.samples for family in text_string_to_metric_families(r.text)}


def value(samples: list[Sample], name: str, **labels: str) -> float:
    """The one sample called ``name`` whose labels include ``labels``."""
    (match,) = [s for s in samples if s.name == name and labels.items() <= s.labels.items()]
    return match.value


def test_metrics_count_requests_faces_and_predictions(client: TestClient, model_path: Path) -> None:
    faces_returned = 0
    for data, detect in [(photo_jpeg("astronaut"), None), (photo_jpeg("coffee"), None), (gray_png(), False)]:
        r = post_image(client, data, detect=detect)
        assert r.status_code == 200
        faces_returned += len(r.json()["faces"])
    batch = post_batch(client, [("a.jpg", photo_jpeg("astronaut")), ("c.jpg", photo_jpeg("coffee")), ("x.txt", b"text")])
    assert batch.status_code == 200
    faces_returned += sum(len(item.get("faces", [])) for item in batch.json()["results"])
    assert faces_returned == 3  # astronaut, the whole gray image, astronaut again; coffee has none
    assert post_image(client, b"").status_code == 400
    assert client.get("/no/such/page/42").status_code == 404

    metrics = scrape(client)

    requests = metrics["fer_http_requests"]
    assert value(requests, "fer_http_requests_total", method="POST", route="/predict", status="200") == 3
    assert value(requests, "fer_http_requests_total", method="POST", route="/predict", status="400") == 1
    assert value(requests, "fer_http_requests_total", method="POST", route="/predict/batch", status="200") == 1
    assert value(requests, "fer_http_requests_total", method="GET", route="unmatched", status="404") == 1
    routes = {s.labels["route"] for s in requests}
    assert routes == {"/predict", "/predict/batch", "unmatched"}  # templates only, never a raw path

    latency = metrics["fer_http_request_duration_seconds"]
    labels = {"method": "POST", "route": "/predict", "status": "200"}
    assert value(latency, "fer_http_request_duration_seconds_count", **labels) == 3
    buckets = [s for s in latency if s.name.endswith("_bucket") and labels.items() <= s.labels.items()]
    counts = [s.value for s in sorted(buckets, key=lambda s: float(s.labels["le"]))]
    assert counts == sorted(counts) and counts[-1] == 3  # cumulative, +Inf holds them all
    assert value(latency, "fer_http_request_duration_seconds_sum", **labels) > 0

    # Three images and one batch went through an inference slot; the empty file never got one.
    assert value(metrics["fer_inference_queue_wait_seconds"], "fer_inference_queue_wait_seconds_count") == 4
    assert value(metrics["fer_inference_duration_seconds"], "fer_inference_duration_seconds_count") == 4
    # Forward passes: astronaut (1 face), gray image (1), the batch (1); coffee alone has no face, no pass.
    assert value(metrics["fer_inference_batch_size"], "fer_inference_batch_size_count") == 3
    assert value(metrics["fer_inference_batch_size"], "fer_inference_batch_size_sum") == 3
    # Decoded images: three single ones, two of the batch (the text file is not an image).
    faces = metrics["fer_faces_per_image"]
    assert value(faces, "fer_faces_per_image_count") == 5
    assert value(faces, "fer_faces_per_image_sum") == faces_returned
    assert value(faces, "fer_faces_per_image_bucket", le="0.0") == 2  # both coffee photos

    predictions = [s for s in metrics["fer_predictions"] if s.name == "fer_predictions_total"]
    assert {s.labels["emotion"] for s in predictions} == set(CLASS_NAMES)
    assert sum(s.value for s in predictions) == faces_returned

    assert value(metrics["fer_http_requests_in_flight"], "fer_http_requests_in_flight") == 1  # this scrape
    (info,) = metrics["fer_model_info"]
    assert info.value == 1
    assert info.labels == {
        "version": "test-run",
        "run_id": "test-run",
        "architecture": "compact",
        "sha256": sha256_file(model_path),
    }
    loads = metrics["fer_model_loads"]
    assert value(loads, "fer_model_loads_total", result="success") == 1
    assert value(loads, "fer_model_loads_total", result="failure") == 0
    assert "process_resident_memory_bytes" in metrics

    # The scrape itself is counted, by the next one.
    assert value(scrape(client)["fer_http_requests"], "fer_http_requests_total", route="/metrics") == 1


def test_failed_model_load_is_counted(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    with running_app(monkeypatch, MODEL_URI=str(tmp_path / "nowhere.pt")) as client:
        assert client.get("/readyz").status_code == 503
        metrics = scrape(client)  # served without a model
    assert value(metrics["fer_model_loads"], "fer_model_loads_total", result="failure") == 1
    assert value(metrics["fer_model_loads"], "fer_model_loads_total", result="success") == 0
    assert metrics["fer_model_info"] == []


def test_each_app_has_its_own_registry(monkeypatch: pytest.MonkeyPatch, model_path: Path) -> None:
    monkeypatch.setenv("MODEL_URI", str(model_path))
    with TestClient(create_app()) as first, TestClient(create_app()) as second:
        assert post_image(first, gray_png(), detect=False).status_code == 200
        counted = [s for s in scrape(second).get("fer_http_requests", []) if s.name == "fer_http_requests_total"]
        assert counted == []  # the request went to the other app
        assert value(scrape(first)["fer_http_requests"], "fer_http_requests_total", route="/predict") == 1


def test_metrics_speak_openmetrics_when_asked(client: TestClient) -> None:
    r = client.get("/metrics", headers={"accept": "application/openmetrics-text; version=1.0.0"})
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("application/openmetrics-text")
    assert r.text.endswith("# EOF\n")


def test_promtool_accepts_the_metrics(client: TestClient) -> None:
    promtool = require_tool("promtool", "Debian's prometheus package")
    assert post_image(client, gray_png(), detect=False).status_code == 200
    text = client.get("/metrics").text
    result = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


# --- traces -----------------------------------------------------------------------------


@dataclass
class OtlpReceiver:
    """What an OTLP/HTTP collector on 127.0.0.1 was sent."""

    url: str
    bodies: list[bytes] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)

    def spans(self) -> list[Span]:
        out: list[Span] = []
        for body in self.bodies:
            request = ExportTraceServiceRequest.FromString(body)
            for resource_spans in request.resource_spans:
                for scope_spans in resource_spans.scope_spans:
                    out.extend(scope_spans.spans)
        return out

    def service_names(self) -> set[str]:
        return {
            attr.value.string_value
            for body in self.bodies
            for resource_spans in ExportTraceServiceRequest.FromString(body).resource_spans
            for attr in resource_spans.resource.attributes
            if attr.key == "service.name"
        }


@pytest.fixture
def otlp_receiver(monkeypatch: pytest.MonkeyPatch) -> Iterator[OtlpReceiver]:
    """A tiny OTLP/HTTP endpoint: records each ``POST /v1/traces`` body and answers success."""
    received = OtlpReceiver(url="")

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length", 0)))
            encoding = self.headers.get("content-encoding", "")
            if encoding == "gzip":
                body = gzip.decompress(body)
            elif encoding == "deflate":
                body = zlib.decompress(body)
            received.paths.append(self.path)
            if self.path == "/v1/traces":
                received.bodies.append(body)
            reply = ExportTraceServiceResponse().SerializeToString()
            self.send_response(200)
            self.send_header("content-type", "application/x-protobuf")
            self.send_header("content-length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, format: str, *args: object) -> None:  # quiet
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    received.url = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield received
    finally:
        server.shutdown()
        server.server_close()


def traced_env(model_path: Path, receiver: OtlpReceiver) -> dict[str, str]:
    return {
        "MODEL_URI": str(model_path),
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url,
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_SERVICE_NAME": "fer-test",
    }


def by_id(spans: list[Span]) -> dict[bytes, Span]:
    return {span.span_id: span for span in spans}


def ancestors(span: Span, spans: dict[bytes, Span]) -> list[bytes]:
    """The span ids from ``span``'s parent up to the root of what was exported."""
    chain: list[bytes] = []
    parent = span.parent_span_id
    while parent in spans:
        chain.append(parent)
        parent = spans[parent].parent_span_id
    chain.append(parent)  # the caller's span, not exported by this service (or b"" for a root)
    return chain


# The parent of each step's span: with micro-batching (the default), the forward pass is a ``batch``
# span inside the request's ``classify`` span; without it, the steps are children of the request.
BATCHED_PARENTS = {"decode": "server", "detect_faces": "server", "classify": "server", "batch": "classify"}
BATCHED_PARENTS |= {"preprocess": "batch", "inference": "batch"}
UNBATCHED_PARENTS = {"decode": "server", "detect_faces": "server", "preprocess": "server", "inference": "server"}


@pytest.mark.parametrize(("batch_max_size", "parents"), [("32", BATCHED_PARENTS), ("1", UNBATCHED_PARENTS)])
def test_request_span_continues_the_callers_trace(
    monkeypatch: pytest.MonkeyPatch,
    model_path: Path,
    otlp_receiver: OtlpReceiver,
    batch_max_size: str,
    parents: dict[str, str],
) -> None:
    env = {**traced_env(model_path, otlp_receiver), "BATCH_MAX_SIZE": batch_max_size}
    with running_app(monkeypatch, **env) as client:
        assert client.app.state.tracing.enabled
        r = post_image(client, photo_jpeg("astronaut"), "astronaut.jpg", headers={"traceparent": TRACEPARENT})
        assert r.status_code == 200 and len(r.json()["faces"]) == 1
        assert client.get("/healthz").status_code == 200  # not traced
        assert client.get("/metrics").status_code == 200  # not traced
    # Leaving the client ran the lifespan's end, which flushed the batch processor.
    assert otlp_receiver.paths and set(otlp_receiver.paths) == {"/v1/traces"}
    assert otlp_receiver.service_names() == {"fer-test"}
    spans = otlp_receiver.spans()
    assert {span.name for span in spans} == {"POST /predict", *STEPS, *parents}  # no probe, no per-message ASGI span

    (server,) = [span for span in spans if span.kind == Span.SPAN_KIND_SERVER]
    assert server.name == "POST /predict"
    assert server.trace_id.hex() == TRACE_ID
    assert server.parent_span_id.hex() == CALLER_SPAN_ID
    index = by_id(spans)
    named = {span.name: span for span in spans if span.kind == Span.SPAN_KIND_INTERNAL}
    named["server"] = server
    for name, parent in parents.items():
        step = named[name]
        assert step.trace_id.hex() == TRACE_ID
        assert step.parent_span_id == named[parent].span_id, name  # though run in a worker thread
        chain = ancestors(step, index)
        assert server.span_id in chain and chain[-1].hex() == CALLER_SPAN_ID
        assert server.start_time_unix_nano <= step.start_time_unix_nano <= step.end_time_unix_nano
        assert step.end_time_unix_nano <= server.end_time_unix_nano
    attributes = {(span.name, attr.key): attr.value.int_value for span in spans for attr in span.attributes}
    assert attributes[("detect_faces", "fer.faces")] == 1
    assert attributes[("inference", "fer.batch_size")] == 1
    assert attributes[("decode", "fer.image.width")] == 512


def test_without_traceparent_the_request_starts_a_trace(
    monkeypatch: pytest.MonkeyPatch, model_path: Path, otlp_receiver: OtlpReceiver
) -> None:
    with running_app(monkeypatch, **traced_env(model_path, otlp_receiver)) as client:
        assert post_batch(client, [("a.png", gray_png()), ("b.png", gray_png())], detect=False).status_code == 200
    spans = otlp_receiver.spans()
    (server,) = [span for span in spans if span.kind == Span.SPAN_KIND_SERVER]
    assert server.name == "POST /predict/batch" and server.parent_span_id == b""

    def children(parent: Span) -> list[str]:
        return sorted(span.name for span in spans if span.parent_span_id == parent.span_id)

    # One decode per file, one forward pass for the batch's faces; detect=false: no detection.
    assert children(server) == ["classify", "decode", "decode"]
    (classify,) = [span for span in spans if span.name == "classify"]
    assert children(classify) == ["batch"]
    (batch,) = [span for span in spans if span.name == "batch"]
    assert children(batch) == ["inference", "preprocess"]
    assert {span.trace_id for span in spans} == {server.trace_id}


def test_micro_batched_requests_link_to_their_shared_forward_pass(
    monkeypatch: pytest.MonkeyPatch, model_path: Path, otlp_receiver: OtlpReceiver
) -> None:
    """Three requests, the last two in one pass: that pass is traced once, in the trace of the
    first request in it, linked to both requests' ``classify`` spans, which link back to it."""
    env = {**traced_env(model_path, otlp_receiver), "BATCH_MAX_SIZE": "8", "MAX_CONCURRENT_INFERENCES": "2"}
    with running_app(monkeypatch, **env) as client, ThreadPoolExecutor(3) as pool:
        real = client.app.state.predictor
        entered, release = threading.Event(), threading.Event()

        class Gated:  # the first pass waits at the gate while the other two requests queue
            info = real.info

            def predict_faces(self, faces: list) -> list:
                entered.set()
                assert release.wait(60), "never released"
                return real.predict_faces(faces)

        gated = Gated()  # one instance: requests of different predictors never share a pass
        client.app.dependency_overrides[get_predictor] = lambda: gated
        first = pool.submit(post_image, client, gray_png(), "first.png", False)
        assert entered.wait(60)
        later = [pool.submit(post_image, client, gray_png(), f"{i}.png", False) for i in range(2)]
        deadline = time.monotonic() + 60
        while client.app.state.batcher.waiting < 2:
            assert time.monotonic() < deadline, "the two requests never queued"
            time.sleep(0.005)
        release.set()
        assert [f.result().status_code for f in (first, *later)] == [200, 200, 200]
    spans = otlp_receiver.spans()
    index = by_id(spans)
    servers = [span for span in spans if span.kind == Span.SPAN_KIND_SERVER]
    assert len(servers) == 3 and len({span.trace_id for span in servers}) == 3  # three requests, three traces
    classify = {span.trace_id: span for span in spans if span.name == "classify"}
    batches = [span for span in spans if span.name == "batch"]
    assert len(classify) == 3 and len(batches) == 2
    for batch in batches:
        parent = index[batch.parent_span_id]
        assert parent.name == "classify" and index[parent.parent_span_id].kind == Span.SPAN_KIND_SERVER
        linked = {link.span_id for link in batch.links}
        assert parent.span_id in linked  # its own request among the linked ones
        for step in ("preprocess", "inference"):
            (child,) = [span for span in spans if span.name == step and span.parent_span_id == batch.span_id]
            assert child.trace_id == batch.trace_id
        size = {attr.key: attr.value.int_value for attr in batch.attributes}
        assert size["fer.batch_size"] == size["fer.batch_requests"] == len(linked)
        for request_span in (span for span in classify.values() if span.span_id in linked):
            assert [link.span_id for link in request_span.links] == [batch.span_id]  # and back
    shared = max(batches, key=lambda span: len(span.links))
    assert len(shared.links) == 2
    other = next(index[link.span_id] for link in shared.links if link.span_id != shared.parent_span_id)
    assert other.trace_id != shared.trace_id  # the second request's trace reaches the pass by its link
    assert not [span for span in spans if span.name == "inference" and span.trace_id == other.trace_id]


def test_tracing_is_off_by_default(client: TestClient) -> None:
    tracing = client.app.state.tracing
    assert not tracing.enabled and tracing.provider is None
    assert not tracing.tracer.start_span("x").get_span_context().is_valid  # a no-op tracer


@pytest.mark.parametrize(
    "env",
    [
        {"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9"},
        {"OTEL_SDK_DISABLED": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9"},
        {"OTEL_SERVICE_NAME": "fer"},
    ],
    ids=["exporter-none", "sdk-disabled", "no-exporter"],
)
def test_tracing_stays_off(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> None:
    for name, val in env.items():
        monkeypatch.setenv(name, val)
    assert not create_app().state.tracing.enabled


@pytest.mark.parametrize(
    ("name", "val"),
    [("OTEL_TRACES_EXPORTER", "jaeger"), ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"), ("OTEL_SDK_DISABLED", "maybe")],
)
def test_invalid_tracing_settings_stop_startup(monkeypatch: pytest.MonkeyPatch, name: str, val: str) -> None:
    monkeypatch.setenv(name, val)
    with pytest.raises(ConfigError, match=name):
        create_app()


def test_cloud_trace_exporter_missing_is_logged(
    monkeypatch: pytest.MonkeyPatch, model_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setitem(sys.modules, "opentelemetry.exporter.cloud_trace", None)  # import fails: not installed
    env = {"MODEL_URI": str(model_path), "OTEL_TRACES_EXPORTER": "gcp_trace"}
    with caplog.at_level(logging.ERROR), running_app(monkeypatch, **env) as client:
        assert client.get("/readyz").status_code == 200  # the service runs, untraced
        assert post_image(client, gray_png(), detect=False).status_code == 200
    (message,) = [rec.getMessage() for rec in caplog.records if rec.name == "app.tracing"]
    assert "gcp_trace" in message and "fer2013-mlops[gcp]" in message


# --- logs -------------------------------------------------------------------------------


@pytest.fixture
def json_log(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> Iterator[io.StringIO]:
    """The ``app`` loggers' lines, formatted at INFO as the service formats them."""
    monkeypatch.setenv("GOOGLE_CLOUD_PROJECT", "demo-project")
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("app")
    caplog.set_level(logging.INFO, logger="app")
    logger.addHandler(handler)
    try:
        yield stream
    finally:
        logger.removeHandler(handler)


def json_lines(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]  # each line a JSON object


def test_log_lines_carry_the_trace(
    monkeypatch: pytest.MonkeyPatch, model_path: Path, otlp_receiver: OtlpReceiver, json_log: io.StringIO
) -> None:
    corrupt = photo_jpeg("astronaut")[:2000]  # a truncated JPEG: rejected while decoding, which logs why
    with running_app(monkeypatch, **traced_env(model_path, otlp_receiver)) as client:
        assert post_image(client, gray_png(), detect=False, headers={"traceparent": TRACEPARENT}).status_code == 200
        assert post_image(client, corrupt, headers={"traceparent": TRACEPARENT}).status_code == 400
    spans = otlp_receiver.spans()
    servers = [span.span_id.hex() for span in spans if span.kind == Span.SPAN_KIND_SERVER]
    decodes = [span for span in spans if span.name == "decode"]
    lines = json_lines(json_log)

    access = [line for line in lines if line["logger"] == "app.access"]
    assert [(line["httpRequest"]["status"], line["route"]) for line in access] == [(200, "/predict"), (400, "/predict")]
    for line in access:
        assert line["severity"] == "INFO"
        assert line["message"].startswith("POST /predict ")
        assert line[TRACE_FIELD] == f"projects/demo-project/traces/{TRACE_ID}"
        assert line[SPAN_FIELD] in servers  # logged inside the request span
        assert line["httpRequest"]["requestMethod"] == "POST"
        assert line["httpRequest"]["latency"].endswith("s") and line["latency_ms"] > 0
        assert line["time"].endswith("+00:00")

    # Logged in the worker thread, inside the decode span: the context crossed the thread.
    (rejected,) = [line for line in lines if line["logger"] == "app.images"]
    assert rejected["severity"] == "INFO" and "rejected" in rejected["message"]
    assert rejected[TRACE_FIELD] == f"projects/demo-project/traces/{TRACE_ID}"
    assert rejected[SPAN_FIELD] in {span.span_id.hex() for span in decodes}

    # Startup happened outside any request: no trace.
    (serving,) = [line for line in lines if line["message"].startswith("serving model")]
    assert TRACE_FIELD not in serving and SPAN_FIELD not in serving


def test_access_log_without_tracing(client: TestClient, json_log: io.StringIO) -> None:
    assert client.get("/nowhere", headers={"traceparent": TRACEPARENT}).status_code == 404
    (line,) = [line for line in json_lines(json_log) if line["logger"] == "app.access"]
    assert line["route"] == "unmatched" and line["httpRequest"]["requestUrl"] == "/nowhere"
    assert TRACE_FIELD not in line  # tracing off: the header is not read


def test_formatter_fields() -> None:
    tracer = TracerProvider(shutdown_on_exit=False).get_tracer("test")
    record = logging.LogRecord("app.x", logging.ERROR, __file__, 7, "failed %s", ("here",), None)
    try:
        raise ValueError("boom")
    except ValueError:
        record.exc_info = sys.exc_info()
    with tracer.start_as_current_span("s") as span:
        entry = json.loads(JsonFormatter(project="").format(record))
        trace_id = f"{span.get_span_context().trace_id:032x}"
    assert entry["severity"] == "ERROR" and entry["message"] == "failed here" and entry["logger"] == "app.x"
    assert entry[TRACE_FIELD] == trace_id  # no project known: the bare trace id
    assert entry[SPAN_FIELD] == f"{span.get_span_context().span_id:016x}"
    assert "ValueError: boom" in entry["stack_trace"]
    outside = json.loads(JsonFormatter(project="p").format(logging.LogRecord("a", logging.INFO, __file__, 1, "m", (), None)))
    assert TRACE_FIELD not in outside and "stack_trace" not in outside


def test_configure_logging_sends_uvicorn_through_json(monkeypatch: pytest.MonkeyPatch) -> None:
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [])  # as under uvicorn: nothing configured the root yet
    loggers = [logging.getLogger(name) for name in (*logs.UVICORN_LOGGERS, logs.UVICORN_ACCESS_LOGGER)]
    for logger in loggers:
        for attr in ("handlers", "propagate", "disabled"):
            monkeypatch.setattr(logger, attr, getattr(logger, attr))
    uvicorn, _, access = loggers
    uvicorn.handlers = [logging.NullHandler()]  # what uvicorn's dictConfig leaves
    uvicorn.propagate = False

    level = root.level
    try:
        configure_logging()
    finally:
        root.setLevel(level)  # setLevel, not setattr: it also clears the loggers' cached levels

    (handler,) = root.handlers
    assert isinstance(handler.formatter, JsonFormatter)
    assert uvicorn.propagate and not uvicorn.handlers
    assert access.disabled  # app.access writes the access log
