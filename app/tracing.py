"""Tracing with OpenTelemetry: a span per request, and spans for its ``decode``, ``detect_faces``,
``preprocess`` and ``inference`` steps inside it.

Configured by the standard ``OTEL_*`` environment variables, checked by :mod:`app.settings`:

* nothing set: tracing is off (no spans, no exporter, no network);
* ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or ``..._TRACES_ENDPOINT``), or ``OTEL_TRACES_EXPORTER=otlp``:
  spans go to an OTLP/HTTP collector (protobuf bodies to ``<endpoint>/v1/traces``);
* ``OTEL_TRACES_EXPORTER=gcp_trace``: spans go to Cloud Trace, with the optional extra
  ``pip install 'fer2013-mlops[gcp]'`` (without it, an ERROR line says so and tracing stays off);
* ``OTEL_TRACES_EXPORTER=console``: spans printed to stdout, for debugging;
* ``OTEL_TRACES_EXPORTER=none`` or ``OTEL_SDK_DISABLED=true``: off, whatever else is set.

The SDK reads the others itself: ``OTEL_SERVICE_NAME`` (default here: Cloud Run's
``K_SERVICE``, else ``fer2013-service``), ``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_TRACES_SAMPLER``,
``OTEL_EXPORTER_OTLP_HEADERS``/``_TIMEOUT``/``_COMPRESSION``, ``OTEL_BSP_*``.

Each app has its own ``TracerProvider`` (never the process-global one), so tests can run several
apps with different settings in one process. An incoming W3C ``traceparent`` header is honoured:
the request span continues the caller's trace. The probes and ``/metrics`` are not traced.

Request and response headers are only recorded when ``OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_*``
ask for them; credentials (``Authorization``, cookies...) are then always recorded as
``[REDACTED]``, whatever ``OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_SANITIZE_FIELDS`` says: a
capture-everything ``.*`` set for debugging must not send the admin token to a trace backend.
"""

from __future__ import annotations

import logging
import os

from fastapi import FastAPI
from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
from opentelemetry.sdk.resources import SERVICE_NAME, SERVICE_VERSION, Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SimpleSpanProcessor, SpanExporter
from opentelemetry.trace import NoOpTracer, Tracer

from app.settings import Settings

log = logging.getLogger(__name__)

INSTRUMENTATION_NAME = "app"
DEFAULT_SERVICE_NAME = "fer2013-service"
# Requests not worth a trace: probes every few seconds, and the metrics scrape.
UNTRACED_URLS = "/healthz$,/readyz$,/metrics$"
# Env variables by which the instrumentation's own exclusion list is set instead.
_EXCLUDED_URLS_ENV = ("OTEL_PYTHON_FASTAPI_EXCLUDED_URLS", "OTEL_PYTHON_EXCLUDED_URLS")
# Headers never recorded in a span, even when header capture is on (regexes, case-insensitive),
# added to those of the variable below.
SECRET_HEADERS = ("authorization", "proxy-authorization", "cookie", "set-cookie", "x-api-key")
_SANITIZE_ENV = "OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_SANITIZE_FIELDS"
GCP_EXTRA_HINT = "pip install 'fer2013-mlops[gcp]' (opentelemetry-exporter-gcp-trace)"


class Tracing:
    """One app's tracer provider and tracer. Off (a no-op tracer) when no exporter is configured.

    Spans are made as soon as the app is instrumented; they are exported from :meth:`start` (in
    the lifespan: the exporters' threads and connections belong to a running app) until
    :meth:`shutdown`, which sends what is still buffered. An app's lifespan runs once.
    """

    def __init__(self, settings: Settings, service_version: str = "") -> None:
        self.settings = settings
        self.exporters = settings.resolved_trace_exporters()
        self.provider: TracerProvider | None = None
        self.tracer: Tracer = NoOpTracer()
        if self.exporters:
            # Not shut down at exit: the lifespan does it, and an atexit hook would keep every
            # test's provider alive.
            self.provider = TracerProvider(resource=service_resource(service_version), shutdown_on_exit=False)
            self.tracer = self.provider.get_tracer(INSTRUMENTATION_NAME)

    @property
    def enabled(self) -> bool:
        return self.provider is not None

    def instrument(self, app: FastAPI) -> None:
        """Give every request a server span (continuing an incoming ``traceparent``)."""
        if self.provider is None:
            return
        from_env = any(os.environ.get(name) for name in _EXCLUDED_URLS_ENV)
        FastAPIInstrumentor.instrument_app(
            app,
            tracer_provider=self.provider,
            excluded_urls=None if from_env else UNTRACED_URLS,
            # One span per ASGI message would bury the steps under dozens of upload chunks.
            exclude_spans=["receive", "send"],
            # Given here, the list replaces the variable's: both go in.
            http_capture_headers_sanitize_fields=sanitized_headers(),
        )

    def start(self) -> None:
        """Attach the exporters; one that cannot be made is logged and skipped."""
        if self.provider is None:
            return
        for name in self.exporters:
            processor = self._processor(name)
            if processor is not None:
                self.provider.add_span_processor(processor)
                log.info("tracing: exporting spans with %s", name)

    def shutdown(self) -> None:
        """Flush the spans still buffered and stop the exporters."""
        if self.provider is not None:
            self.provider.shutdown()

    def _processor(self, name: str) -> SpanProcessor | None:
        if name == "console":  # for a developer watching stdout: no batching delay
            return SimpleSpanProcessor(ConsoleSpanExporter())
        exporter = otlp_exporter() if name == "otlp" else gcp_trace_exporter(self.settings.google_cloud_project)
        return BatchSpanProcessor(exporter) if exporter is not None else None


def service_resource(service_version: str) -> Resource:
    """``service.name`` and ``service.version``, unless OTEL_SERVICE_NAME/OTEL_RESOURCE_ATTRIBUTES say otherwise."""
    resource = Resource.create()  # reads the env variables
    defaults: dict[str, str] = {}
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        defaults[SERVICE_NAME] = os.environ.get("K_SERVICE") or DEFAULT_SERVICE_NAME
    if service_version and SERVICE_VERSION not in resource.attributes:
        defaults[SERVICE_VERSION] = service_version
    return resource.merge(Resource(defaults)) if defaults else resource


def otlp_exporter() -> SpanExporter:
    """OTLP over HTTP; endpoint, headers, timeout and compression from the ``OTEL_EXPORTER_OTLP_*`` variables."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter()


def gcp_trace_exporter(project: str | None) -> SpanExporter | None:
    """Cloud Trace, if the optional exporter is installed and credentials are found; else None, logged."""
    try:
        from opentelemetry.exporter.cloud_trace import CloudTraceSpanExporter
    except ImportError:
        log.error("OTEL_TRACES_EXPORTER=gcp_trace but the Cloud Trace exporter is not installed: %s", GCP_EXTRA_HINT)
        return None
    try:
        exporter: SpanExporter = CloudTraceSpanExporter(project_id=project)
    except Exception as exc:  # no credentials, no project: tracing off, the service still serves
        log.error("OTEL_TRACES_EXPORTER=gcp_trace: cannot create the Cloud Trace exporter (%s: %s)", type(exc).__name__, exc)
        return None
    return exporter


def sanitized_headers() -> list[str]:
    """Header names (regexes) recorded as ``[REDACTED]``: the operator's, and :data:`SECRET_HEADERS`."""
    configured = [name.strip() for name in os.environ.get(_SANITIZE_ENV, "").split(",") if name.strip()]
    return [*configured, *SECRET_HEADERS]
