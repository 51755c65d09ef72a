"""A fault-injecting HTTP proxy, to put in front of the gcp-storage-emulator.

The real google-cloud-storage client talks to the proxy (``STORAGE_EMULATOR_HOST=proxy.url``),
which forwards each request to the emulator and hands the answer back, unless a fault says
otherwise. A fault applies to the requests whose path (with its query) its ``match``, a regular
expression, is found in, for the next ``times`` of them (None: until cleared); faults can be
changed while a test runs. Any fault can also drop response headers (``drop_headers``, e.g.
``x-goog-hash``: no checksum to verify).

* ``error``: answer ``status`` (500, 503...) without asking the emulator;
* ``slow``: wait ``delay_s`` before the status line (``where="headers"``), or after the first
  half of the body (``where="body"``), then send the rest;
* ``cut``: send the headers and the first ``fraction`` of the body, then close the connection: a
  download cut short. With ``framing="length"`` the headers announce the full ``Content-Length``
  (the client sees the body end early); with ``"close"`` they announce none (the body ends where
  the connection does, so only a checksum can tell);
* :meth:`FaultProxy.down` / :meth:`FaultProxy.up`: stop listening (connections are refused)
  and listen again on the same port.

With ``enforce_preconditions`` set, the proxy does what Cloud Storage does and the emulator does
not: a request with ``ifGenerationMatch=N`` (an upload, a download) is answered 412 unless the
object is at generation N (0: absent). The check and the forwarding happen under one lock, so
two conditional writes cannot both pass; faults do not apply to those requests (recorded with
fault ``"precondition"`` when refused).

Each answer closes its connection (``Connection: close``): no keep-alive connection outlives a
switch of mode. What happened to each request is in :attr:`FaultProxy.requests`.
"""

from __future__ import annotations

import email.message
import http.client
import http.server
import json
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from urllib.parse import parse_qs, quote, unquote, urlsplit

# Headers that describe one hop, not the message: the proxy re-frames the body itself.
HOP_HEADERS = frozenset({"connection", "keep-alive", "transfer-encoding", "content-length", "proxy-connection"})


@dataclass
class Fault:
    """One misbehaviour; see the module docstring."""

    kind: str  # "error", "slow" or "cut"
    match: str = ""  # regex searched in the request's path and query ("": every request)
    times: int | None = None  # how many matching requests it applies to; None: all of them
    status: int = 503  # error
    delay_s: float = 0.0  # slow
    where: str = "headers"  # slow: "headers" or "body"
    fraction: float = 0.5  # cut: the share of the body sent
    framing: str = "length"  # cut: "length" (Content-Length of the whole body) or "close" (none)
    drop_headers: tuple[str, ...] = ()  # response headers left out (any kind but error)

    def __post_init__(self) -> None:
        if self.kind not in ("error", "slow", "cut"):
            raise ValueError(f"unknown fault kind {self.kind!r}")
        if self.where not in ("headers", "body"):
            raise ValueError(f"where must be 'headers' or 'body', not {self.where!r}")
        if self.framing not in ("length", "close"):
            raise ValueError(f"framing must be 'length' or 'close', not {self.framing!r}")


@dataclass(frozen=True)
class Seen:
    """A request the proxy received, and the fault applied to it (None: passed through)."""

    method: str
    path: str
    fault: str | None


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True  # up() binds the port down() released, TIME_WAIT connections or not
    proxy: FaultProxy


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: object) -> None:  # quiet: the test reads proxy.requests
        pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                pass
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _handle(self) -> None:
        proxy = self.server.proxy
        self.close_connection = True
        body = self._body()
        if len(body) < int(self.headers.get("Content-Length") or 0):
            return  # the client died mid-upload: forwarding the part received would store it
        if proxy.enforce_preconditions and "ifGenerationMatch=" in self.path:
            self._handle_conditional(body)
            return
        fault = proxy._take(self.path)
        proxy._record(Seen(self.command, self.path, fault.kind if fault else None))
        try:
            if fault is not None and fault.kind == "error":
                self._answer(fault.status, {"Content-Type": "application/json"}, _error_body(fault.status))
                return
            status, headers, content = proxy._forward(self.command, self.path, self.headers, body)
            if fault is not None:
                dropped = {name.lower() for name in fault.drop_headers}
                headers = {k: v for k, v in headers.items() if k.lower() not in dropped}
            if fault is not None and fault.kind == "slow" and fault.where == "headers":
                time.sleep(fault.delay_s)
            self._answer(status, headers, content, fault)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (a timeout): nothing to do
            pass

    def _handle_conditional(self, body: bytes) -> None:
        proxy = self.server.proxy
        with proxy._conditions:  # check and write as one step, as GCS does
            if proxy._generation_differs(self.command, self.path, body):
                proxy._record(Seen(self.command, self.path, "precondition"))
                self._answer(412, {"Content-Type": "application/json"}, _error_body(412))
                return
            proxy._record(Seen(self.command, self.path, None))
            status, headers, content = proxy._forward(self.command, self.path, self.headers, body)
        self._answer(status, headers, content)

    def _answer(self, status: int, headers: dict[str, str], content: bytes, fault: Fault | None = None) -> None:
        self.send_response_only(status)
        for name, value in headers.items():
            self.send_header(name, value)
        if fault is None or fault.kind != "cut" or fault.framing == "length":
            self.send_header("Content-Length", str(len(content)))
        self.send_header("Connection", "close")
        self.end_headers()
        if self.command == "HEAD":  # the headers describe a body that is not sent
            return
        if fault is not None and fault.kind == "cut":
            self.wfile.write(content[: int(len(content) * fault.fraction)])
            self.wfile.flush()
            return  # the connection closes with the body short of its Content-Length
        if fault is not None and fault.kind == "slow" and fault.where == "body":
            half = len(content) // 2
            self.wfile.write(content[:half])
            self.wfile.flush()
            time.sleep(fault.delay_s)
            content = content[half:]
        self.wfile.write(content)
        self.wfile.flush()

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _handle


