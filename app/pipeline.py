"""The service's request pipeline: :mod:`app.analysis`'s steps, admitted, batched and measured.

The steps themselves (decode -> detect -> align -> crop -> classify) live in :mod:`app.analysis`,
shared with the Python API and the command line (:mod:`ferkit`); this module decides where they run.
One path for ``POST /predict`` (one upload) and ``POST /predict/batch`` (several): each request is
admitted once by the :class:`~app.concurrency.InferenceLimiter` (503 beyond its bound), decodes and
finds its faces in an inference slot, then has its crops classified by a :class:`Classify`:

* :class:`ClassifyInSlot`: a forward pass of its own, in an inference slot;
* :class:`ClassifyBatched`: a forward pass shared with other requests' faces
  (:class:`~app.batching.MicroBatcher`), the request still admitted while it waits.

A file that cannot be used (empty, too large, corrupt) is a :class:`~app.failures.ServiceError` in its
place; the other files of a batch are still classified.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from opentelemetry.trace import Tracer
from PIL import Image

from app.analysis import NO_TRACER, Analyzer, Located, Outcome, assign, crops_of, explain_faces, locate_uploads
from app.batching import MicroBatcher
from app.concurrency import InferenceLimiter
from app.faces import FaceDetector
from app.failures import ServiceError
from app.metrics import Metrics
from app.model import Prediction, Predictor
from app.schemas import Face


class Classify(Protocol):
    """Classifies the crops of one request with ``predictor``."""

    async def __call__(self, predictor: Predictor, crops: Sequence[Image.Image]) -> list[Prediction]: ...


@dataclass(frozen=True)
class ClassifyInSlot:
    """A forward pass of the request's own, in an inference slot (BATCH_MAX_SIZE=1)."""

    limiter: InferenceLimiter
    metrics: Metrics

    async def __call__(self, predictor: Predictor, crops: Sequence[Image.Image]) -> list[Prediction]:
        if not crops:
            return []
        predictions = await self.limiter.run_admitted(predictor.predict_faces, crops)
        self.metrics.observe_forward_pass(len(crops))
        return predictions


@dataclass(frozen=True)
class ClassifyBatched:
    """A forward pass shared with other requests' faces (the micro-batcher records its metrics)."""

    batcher: MicroBatcher

    async def __call__(self, predictor: Predictor, crops: Sequence[Image.Image]) -> list[Prediction]:
        return await self.batcher.predict(predictor, crops)


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
            located = await self.limiter.run_admitted(self.locate_uploads, uploads)
            predictions = await self.classify(self.predictor, crops_of(located))
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
