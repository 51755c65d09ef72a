"""Which model is served, and replacing it without a restart.

:class:`ModelLoader` loads MODEL_URI's model in the lifespan and puts it on ``app.state.predictor``,
which :func:`app.deps.get_predictor` reads for each request.

* **Startup.** A transient failure (GCS unreachable or slow, a 5xx: :attr:`ModelLoadError.transient`)
  is retried ``MODEL_LOAD_RETRIES`` times with exponential backoff; a corrupt or mismatching
  model is refused at once. If loading still fails, the service stays unready (``/readyz`` 503)
  or, with ``FALLBACK_TO_BUNDLED``, serves the bundled model and says so in ``GET /model``.
* **Reload** (``POST /admin/reload``, or every ``RELOAD_INTERVAL_S``): when MODEL_URI names a
  model other than the one served (another sha256 in ``latest.json``), the new one is loaded
  and warmed up in a worker thread, beside the old one, then swapped in with one assignment.
  A request holds the predictor it started with, so in-flight requests finish on the old model.
  A failed reload changes nothing but ``last_reload_error`` and the failure counter; the next
  check tries again. Reloads make one attempt each: the periodic check is the retry.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, replace
from datetime import UTC, datetime

from opentelemetry.trace import Tracer
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import State

from app.metrics import Metrics
from app.model import ModelLoadError, Predictor, source_sha256
from app.settings import Settings

log = logging.getLogger(__name__)

# The longest wait between two startup attempts, however many retries are configured.
MAX_BACKOFF_S = 300.0


def load_predictor(
    uri: str, tracer: Tracer, timeout: float | None = None, fallback_error: str = "", threads: int = 1
) -> Predictor:
    """Load and warm up the model at ``uri``; ``fallback_error`` marks it as served in place of
    MODEL_URI's model, which failed to load for that reason; ``threads``: INFERENCE_THREADS.
    Blocking: run it in a worker thread."""
    predictor = Predictor.from_uri(uri, timeout=timeout, threads=threads)
    predictor.warm_up()
    predictor.tracer = tracer  # after the warm-up: its inference is no request's
    if fallback_error:
        predictor.info = replace(predictor.info, fallback_error=fallback_error)
    return predictor


@dataclass(frozen=True)
class ReloadOutcome:
    """What one reload did: ``version`` is the model served afterwards (None: none is)."""

    reloaded: bool
    version: str | None
    error: str | None = None


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class ModelLoader:
    """Loads the served model into ``state.predictor`` at startup, and reloads it on request or periodically."""

    def __init__(self, state: State, settings: Settings, metrics: Metrics, tracer: Tracer) -> None:
        self.state = state
        self.settings = settings
        self.metrics = metrics
        self.tracer = tracer
        self.uri = settings.resolved_model_uri()
        self.threads = settings.resolved_inference_threads()
        self.last_reload_at: str | None = None  # when the last reload check ended, whatever it found
        self.last_reload_error: str | None = None  # why it failed; None if it succeeded or found nothing new
        self._lock = asyncio.Lock()  # one reload at a time: a second waits, then finds nothing new
        self._task: asyncio.Task[None] | None = None

    # --- startup ------------------------------------------------------------------------

    async def load_at_startup(self) -> None:
        """Serve MODEL_URI's model, else the bundled one (FALLBACK_TO_BUNDLED), else nothing (not ready)."""
        try:
            predictor = await self._load_with_retries()
        except ModelLoadError as exc:
            self.metrics.model_load_failed()
            bundled = str(self.settings.bundled_model_path)
            if not self.settings.fallback_to_bundled or self.uri == bundled:
                log.error("model not loaded, the service will not become ready: %s", exc)
                return
            log.error("model not loaded: %s; falling back to the bundled model %s (FALLBACK_TO_BUNDLED)", exc, bundled)
            try:
                predictor = await run_in_threadpool(load_predictor, bundled, self.tracer, None, str(exc), self.threads)
            except ModelLoadError as fallback_exc:
                self.metrics.model_load_failed()
                log.error("the bundled model did not load either, the service will not become ready: %s", fallback_exc)
                return
        self._serve(predictor)

    async def _load_with_retries(self) -> Predictor:
        """One attempt, plus MODEL_LOAD_RETRIES more while the failure is transient. The waits are
        ``asyncio.sleep``: no worker thread is held while waiting."""
        attempts = self.settings.model_load_retries + 1
        for attempt in range(1, attempts + 1):
            try:
                return await run_in_threadpool(
                    load_predictor, self.uri, self.tracer, self.settings.gcs_timeout_s, threads=self.threads
                )
            except ModelLoadError as exc:
                if not exc.transient:
                    raise
                if attempt == attempts:
                    raise ModelLoadError(f"{exc} (gave up after {attempts} attempts)", transient=True) from None
                delay = min(self.settings.model_load_backoff_s * 2 ** (attempt - 1), MAX_BACKOFF_S)
                self.metrics.model_load_retried()
                log.warning("loading the model failed (attempt %d of %d), retrying in %.2f s: %s", attempt, attempts, delay, exc)
                await asyncio.sleep(delay)
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _serve(self, predictor: Predictor) -> None:
        # The swap: a single assignment. Requests resolved their predictor when they started and
        # keep it; the old model is freed when the last of them is done.
        self.state.predictor = predictor
        self.metrics.model_loaded(predictor.info)
        info = predictor.info
        log.info("serving model %s (%s, sha256 %s) from %s", info.version, info.architecture, info.sha256, info.source)

    # --- reload -------------------------------------------------------------------------

    async def reload(self) -> ReloadOutcome:
        """Serve MODEL_URI's current model if it is not the one served; keep the old one if that fails."""
        async with self._lock:
            outcome = await self._reload()
            self.last_reload_at = _now()
            self.last_reload_error = outcome.error
        return outcome

    async def _reload(self) -> ReloadOutcome:
        current: Predictor | None = self.state.predictor
        version = current.info.version if current else None
        # A fallback model is never what MODEL_URI names: any model MODEL_URI loads replaces it.
        serving = current.info.sha256 if current and not current.info.fallback else None
        timeout = self.settings.gcs_timeout_s
        try:
            wanted = await run_in_threadpool(source_sha256, self.uri, timeout)
            if wanted is not None and wanted == serving:
                return ReloadOutcome(reloaded=False, version=version)
            new = await run_in_threadpool(load_predictor, self.uri, self.tracer, timeout, threads=self.threads)
        except Exception as exc:
            self.metrics.model_load_failed()
            still = f"still serving {version}" if current else "no model served"
            if isinstance(exc, ModelLoadError):
                error = str(exc)
                log.error("model reload failed, %s: %s", still, error)
            else:  # a bug, not a bad model: the traceback is needed
                error = f"{type(exc).__name__}: {exc}"
                log.error("model reload failed unexpectedly, %s", still, exc_info=exc)
            return ReloadOutcome(reloaded=False, version=version, error=error)
        if new.info.sha256 == serving:  # a gs://....pt file: only the download told it had not changed
            return ReloadOutcome(reloaded=False, version=version)
        self._serve(new)
        log.info("model reloaded: %s -> %s", version, new.info.version)
        return ReloadOutcome(reloaded=True, version=new.info.version)

    # --- periodic checks ----------------------------------------------------------------

    def start(self) -> None:
        """Check MODEL_URI every RELOAD_INTERVAL_S in a background task (nothing when it is 0)."""
        interval = self.settings.reload_interval_s
        if interval > 0 and self._task is None:
            self._task = asyncio.create_task(self._check_every(interval), name="model-reload")

    async def stop(self) -> None:
        """Cancel the periodic checks; a reload in progress finishes its worker-thread step first."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _check_every(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await self.reload()
            except Exception:  # reload() reports its own failures; this keeps the checks alive regardless
                log.exception("model reload check failed")