def _error_body(status: int) -> bytes:
    """An error in the JSON API's shape, so the client raises the matching exception."""
    message = f"injected by the fault proxy: {status} {http.client.responses.get(status, '')}".strip()
    return json.dumps({"error": {"code": status, "message": message, "errors": [{"message": message}]}}).encode()


class FaultProxy:
    """Forwards HTTP to ``upstream`` (``http://host:port``) from :attr:`url`, misbehaving on demand."""

    def __init__(self, upstream: str, upstream_timeout: float = 30.0) -> None:
        parts = urlsplit(upstream)
        self._upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self._upstream_netloc = parts.netloc
        self._upstream_timeout = upstream_timeout
        self._lock = threading.Lock()
        self._conditions = threading.Lock()
        self.enforce_preconditions = False
        self._faults: list[Fault] = []
        self.requests: list[Seen] = []
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self.port = 0
        self.up()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # --- modes ------------------------------------------------------------------------------

    def inject(self, *faults: Fault) -> None:
        """Apply ``faults`` from now on (after any already injected: the first that matches wins)."""
        with self._lock:
            self._faults.extend(faults)

    def clear(self) -> None:
        """Pass everything through again."""
        with self._lock:
            self._faults.clear()

    def up(self) -> None:
        """Listen (again, on the same port after :meth:`down`)."""
        if self._server is not None:
            return
        server = _Server(("127.0.0.1", self.port), _Handler)
        server.proxy = self
        self.port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, name=f"fault-proxy-{self.port}", daemon=True)
        self._thread.start()

    def down(self) -> None:
        """Stop listening: new connections are refused until :meth:`up`."""
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def seen(self, match: str = "") -> list[Seen]:
        """The requests received so far whose path the regex ``match`` finds."""
        with self._lock:
            return [r for r in self.requests if re.search(match, r.path)]

    # --- used by the handler ----------------------------------------------------------------

    def _take(self, path: str) -> Fault | None:
        with self._lock:
            for fault in self._faults:
                if re.search(fault.match, path) and (fault.times is None or fault.times > 0):
                    if fault.times is not None:
                        fault.times -= 1
                    return fault
        return None

    def _record(self, seen: Seen) -> None:
        with self._lock:
            self.requests.append(seen)

    def _generation_differs(self, method: str, path: str, body: bytes) -> bool:
        """Whether the object a conditional request names is not at its ``ifGenerationMatch``."""
        parts = urlsplit(path)
        query = parse_qs(parts.query)
        expected = int(query["ifGenerationMatch"][0])
        bucket_match = re.search(r"/b/([^/]+)/o", parts.path)
        assert bucket_match is not None, path
        if method == "GET":  # a download: /download/storage/v1/b/B/o/NAME
            name = unquote(parts.path.split("/o/", 1)[1])
        elif "name" in query:
            name = query["name"][0]
        else:  # a multipart upload: the name is in the JSON metadata, the body's first part
            found = re.search(rb'"name"\s*:\s*"([^"]+)"', body)
            assert found is not None, "an upload without an object name"
            name = found.group(1).decode()
        status, _, content = self._forward(
            "GET", f"/storage/v1/b/{bucket_match.group(1)}/o/{quote(name, safe='')}", email.message.Message(), b""
        )
        current = int(json.loads(content)["generation"]) if status == 200 else 0
        return current != expected

    def _forward(self, method: str, path: str, headers: email.message.Message, body: bytes) -> tuple[int, dict[str, str], bytes]:
        """The emulator's answer, whole. ``Host`` is passed on unchanged: the emulator builds its
        ``mediaLink`` URLs from it, so downloads come back through the proxy."""
        conn = http.client.HTTPConnection(*self._upstream, timeout=self._upstream_timeout)
        try:
            sent = {k: v for k, v in headers.items() if k.lower() not in HOP_HEADERS}
            if body or method in ("POST", "PUT", "PATCH"):
                sent["Content-Length"] = str(len(body))
            conn.request(method, path, body=body, headers=sent)
            response = conn.getresponse()
            content = response.read()
            kept = {k: v for k, v in response.getheaders() if k.lower() not in HOP_HEADERS}
            if "json" in response.getheader("Content-Type", ""):
                # An object uploaded straight to the emulator has a mediaLink to the emulator:
                # point it here, so its download comes through the proxy as well.
                content = content.replace(self._upstream_netloc.encode(), f"127.0.0.1:{self.port}".encode())
            return response.status, kept, content
        finally:
            conn.close()


@contextmanager
def fault_proxy(upstream: str) -> Iterator[FaultProxy]:
    """A :class:`FaultProxy` in front of ``upstream``, stopped afterwards."""
    proxy = FaultProxy(upstream)
    try:
        yield proxy
    finally:
        proxy.down()
