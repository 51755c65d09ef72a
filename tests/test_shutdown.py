"""Graceful shutdown of the real entry point, ``python -m app.serve``, as Cloud Run stops an instance.

Cloud Run sends SIGTERM, then SIGKILL 10 s later. The service must stop accepting connections at
once, let the requests in flight finish (up to ``SHUTDOWN_TIMEOUT_S``), and exit with status 0.
The request in flight here is an upload the client sends in two halves, pausing in between: a
slow upload, held exactly as long as the test wants, with no change to the app.
"""

from __future__ import annotations

import http.client
import json
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from app.settings import Settings
from tests.utils.service import clean_service_env, gray_png, scrape, serve_process, value, write_model

# Only catches a hang.
HANG_S = 60.0
BOUNDARY = "fer-shutdown-test-boundary"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    clean_service_env(monkeypatch)


def upload_parts(port: int, image: bytes) -> tuple[bytes, bytes]:
    """``POST /predict?detect=false`` of ``image`` as raw HTTP/1.1: (request head and the first
    half of the body, the rest of the body)."""
    body = (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="face.png"\r\nContent-Type: image/png\r\n\r\n'
    ).encode()
    body += image + f"\r\n--{BOUNDARY}--\r\n".encode()
    head = (
        f"POST /predict?detect=false HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    half = len(body) // 2
    return head + body[:half], body[half:]


def start_upload(base: str) -> tuple[socket.socket, bytes]:
    """Open a connection, send the first half of an upload, and wait until the app is handling
    it (``fer_http_requests_in_flight`` counts it); returns the socket and the rest to send."""
    port = int(base.rsplit(":", 1)[1])
    first, rest = upload_parts(port, gray_png())
    sock = socket.create_connection(("127.0.0.1", port), timeout=HANG_S)
    sock.sendall(first)
    deadline = time.monotonic() + HANG_S
    with httpx.Client(base_url=base, timeout=HANG_S) as client:
        # 2: the upload, and this scrape
        while value(scrape(client), "fer_http_requests_in_flight", "fer_http_requests_in_flight") < 2:
            assert time.monotonic() < deadline, "the upload never reached the app"
            time.sleep(0.05)
    return sock, rest


def refuses_connections(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


def wait_until_refused(port: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + HANG_S
    while not refuses_connections(port):
        assert proc.poll() is None, "exited before the request in flight was answered"
        assert time.monotonic() < deadline, "still accepting connections after SIGTERM"
        time.sleep(0.05)


def wait_for_log(log: Path, text: str, proc: subprocess.Popen[bytes]) -> None:
    """Until the server has written ``text`` to its log: a point it reaches, not a time."""
    deadline = time.monotonic() + HANG_S
    while text not in log.read_text(errors="replace"):
        assert proc.poll() is None, f"exited before logging {text!r}:\n{log.read_text()}"
        assert time.monotonic() < deadline, f"no {text!r} in the log after {HANG_S:.0f} s"
        time.sleep(0.05)


@pytest.mark.slow
def test_sigterm_lets_the_request_in_flight_finish(tmp_path: Path) -> None:
    model = write_model(tmp_path / "model.pt", run_id="shutdown-run")
    log = tmp_path / "serve.log"
    grace = 30  # far longer than the request needs: the exit must not wait it out
    with serve_process(log, MODEL_URI=str(model), INFERENCE_THREADS="1", SHUTDOWN_TIMEOUT_S=str(grace)) as (base, proc):
        port = int(base.rsplit(":", 1)[1])
        sock, rest = start_upload(base)
        with sock:
            proc.send_signal(signal.SIGTERM)
            wait_until_refused(port, proc)  # no new connections, while the upload is still open
            wait_for_log(log, "Waiting for connections to close", proc)  # uvicorn waits for this upload
            assert proc.poll() is None

            sock.sendall(rest)  # the client finishes its upload
            response = http.client.HTTPResponse(sock)
            response.begin()
            answered = time.monotonic()
            body = json.loads(response.read())
        assert response.status == 200, body
        assert body["model"]["version"] == "shutdown-run" and len(body["faces"]) == 1

        assert proc.wait(timeout=HANG_S) == 0, log.read_text()
        assert time.monotonic() - answered < grace  # done when the last request was, not at the deadline
    text = log.read_text()
    assert "Waiting for connections to close" in text and "Application shutdown complete" in text
    assert "timeout graceful shutdown exceeded" not in text


@pytest.mark.slow
def test_sigterm_exits_after_the_grace_period_when_a_request_hangs(tmp_path: Path) -> None:
    model = write_model(tmp_path / "model.pt")
    log = tmp_path / "serve.log"
    grace = 1
    with serve_process(log, MODEL_URI=str(model), INFERENCE_THREADS="1", SHUTDOWN_TIMEOUT_S=str(grace)) as (base, proc):
        sock, _ = start_upload(base)  # ... and the rest of it never comes
        with sock:
            signalled = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=HANG_S) == 0, log.read_text()
            assert time.monotonic() - signalled >= grace  # it did wait for the request
            try:
                answer = sock.recv(1024)
            except ConnectionResetError:
                answer = b""
        assert not answer.startswith(b"HTTP/1.1 200")
    text = log.read_text()
    assert "timeout graceful shutdown exceeded" in text and "Application shutdown complete" in text


def test_shutdown_timeout_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    """SHUTDOWN_TIMEOUT_S reaches uvicorn; the default fits in Cloud Run's 10 s."""
    from app import serve

    assert Settings().shutdown_timeout_s == 8
    calls: list[dict[str, object]] = []
    monkeypatch.setattr(serve.uvicorn, "run", lambda app, **kwargs: calls.append(kwargs))
    monkeypatch.setenv("SHUTDOWN_TIMEOUT_S", "3")
    before = signal.getsignal(signal.SIGTERM)
    assert serve.main() == 0
    assert calls[0]["timeout_graceful_shutdown"] == 3
    assert signal.getsignal(signal.SIGTERM) == before  # the handler for after uvicorn is gone again
    monkeypatch.setenv("SHUTDOWN_TIMEOUT_S", "-1")
    assert serve.main() == 2
