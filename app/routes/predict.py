"""Emotion prediction: the faces in an uploaded image, in each of several, or followed through a video."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, File, Query, Request, Response, UploadFile
from pydantic import BaseModel

from app import explain as explaining
from app.batching import MicroBatcher
from app.concurrency import InferenceLimiter
from app.deps import PredictorDep, SettingsDep
from app.errors import (
    CorruptImage,
    CorruptVideo,
    EmptyFile,
    ImageTooCostly,
    ImageTooLarge,
    ModelNotReady,
    NoVideoFrames,
    NoVideoStream,
    PayloadTooLarge,
    ServerBusy,
    ServiceError,
    TooManyFiles,
    UnsupportedImage,
    VideoFrameTooLarge,
    VideoTooLong,
)
from app.faces import FaceDetector
from app.metrics import Metrics
from app.pipeline import Classify, ClassifyBatched, ClassifyInSlot, Pipeline
from app.schemas import BatchResponse, ErrorBody, FileError, FileFaces, FileFailure, ModelRef, PredictResponse, VideoResponse
from app.video import VideoLimits

router = APIRouter(tags=["predict"])

CHUNK_BYTES = 1 << 20

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
        413: (
            "file or image too large, or too costly to decode",
            [PayloadTooLarge.message, ImageTooLarge.message, ImageTooCostly.message],
        ),
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
_VIDEO_ERRORS = _error_docs(
    {
        400: (
            "empty file, not a video FFmpeg can read, or no picture in it",
            [EmptyFile.message, CorruptVideo.message, NoVideoStream.message, NoVideoFrames.message],
        ),
        413: (
            "file over MAX_VIDEO_UPLOAD_BYTES, video over MAX_VIDEO_DURATION_S, more frames to analyse than"
            " MAX_VIDEO_FRAMES, or frames over MAX_VIDEO_FRAME_PIXELS",
            [PayloadTooLarge.message, VideoTooLong.message, VideoFrameTooLarge.message],
        ),
        503: (_BUSY, [ModelNotReady.message, ServerBusy.message]),
    }
)
VIDEO_FORMATS = "MP4, MOV, WebM, MKV, AVI... (what FFmpeg reads: H.264, HEVC, VP8/9, AV1, MPEG-4...)"

DetectParam = Annotated[
    bool,
    Query(description="find the faces first (default); false: classify the whole image as one face crop"),
]


async def request_pipeline(request: Request, predictor: PredictorDep, detect: DetectParam = True) -> Pipeline:
    """The request's pipeline: the app's parts, and the ``detect`` query parameter of both routes.

    The parts are read from ``app.state`` here rather than each through a dependency of its own:
    FastAPI resolves a dependency in tens of microseconds, a tenth of a crop's whole plumbing. The
    predictor stays a dependency, which tests override."""
    state = request.app.state
    detector: FaceDetector | None = state.detector
    limiter: InferenceLimiter | None = state.limiter
    if detector is None or limiter is None:  # only before the lifespan has run
        raise ModelNotReady()
    batcher: MicroBatcher | None = state.batcher  # None: BATCH_MAX_SIZE=1
    metrics: Metrics = state.metrics
    classify: Classify = ClassifyInSlot(limiter, metrics) if batcher is None else ClassifyBatched(limiter, batcher)
    max_pixels = state.settings.max_image_pixels
    return Pipeline(limiter, classify, metrics, predictor, detector if detect else None, max_pixels, state.tracing.tracer)


PipelineDep = Annotated[Pipeline, Depends(request_pipeline)]

ExplainParam = Annotated[
    bool,
    Query(
        description=f"add to each face (at most {explaining.MAX_EXPLAINED_FACES}, the largest) `explanation`: where the model"
        f" looked, as an occlusion heatmap over the face crop; costs {explaining.GRID**2 + 1} model inputs per face, in one batch"
    ),
]


@router.post("/predict", response_model=PredictResponse, responses=_ERRORS)
async def predict(
    file: Annotated[UploadFile, File(description=f"an image: {FORMATS}")],
    pipeline: PipelineDep,
    settings: SettingsDep,
    explain: ExplainParam = False,
) -> Response:
    """Find the faces in an image and classify the facial expression of each.

    Faces are found with a neural face detector (BlazeFace full-range: faces turned or tilted
    well away from the camera too). Each face is turned so its eyes are level, cropped as the
    training faces were, and classified; `box` is the detected face, `landmarks` its eyes, nose,
    mouth and ears, and faces are listed left to right. **An image in which no face is found is
    answered 200 with `"faces": []`.**

    With `detect=false` the whole image is classified as one face crop, for images that are
    face crops already; its `box` is then the whole image.

    With `explain=true`, each of the (at most 4) largest faces also gets `explanation`: a heatmap
    of where the model looked (occlusion sensitivity: see `method`, `forward_passes`).
    """
    # A full server has answered 503 already, before reading the upload (app.concurrency.RefuseWhenFull).
    faces = await pipeline.image(await read_upload(file, settings.max_upload_bytes), explain)
    return serialized(PredictResponse(faces=faces, model=ModelRef.from_info(pipeline.predictor.info)))


@router.post("/predict/batch", response_model=BatchResponse, responses=_BATCH_ERRORS)
async def predict_batch(
    files: Annotated[list[UploadFile], File(description=f"images: {FORMATS}; at most MAX_BATCH_FILES (default 16)")],
    pipeline: PipelineDep,
    settings: SettingsDep,
) -> Response:
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
    return serialized(BatchResponse(results=results, model=ModelRef.from_info(pipeline.predictor.info)))


FpsParam = Annotated[
    float,
    Query(gt=0, le=30, description="frames analysed per second of video: the first frame of each 1/fps s"),
]


@router.post("/predict/video", response_model=VideoResponse, responses=_VIDEO_ERRORS)
async def predict_video(
    file: Annotated[UploadFile, File(description=f"a video: {VIDEO_FORMATS}")],
    pipeline: PipelineDep,
    settings: SettingsDep,
    fps: FpsParam = 5.0,
) -> VideoResponse:
    """Follow each face through a video: its emotion in every frame analysed, raw and smoothed.

    Frames are sampled at `fps`; in each, faces are found and classified as by `POST /predict`, then
    matched to the faces of the frames before by the overlap of their boxes (a face unseen for 1 s
    ends its track). Each track's scores are smoothed over time: an exponential moving average with a
    0.5 s time constant. Bounded: the upload (MAX_VIDEO_UPLOAD_BYTES, 30 MiB), the duration
    (MAX_VIDEO_DURATION_S, 60 s), the frames analysed (MAX_VIDEO_FRAMES, 600) and the frame size
    (MAX_VIDEO_FRAME_PIXELS, 4K): a 413 beyond them. The whole video takes one inference slot.
    """
    data = await read_upload(file, settings.max_video_upload_bytes)
    limits = VideoLimits(settings.max_video_duration_s, settings.max_video_frames, settings.max_video_frame_pixels)
    async with pipeline.limiter.admit():
        summary, tracks = await pipeline.limiter.run_admitted(pipeline.analyzer().video_tracks, data, fps, limits)
    return VideoResponse(video=summary, tracks=tracks, model=ModelRef.from_info(pipeline.predictor.info))


def serialized(body: BaseModel) -> Response:
    """``body`` as JSON, serialised once, by pydantic. Returned as a Response, it is not validated and
    serialised again by FastAPI (the route's ``response_model`` still documents it): built from the
    schema's own models, it is valid already."""
    return Response(body.model_dump_json(), media_type="application/json")


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
