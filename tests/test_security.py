"""The admin token: compared in constant time, and never written anywhere.

``tests/test_reload.py`` checks the answers of ``POST /admin/reload`` (401 with a stable detail for
a missing or wrong token, 404 when ADMIN_TOKEN is unset, a weak token refused at startup without
echoing it). Here: the comparison itself, and the real service (``python -m app.serve``, with
its JSON logs and, for this test, every request and response header recorded in console-exported
trace spans) asked with a right and a wrong token, after which neither token appears in its
output nor in anything it answered.
"""

from __future__ import annotations

import hmac
import signal
from pathlib import Path

import httpx
import pytest

from app import deps
from app.tracing import SECRET_HEADERS, sanitized_headers
from tests.utils.service import clean_service_env, running_app, serve_process, write_model

TOKEN = "s3cret-admin-token-0123456789abcdef"
WRONG = "wr0ng-admin-token-fedcba9876543210"  # a client's mistake may well be another real token
DETAIL = {"detail": "invalid or missing bearer token"}


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    clean_service_env(monkeypatch)


def test_token_is_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch, model_path: Path) -> None:
    compared: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(deps.hmac, "compare_digest", spy)
    with running_app(monkeypatch, MODEL_URI=str(model_path), ADMIN_TOKEN=TOKEN) as client:
        assert client.post("/admin/reload", headers={"Authorization": f"Bearer {WRONG}"}).status_code == 401
        assert client.post("/admin/reload").status_code == 401  # no header: compared all the same
        assert client.post("/admin/reload", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
    assert compared == [(WRONG.encode(), TOKEN.encode()), (b"", TOKEN.encode()), (TOKEN.encode(), TOKEN.encode())]


def test_a_token_that_is_not_ascii_is_refused_not_a_crash(monkeypatch: pytest.MonkeyPatch, model_path: Path) -> None:
    with running_app(monkeypatch, MODEL_URI=str(model_path), ADMIN_TOKEN=TOKEN) as client:
        r = client.post("/admin/reload", headers=[(b"authorization", b"Bearer \xff\xfe" + TOKEN.encode())])
        assert (r.status_code, r.json()) == (401, DETAIL)


def test_credential_headers_are_always_redacted_in_spans(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_SANITIZE_FIELDS", raising=False)
    assert sanitized_headers() == list(SECRET_HEADERS)
    monkeypatch.setenv("OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_SANITIZE_FIELDS", " x-session , ")
    assert sanitized_headers() == ["x-session", *SECRET_HEADERS]
    assert "authorization" in SECRET_HEADERS and "cookie" in SECRET_HEADERS


@pytest.mark.slow
def test_tokens_never_reach_logs_traces_or_answers(tmp_path: Path) -> None:
    model = write_model(tmp_path / "model.pt", run_id="security-run")
    log = tmp_path / "serve.log"
    served = serve_process(
        log,
        MODEL_URI=str(model),
        INFERENCE_THREADS="1",
        ADMIN_TOKEN=TOKEN,
        # Spans printed with the service's output, every header of every request in them.
        OTEL_TRACES_EXPORTER="console",
        OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_SERVER_REQUEST=".*",
        OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_SERVER_RESPONSE=".*",
    )
    answers: list[str] = []
    with served as (base, proc), httpx.Client(base_url=base, timeout=60) as client:

        def call(method: str, path: str, headers: dict[str, str] | None = None) -> httpx.Response:
            r = client.request(method, path, headers=headers)
            answers.append(f"{r.status_code} {r.headers} {r.text}")
            return r

        for headers in (
            {"Authorization": f"Bearer {WRONG}"},
            {"Authorization": f"Bearer {TOKEN}x"},  # the token inside a longer one
            {"Authorization": f"Basic {TOKEN}"},
            {"Authorization": TOKEN},
            {},
        ):
            r = call("POST", "/admin/reload", headers)
            assert (r.status_code, r.json()) == (401, DETAIL)
        assert call("POST", "/admin/reload", {"Authorization": f"Bearer {TOKEN}"}).status_code == 200
        assert call("GET", "/model").json()["version"] == "security-run"
        for path in ("/metrics", "/openapi.json", "/readyz"):
            assert call("GET", path).status_code == 200
        proc.send_signal(signal.SIGTERM)  # flushes the spans still buffered
        assert proc.wait(timeout=60) == 0
    output = log.read_text()
    assert '"http.request.header.authorization"' in output and "[REDACTED]" in output  # captured, and redacted
    assert output.count('"status": 401') == 5  # the refusals are logged, without what was sent
    for secret in (TOKEN, WRONG):
        assert secret not in output
        assert not [a for a in answers if secret in a]
