"""Where checkpoints and data live: a local path or ``gs://bucket/path``.

Writes are atomic in both worlds: locally a temp file is renamed into place; on GCS an
object only becomes visible once its upload completes. Runs are published as
``<prefix>/<run-id>/...`` and only then may ``<prefix>/latest.json`` be rewritten to serve
one (a promotion, :mod:`fercore.registry`), so a reader following ``latest.json`` never finds
a missing or half-written model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

if TYPE_CHECKING:
    from google.cloud.storage import Blob, Client

log = logging.getLogger(__name__)

LATEST = "latest.json"


def is_gcs(uri: str | Path) -> bool:
    return str(uri).startswith("gs://")


def split_gcs(uri: str) -> tuple[str, str]:
    """``gs://bucket/a/b`` -> ``("bucket", "a/b")``."""
    rest = uri[len("gs://") :]
    bucket, _, name = rest.partition("/")
    if not bucket:
        raise ValueError(f"not a gs:// URI with a bucket: {uri!r}")
    return bucket, name.strip("/")


def join(base: str | Path, *parts: str) -> str:
    if is_gcs(base):
        return "/".join([str(base).rstrip("/"), *parts])
    return str(Path(base, *parts))


def gcs_client() -> Client:
    """The real client; ``STORAGE_EMULATOR_HOST`` points it at an emulator (tests)."""
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    if os.environ.get("STORAGE_EMULATOR_HOST"):
        return storage.Client(credentials=AnonymousCredentials(), project=os.environ.get("GOOGLE_CLOUD_PROJECT", "test"))
    return storage.Client()


def _request_options(timeout: float | None) -> dict[str, Any]:
    """Keyword arguments for a client call. With a ``timeout``: each HTTP request gives up after
    that many seconds and the client does not retry (the caller does, with its own backoff).
    Without: the client's defaults (60 s per request, transient errors retried for up to 120 s)."""
    return {} if timeout is None else {"timeout": timeout, "retry": None}


def is_transient(exc: BaseException) -> bool:
    """Whether trying again later may succeed: the network, a timeout, or a 408/429/5xx from GCS.

    Mirrors the google-cloud-storage client's own retry predicate. A missing object, a refused
    credential, a sha256 mismatch or malformed content are not transient.
    """
    import http.client

    import requests
    import urllib3
    from google.api_core import exceptions as api_exceptions
    from google.auth import exceptions as auth_exceptions
    from google.cloud.storage.exceptions import DataCorruption, InvalidResponse

    retryable_status = {408, 429, 500, 502, 503, 504}
    if isinstance(
        exc,
        (
            ConnectionError,
            TimeoutError,
            requests.ConnectionError,
            requests.Timeout,
            requests.exceptions.ChunkedEncodingError,
            http.client.BadStatusLine,
            http.client.IncompleteRead,
            http.client.ResponseNotReady,
            urllib3.exceptions.PoolError,
            urllib3.exceptions.ProtocolError,
            urllib3.exceptions.SSLError,
            urllib3.exceptions.TimeoutError,
            DataCorruption,  # the client's checksum of a download failed: fetch it again
        ),
    ):
        return True
    if isinstance(exc, api_exceptions.GoogleAPICallError):
        return exc.code in retryable_status
    if isinstance(exc, api_exceptions.RetryError):  # the client's own retries (no ``timeout``) ran out
        return exc.cause is not None and is_transient(exc.cause)
    if isinstance(exc, InvalidResponse):
        return getattr(exc.response, "status_code", None) in retryable_status
    # Fetching a token failed on the network (the metadata server, oauth2.googleapis.com).
    return isinstance(exc, auth_exceptions.TransportError)


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@contextmanager
def atomic_write(path: str | Path) -> Iterator[BinaryIO]:
    """A binary file to write that appears at ``path`` whole, or not at all.

    It is a temp file in the same folder, fsynced and renamed over ``path`` when the block ends
    without an exception (else removed): a reader, or a process killed mid-write, sees the old file
    or the new one, never half of one. Readable by other users (a model is read by the service's).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_bytes(uri: str | Path, data: bytes, if_generation_match: int | None = None) -> None:
    """Write ``data`` to a local path (:func:`atomic_write`) or a GCS object. ``if_generation_match``
    (GCS only; 0: the object must not exist) makes the write conditional: Cloud Storage answers
    412 (``google.api_core.exceptions.PreconditionFailed``) if the object is at another generation."""
    if is_gcs(uri):
        bucket, name = split_gcs(str(uri))
        gcs_client().bucket(bucket).blob(name).upload_from_string(data, if_generation_match=if_generation_match)
        return
    with atomic_write(uri) as f:
        f.write(data)


def upload_file(src: str | Path, uri: str | Path) -> None:
    if is_gcs(uri):
        bucket, name = split_gcs(str(uri))
        gcs_client().bucket(bucket).blob(name).upload_from_filename(str(src))
    elif Path(src).resolve() != Path(uri).resolve():  # a local run publishes in place
        write_bytes(uri, Path(src).read_bytes())


def read_bytes(uri: str | Path, timeout: float | None = None) -> bytes:
    """The content of a local file or GCS object; ``timeout``: see :func:`_request_options`."""
    if is_gcs(uri):
        bucket, name = split_gcs(str(uri))
        return gcs_client().bucket(bucket).blob(name).download_as_bytes(**_request_options(timeout))  # type: ignore[no-any-return]
    return Path(uri).read_bytes()


def exists(uri: str | Path) -> bool:
    """Whether a local file or GCS object is there."""
    if is_gcs(uri):
        bucket, name = split_gcs(str(uri))
        return gcs_client().bucket(bucket).get_blob(name) is not None
    return Path(uri).is_file()


class IncompleteDownload(ConnectionError):
    """A download ended with fewer (or more) bytes than the object holds: the connection was cut
    short. A :class:`ConnectionError`, so :func:`is_transient` says to try again."""


def download(uri: str, dest: str | Path, expected_sha256: str | None = None, timeout: float | None = None) -> Path:
    """Download a GCS object to ``dest`` via a temp file; verify the sha256 before the rename,
    so a partial or corrupted download is never found at ``dest``. ``timeout`` bounds each HTTP
    request (not the whole transfer) and turns the client's retries off: see :func:`_request_options`."""
    bucket, name = split_gcs(uri)
    blob = gcs_client().bucket(bucket).get_blob(name, **_request_options(timeout))
    if blob is None:
        raise FileNotFoundError(f"{uri} does not exist")
    return _download_blob(blob, uri, Path(dest), expected_sha256, timeout)


