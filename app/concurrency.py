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
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import time
from collections.abc import Callable
from typing import ParamSpec, TypeVar

from starlette.concurrency import run_in_threadpool

from app.errors import ServerBusy
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
        self.metrics = metrics

    @property
    def admitted(self) -> int:
        """Calls running or waiting for a slot right now."""
        return self._admitted

    def raise_if_full(self) -> None:
        """:class:`ServerBusy` now if :meth:`run` would refuse: lets a route skip reading uploads
        it could not process anyway. :meth:`run` checks again."""
        if self._admitted >= self.max_running + self.max_waiting:
            raise ServerBusy()

    async def run(self, func: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """``func(*args, **kwargs)`` in a worker thread once a slot is free; :class:`ServerBusy` if
        the queue is full."""
        self.raise_if_full()
        self._admitted += 1
        context = contextvars.copy_context()  # the trace context, explicitly, whatever the threadpool does
        queued = time.perf_counter()
        try:
            async with self._slots:
                started = time.perf_counter()
                try:
                    # Not abandoned on cancellation (anyio's default): a client that disconnects
                    # keeps its slot until the thread is done, so the bound holds for real work.
                    return await run_in_threadpool(functools.partial(context.run, func, *args, **kwargs))
                finally:
                    if self.metrics is not None:
                        self.metrics.queue_wait.observe(started - queued)
                        self.metrics.inference_duration.observe(time.perf_counter() - started)
        finally:
            self._admitted -= 1
