"""The Python API: :class:`Analyzer` and :func:`analyze`, over the service's own pipeline.

The same steps as ``POST /predict`` (:mod:`app.analysis`: decode, detect with BlazeFace, align,
crop, classify with the ONNX model) in the caller's thread, with the same settings (the FACE_*,
MAX_IMAGE_PIXELS, MODEL_URI variables, :class:`app.settings.Settings`) and the same answers: a list
of :class:`~app.schemas.Face` (``.model_dump()`` gives the JSON's dicts). No server, no web
framework, no PyTorch.
"""

from __future__ import annotations

import functools
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import numpy as np
from PIL import Image

from app import analysis
from app.analysis import AnalysedFrame, detector_config
from app.faces import FaceDetector
from app.failures import ServiceError
from app.model import Predictor
from app.schemas import Face, ModelRef, PredictResponse, VideoResponse
from app.settings import Settings, load_settings
from app.tracking import Tracker
from app.video import Video, VideoLimits

ImageInput = str | os.PathLike[str] | bytes | Image.Image | np.ndarray
T = TypeVar("T")
R = TypeVar("R")
VideoInput = str | os.PathLike[str] | bytes


class Analyzer:
    """A loaded model and face detector; reuse it across calls (loading takes about a second).

    ``model``: an ONNX file, a folder with ``latest.json`` or a gs:// URI (as MODEL_URI); default
    MODEL_URI, else the bundled model. ``detect=False``: each image is one face crop, as
    ``POST /predict?detect=false``. ``threads``: how many cores to use (default: the CPUs this
    process may use): the classifier's ONNX Runtime threads, and as many threads finding the faces
    of a video's frames, each frame on one (a photo's on one). ``settings``: default, read from the
    environment.
    """

    def __init__(
        self,
        model: str | os.PathLike[str] | None = None,
        *,
        detect: bool = True,
        threads: int = 0,
        settings: Settings | None = None,
    ) -> None:
        self.settings = settings or load_settings()
        uri = os.fspath(model) if model is not None else self.settings.resolved_model_uri()
        threads = threads or self.settings.resolved_inference_threads()
        predictor = Predictor.from_uri(uri, timeout=self.settings.gcs_timeout_s, threads=threads)
        predictor.warm_up()
        detector = FaceDetector(detector_config(self.settings), threads=1) if detect else None
        # Idle threads cost nothing and end with the Analyzer (the executor's own weak reference).
        workers = ThreadPoolExecutor(threads, thread_name_prefix="ferkit-faces") if detect and threads > 1 else None
        self.core = analysis.Analyzer(predictor, detector, self.settings.max_image_pixels, workers=workers)

    @property
    def model(self) -> ModelRef:
        """Which model answers: version, architecture, sha256 (as in the service's answers)."""
        return ModelRef.from_info(self.core.predictor.info)

    @property
    def classes(self) -> tuple[str, ...]:
        return tuple(self.core.predictor.classes)

    def analyze(self, image: ImageInput, explain: bool = False) -> list[Face]:
        """The faces in ``image``: a path, a file's bytes, a PIL image, or a uint8 numpy array (H, W),
        (H, W, 3) RGB or (H, W, 4) RGBA. Left to right; ``explain``: the 4 largest also get a heatmap.

        A file that is not a usable image raises a :class:`~app.failures.ServiceError` subclass
        (``CorruptImage``, ``UnsupportedImage``, ``ImageTooLarge``...) with ``.status_code`` and ``.detail``.
        """
        if isinstance(image, bytes):
            return self.core.upload(image, explain)
        if isinstance(image, str | os.PathLike):
            return self.core.upload(Path(image).read_bytes(), explain)
        return self.core.images([to_pil(image)], explain)[0]

    def analyze_files(self, paths: Iterable[str | os.PathLike[str]]) -> Iterator[tuple[Path, list[Face] | Exception]]:
        """Each file's faces, or why it has none (a client-side :class:`~app.failures.ServiceError`,
        an :class:`OSError`), in order; several files at once, one per thread (``threads``). A
        failure that is not the file's (a 5xx) is raised."""

        def one(path: Path) -> tuple[Path, list[Face] | Exception]:
            try:
                return path, self.analyze(path)
            except ServiceError as exc:
                if not exc.client_error:
                    raise
                return path, exc
            except OSError as exc:
                return path, exc

        yield from ordered_map(self.core.workers, one, map(Path, paths))

    def predict_response(self, image: ImageInput, explain: bool = False) -> PredictResponse:
        """:meth:`analyze` in the shape ``POST /predict`` answers (faces and model)."""
        return PredictResponse(faces=self.analyze(image, explain), model=self.model)

    @contextmanager
    def video_frames(
        self, video: VideoInput, fps: float | None = None, limits: VideoLimits | None = None
    ) -> Iterator[tuple[Video, Iterator[AnalysedFrame]]]:
        """The open video and its sampled frames, analysed as they are iterated (each with its
        tracked faces: :mod:`app.tracking`); ``fps`` None: every frame. Bad video raises a
        :class:`~app.failures.ServiceError` (``CorruptVideo``, ``NoVideoStream``...)."""
        with Video(video_source(video), limits or self.video_limits()) as opened:
            yield opened, self.core.video(opened, fps, Tracker())

    def analyze_video(self, video: VideoInput, fps: float | None = None, limits: VideoLimits | None = None) -> VideoResponse:
        """Every face of ``video`` followed through the frames sampled at ``fps``: what
        ``POST /predict/video`` answers (per-face tracks, each face's raw and smoothed emotion)."""
        summary, tracks = self.core.video_tracks(video_source(video), fps, limits or self.video_limits())
        return VideoResponse(video=summary, tracks=tracks, model=self.model)

    def video_limits(self) -> VideoLimits:
        """A local video's bounds: any length; frames within MAX_IMAGE_PIXELS, as photos."""
        return VideoLimits(max_frame_pixels=self.settings.max_image_pixels)


