"""Emotion prediction: the faces in an uploaded image, or in each of several."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated

from fastapi import APIRouter, Depends, File, Query, UploadFile
from opentelemetry.trace import NoOpTracer, Tracer
from PIL import Image

from app.batching import MicroBatcher
from app.concurrency import InferenceLimiter
from app.deps import BatcherDep, DetectorDep, LimiterDep, MetricsDep, PredictorDep, SettingsDep, TracerDep
from app.errors import (
    CorruptImage,
    EmptyFile,
    ImageTooLarge,
    ModelNotReady,
    PayloadTooLarge,
    ServerBusy,
    ServiceError,
    TooManyFiles,
    UnsupportedImage,
)
from app.faces import Detection, FaceDetector, crop_faces, whole_image_crop
from app.images import decode_image_reduced
from app.metrics import Metrics
from app.model import Prediction, Predictor
from app.schemas import BatchResponse, ErrorBody, Face, FileError, FileFaces, FileFailure, ModelRef, PredictResponse

router = APIRouter(tags=["predict"])

CHUNK_BYTES = 1 << 20
NO_TRACER = NoOpTracer()

FORMATS = "JPEG, PNG, GIF, BMP, TIFF, WebP or PPM"
_BUSY = "model not loaded, or server busy (every inference slot taken and the queue full: retry after `Retry-After` seconds)"


def _error_docs(codes: dict[int, tuple[str, list[str]]]) -> dict[int | str, dict[str, object]]:
    """OpenAPI entries for error responses, each with its own stable ``detail`` values as examples."""
    return {
        code: {
            "model": ErrorBody,
            "description": text,
            "content": {"application/json": {"examples": {d: {"value": {"detail": d}} for d in details}}},
        }
        for code, (text, details) in codes.items()
    }


_ERRORS = _error_docs(
    {
        400: ("empty file or corrupt image", [EmptyFile.message, CorruptImage.message]),
        413: ("file or image too large", [PayloadTooLarge.message, ImageTooLarge.message]),
        415: ("unsupported image format", [UnsupportedImage.message]),
        503: (_BUSY, [ModelNotReady.message, ServerBusy.message]),
    }
)
_BATCH_ERRORS = _error_docs(
    {
        # The files' own errors are in the results; a body the multipart parser cannot read is the request's.
        400: ("malformed multipart body (the parser's message in `detail`)", []),
        413: (
            "too many files (over MAX_BATCH_FILES), or the request body too large",
            [TooManyFiles.message, PayloadTooLarge.message],
        ),
        503: (_BUSY, [ModelNotReady.message, ServerBusy.message]),
    }
)

DetectParam = Annotated[
    bool,
    Query(description="find the faces first (default); false: classify the whole image as one face crop"),
]


@dataclass(frozen=True)
class FacePipeline:
    """Where a request's steps run: decode and detection in an inference slot of ``limiter``;
    classification in that same slot, or, with a ``batcher``, in a forward pass shared with other
    requests, the request still admitted (counted against the limiter's bound) while it waits."""

    limiter: InferenceLimiter
    batcher: MicroBatcher | None
    metrics: Metrics
    predictor: Predictor
    detector: FaceDetector | None  # None: each image is one face crop
    max_pixels: int
    tracer: Tracer

    async def image(self, data: bytes) -> list[Face]:
        """The faces in one image; a bad image raises its :class:`ServiceError`."""
        faces: list[Face]
        if self.batcher is None:
            faces = await self.limiter.run(classify_image, self.predictor, self.detector, data, self.max_pixels, self.tracer)
            self.metrics.observe_forward_pass(len(faces))
        else:
            async with self.limiter.admit():
                boxes, crops = await self.limiter.run_admitted(locate_image, self.detector, data, self.max_pixels, self.tracer)
                faces = to_faces(boxes, await self.batcher.predict(self.predictor, crops))
        self.metrics.observe_images([[face.emotion for face in faces]])
        return faces

    async def uploads(self, uploads: Sequence[bytes | ServiceError]) -> list[list[Face] | ServiceError]:
        """The faces in each upload, all classified in one forward pass; errors stay in their place."""
        outcomes: list[list[Face] | ServiceError]
        if self.batcher is None:
            outcomes = await self.limiter.run(
                classify_uploads, self.predictor, self.detector, uploads, self.max_pixels, self.tracer
            )
            self.metrics.observe_forward_pass(sum(len(item) for item in outcomes if not isinstance(item, ServiceError)))
        else:
            async with self.limiter.admit():
                located = await self.limiter.run_admitted(locate_uploads, self.detector, uploads, self.max_pixels, self.tracer)
                outcomes = assign(located, await self.batcher.predict(self.predictor, crops_of(located)))
        self.metrics.observe_images([[face.emotion for face in item] for item in outcomes if not isinstance(item, ServiceError)])
        return outcomes


def face_pipeline(
    predictor: PredictorDep,
    detector: DetectorDep,
    limiter: LimiterDep,
    batcher: BatcherDep,
    settings: SettingsDep,
    metrics: MetricsDep,
    tracer: TracerDep,
    detect: DetectParam = True,
) -> FacePipeline:
    """The request's pipeline: the app's parts, and the ``detect`` query parameter of both routes."""
    return FacePipeline(limiter, batcher, metrics, predictor, detector if detect else None, settings.max_image_pixels, tracer)


PipelineDep = Annotated[FacePipeline, Depends(face_pipeline)]


@router.post("/predict", response_model=PredictResponse, responses=_ERRORS)
async def predict(
    file: Annotated[UploadFile, File(description=f"an image: {FORMATS}")], pipeline: PipelineDep, settings: SettingsDep
) -> PredictResponse:
    """Find the faces in an image and classify the facial expression of each.

    Faces are found with a neural face detector (BlazeFace full-range: faces turned or tilted
    well away from the camera too). Each face is turned so its eyes are level, cropped as the
    training faces were, and classified; `box` is the detected face, `landmarks` its eyes, nose,
    mouth and ears, and faces are listed left to right. **An image in which no face is found is
    answered 200 with `"faces": []`.**

    With `detect=false` the whole image is classified as one face crop, for images that are
    face crops already; its `box` is then the whole image.
    """
    # A full server has answered 503 already, before reading the upload (app.concurrency.RefuseWhenFull).
    faces = await pipeline.image(await read_upload(file, settings.max_upload_bytes))
    return PredictResponse(faces=faces, model=ModelRef.from_info(pipeline.predictor.info))


@router.post("/predict/batch", response_model=BatchResponse, responses=_BATCH_ERRORS)
async def predict_batch(
    files: Annotated[list[UploadFile], File(description=f"images: {FORMATS}; at most MAX_BATCH_FILES (default 16)")],
    pipeline: PipelineDep,
    settings: SettingsDep,
) -> BatchResponse:
    """Find and classify the faces in each of several images: one result per file, in upload order.

    A file that cannot be used (empty, too large, corrupt, not an image) does not fail the
    request: its result carries `error` with the status and detail `POST /predict` would
    have answered, and the other files are still classified. Too many files is a 413
    (`"too many files"`) for the whole request. The batch takes one inference slot, and all
    its faces are classified in one forward pass (shared with other requests' faces when the
    service micro-batches). `detect` works as for `POST /predict`.
    """
    if len(files) > settings.max_batch_files:
        raise TooManyFiles()
    uploads = [await read_upload_or_error(file, settings.max_upload_bytes) for file in files]
    outcomes = await pipeline.uploads(uploads)
    results: list[FileFaces | FileFailure] = [
        FileFailure(filename=file.filename, error=FileError(status=outcome.status_code, detail=outcome.detail))
        if isinstance(outcome, ServiceError)
        else FileFaces(filename=file.filename, faces=outcome)
        for file, outcome in zip(files, outcomes, strict=True)
    ]
    return BatchResponse(results=results, model=ModelRef.from_info(pipeline.predictor.info))


async def read_upload(file: UploadFile, max_bytes: int) -> bytes:
    """The upload's bytes, read in chunks; stops as soon as it is known to be over ``max_bytes``."""
    if file.size is not None and file.size > max_bytes:
        raise PayloadTooLarge()
    data = bytearray()
    while chunk := await file.read(CHUNK_BYTES):
        data += chunk
        if len(data) > max_bytes:
            raise PayloadTooLarge()
    if not data:
        raise EmptyFile()
    return bytes(data)


async def read_upload_or_error(file: UploadFile, max_bytes: int) -> bytes | ServiceError:
    """:func:`read_upload`, with the client's mistake returned rather than raised."""
    try:
        return await read_upload(file, max_bytes)
    except ServiceError as exc:
        return exc


Located = tuple[list[Detection], list[Image.Image]]  # the faces in an image (its pixels) and the crops to classify


def classify_image(
    predictor: Predictor, detector: FaceDetector | None, data: bytes, max_pixels: int, tracer: Tracer = NO_TRACER
) -> list[Face]:
    """Decode, find the faces (or take the whole image when ``detector`` is None), classify them."""
    boxes, crops = locate_image(detector, data, max_pixels, tracer)
    return to_faces(boxes, predictor.predict_faces(crops) if crops else [])


def classify_uploads(
    predictor: Predictor,
    detector: FaceDetector | None,
    uploads: Sequence[bytes | ServiceError],
    max_pixels: int,
    tracer: Tracer = NO_TRACER,
) -> list[list[Face] | ServiceError]:
    """:func:`classify_image` for each upload, with the faces of all of them in one forward pass.

    An upload that is already an error, or fails to decode, stays an error in its place.
    """
    located = locate_uploads(detector, uploads, max_pixels, tracer)
    crops = crops_of(located)
    return assign(located, predictor.predict_faces(crops) if crops else [])


def locate_image(detector: FaceDetector | None, data: bytes, max_pixels: int, tracer: Tracer = NO_TRACER) -> Located:
    """Decode ``data`` and find its faces: everything before classification. With a detector, a large
    JPEG is decoded at reduced size; the faces are reported in the file's pixels all the same."""
    image, scale = decode(data, max_pixels, tracer, detector.max_side if detector else None)
    detections, crops = locate_faces(image, detector, tracer)
    return [detection.scaled(scale) for detection in detections], crops


def locate_uploads(
    detector: FaceDetector | None, uploads: Sequence[bytes | ServiceError], max_pixels: int, tracer: Tracer = NO_TRACER
) -> list[Located | ServiceError]:
    """:func:`locate_image` for each upload; an upload that is an error, or fails to decode, stays one."""
    located: list[Located | ServiceError] = []
    for upload in uploads:
        if isinstance(upload, ServiceError):
            located.append(upload)
            continue
        try:
            located.append(locate_image(detector, upload, max_pixels, tracer))
        except ServiceError as exc:
            located.append(exc)
    return located


def crops_of(located: Sequence[Located | ServiceError]) -> list[Image.Image]:
    """Every crop to classify, in upload order."""
    return [crop for item in located if not isinstance(item, ServiceError) for crop in item[1]]


def to_faces(detections: Sequence[Detection], predictions: Sequence[Prediction]) -> list[Face]:
    return [to_face(d, prediction) for d, prediction in zip(detections, predictions, strict=True)]


def to_face(detection: Detection, prediction: Prediction) -> Face:
    return Face(box=detection.box, landmarks=detection.landmarks, **prediction)


def assign(located: Sequence[Located | ServiceError], predictions: Sequence[Prediction]) -> list[list[Face] | ServiceError]:
    """Each upload's faces from its boxes and its share of ``predictions`` (:func:`crops_of`'s order)."""
    remaining = iter(predictions)
    return [item if isinstance(item, ServiceError) else [to_face(d, next(remaining)) for d in item[0]] for item in located]


def decode(data: bytes, max_pixels: int, tracer: Tracer = NO_TRACER, max_side: int | None = None) -> tuple[Image.Image, float]:
    """:func:`~app.images.decode_image_reduced` in a ``decode`` span (a rejected file ends it in error)."""
    with tracer.start_as_current_span("decode", attributes={"fer.bytes": len(data)}) as span:
        image, scale = decode_image_reduced(data, max_pixels, max_side)
        span.set_attribute("fer.image.width", image.width)
        span.set_attribute("fer.image.height", image.height)
        return image, scale


def locate_faces(image: Image.Image, detector: FaceDetector | None, tracer: Tracer = NO_TRACER) -> Located:
    """The faces in ``image`` and the crops to classify; without a detector, the whole image."""
    if detector is None:
        width, height = image.size
        return [Detection((0, 0, width, height), 1.0)], [whole_image_crop(image)]  # shrunk: see whole_image_crop
    with tracer.start_as_current_span("detect_faces") as span:
        detections = detector.detect(image)
        span.set_attribute("fer.faces", len(detections))
    return detections, crop_faces(image, detections, detector.align)
