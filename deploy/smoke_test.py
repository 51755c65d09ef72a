"""Smoke-test a running service: ``/readyz``, ``/healthz``, ``/model`` and one ``/predict``.

    python deploy/smoke_test.py https://fer-api-xxxx.a.run.app [--timeout 120] [--id-token TOKEN]

cloudbuild.yaml runs it on the URL Cloud Run gives the service right after each deploy;
tests/test_delivery.py runs it against ``python -m app.serve``. Standard library only (it runs
in the bare cloud-sdk image): the test image is a 48x48 greyscale PNG written here, classified
with ``?detect=false`` (as a face crop, so the answer does not depend on face detection).
Exits 0 when every check passes, 1 with the failing check on stderr otherwise. For a service
that requires authentication, pass an identity token (``gcloud auth print-identity-token``)
as ``--id-token`` or ``SMOKE_ID_TOKEN``.
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import sys
import time
import urllib.error
import urllib.request
import uuid
import zlib
from typing import Any

CLASSES = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")


class SmokeError(Exception):
    """A check failed; the message says which and what came back."""


def png_gray(width: int = 48, height: int = 48) -> bytes:
    """A greyscale 8-bit PNG of a diagonal gradient (not flat, so equalisation has work to do)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    rows = b"".join(b"\x00" + bytes((x * 3 + y * 2) % 256 for x in range(width)) for y in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale, no interlace
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def multipart(field: str, filename: str, data: bytes, content_type: str) -> tuple[bytes, str]:
    """A multipart/form-data body with one file part, and its Content-Type header."""
    boundary = uuid.uuid4().hex
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{filename}"\r\n'
        f"Content-Type: {content_type}\r\n\r\n"
    ).encode()
    return head + data + f"\r\n--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


class Client:
    def __init__(self, base_url: str, id_token: str | None = None, request_timeout: float = 30.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {id_token}"} if id_token else {}
        self.request_timeout = request_timeout

    def call(self, method: str, path: str, body: bytes | None = None, content_type: str | None = None) -> tuple[int, bytes]:
        headers = dict(self.headers)
        if content_type:
            headers["Content-Type"] = content_type
        request = urllib.request.Request(self.base_url + path, data=body, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=self.request_timeout) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def json(self, method: str, path: str, body: bytes | None = None, content_type: str | None = None) -> Any:
        status, payload = self.call(method, path, body, content_type)
        if status != 200:
            raise SmokeError(f"{method} {path}: HTTP {status}: {payload[:500]!r}")
        try:
            return json.loads(payload)
        except ValueError as exc:
            raise SmokeError(f"{method} {path}: not JSON: {payload[:200]!r}") from exc


def wait_ready(client: Client, timeout: float) -> None:
    """Poll ``/readyz`` until 200; a new Cloud Run revision may still be loading its model."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while True:
        try:
            status, payload = client.call("GET", "/readyz")
            if status == 200:
                return
            last = f"HTTP {status}: {payload[:200]!r}"
        except (urllib.error.URLError, OSError) as exc:  # not listening yet, DNS not there yet
            last = str(exc)
        if time.monotonic() >= deadline:
            raise SmokeError(f"GET /readyz: not ready after {timeout:.0f} s ({last})")
        time.sleep(2)


def check_prediction(result: dict[str, Any]) -> str:
    faces = result.get("faces")
    if not isinstance(faces, list) or len(faces) != 1:
        raise SmokeError(f"POST /predict?detect=false: expected one face, got {result!r}")
    face = faces[0]
    if face.get("emotion") not in CLASSES:
        raise SmokeError(f"POST /predict: unknown emotion {face.get('emotion')!r}")
    scores = face.get("scores", {})
    if set(scores) != set(CLASSES) or abs(sum(scores.values()) - 1.0) > 1e-3:
        raise SmokeError(f"POST /predict: scores are not a distribution over the 7 classes: {scores!r}")
    return str(face["emotion"])


def smoke(base_url: str, timeout: float = 120.0, id_token: str | None = None) -> list[str]:
    """Run every check against ``base_url``; returns one line per passed check."""
    client = Client(base_url, id_token)
    wait_ready(client, timeout)
    done = ["GET /readyz: 200"]
    health = client.json("GET", "/healthz")
    if not isinstance(health, dict) or health.get("status") != "ok":
        raise SmokeError(f"GET /healthz: unexpected body {health!r}")
    done.append("GET /healthz: 200")
    model = client.json("GET", "/model")
    done.append(f"GET /model: version {model.get('version')!r}, fallback {model.get('fallback')!r}")
    body, content_type = multipart("file", "smoke.png", png_gray(), "image/png")
    emotion = check_prediction(client.json("POST", "/predict?detect=false", body, content_type))
    done.append(f"POST /predict?detect=false: 200, {emotion}")
    return done


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("url", help="base URL of the service, e.g. https://fer-api-xxxx.a.run.app")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for /readyz (default 120)")
    parser.add_argument("--id-token", default=os.environ.get("SMOKE_ID_TOKEN"), help="identity token for a private service")
    args = parser.parse_args(argv)
    try:
        for line in smoke(args.url, args.timeout, args.id_token):
            print(f"ok  {line}")
    except SmokeError as exc:
        print(f"smoke test FAILED against {args.url}: {exc}", file=sys.stderr)
        return 1
    print(f"smoke test passed: {args.url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
