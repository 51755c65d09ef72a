"""Per-request observation: the request metrics and one access-log line, in one ASGI middleware.

It sits inside the tracing middleware (:mod:`app.tracing` instruments the app around the whole
stack), so the access-log line carries the request's trace id. It sits outside the routes and
the error handlers, so it sees every status the client sees, including a 413 raised while the
body streams in; an exception that escapes it is answered 500 by Starlette, and counted so.
"""

from __future__ import annotations

import logging
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.metrics import UNMATCHED_ROUTE, Metrics

log = logging.getLogger(__name__)


class RequestTelemetry:
    """Counts, times and logs each HTTP request by its route template (``/predict``, not the raw path)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500  # unless a response starts: an escaping exception becomes Starlette's 500
        sent = 0

        async def observed_send(message: Message) -> None:
            nonlocal status, sent
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body":
                sent += len(message.get("body", b""))
            await send(message)

        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, observed_send)
        finally:
            self.metrics.in_flight.dec()
            seconds = time.perf_counter() - start
            route = route_template(scope)
            self.metrics.observe_request(scope["method"], route, status, seconds)
            log_access(scope, route, status, seconds, sent)


def route_template(scope: Scope) -> str:
    """The path template of the route that handled the request (set on the scope by the router)."""
    path = getattr(scope.get("route"), "path", None)
    return path if isinstance(path, str) and path else UNMATCHED_ROUTE


def log_access(scope: Scope, route: str, status: int, seconds: float, response_bytes: int) -> None:
    """One line per request; ``httpRequest`` is the field Cloud Logging shows as a request."""
    method: str = scope["method"]
    path: str = scope["path"]  # as the client sent it (a proxy's root_path included)
    query = scope.get("query_string", b"").decode("latin-1")
    headers = dict(scope.get("headers", []))
    client = scope.get("client")
    http_request = {
        "requestMethod": method,
        "requestUrl": f"{path}?{query}" if query else path,
        "status": status,
        "responseSize": str(response_bytes),
        "latency": f"{seconds:.6f}s",
        "userAgent": headers.get(b"user-agent", b"").decode("latin-1"),
        "remoteIp": client[0] if client else "",
        "protocol": f"HTTP/{scope.get('http_version', '1.1')}",
    }
    # 5xx are the service's own failures (or overload): worth a look; the rest is routine.
    level = logging.WARNING if status >= 500 else logging.INFO
    log.log(
        level,
        "%s %s %d %.1f ms",
        method,
        path,
        status,
        seconds * 1000,
        extra={"json_fields": {"httpRequest": http_request, "route": route, "latency_ms": round(seconds * 1000, 3)}},
    )
