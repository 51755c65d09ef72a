"""Domain errors and the one place that turns failures into HTTP responses.

Every error a client can cause is a :class:`ServiceError` subclass carrying its status code
and a short, stable ``detail``. They subclass Starlette's ``HTTPException`` for one reason:
FastAPI re-raises that class untouched when it escapes from reading the request body, so a
body-size limit hit mid-stream still reaches :func:`handle_service_error` as a 413 rather
than becoming a generic 400. Anything else that escapes a route is a bug: logged with its
traceback and answered 500.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)


class ServiceError(StarletteHTTPException):
    """A failure with a known HTTP status; subclasses set ``status`` and ``message``."""

    status: int = 500
    message: str = "internal error"

    def __init__(self, detail: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(self.status, detail or self.message, headers)


class EmptyFile(ServiceError):
    status, message = 400, "empty file"


class CorruptImage(ServiceError):
    status, message = 400, "corrupt image"


class PayloadTooLarge(ServiceError):
    status, message = 413, "file too large"


class TooManyFiles(ServiceError):
    # 413, not 422: like a byte limit, it is a size the server refuses ("send less"), and a
    # 422's detail is FastAPI's list of validation errors, which this is not.
    status, message = 413, "too many files"


class ImageTooLarge(ServiceError):
    status, message = 413, "image has too many pixels"


class UnsupportedImage(ServiceError):
    status, message = 415, "unsupported image format"


class NotAuthenticated(ServiceError):
    """A missing or wrong bearer token on an admin endpoint."""

    status, message = 401, "invalid or missing bearer token"

    def __init__(self) -> None:
        super().__init__(headers={"WWW-Authenticate": "Bearer"})


class AdminDisabled(ServiceError):
    """An admin endpoint while ADMIN_TOKEN is unset: answered as if it did not exist."""

    status, message = 404, "Not Found"


class ModelNotReady(ServiceError):
    status, message = 503, "model not loaded"


class ServerBusy(ServiceError):
    """Every inference slot is taken and the wait queue is full: try again shortly."""

    status, message = 503, "server busy"
    retry_after_s = 1

    def __init__(self) -> None:
        super().__init__(headers={"Retry-After": str(self.retry_after_s)})


async def handle_service_error(request: Request, exc: Exception) -> JSONResponse:
    # Not logged: these are expected answers (a 503 /readyz is polled every few seconds while
    # unready), and the access log already has method, path and status.
    assert isinstance(exc, StarletteHTTPException)
    return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)


async def handle_unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.error("unhandled error in %s %s", request.method, request.url.path, exc_info=exc)
    return JSONResponse({"detail": "internal error"}, status_code=500)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ServiceError, handle_service_error)
    app.add_exception_handler(Exception, handle_unexpected)
