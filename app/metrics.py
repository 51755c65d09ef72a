"""Every Prometheus metric the service exports, defined in one place and served at ``GET /metrics``.

Each app gets its own :class:`Metrics`, with its own ``CollectorRegistry``: tests create many
apps in one process, and two registering ``fer_http_requests_total`` in the global registry
would clash. The service runs one process per container (Cloud Run scales instances, not
workers), so no multiprocess collector is needed.

Label values are bounded on purpose: requests are labelled by their route template
(``/predict``), never the raw path, and unknown HTTP methods become ``other``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypedDict

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from app.model import ModelInfo

NAMESPACE = "fer"
# Seconds: a small image takes milliseconds, a large photo on a busy CPU a few seconds.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# Seconds waited for an inference slot: zero when idle, up to the queue's length under load.
WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# Faces per forward pass: one for most selfies, many for a /predict/batch of group photos.
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
# Faces found per image; 0 is its own bucket (no face found is a common, valid answer).
FACES_BUCKETS = (0, 1, 2, 3, 4, 6, 8, 12, 16, 32)
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
UNMATCHED_ROUTE = "unmatched"  # the route label of a request no route matched (404)


class _Registered(TypedDict):
    namespace: str
    registry: CollectorRegistry


class Metrics:
    """The service's metrics, in :attr:`registry`. Names are prefixed ``fer_``."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        # What the global registry would have had: CPU, memory, open files, GC and Python version.
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        common = _Registered(namespace=NAMESPACE, registry=self.registry)
        self._declare_http(common)
        self._declare_inference(common)
        self._declare_model(common)

    def _declare_http(self, common: _Registered) -> None:
        """Requests as the client sees them (app.access)."""
        self.requests = Counter(
            "http_requests",
            "HTTP requests answered, by method, route template and status code.",
            ["method", "route", "status"],
            **common,
        )
        self.request_duration = Histogram(
            "http_request_duration_seconds",
            "Time from a request's arrival to the end of its response.",
            ["method", "route", "status"],
            buckets=LATENCY_BUCKETS,
            **common,
        )
        self.in_flight = Gauge("http_requests_in_flight", "HTTP requests being handled right now.", **common)

    def _declare_inference(self, common: _Registered) -> None:
        """Admission, slots, forward passes and what they found (app.concurrency, app.batching, app.pipeline)."""
        self.inference_admitted = Gauge(
            "inference_admitted",
            "Requests running or waiting for an inference slot; at most MAX_CONCURRENT_INFERENCES + MAX_QUEUE (beyond: 503).",
            **common,
        )
        self.queue_wait = Histogram(
            "inference_queue_wait_seconds", "Time a request waited for an inference slot.", buckets=WAIT_BUCKETS, **common
        )
        self.inference_duration = Histogram(
            "inference_duration_seconds",
            "Time a request held an inference slot: decode, face detection, and its forward pass when that ran in"
            " the slot (BATCH_MAX_SIZE=1, or nothing to batch with).",
            buckets=LATENCY_BUCKETS,
            **common,
        )
        self.batch_size = Histogram(
            "inference_batch_size", "Faces classified per forward pass of the model.", buckets=BATCH_BUCKETS, **common
        )
        self.batch_wait = Histogram(
            "batch_wait_seconds",
            "Time a request's faces waited for the forward pass they joined to start (micro-batching only).",
            buckets=WAIT_BUCKETS,
            **common,
        )
        self.faces_per_image = Histogram(
            "faces_per_image", "Faces found per decoded image (1 with detect=false).", buckets=FACES_BUCKETS, **common
        )
        self.predictions = Counter("predictions", "Faces classified, by predicted emotion.", ["emotion"], **common)

    def _declare_model(self, common: _Registered) -> None:
        """The model served, and its loads (app.loader)."""
        self.model_info = Gauge(
            "model_info",
            "The model being served (always 1; its identity is in the labels).",
            ["version", "run_id", "architecture", "sha256"],
            **common,
        )
        self.model_loads = Counter(
            "model_loads",
            "Model loads (the one at startup and any reload), by result: success or failure.",
            ["result"],
            **common,
        )
        for result in ("success", "failure"):  # both series exist from the start, at 0
            self.model_loads.labels(result)
        self.model_load_retries = Counter(
            "model_load_retries",
            "Model load attempts that failed for a transient reason (GCS unreachable or slow, a 5xx) and were retried.",
            **common,
        )

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        method = method if method in HTTP_METHODS else "other"
        self.requests.labels(method, route, str(status)).inc()
        self.request_duration.labels(method, route, str(status)).observe(seconds)

    def observe_images(self, emotions_per_image: Sequence[Sequence[str]]) -> None:
        """Record the outcome of one request: the predicted emotion of each face, per image."""
        for emotions in emotions_per_image:
            self.faces_per_image.observe(len(emotions))
            for emotion in emotions:
                self.predictions.labels(emotion).inc()

    def observe_forward_pass(self, faces: int) -> None:
        """Record one forward pass of the model over ``faces`` faces (none: no pass, nothing recorded)."""
        if faces:
            self.batch_size.observe(faces)

    def model_loaded(self, info: ModelInfo) -> None:
        """A model is now served: it replaces the previous one in ``fer_model_info``."""
        self.model_loads.labels("success").inc()
        self.model_info.clear()
        self.model_info.labels(info.version, info.run_id, info.architecture, info.sha256).set(1)
        for emotion in info.classes:  # every class has a series, at 0 until predicted
            self.predictions.labels(emotion)

    def model_load_failed(self) -> None:
        """A load gave up (after its retries, if any): at startup, or a reload that keeps the old model."""
        self.model_loads.labels("failure").inc()

    def model_load_retried(self) -> None:
        self.model_load_retries.inc()
