"""Bounded concurrency for inference: a few requests run, a bounded number wait, the rest are refused.

Inference is CPU-bound. Without a bound, every request admitted by the server would start
its own decode-detect-classify in the threadpool: they would all slow down together, memory
would grow with the backlog, and latency would climb for everyone. Instead at most
``max_running`` calls run at once, up to ``max_waiting`` more wait their turn (first come,
first served), and any beyond that get :class:`~app.errors.ServerBusy` (503 with
``Retry-After``) at once, so a load balancer or client can retry elsewhere or later.

The call runs in a copy of the caller's context (``contextvars``), so the request's trace
span is the parent of the spans made in the worker thread. Time spent waiting for a slot and
time holding one go to the app's metrics.

With micro-batching (:mod:`app.batching`) a request's work is split: it is admitted once
(:meth:`InferenceLimiter.admit`), decodes and finds its faces in a slot
(:meth:`InferenceLimiter.run_admitted`), then leaves the slot to wait for a shared forward pass,
still admitted: the bound on requests in progress, and the 503 beyond it, cover that wait too.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import time
from collections.abc import AsyncIterator, Callable, Collection
from typing import ParamSpec, TypeVar

from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import ServerBusy
from app.limits import route_path
from app.metrics import Metrics

P = ParamSpec("P")
T = TypeVar("T")


class InferenceLimiter:
    """Runs blocking calls in the threadpool, ``max_running`` at a time, with ``max_waiting`` queued.

    Create it inside the event loop that will use it (the app's lifespan). The admitted count
    needs no lock: it is only touched on the event loop, with no ``await`` between its check
    and its update.
    """

    def __init__(self, max_running: int, max_waiting: int, metrics: Metrics | None = None) -> None:
        if max_running < 1 or max_waiting < 0:
            raise ValueError(f"need max_running >= 1 and max_waiting >= 0, got {max_running} and {max_waiting}")
        self.max_running = max_running
        self.max_waiting = max_waiting
        self._slots = asyncio.Semaphore(max_running)
        self._admitted = 0  # running + waiting
        self._running = 0  # holding a slot
        self.metrics = metrics
        if metrics is not None:
            metrics.inference_admitted.set_function(lambda: self._admitted)  # read when /metrics is scraped

    @property
    def admitted(self) -> int:
        """Calls running or waiting for a slot right now."""
        return self._admitted

    @property
    def idle_slots(self) -> int:
        """Slots no call holds right now (read on the event loop)."""
        return self.max_running - self._running

    def raise_if_full(self) -> None:
        """:class:`ServerBusy` now if :meth:`run` would refuse: lets a route skip reading uploads
        it could not process anyway. :meth:`run` checks again."""
        if self._admitted >= self.max_running + self.max_waiting:
            raise ServerBusy()

    @contextlib.asynccontextmanager
    async def admit(self) -> AsyncIterator[None]:
        """Count a request as in progress for the ``async with`` block: :class:`ServerBusy` at once if
        ``max_running + max_waiting`` already are. Inside, each :meth:`run_admitted` waits for a slot.

        For a request whose work is split: decode and detection in a slot, then classification in a
        shared forward pass (:mod:`app.batching`) that holds no slot but still counts here.
        """
        self.raise_if_full()
        self._admitted += 1
        try:
            yield
        finally:
            self._admitted -= 1

    async def run(self, func: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """``func(*args, **kwargs)`` in a worker thread once a slot is free; :class:`ServerBusy` if
        the queue is full."""
        async with self.admit():
            return await self.run_admitted(func, *args, **kwargs)

    async def run_admitted(self, func: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """:meth:`run` for a request already inside :meth:`admit`: waits for a slot, never refuses."""
        context = contextvars.copy_context()  # the trace context, explicitly, whatever the threadpool does
        queued = time.perf_counter()
        async with self._slots:
            started = time.perf_counter()
            self._running += 1
            try:
                # Not abandoned on cancellation (anyio's default): a client that disconnects
                # keeps its slot until the thread is done, so the bound holds for real work.
                return await run_in_threadpool(functools.partial(context.run, func, *args, **kwargs))
            finally:
                self._running -= 1
                if self.metrics is not None:
                    self.metrics.queue_wait.observe(started - queued)
                    self.metrics.inference_duration.observe(time.perf_counter() - started)


class RefuseWhenFull:
    """ASGI middleware: a POST to an inference route gets its 503 before its upload is read.

    FastAPI reads and parses a multipart body before any route code runs, so a request the route
    would refuse would first have to send its whole upload, at the moment the server is busiest
    (seen in the soak's overload burst: refusals took seconds). The check runs on the first
    ``receive``, inside the route, so the app's error handler answers it, as for
    :class:`app.limits.BodySizeLimit`'s 413; the route checks again once the body is in.
    """

    def __init__(self, app: ASGIApp, paths: Collection[str]) -> None:
        self.app = app
        self.paths = frozenset(paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or route_path(scope) not in self.paths:
            await self.app(scope, receive, send)
            return
        checked = False

        async def receive_unless_full() -> Message:
            nonlocal checked
            if not checked:
                checked = True
                limiter: InferenceLimiter | None = scope["app"].state.limiter  # None before the lifespan
                if limiter is not None:
                    limiter.raise_if_full()
            return await receive()

        await self.app(scope, receive_unless_full, send)
