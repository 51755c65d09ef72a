"""The service's request pipeline: :mod:`app.analysis`'s steps, admitted, batched and measured.

The steps themselves (decode -> detect -> align -> crop -> classify) live in :mod:`app.analysis`,
shared with the Python API and the command line (:mod:`ferkit`); this module decides where they run.
One path for ``POST /predict`` (one upload) and ``POST /predict/batch`` (several): each request is
admitted once by the :class:`~app.concurrency.InferenceLimiter` (503 beyond its bound), then a
:class:`Classify` decodes and finds its faces in an inference slot and has its crops classified:

* :class:`ClassifyInSlot`: a forward pass of its own, in the same slot, in the same thread hop;
* :class:`ClassifyBatched`: a forward pass shared with other requests' faces
  (:class:`~app.batching.MicroBatcher`), the request still admitted while it waits; when the
  batcher is idle and another slot is free, its own pass in its slot, in the same thread hop.

One thread hop per request where one suffices: with two, the micro-batcher's wake-up between them
and eight route dependencies, the service's plumbing around a 48x48 crop's forward pass was 0.50 ms;
with one hop and one dependency, 0.35 ms (in process, bench/results/overhead.json).

A file that cannot be used (empty, too large, corrupt) is a :class:`~app.failures.ServiceError` in its
place; the other files of a batch are still classified.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from opentelemetry.trace import Tracer

from app.analysis import NO_TRACER, Analyzer, Located, Outcome, assign, crops_of, explain_faces, locate_uploads
from app.batching import MicroBatcher
from app.concurrency import InferenceLimiter
from app.faces import FaceDetector
from app.failures import ServiceError
from app.metrics import Metrics
from app.model import Prediction, Predictor
from app.schemas import Face

Locate = Callable[[], list[Located | ServiceError]]  # decode and find the faces of a request's uploads (blocking)
Classified = tuple[list[Located | ServiceError], list[Prediction]]  # and the predictions of their crops, in order


class Classify(Protocol):
    """Runs ``locate`` in an inference slot of the admitted request, then classifies its crops with ``predictor``."""

    async def __call__(self, locate: Locate, predictor: Predictor) -> Classified: ...


@dataclass(frozen=True)
class ClassifyInSlot:
    """A forward pass of the request's own, in its inference slot, after its decoding (BATCH_MAX_SIZE=1)."""

    limiter: InferenceLimiter
    metrics: Metrics

    async def __call__(self, locate: Locate, predictor: Predictor) -> Classified:
        def located_and_classified() -> Classified:
            located = locate()
            crops = crops_of(located)
            return located, predictor.predict_faces(crops) if crops else []

        located, predictions = await self.limiter.run_admitted(located_and_classified)
        self.metrics.observe_forward_pass(len(predictions))
        return located, predictions


@dataclass(frozen=True)
class ClassifyBatched:
    """A forward pass shared with other requests' faces (the micro-batcher records its metrics).

    When the batcher is idle and another slot is free (so the request's pass keeps no one from
    decoding), the pass runs in the request's slot right after its decoding; else, or if a pass
    started meanwhile, the request leaves its slot and joins the batcher's queue."""

    limiter: InferenceLimiter
    batcher: MicroBatcher

    async def __call__(self, locate: Locate, predictor: Predictor) -> Classified:
        if self.batcher.idle and self.limiter.idle_slots > 1:

            def located_maybe_classified() -> tuple[list[Located | ServiceError], list[Prediction] | None]:
                located = locate()
                return located, self.batcher.predict_inline(predictor, crops_of(located))

            located, inline = await self.limiter.run_admitted(located_maybe_classified)
            if inline is not None:
                return located, inline
        else:
            located = await self.limiter.run_admitted(locate)
        return located, await self.batcher.predict(predictor, crops_of(located))


@dataclass(frozen=True)
class Pipeline:
    """A request's steps and where they run; ``detector`` None: each image is one face crop."""

    limiter: InferenceLimiter
    classify: Classify
    metrics: Metrics
    predictor: Predictor
    detector: FaceDetector | None
    max_pixels: int
    tracer: Tracer = NO_TRACER

    async def image(self, data: bytes, explain: bool = False) -> list[Face]:
        """The faces in one image; a bad image raises its :class:`ServiceError`. ``explain``: the
        largest faces also get an :class:`~app.schemas.Explanation` (:mod:`app.explain`)."""
        (outcome,) = await self.uploads([data], explain)
        if isinstance(outcome, ServiceError):
            raise outcome
        return outcome

    async def uploads(self, uploads: Sequence[bytes | ServiceError], explain: bool = False) -> list[Outcome]:
        """The faces in each upload, classified together; errors stay in their place."""
        async with self.limiter.admit():
            located, predictions = await self.classify(functools.partial(self.locate_uploads, uploads), self.predictor)
            outcomes = assign(located, predictions)
            if explain:
                outcomes = await self.limiter.run_admitted(self.explain, located, outcomes)
        self.metrics.observe_images([[face.emotion for face in item] for item in outcomes if not isinstance(item, ServiceError)])
        return outcomes

    def locate_uploads(self, uploads: Sequence[bytes | ServiceError]) -> list[Located | ServiceError]:
        """Decode each upload and find its faces (blocking: runs in a slot)."""
        return locate_uploads(uploads, self.max_pixels, self.detector, self.tracer)

    def explain(self, located: Sequence[Located | ServiceError], outcomes: list[Outcome]) -> list[Outcome]:
        """:func:`app.analysis.explain_faces` with this request's model (blocking: runs in a slot)."""
        return explain_faces(self.predictor, located, outcomes, self.tracer)

    def analyzer(self) -> Analyzer:
        """The same steps, to be run whole in one inference slot (a video: :mod:`app.routes.video`)."""
        return Analyzer(self.predictor, self.detector, self.max_pixels, self.tracer)