def _download_blob(blob: Blob, uri: str, dest: Path, expected_sha256: str | None, timeout: float | None) -> Path:
    """``blob`` (its metadata loaded: this generation, this size) to ``dest``, whole or not at all.

    The size is checked as well as the sha256: the client checks a download against the
    ``X-Goog-Hash`` header and urllib3 against ``Content-Length``, but a response with neither
    (a proxy's doing) that is cut short would otherwise pass for the whole object where no
    sha256 is expected (:func:`fetch_to_cache`), and be kept in the cache for good.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    os.close(fd)
    try:
        blob.download_to_filename(tmp, **_request_options(timeout))
        # A gzip-encoded object is decompressed on the way: its stored size is not the file's.
        if blob.size is not None and blob.content_encoding != "gzip":
            got = os.path.getsize(tmp)
            if got != blob.size:
                raise IncompleteDownload(f"{uri}: downloaded {got} bytes of {blob.size}")
        if expected_sha256 is not None:
            actual = sha256_file(tmp)
            if actual != expected_sha256:
                raise ValueError(f"{uri}: sha256 {actual} does not match the expected {expected_sha256}")
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return dest


def cache_dir() -> Path:
    """Local cache for downloads and decoded datasets (``FER_CACHE_DIR`` overrides)."""
    root = os.environ.get("FER_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"), "fer2013-mlops")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def fetch_to_cache(uri: str, timeout: float | None = None) -> Path:
    """A local copy of ``gs://...`` in the cache, downloaded once per object generation."""
    bucket, name = split_gcs(uri)
    blob = gcs_client().bucket(bucket).get_blob(name, **_request_options(timeout))
    if blob is None:
        raise FileNotFoundError(f"{uri} does not exist")
    dest = cache_dir() / "gcs" / bucket / f"{blob.generation}" / Path(name).name
    # A cached copy of another size than the object is incomplete (a cut download): fetch it again.
    # A gzip-encoded object's size is its compressed size, which says nothing about the copy.
    if not dest.exists() or (blob.size is not None and blob.content_encoding != "gzip" and dest.stat().st_size != blob.size):
        log.info("downloading %s (%d bytes) to %s", uri, blob.size or 0, dest)
        _download_blob(blob, uri, dest, None, timeout)
    return dest


