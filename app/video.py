"""Video in: a file's frames, sampled at a rate, as PIL images with their timestamps; and bounds.

Decoding is PyAV's (FFmpeg inside the ``av`` wheel, no system ffmpeg). Untrusted input, as for
images (:mod:`app.images`): whatever FFmpeg cannot open or decode is a
:class:`~app.failures.CorruptVideo`, a file without a picture stream (audio only) a
:class:`~app.failures.NoVideoStream`, one from which no frame decodes a
:class:`~app.failures.NoVideoFrames`; the frame size is checked from the stream's header before
anything is decoded, and the duration both from the header and from each frame's timestamp (a
header can lie), so a small file cannot make the service decode for minutes. Every bound is a
413, like the image's pixel bound.
"""

from __future__ import annotations

import io
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import av.error
from av.container import InputContainer
from av.video.stream import VideoStream
from PIL import Image

from app.failures import CorruptVideo, NoVideoFrames, NoVideoStream, VideoFrameTooLarge, VideoTooLong

log = logging.getLogger(__name__)

# Frames decoded per second of video at most: a stream whose frames come faster (a crafted file of
# tiny repeated frames) is refused as too long rather than decoded for minutes.
MAX_SOURCE_FPS = 240


@dataclass(frozen=True)
class VideoLimits:
    """What a video may be: ``None`` is no bound (the command line's own files)."""

    max_duration_s: float | None = None
    max_frames: int | None = None  # sampled (analysed) frames
    max_frame_pixels: int = 40_000_000


@dataclass(frozen=True)
class VideoInfo:
    """A video stream's header: size in pixels, the frame rate it declares, its duration if known."""

    width: int
    height: int
    fps: float | None
    duration_s: float | None


@dataclass(frozen=True)
class Frame:
    """One sampled frame: its position among the decoded frames, its time, its pixels (RGB)."""

    index: int
    time_s: float
    image: Image.Image


class Video:
    """An open video file (a path or the bytes of one); a context manager. Frames come from
    :meth:`frames`, once."""

    def __init__(self, source: Path | str | bytes, limits: VideoLimits | None = None) -> None:
        self.limits = limits or VideoLimits()
        self._container = open_container(source)
        try:
            self._stream = video_stream(self._container)
            self.info = stream_info(self._container, self._stream)
            check_header(self.info, self.limits)
        except BaseException:
            self._container.close()
            raise

    def __enter__(self) -> Video:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._container.close()

    def frames(self, fps: float | None = None) -> Iterator[Frame]:
        """The frames, the first of each 1/``fps`` s interval (every frame for None), in order.
        Raises :class:`~app.failures.NoVideoFrames` at the end if none decoded."""
        sampled = 0
        last_slot = -1
        for index, (time_s, frame) in enumerate(self._decoded()):
            check_frame(index, time_s, frame, self.limits)
            slot = index if fps is None else math.floor(time_s * fps + 1e-6)
            if slot <= last_slot:
                continue
            last_slot = slot
            sampled += 1
            if self.limits.max_frames is not None and sampled > self.limits.max_frames:
                raise VideoTooLong(f"video has more than {self.limits.max_frames} frames to analyse")
            yield Frame(index, time_s, frame.to_image())
        if sampled == 0:
            raise NoVideoFrames()

    def _decoded(self) -> Iterator[tuple[float, av.VideoFrame]]:
        """Each decoded frame and its time in seconds from the stream's start."""
        rate = self.info.fps or 25.0  # for a stream without timestamps (raw H.264...): FFmpeg's own default
        start: float | None = None
        try:
            for index, frame in enumerate(self._container.decode(self._stream)):
                time_s = frame.time if frame.time is not None else index / rate
                start = time_s if start is None else start
                yield max(0.0, time_s - start), frame
        except av.error.FFmpegError as exc:
            log.info("video data rejected: %r", exc)
            raise CorruptVideo() from None


def open_container(source: Path | str | bytes) -> InputContainer:
    """FFmpeg's demuxer on ``source``; :class:`~app.failures.CorruptVideo` if it is not a media file."""
    try:
        file = io.BytesIO(source) if isinstance(source, bytes) else str(source)
        return av.open(file, mode="r", metadata_errors="ignore")
    except av.error.FFmpegError as exc:
        log.info("video container rejected: %r", exc)
        raise CorruptVideo() from None


def video_stream(container: InputContainer) -> VideoStream:
    """The first picture stream; an album cover in an audio file is not one."""
    for stream in container.streams.video:
        if not stream.disposition & av.stream.Disposition.attached_pic:
            stream.thread_type = "AUTO"  # FFmpeg's frame and slice threads: decoding keeps up with analysis
            return stream
    raise NoVideoStream()


def stream_info(container: InputContainer, stream: VideoStream) -> VideoInfo:
    rate = stream.average_rate or stream.base_rate
    duration: float | None = None
    if stream.duration is not None and stream.time_base is not None:
        duration = float(stream.duration * stream.time_base)
    elif container.duration is not None:
        duration = float(Fraction(container.duration, av.time_base))
    width, height = stream.codec_context.width, stream.codec_context.height
    return VideoInfo(width, height, float(rate) if rate else None, duration)


def check_header(info: VideoInfo, limits: VideoLimits) -> None:
    """The bounds the header can tell before anything is decoded."""
    if info.width * info.height > limits.max_frame_pixels:
        raise VideoFrameTooLarge()
    if info.width <= 0 or info.height <= 0:
        # FFmpeg knows no size before the first frame for some streams: each frame is checked too.
        log.info("video stream declares no frame size")
    if limits.max_duration_s is not None and info.duration_s is not None and info.duration_s > limits.max_duration_s:
        raise VideoTooLong()


def check_frame(index: int, time_s: float, frame: av.VideoFrame, limits: VideoLimits) -> None:
    """The bounds each decoded frame is held to: its size, its time, how many came before it."""
    if frame.width * frame.height > limits.max_frame_pixels:
        raise VideoFrameTooLarge()
    if limits.max_duration_s is not None and (time_s > limits.max_duration_s or index >= limits.max_duration_s * MAX_SOURCE_FPS):
        raise VideoTooLong()
