"""The one place that turns failures into HTTP responses.

The failures themselves (:class:`~app.failures.ServiceError` and its subclasses, each with its
status and stable ``detail``) live in :mod:`app.failures`, free of any web framework, so the
pipeline raises the same ones in the service, the Python API and the command line; they are
re-exported here for the service's modules. A :class:`ServiceError` that escapes a route becomes
``{"detail": ...}`` with its status and headers. Anything else is a bug: logged with its
traceback and answered 500.

One wrinkle: FastAPI lets only Starlette's ``HTTPException`` out of reading the request body
unchanged; anything else raised from inside ``receive`` (the body-size limit of :mod:`app.limits`,
the early 503 of :class:`app.concurrency.RefuseWhenFull`) comes out as its generic 400 with the
original as its cause, which :func:`handle_http_exception` answers as the original.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.failures import (
    AdminDisabled,
    CorruptImage,
    CorruptVideo,
    EmptyFile,
    ImageTooCostly,
    ImageTooLarge,
    ModelNotReady,
    NotAuthenticated,
    NoVideoFrames,
    NoVideoStream,
    PayloadTooLarge,
    ServerBusy,
    ServiceError,
    TooManyFiles,
    UnsupportedImage,
    VideoFrameTooLarge,
    VideoTooLong,
)

__all__ = [
    "AdminDisabled",
    "CorruptImage",
    "CorruptVideo",
    "EmptyFile",
    "ImageTooCostly",
    "ImageTooLarge",
    "ModelNotReady",
    "NoVideoFrames",
    "NoVideoStream",
    "NotAuthenticated",
    "PayloadTooLarge",
    "ServerBusy",
    "ServiceError",
    "TooManyFiles",
    "UnsupportedImage",
    "VideoFrameTooLarge",
    "VideoTooLong",
    "install_error_handlers",
]

log = logging.getLogger(__name__)


async def handle_service_error(request: Request, exc: Exception) -> JSONResponse:
    # Not logged: these are expected answers (a 503 /readyz is polled every few seconds while
    # unready), and the access log already has method, path and status.
    assert isinstance(exc, ServiceError)
    return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)


async def handle_http_exception(request: Request, exc: Exception) -> Response:
    """A ServiceError raised while FastAPI read the body, as itself; any other HTTPException (404,
    405...) as FastAPI answers it."""
    if isinstance(exc.__cause__, ServiceError):
        return await handle_service_error(request, exc.__cause__)
    assert isinstance(exc, StarletteHTTPException)
    return await http_exception_handler(request, exc)


async def handle_unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.error("unhandled error in %s %s", request.method, request.url.path, exc_info=exc)
    return JSONResponse({"detail": "internal error"}, status_code=500)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ServiceError, handle_service_error)
    app.add_exception_handler(StarletteHTTPException, handle_http_exception)
    app.add_exception_handler(Exception, handle_unexpected)
