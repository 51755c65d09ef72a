"""Logging for the service: one JSON object per line, with the field names Cloud Logging reads
(``severity``, ``message``, ``time``, ``logging.googleapis.com/trace`` ...). Configured once, at
the entry point (:mod:`app.main`).

While a span is active (tracing on, see :mod:`app.tracing`) each line carries its trace and span
ids, so Cloud Logging shows a request's log lines under its trace. The trace field is
``projects/<GOOGLE_CLOUD_PROJECT>/traces/<trace id>`` as Cloud Logging wants it, or the bare
trace id when no project is known. Logging is set up before the settings are read (so a bad
setting is itself logged as JSON), which is why the project is read from the environment here.

Structured fields go in ``extra={"json_fields": {...}}`` (the convention of Google's own
logging library): they are merged into the JSON object.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from datetime import UTC, datetime

from opentelemetry import trace

TRACE_FIELD = "logging.googleapis.com/trace"
SPAN_FIELD = "logging.googleapis.com/spanId"
SAMPLED_FIELD = "logging.googleapis.com/trace_sampled"
SOURCE_FIELD = "logging.googleapis.com/sourceLocation"
# Uvicorn's loggers: their lines go through the root's JSON handler; its access log is replaced
# by the service's own (app.access), which knows the route template and the trace.
UVICORN_LOGGERS = ("uvicorn", "uvicorn.error")
UVICORN_ACCESS_LOGGER = "uvicorn.access"


class JsonFormatter(logging.Formatter):
    """A log record as one line of JSON for Cloud Logging.

    The trace is read from the OpenTelemetry context when the record is formatted, which is
    when it is emitted for a stream handler: in the request's context.
    """

    def __init__(self, project: str | None = None) -> None:
        super().__init__()
        # Empty means unknown, as does unset: Cloud Run does not set it by itself.
        self.project = project if project is not None else os.environ.get("GOOGLE_CLOUD_PROJECT", "")

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "severity": record.levelname,
            "message": record.getMessage(),
            "logger": record.name,
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            SOURCE_FIELD: {"file": record.pathname, "line": str(record.lineno), "function": record.funcName},
        }
        entry.update(self.trace_fields())
        fields = getattr(record, "json_fields", None)
        if isinstance(fields, dict):
            entry.update({key: value for key, value in fields.items() if key not in entry})
        if record.exc_info:
            entry["stack_trace"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)

    def trace_fields(self) -> dict[str, object]:
        """The current span's trace and span ids in Cloud Logging's fields; none outside a span."""
        context = trace.get_current_span().get_span_context()
        if not context.is_valid:
            return {}
        trace_id = trace.format_trace_id(context.trace_id)
        return {
            TRACE_FIELD: f"projects/{self.project}/traces/{trace_id}" if self.project else trace_id,
            SPAN_FIELD: trace.format_span_id(context.span_id),
            SAMPLED_FIELD: context.trace_flags.sampled,
        }


def configure_logging(level: int = logging.INFO) -> None:
    """JSON lines on stderr for the root logger, unless something (a test runner) set it up already.

    Uvicorn configures its own loggers before it imports the app; they are redirected here to
    the root's JSON handler, and uvicorn's access log is turned off (app.access writes one line
    per request instead).
    """
    root = logging.getLogger()
    if root.handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root.addHandler(handler)
    root.setLevel(level)
    for name in UVICORN_LOGGERS:
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
    access = logging.getLogger(UVICORN_ACCESS_LOGGER)
    access.handlers.clear()
    access.propagate = False
    access.disabled = True
