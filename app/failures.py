"""The failures a caller can cause, without a web framework: each carries its HTTP status and a
short, stable ``detail``.

Raised by the pipeline (:mod:`app.analysis`: decoding, video) wherever it runs: in the service,
where :mod:`app.errors` turns them into responses (the one place that does), and in the Python
API and the command line (:mod:`ferkit`), where the status tells a caller's mistake (4xx: the
CLI's exit code 2) from the service's own trouble (5xx). Plain exceptions on purpose: importing
this module pulls in no Starlette nor FastAPI.
"""

from __future__ import annotations


class ServiceError(Exception):
    """A failure with a known HTTP status; subclasses set ``status`` and ``message``."""

    status: int = 500
    message: str = "internal error"

    def __init__(self, detail: str | None = None, headers: dict[str, str] | None = None) -> None:
        self.status_code = self.status
        self.detail = detail or self.message
        self.headers = headers
        super().__init__(self.detail)

    @property
    def client_error(self) -> bool:
        """Whether the input is at fault (4xx), not the service or the model."""
        return 400 <= self.status_code < 500


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


class ImageTooCostly(ServiceError):
    """An image whose structure would make decoding it far more work than its size justifies
    (a progressive JPEG with hundreds of scans): see :mod:`app.decode_work`."""

    status, message = 413, "image too costly to decode"


class UnsupportedImage(ServiceError):
    status, message = 415, "unsupported image format"


class CorruptVideo(ServiceError):
    """Not a container FFmpeg can open, or a stream that fails to decode (truncated, damaged)."""

    status, message = 400, "corrupt video"


class NoVideoStream(ServiceError):
    """A media file without pictures: audio only, subtitles, an empty container."""

    status, message = 400, "no video stream"


class NoVideoFrames(ServiceError):
    """A video stream from which not one frame decodes."""

    status, message = 400, "video has no frames"


class VideoTooLong(ServiceError):
    status, message = 413, "video too long"


class VideoFrameTooLarge(ServiceError):
    status, message = 413, "video frame has too many pixels"


class ModelNotReady(ServiceError):
    status, message = 503, "model not loaded"


class ServerBusy(ServiceError):
    """Every inference slot is taken and the wait queue is full: try again shortly."""

    status, message = 503, "server busy"
    retry_after_s = 1

    def __init__(self) -> None:
        super().__init__(headers={"Retry-After": str(self.retry_after_s)})


class NotAuthenticated(ServiceError):
    """A missing or wrong bearer token on an admin endpoint."""

    status, message = 401, "invalid or missing bearer token"

    def __init__(self) -> None:
        super().__init__(headers={"WWW-Authenticate": "Bearer"})


class AdminDisabled(ServiceError):
    """An admin endpoint while ADMIN_TOKEN is unset: answered as if it did not exist."""

    status, message = 404, "Not Found"
