"""Micro-batching: the faces of concurrent requests classified together, in one forward pass.

A forward pass over N faces costs less than N passes over one (fewer, larger matrix products,
one set of per-call overheads), so under concurrency the service does more with the same CPUs.
Requests hand their face crops to a :class:`MicroBatcher` and await their own predictions:

* a collector task on the event loop takes the oldest waiting request, then lets others join
  while the batch holds fewer than ``max_size`` faces and the oldest has waited less than
  ``max_wait_s``. Requests that arrived while the previous batch ran are already there, so under
  load batches form without any waiting; with ``max_wait_s`` 0, the wait is only that;
* the batch runs in the batcher's one worker thread (one forward pass at a time; its intra-op
  threads are ONNX Runtime's own), then each request's future gets its slice of the predictions, or,
  if the pass failed, the exception;
* a request that finds the batcher idle (no pass running, none queued) runs its pass of one in its
  own inference slot's thread, right after its decoding (:meth:`MicroBatcher.predict_inline`): one
  thread hop instead of two, and the collector's wake-up saved, when there is nobody to batch with.
  A lock keeps it one pass at a time: requests arriving meanwhile queue, and form the next batch;
* a request's faces never span two batches; one with more than ``max_size`` faces (a
  ``/predict/batch`` of group photos) is a batch of its own. Requests served by different
  predictors (a model reload in between) go in different batches.

Decoding and face detection stay per request, under :class:`~app.concurrency.InferenceLimiter`'s
slots; a request waiting here has left its slot but is still *admitted*, so the limiter's bound
on requests in progress (running + waiting, beyond which 503) covers the batch queue too.

One pass runs at a time, so a slow pass delays every request queued behind it. The worker is a
CPU consumer beside the slots' decoding and detection, which is why ONNX Runtime's threads sleep
rather than spin between passes (:func:`fercore.classifier.session_options`).

Tracing: each request gets a ``classify`` span (its wait plus the pass it joined, with the batch's
size); the pass itself is a ``batch`` span, the child of the first request's ``classify`` span,
with a link to every request's, and its ``preprocess`` and ``inference`` spans inside it. Each
``classify`` span links back to its ``batch`` span. Metrics: faces per forward pass
(``fer_inference_batch_size``) and the time from joining the queue to the pass's start
(``fer_batch_wait_seconds``).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import logging
import threading
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from opentelemetry.trace import Link, NoOpTracer, Span, Tracer
from PIL import Image

from app.errors import ModelNotReady
from app.metrics import Metrics
from app.model import Prediction, Predictor

log = logging.getLogger(__name__)


@dataclass
class _Request:
    """One request's faces, waiting to join a batch."""

    predictor: Predictor
    crops: Sequence[Image.Image]
    future: asyncio.Future[list[Prediction]]
    context: contextvars.Context  # the request's, with its ``classify`` span current
    span: Span  # that ``classify`` span
    queued: float = field(default_factory=time.perf_counter)