def ordered_map(executor: Executor | None, fn: Callable[[T], R], items: Iterable[T], ahead: int = 8) -> Iterator[R]:
    """``map(fn, items)`` on ``executor``'s threads, in order, at most ``ahead`` items in flight (a
    folder of a million photos is not read into memory at once); in this thread without one."""
    if executor is None:
        yield from map(fn, items)
        return
    pending: deque[Future[R]] = deque()
    try:
        for item in items:
            pending.append(executor.submit(fn, item))
            if len(pending) >= ahead:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for future in pending:
            future.cancel()


def video_source(video: VideoInput) -> Path | bytes:
    return video if isinstance(video, bytes) else Path(video)


def to_pil(image: Image.Image | np.ndarray) -> Image.Image:
    """A PIL image as it is; a uint8 array (H, W), (H, W, 1), (H, W, 3) RGB or (H, W, 4) RGBA as one."""
    if isinstance(image, Image.Image):
        return image
    if not isinstance(image, np.ndarray):
        raise TypeError(f"expected a path, bytes, a PIL image or a numpy array, not {type(image).__name__}")
    if image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 array (0-255), not {image.dtype}: e.g. (array * 255).astype(np.uint8)")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (3, 4)):
        raise ValueError(f"expected an array of shape (H, W), (H, W, 3) or (H, W, 4), not {image.shape}")
    return Image.fromarray(np.ascontiguousarray(image))


@functools.cache
def default_analyzer(model: str | None = None) -> Analyzer:
    """One :class:`Analyzer` per model for :func:`analyze`, loaded on first use."""
    return Analyzer(model)


def analyze(image: ImageInput, explain: bool = False, model: str | None = None) -> list[Face]:
    """The faces in ``image`` (see :meth:`Analyzer.analyze`), with a default :class:`Analyzer`
    kept for the next call: the bundled model, or MODEL_URI's, or ``model``."""
    return default_analyzer(model).analyze(image, explain)


def analyze_video(video: VideoInput, fps: float | None = None, model: str | None = None) -> VideoResponse:
    """Each face of ``video`` tracked through its frames (see :meth:`Analyzer.analyze_video`)."""
    return default_analyzer(model).analyze_video(video, fps)
