"""The request pipeline: uploaded bytes -> decode -> locate the faces -> classify them -> faces.

One path for ``POST /predict`` (one upload) and ``POST /predict/batch`` (several): each request is
admitted once by the :class:`~app.concurrency.InferenceLimiter` (503 beyond its bound), decodes and
finds its faces in an inference slot, then has its crops classified by a :class:`Classify`:

* :class:`ClassifyInSlot`: a forward pass of its own, in an inference slot;
* :class:`ClassifyBatched`: a forward pass shared with other requests' faces
  (:class:`~app.batching.MicroBatcher`), the request still admitted while it waits.

A file that cannot be used (empty, too large, corrupt) is a :class:`~app.errors.ServiceError` in its
place; the other files of a batch are still classified.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from opentelemetry.trace import NoOpTracer, Tracer
from PIL import Image

from app import explain as explaining
from app.batching import MicroBatcher
from app.concurrency import InferenceLimiter
from app.errors import ServiceError
from app.faces import CROP_MARGIN, Box, FaceDetector, crop_faces, expand_box, whole_image_crop
from app.images import decode_image
from app.metrics import Metrics
from app.model import Prediction, Predictor
from app.schemas import Explanation, Face

NO_TRACER = NoOpTracer()


@dataclass(frozen=True)
class Located:
    """The faces found in one image: their boxes, the crops to classify, and where each crop lies."""

    boxes: list[Box]
    crops: list[Image.Image]
    regions: list[Box]  # the part of the image each crop shows (the box and its margin)


Outcome = list[Face] | ServiceError  # one upload's faces, or why it has none


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
        located: list[Located | ServiceError] = []
        for upload in uploads:
            if isinstance(upload, ServiceError):
                located.append(upload)
                continue
            try:
                located.append(self.locate(self.decode(upload)))
            except ServiceError as exc:
                located.append(exc)
        return located

    def decode(self, data: bytes) -> Image.Image:
        """:func:`~app.images.decode_image` in a ``decode`` span (a rejected file ends it in error)."""
        with self.tracer.start_as_current_span("decode", attributes={"fer.bytes": len(data)}) as span:
            image = decode_image(data, self.max_pixels)
            span.set_attribute("fer.image.width", image.width)
            span.set_attribute("fer.image.height", image.height)
            return image

    def locate(self, image: Image.Image) -> Located:
        """The face boxes in ``image`` and the crops to classify; without a detector, the whole image."""
        if self.detector is None:
            whole = (0, 0, *image.size)
            return Located([whole], [whole_image_crop(image)], [whole])  # shrunk: see whole_image_crop
        with self.tracer.start_as_current_span("detect_faces") as span:
            boxes = self.detector.detect(image)
            span.set_attribute("fer.faces", len(boxes))
        regions = [expand_box(box, CROP_MARGIN, *image.size) for box in boxes]
        return Located(boxes, crop_faces(image, boxes), regions)

    def explain(self, located: Sequence[Located | ServiceError], outcomes: list[Outcome]) -> list[Outcome]:
        """``outcomes`` with an explanation for the largest faces of the request, in place (blocking:
        runs in a slot). At most :data:`app.explain.MAX_EXPLAINED_FACES` faces, in one forward pass."""
        entries = [
            (faces, j, item)
            for item, faces in zip(located, outcomes, strict=True)
            if isinstance(item, Located) and isinstance(faces, list)
            for j in range(len(faces))
        ]
        chosen = [entries[k] for k in explaining.largest([item.boxes[j] for _, j, item in entries])]
        with self.tracer.start_as_current_span("explain", attributes={"fer.faces": len(chosen)}):
            heatmaps = explaining.explain(self.predictor, [item.crops[j] for _, j, item in chosen])
        for (faces, j, item), heatmap in zip(chosen, heatmaps, strict=True):
            explanation = Explanation(
                method=explaining.METHOD,
                emotion=self.predictor.classes[heatmap.class_index],
                png=heatmap.png_base64(),
                box=item.regions[j],
                forward_passes=explaining.GRID**2 + 1,
                max_drop=heatmap.max_drop,
            )
            faces[j] = faces[j].model_copy(update={"explanation": explanation})
        return outcomes


def crops_of(located: Sequence[Located | ServiceError]) -> list[Image.Image]:
    """Every crop to classify, in upload order."""
    return [crop for item in located if not isinstance(item, ServiceError) for crop in item.crops]


def assign(located: Sequence[Located | ServiceError], predictions: Sequence[Prediction]) -> list[Outcome]:
    """Each upload's faces from its boxes and its share of ``predictions`` (:func:`crops_of`'s order)."""
    remaining = iter(predictions)
    return [
        item if isinstance(item, ServiceError) else [Face(box=box, **next(remaining)) for box in item.boxes] for item in located
    ]