class MicroBatcher:
    """Classifies the face crops of concurrent requests in shared forward passes.

    Create it, :meth:`start` it and :meth:`stop` it on the event loop that uses it (the app's
    lifespan). ``max_size``: most faces per pass; ``max_wait_s``: longest the oldest request
    waits for others to join before its batch runs anyway.
    """

    def __init__(self, max_size: int, max_wait_s: float, metrics: Metrics | None = None, tracer: Tracer | None = None) -> None:
        if max_size < 1 or max_wait_s < 0:
            raise ValueError(f"need max_size >= 1 and max_wait_s >= 0, got {max_size} and {max_wait_s}")
        self.max_size = max_size
        self.max_wait_s = max_wait_s
        self.metrics = metrics
        self.tracer: Tracer = tracer or NoOpTracer()
        self._queue: deque[_Request] = deque()
        self._queued_faces = 0
        self._arrived = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task[None] | None = None
        self._executor: ThreadPoolExecutor | None = None
        # Held by the pass running, the collector's or a request's own (predict_inline); a threading
        # lock, as predict_inline takes it in a worker thread. Its release is signalled on the loop.
        self._pass_lock = threading.Lock()
        self._pass_freed = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def waiting(self) -> int:
        """Requests queued for a batch right now (not counting the batch running)."""
        return len(self._queue)

    def start(self) -> None:
        """Start collecting batches (a task on the running loop, one worker thread)."""
        if self._task is None:
            self._loop = asyncio.get_running_loop()
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fer-batch")
            self._task = asyncio.create_task(self._collect(), name="micro-batcher")

    async def stop(self) -> None:
        """Finish the requests already queued, then stop; later calls to :meth:`predict` get 503."""
        self._closing = True
        self._arrived.set()
        task, self._task = self._task, None
        if task is not None:
            with contextlib.suppress(Exception):  # a collector that failed has logged why
                await task
        if self._executor is not None:
            self._executor.shutdown(wait=False)  # idle: the collector waited for its last batch
            self._executor = None

    async def predict(self, predictor: Predictor, crops: Sequence[Image.Image]) -> list[Prediction]:
        """``predictor.predict_faces(crops)``, computed in a forward pass shared with other requests."""
        if not crops:
            return []
        if self._closing or self._task is None or self._task.done():  # stopped, or never started
            raise ModelNotReady()
        with self.tracer.start_as_current_span("classify", attributes={"fer.faces": len(crops)}) as span:
            request = _Request(
                predictor=predictor,
                crops=crops,
                future=asyncio.get_running_loop().create_future(),
                context=contextvars.copy_context(),
                span=span,
            )
            self._queue.append(request)
            self._queued_faces += len(crops)
            self._arrived.set()
            # Cancelled (the client went away): the future is cancelled too, and the collector
            # drops the request if its batch has not started, or its result if it has.
            return await request.future

    @property
    def idle(self) -> bool:
        """No pass running or queued (read on the event loop): :meth:`predict_inline` would run now."""
        return self._task is not None and not self._closing and not self._queue and not self._pass_lock.locked()

    def predict_inline(self, predictor: Predictor, crops: Sequence[Image.Image]) -> list[Prediction] | None:
        """In a worker thread (the request's inference slot): ``predictor.predict_faces(crops)`` now, in
        this thread, if the batcher is idle; else None, and the request joins the queue with
        :meth:`predict`. Traced and measured as a batch of one request."""
        if not crops:
            return []
        # The queue is read off the loop: at worst a request queued a moment ago waits for this pass,
        # as it would for any pass running when it arrived.
        if not self.idle or not self._pass_lock.acquire(blocking=False):
            return None
        try:
            if self.metrics is not None:
                self.metrics.batch_wait.observe(0.0)  # it waited for no pass
            with self.tracer.start_as_current_span("classify", attributes={"fer.faces": len(crops)}) as span:
                return self._forward(predictor, crops, [span])
        finally:
            self._pass_lock.release()
            if self._loop is not None:
                # The collector may wait for it; a loop already closed (shutdown) has no one waiting,
                # and its RuntimeError must not replace this pass's result.
                with contextlib.suppress(RuntimeError):
                    self._loop.call_soon_threadsafe(self._pass_freed.set)

    # --- on the event loop -------------------------------------------------------------------

    async def _collect(self) -> None:
        try:
            while True:
                while not self._queue:
                    if self._closing:
                        return
                    self._arrived.clear()
                    await self._arrived.wait()
                await self._wait_for_company()
                await self._acquire_pass()
                try:
                    batch = self._take_batch()
                    if batch:  # else every request taken had been cancelled
                        await self._run_batch(batch)
                finally:
                    self._pass_lock.release()
        except BaseException as exc:  # a bug here, or the loop going away: no request waits forever
            if not isinstance(exc, asyncio.CancelledError):
                log.error("micro-batcher stopped unexpectedly", exc_info=exc)
            failure = exc if isinstance(exc, Exception) else ModelNotReady()
            while self._queue:
                request = self._queue.popleft()
                if not request.future.done():
                    request.future.set_exception(failure)
            self._queued_faces = 0
            raise

    async def _run_batch(self, batch: list[_Request]) -> None:
        """Run ``batch`` in the worker thread; resolve each request's future with its predictions."""
        started = time.perf_counter()
        if self.metrics is not None:
            for request in batch:
                self.metrics.batch_wait.observe(started - request.queued)
        try:
            # Run in the first request's context: its ``classify`` span is the batch span's parent.
            call = functools.partial(batch[0].context.run, self._run, batch)
            predictions = await asyncio.get_running_loop().run_in_executor(self._executor, call)
        except Exception as exc:  # every request of the batch gets the failure
            for request in batch:
                if not request.future.done():
                    request.future.set_exception(exc)
            return
        start = 0
        for request in batch:
            end = start + len(request.crops)
            if not request.future.done():
                request.future.set_result(predictions[start:end])
            start = end

    async def _acquire_pass(self) -> None:
        """Take the pass lock, waiting (without blocking the loop) for a request's own pass to end."""
        while not self._pass_lock.acquire(blocking=False):
            self._pass_freed.clear()
            if self._pass_lock.acquire(blocking=False):  # released before the clear: its signal is gone
                return
            await self._pass_freed.wait()

    async def _wait_for_company(self) -> None:
        """Wait while the batch could grow: fewer than ``max_size`` faces queued and the oldest
        request has waited less than ``max_wait_s`` (it may have waited that long already)."""
        deadline = self._queue[0].queued + self.max_wait_s
        while self._queued_faces < self.max_size and not self._closing:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                return
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except TimeoutError:
                return

    def _take_batch(self) -> list[_Request]:
        """The oldest requests whose faces fit in one batch, all for the same predictor."""
        batch: list[_Request] = []
        faces = 0
        while self._queue:
            request = self._queue[0]
            if request.future.done():  # cancelled while queued
                self._queue.popleft()
                self._queued_faces -= len(request.crops)
                continue
            if batch and (request.predictor is not batch[0].predictor or faces + len(request.crops) > self.max_size):
                break
            self._queue.popleft()
            self._queued_faces -= len(request.crops)
            batch.append(request)
            faces += len(request.crops)
        return batch

    # --- in the worker thread ----------------------------------------------------------------

    def _run(self, batch: list[_Request]) -> list[Prediction]:
        crops = [crop for request in batch for crop in request.crops]
        return self._forward(batch[0].predictor, crops, [request.span for request in batch])

    def _forward(self, predictor: Predictor, crops: Sequence[Image.Image], spans: Sequence[Span]) -> list[Prediction]:
        """One forward pass over the faces of the requests whose ``classify`` spans are ``spans``."""
        links = [Link(span.get_span_context()) for span in spans]
        attributes = {"fer.batch_size": len(crops), "fer.batch_requests": len(spans)}
        with self.tracer.start_as_current_span("batch", links=links, attributes=attributes) as batch_span:
            for span in spans:  # each request's own span: the batch it joined
                span.set_attribute("fer.batch_size", len(crops))
                span.add_link(batch_span.get_span_context())
            predictions = predictor.predict_faces(crops)
        if self.metrics is not None:
            self.metrics.observe_forward_pass(len(crops))
        if len(predictions) != len(crops):
            raise ValueError(f"{len(predictions)} predictions for {len(crops)} faces")
        return predictions
