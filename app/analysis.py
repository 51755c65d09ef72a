"""The pipeline itself: bytes or an image -> decode -> detect -> align -> crop -> classify -> faces.

One home for these steps, whichever door a caller comes in by: the service's routes run them
through :class:`app.pipeline.Pipeline` (which adds admission, micro-batching and metrics), the
Python API and the command line (:mod:`ferkit`) through :class:`Analyzer`, in the caller's thread.
Nothing here imports a web framework or a server; a failure is a :class:`~app.failures.ServiceError`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import TypeVar

from opentelemetry.trace import NoOpTracer, Tracer
from PIL import Image

from app import explain as explaining
from app.faces import Box, Detection, DetectorConfig, FaceDetector, crop_faces, crop_region, whole_image_crop
from app.failures import ImageTooLarge, ServiceError
from app.images import decode_image_reduced, to_gray_or_rgb
from app.model import Prediction, Predictor
from app.schemas import Explanation, Face, FaceTrack, TrackedFace, VideoSummary
from app.settings import Settings
from app.tracking import Tracker
from app.video import Frame, Video, VideoLimits

NO_TRACER = NoOpTracer()
# Sampled video frames whose faces are classified in one forward pass.
VIDEO_CHUNK = 8

T = TypeVar("T")


@dataclass(frozen=True)
class Located:
    """The faces found in one image (in its pixels), the crops to classify, and where each crop lies."""

    detections: list[Detection]
    crops: list[Image.Image]
    regions: list[Box]  # the part of the image each crop shows (app.faces.crop_region)


Outcome = list[Face] | ServiceError  # one upload's faces, or why it has none


def detector_config(settings: Settings) -> DetectorConfig:
    """The face detector's settings (FACE_*)."""
    return DetectorConfig(
        score_threshold=settings.face_score_threshold,
        nms_iou=settings.face_nms_iou,
        max_side=settings.face_detect_max_side,
        align=settings.face_align,
        grid=settings.face_detect_grid,
    )


def decode(data: bytes, max_pixels: int, detector: FaceDetector | None, tracer: Tracer = NO_TRACER) -> tuple[Image.Image, float]:
    """:func:`~app.images.decode_image_reduced` in a ``decode`` span (a rejected file ends it in error):
    for a ``detector``, a large JPEG is decoded at reduced size; the scale back to the file's pixels
    comes with it."""
    max_side = detector.max_side if detector is not None else None
    with tracer.start_as_current_span("decode", attributes={"fer.bytes": len(data)}) as span:
        image, scale = decode_image_reduced(data, max_pixels, max_side)
        span.set_attribute("fer.image.width", image.width)
        span.set_attribute("fer.image.height", image.height)
        return image, scale


def prepare(image: Image.Image, max_pixels: int) -> Image.Image:
    """An image already decoded by the caller (a PIL image, a video frame) as the pipeline takes it:
    ``L`` or ``RGB``, within ``max_pixels``."""
    if image.width * image.height > max_pixels:
        raise ImageTooLarge()
    return to_gray_or_rgb(image)


def locate(image: Image.Image, scale: float, detector: FaceDetector | None, tracer: Tracer = NO_TRACER) -> Located:
    """The faces in ``image`` (reported in the pixels of an image ``scale`` times as large: the
    file's) and the crops to classify; without a detector, the whole image is the one face."""
    if detector is None:
        whole = (0, 0, *image.size)
        return Located([Detection(whole, 1.0)], [whole_image_crop(image)], [whole])  # shrunk: see whole_image_crop
    with tracer.start_as_current_span("detect_faces") as span:
        detections = detector.detect(image)
        span.set_attribute("fer.faces", len(detections))
    crops = crop_faces(image, detections, detector.align)
    regions = [crop_region(d, image.size, detector.align) for d in detections]
    scaled: list[Box] = [tuple(round(v * scale) for v in region) for region in regions]  # type: ignore[misc]
    return Located([d.scaled(scale) for d in detections], crops, scaled)


def locate_uploads(
    uploads: Sequence[bytes | ServiceError], max_pixels: int, detector: FaceDetector | None, tracer: Tracer = NO_TRACER
) -> list[Located | ServiceError]:
    """Decode each upload and find its faces; a bad one becomes its error, in its place (blocking)."""
    located: list[Located | ServiceError] = []
    for upload in uploads:
        if isinstance(upload, ServiceError):
            located.append(upload)
            continue
        try:
            image, scale = decode(upload, max_pixels, detector, tracer)
            located.append(locate(image, scale, detector, tracer))
        except ServiceError as exc:
            located.append(exc)
    return located


def crops_of(located: Sequence[Located | ServiceError]) -> list[Image.Image]:
    """Every crop to classify, in upload order."""
    return [crop for item in located if not isinstance(item, ServiceError) for crop in item.crops]


def assign(located: Sequence[Located | ServiceError], predictions: Sequence[Prediction]) -> list[Outcome]:
    """Each upload's faces from its boxes and its share of ``predictions`` (:func:`crops_of`'s order)."""
    remaining = iter(predictions)
    return [
        item if isinstance(item, ServiceError) else [to_face(d, next(remaining)) for d in item.detections] for item in located
    ]


def to_face(detection: Detection, prediction: Prediction) -> Face:
    return Face(box=detection.box, landmarks=detection.landmarks, **prediction)


