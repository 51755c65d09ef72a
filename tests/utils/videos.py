"""Real videos for the video tests and benchmark, written with PyAV from a real photo.

:func:`moving_face_video` pans a 640x360 window over skimage's astronaut photo so her face moves
across the frame, and brightens the picture over time (the pixels change, not just their place):
a face to track and classify frame after frame. Other helpers make the bad inputs: audio only,
a truncated file, frames larger than a bound.
"""

from __future__ import annotations

import io
from pathlib import Path

import av
import numpy as np
from av.video.stream import VideoStream
from PIL import Image, ImageEnhance, ImageOps

from tests.utils.photos import photo

SIZE = (640, 360)


def moving_face_frames(count: int, size: tuple[int, int] = SIZE) -> list[Image.Image]:
    """``count`` frames of ``size``: the astronaut's face drifting right to left and back, the
    picture growing brighter. Her face stays whole in every frame."""
    source = photo("astronaut").resize((768, 768), Image.Resampling.BILINEAR)  # face ~100-140 px wide
    width, height = size
    frames = []
    for i in range(count):
        phase = i / max(1, count - 1)
        left = round(120 * (1 - abs(2 * phase - 1)))  # 0 -> 120 -> 0 px: the face moves in the frame
        window = source.crop((left, 40, left + width, 40 + height))
        frames.append(ImageEnhance.Brightness(window).enhance(0.8 + 0.4 * phase))
    return frames


def write_video(
    path: Path | io.BytesIO, frames: list[Image.Image], fps: int = 30, codec: str = "libx264", fmt: str = "mp4"
) -> None:
    """``frames`` (one size) as an H.264 MP4 (or ``codec`` in the container ``fmt``) at ``fps``."""
    with av.open(path, mode="w", format=fmt) as container:
        stream = container.add_stream(codec, rate=fps)
        assert isinstance(stream, VideoStream), codec
        stream.width, stream.height = frames[0].size
        stream.pix_fmt = "yuv420p"
        for image in frames:
            for packet in stream.encode(av.VideoFrame.from_image(image.convert("RGB"))):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def video_bytes(frames: list[Image.Image], fps: int = 30, codec: str = "libx264", fmt: str = "mp4") -> bytes:
    buffer = io.BytesIO()
    write_video(buffer, frames, fps, codec, fmt)
    return buffer.getvalue()


def moving_face_video(seconds: float = 2.0, fps: int = 30, size: tuple[int, int] = SIZE) -> bytes:
    """:func:`moving_face_frames` as an MP4 of ``seconds`` at ``fps``."""
    return video_bytes(moving_face_frames(round(seconds * fps), size), fps)


def two_faces_video(seconds: float = 2.0, fps: int = 30) -> bytes:
    """Two people side by side, 1280x360: :func:`moving_face_frames` on the left, its mirror image
    on the right (her face moving the other way): two faces to follow, each with its own id."""
    frames = []
    for frame in moving_face_frames(round(seconds * fps)):
        pair = Image.new("RGB", (2 * SIZE[0], SIZE[1]))
        pair.paste(frame, (0, 0))
        pair.paste(ImageOps.mirror(frame), (SIZE[0], 0))
        frames.append(pair)
    return video_bytes(frames, fps)


def audio_only(seconds: float = 1.0) -> bytes:
    """An M4A (AAC) of a 440 Hz tone: a media file FFmpeg opens, with no picture."""
    rate = 44_100
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("aac", rate=rate)
        samples = (0.2 * np.sin(2 * np.pi * 440 * np.arange(round(seconds * rate)) / rate)).astype(np.float32)
        frame = av.AudioFrame.from_ndarray(samples[None, :], format="fltp", layout="mono")
        frame.sample_rate = rate
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()


def frameless_video() -> bytes:
    """An AVI whose header declares an MPEG-4 video stream, with not one frame in it."""
    buffer = io.BytesIO()
    container = av.open(buffer, mode="w", format="avi")
    stream = container.add_stream("mpeg4", rate=30)
    stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
    container.start_encoding()  # the header, and nothing after it
    container.close()
    return buffer.getvalue()


def huge_frame_video(side: int = 10_000) -> bytes:
    """A MOV of one black ``side`` x ``side`` PNG frame: 100 megapixels in ~120 KB."""
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mov") as container:
        stream = container.add_stream("png", rate=1)
        stream.width, stream.height, stream.pix_fmt = side, side, "gray"
        frame = av.VideoFrame(side, side, "gray")
        frame.planes[0].update(bytes(frame.planes[0].buffer_size))
        for packet in [*stream.encode(frame), *stream.encode()]:
            container.mux(packet)
    return buffer.getvalue()