RUN_POINTER = "pointer.json"  # in each run folder: what latest.json would hold to serve that run


@dataclass(frozen=True)
class LatestPointer:
    """The content of ``latest.json``: which run is served and how to verify the file it serves.

    ``path`` and ``sha256`` are all the service reads: the file it runs (relative to the prefix)
    and that file's digest. The other fields serve the promotion gate and history
    (:mod:`fercore.registry`); a ``latest.json`` written before they existed reads with defaults.
    """

    run_id: str
    path: str  # the served file, relative to the prefix that holds latest.json
    sha256: str  # of that file
    metrics: dict[str, Any] = field(default_factory=dict)
    created_at: str = ""
    files: dict[str, str] = field(default_factory=dict)  # every published file of the run -> its sha256
    dataset_fingerprint: str = ""  # of the data val_accuracy was measured on (training.data)
    promotion: dict[str, Any] = field(default_factory=dict)  # the event that made it current; {} for a candidate

    def model_uri(self, prefix: str | Path) -> str:
        return join(prefix, *self.path.split("/"))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict(), indent=2).encode()

    @classmethod
    def from_dict(cls, raw: Any, where: str = "pointer") -> LatestPointer:
        """Parse a pointer; keys this code does not know are ignored, missing optional ones default."""
        if not isinstance(raw, dict):
            raise ValueError(f"{where} is malformed: not a JSON object")
        known = {f.name for f in fields(cls)}
        try:
            pointer = cls(**{k: v for k, v in raw.items() if k in known})
        except TypeError as exc:
            raise ValueError(f"{where} is malformed: {exc}") from None
        if not all(isinstance(v, str) for v in (pointer.run_id, pointer.path, pointer.sha256)):
            raise ValueError(f"{where} is malformed: run_id, path and sha256 must be strings")
        return pointer


def publish_run(
    output: str | Path,
    run_id: str,
    files: dict[str, Path],
    model_name: str = "model.pt",
    metrics: dict[str, Any] | None = None,
    created_at: str = "",
    dataset_fingerprint: str = "",
) -> LatestPointer:
    """Copy a finished run's ``files`` (name in the run folder -> local file) to
    ``<output>/<run_id>/``, then write the run's ``pointer.json`` (the candidate naming
    ``model_name``, the file the service would run, with every file's sha256). Returns the candidate.

    Publishing serves nothing: promoting a candidate (``latest.json`` and its history) is
    :mod:`fercore.registry`'s, which is built on this module (:func:`fercore.registry.promote`
    with or without a gate, :func:`fercore.registry.publish_promoted` for both steps at once).
    """
    if model_name not in files:
        raise ValueError(f"run files must include {model_name}")
    digests = {rel: sha256_file(src) for rel, src in files.items()}
    for rel, src in files.items():
        upload_file(src, join(output, run_id, rel))
    candidate = LatestPointer(
        run_id=run_id,
        path=f"{run_id}/{model_name}",
        sha256=digests[model_name],
        metrics=metrics or {},
        created_at=created_at,
        files=digests,
        dataset_fingerprint=dataset_fingerprint,
    )
    write_bytes(join(output, run_id, RUN_POINTER), candidate.to_json())
    log.info("published %s to %s", run_id, join(output, run_id))
    return candidate


def read_run(output: str | Path, run_id: str, timeout: float | None = None) -> LatestPointer:
    """The candidate pointer of a published run (its ``pointer.json``)."""
    where = join(output, run_id, RUN_POINTER)
    try:
        raw = json.loads(read_bytes(where, timeout=timeout))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{where} is malformed: {exc}") from None
    return LatestPointer.from_dict(raw, where)


def read_latest(prefix: str | Path, timeout: float | None = None) -> LatestPointer:
    """The pointer in ``<prefix>/latest.json``; ``timeout`` applies to GCS (see :func:`_request_options`)."""
    where = join(prefix, LATEST)
    return LatestPointer.from_dict(json.loads(read_bytes(where, timeout=timeout)), where)
