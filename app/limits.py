"""A request-body size limit enforced before the body is read.

FastAPI parses a multipart body (spooling it to disk) before any route code or dependency
runs, so the limit has to sit in front of it: in ASGI middleware wrapping ``receive``.
"""

from __future__ import annotations

from collections.abc import Mapping

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import PayloadTooLarge

# Room for the multipart envelope (boundaries, part headers, a file name) around the file.
MULTIPART_OVERHEAD = 64 * 1024


class BodySizeLimit:
    """Reject bodies over ``max_body_bytes`` (or the path's own limit in ``path_limits``): at once
    when ``Content-Length`` says so, else as soon as the streamed bytes (e.g. chunked transfer)
    pass it.

    The :class:`~app.errors.PayloadTooLarge` is raised from ``receive``, that is from inside
    the route handler reading the body, so the app's error handler answers it (413).
    """

    def __init__(self, app: ASGIApp, max_body_bytes: int, path_limits: Mapping[str, int] | None = None) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.path_limits = dict(path_limits or {})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.path_limits.get(route_path(scope), self.max_body_bytes)
        declared = _content_length(scope)
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            if declared is not None and declared > limit:
                raise PayloadTooLarge()
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise PayloadTooLarge()
            return message

        await self.app(scope, limited_receive, send)


def route_path(scope: Scope) -> str:
    """The path the app's routes see: without the ``root_path`` a proxy may mount it under."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