def explain_faces(
    predictor: Predictor, located: Sequence[Located | ServiceError], outcomes: list[Outcome], tracer: Tracer = NO_TRACER
) -> list[Outcome]:
    """``outcomes`` with an explanation for the largest faces of all the images, in place (blocking).
    At most :data:`app.explain.MAX_EXPLAINED_FACES` faces, in one forward pass."""
    entries = [
        (faces, j, item)
        for item, faces in zip(located, outcomes, strict=True)
        if isinstance(item, Located) and isinstance(faces, list)
        for j in range(len(faces))
    ]
    chosen = [entries[k] for k in explaining.largest([item.detections[j].box for _, j, item in entries])]
    with tracer.start_as_current_span("explain", attributes={"fer.faces": len(chosen)}):
        heatmaps = explaining.explain(predictor, [item.crops[j] for _, j, item in chosen])
    for (faces, j, item), heatmap in zip(chosen, heatmaps, strict=True):
        explanation = Explanation(
            method=explaining.METHOD,
            emotion=predictor.classes[heatmap.class_index],
            png=heatmap.png_base64(),
            box=item.regions[j],
            forward_passes=explaining.GRID**2 + 1,
            max_drop=heatmap.max_drop,
        )
        faces[j] = faces[j].model_copy(update={"explanation": explanation})
    return outcomes


@dataclass(frozen=True)
class AnalysedFrame:
    """One sampled video frame and its faces, each on its track."""

    frame: Frame
    faces: list[TrackedFace]


@dataclass(frozen=True)
class Analyzer:
    """The whole pipeline in the caller's thread: what :mod:`ferkit` and the video route run.

    ``detector`` None: each image is one face crop (``detect=false``). Thread-safe, as its parts are.
    """

    predictor: Predictor
    detector: FaceDetector | None
    max_pixels: int
    tracer: Tracer = NO_TRACER
    # Threads that find the faces of several images (a video's chunk of frames) at once, each image
    # on one: BlazeFace's 192x192 passes keep one core busy each far better than ONNX Runtime's
    # threads share one pass (bench/results/video.json). None: one image after another.
    workers: Executor | None = None

    def upload(self, data: bytes, explain: bool = False) -> list[Face]:
        """The faces in an encoded image (a file's bytes); a bad one raises its :class:`ServiceError`."""
        (located,) = locate_uploads([data], self.max_pixels, self.detector, self.tracer)
        if isinstance(located, ServiceError):
            raise located
        return self.classify([located], explain)[0]

    def images(self, images: Sequence[Image.Image], explain: bool = False) -> list[list[Face]]:
        """The faces in each decoded image (any Pillow mode), all classified in one forward pass."""
        return self.classify(self.locate_all(images), explain)

    def locate_all(self, images: Sequence[Image.Image]) -> list[Located]:
        """:meth:`locate` for each image, in order: on :attr:`workers` at once, when there are some."""
        if self.workers is None or len(images) < 2:
            return [self.locate(image) for image in images]
        return list(self.workers.map(self.locate, images))

    def locate(self, image: Image.Image) -> Located:
        """The faces and crops of one decoded image (any Pillow mode)."""
        return locate(prepare(image, self.max_pixels), 1.0, self.detector, self.tracer)

    def classify(self, located: Sequence[Located], explain: bool = False) -> list[list[Face]]:
        """Each image's faces, from the crops of all of them in one forward pass."""
        outcomes = assign(located, self.predictor.predict_faces(crops_of(located)))
        if explain:
            outcomes = explain_faces(self.predictor, located, outcomes, self.tracer)
        return [faces for faces in outcomes if isinstance(faces, list)]

    def video(self, video: Video, fps: float | None = None, tracker: Tracker | None = None) -> Iterator[AnalysedFrame]:
        """Each frame sampled at ``fps`` (None: every frame) with its tracked faces, as they are
        analysed (one frame's pixels held at a time, :data:`VIDEO_CHUNK` frames' faces classified together)."""
        tracker = tracker or Tracker()
        for chunk in batched(video.frames(fps), VIDEO_CHUNK):
            faces = self.classify(self.locate_all([frame.image for frame in chunk]))
            for frame, found in zip(chunk, faces, strict=True):
                yield AnalysedFrame(frame, tracker.update(found, frame.index, frame.time_s))

    def video_tracks(self, source: Path | bytes, fps: float | None, limits: VideoLimits) -> tuple[VideoSummary, list[FaceTrack]]:
        """A whole video's analysis: its size and length, and each face's track (blocking)."""
        with Video(source, limits) as video:
            return video_summary(video, fps, self.video(video, fps))


class VideoTracks:
    """A video's analysed frames gathered into per-face tracks, as they come (their faces only:
    no frame's pixels are kept)."""

    def __init__(self) -> None:
        self.tracks: dict[int, list[TrackedFace]] = {}
        self.frames = 0
        self.last_s = 0.0

    def add(self, item: AnalysedFrame) -> None:
        self.frames, self.last_s = self.frames + 1, item.frame.time_s
        for face in item.faces:
            self.tracks.setdefault(face.track_id, []).append(face)

    def result(self, video: Video, fps: float | None) -> tuple[VideoSummary, list[FaceTrack]]:
        """The video's size and length, and each face's track, by id."""
        summary = VideoSummary(
            width=video.info.width,
            height=video.info.height,
            duration_s=round(self.last_s, 4),
            sample_fps=fps,
            frames_analysed=self.frames,
        )
        tracks = [FaceTrack(id=i, first_s=fs[0].time_s, last_s=fs[-1].time_s, faces=fs) for i, fs in self.tracks.items()]
        return summary, tracks


def video_summary(video: Video, fps: float | None, frames: Iterable[AnalysedFrame]) -> tuple[VideoSummary, list[FaceTrack]]:
    """What a whole video's analysis comes to (:class:`VideoTracks` over ``frames``)."""
    tracks = VideoTracks()
    for item in frames:
        tracks.add(item)
    return tracks.result(video, fps)


def batched(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """``items`` in lists of ``size`` (the last may be shorter): itertools.batched, from Python 3.12."""
    iterator = iter(items)
    while chunk := list(islice(iterator, size)):
        yield chunk
