"""The page a person uses: ``GET /`` and its script and stylesheet, shipped in ``app/static/``.

Plain HTML, CSS and JavaScript (no build step, no CDN, no external font): it works offline and
under the strict Content-Security-Policy sent with it, which allows only the service's own
scripts, styles and requests, images from ``data:``/``blob:`` URLs (the uploaded photo, the
heatmaps) and the camera's stream. It talks to the service through ``POST /predict`` only.
"""

from __future__ import annotations

import functools
from importlib import resources

from fastapi import APIRouter
from fastapi.responses import Response

router = APIRouter(tags=["page"], include_in_schema=False)

CSP = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data: blob:",
        "media-src 'self' blob: mediastream:",
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    ]
)
# Sent with each of the page's files; the API's routes keep their own headers.
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Permissions-Policy": "camera=(self), microphone=(), geolocation=()",
    # Revalidated on each load (the files change with the package), answered from memory.
    "Cache-Control": "no-cache",
}
MEDIA_TYPES = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}


@functools.cache
def static_file(name: str) -> bytes:
    """The bytes of ``app/static/<name>``, read once (package data: works from a wheel too)."""
    return resources.files("app").joinpath("static", name).read_bytes()


def serve(name: str) -> Response:
    headers = dict(SECURITY_HEADERS)
    if name == "index.html":
        headers["Content-Security-Policy"] = CSP
    return Response(static_file(name), media_type=MEDIA_TYPES[name], headers=headers)


@router.get("/")
async def get_page() -> Response:
    """The page: upload a photo or start the webcam, see each face's emotion and where the model looked."""
    return serve("index.html")


@router.get("/static/app.js")
async def get_script() -> Response:
    return serve("app.js")


@router.get("/static/style.css")
async def get_stylesheet() -> Response:
    return serve("style.css")
