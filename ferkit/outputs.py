"""What ``fer-analyze`` writes: rows (CSV or JSON Lines, one per face), an annotated video, a
progress bar; each output file whole or not at all.

Every file is written to a temporary file beside it and renamed over its path when the whole run
has succeeded (:class:`Outputs`): a failure half-way (a corrupt frame at minute 40, Ctrl-C) leaves
what was there before, never half a CSV or an MP4 without its index.
"""

from __future__ import annotations

import csv
import io
import json
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager
from fractions import Fraction
from pathlib import Path
from typing import IO, Any, BinaryIO, TextIO, TypeVar

import av
from PIL import Image

from app.schemas import Face, TrackedFace
from fercore.storage import atomic_write

ROW_FORMATS = (".csv", ".jsonl")

T = TypeVar("T")


class OutputError(Exception):
    """An output file that cannot be written where it was asked for."""


class Outputs:
    """The run's output files, each appearing at its path only if the ``with`` block succeeds."""

    def __init__(self) -> None:
        self._stack = ExitStack()

    def __enter__(self) -> Outputs:
        self._stack.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stack.__exit__(*exc)

    def enter(self, context: AbstractContextManager[T]) -> T:
        """Another context to close with the outputs (before the files are renamed into place)."""
        return self._stack.enter_context(context)

    def binary(self, path: Path) -> BinaryIO:
        try:
            return self._stack.enter_context(atomic_write(path))
        except OSError as exc:  # its folder cannot be made or written to
            raise OutputError(f"{path}: cannot write it: {exc.strerror or exc}") from None

    def text(self, path: Path) -> TextIO:
        wrapper = io.TextIOWrapper(self.binary(path), encoding="utf-8", newline="")
        self._stack.callback(wrapper.detach)  # flushes; the binary file is atomic_write's to close
        return wrapper


def photo_row(file: str, index: int, face: Face) -> dict[str, Any]:
    """One face of a photo as a flat row."""
    x, y, w, h = face.box
    row: dict[str, Any] = {"file": file, "face": index, "x": x, "y": y, "width": w, "height": h}
    row.update(emotion=face.emotion, confidence=round(face.confidence, 6))
    row.update({name: round(p, 6) for name, p in face.scores.items()})
    return row


def video_row(file: str, face: TrackedFace) -> dict[str, Any]:
    """One face in one sampled frame of a video as a flat row: raw and smoothed scores."""
    x, y, w, h = face.box
    row: dict[str, Any] = {"file": file, "frame": face.frame, "time_s": face.time_s, "track_id": face.track_id}
    row.update(x=x, y=y, width=w, height=h, emotion=face.emotion, confidence=round(face.confidence, 6))
    best = face.smoothed_emotion
    row.update(smoothed_emotion=best, smoothed_confidence=round(face.smoothed_scores[best], 6))
    row.update({name: round(p, 6) for name, p in face.scores.items()})
    row.update({f"smoothed_{name}": round(p, 6) for name, p in face.smoothed_scores.items()})
    return row


def photo_record(file: str, index: int, face: Face) -> dict[str, Any]:
    """One face of a photo as a JSON Lines record: the API's face, with its file."""
    return {"file": file, "face": index, **face.model_dump(mode="json", exclude_none=True)}


def video_record(file: str, face: TrackedFace) -> dict[str, Any]:
    return {"file": file, **face.model_dump(mode="json", exclude_none=True)}


def photo_columns(classes: Sequence[str]) -> list[str]:
    return ["file", "face", "x", "y", "width", "height", "emotion", "confidence", *classes]


def video_columns(classes: Sequence[str]) -> list[str]:
    head = ["file", "frame", "time_s", "track_id", "x", "y", "width", "height", "emotion", "confidence"]
    return [*head, "smoothed_emotion", "smoothed_confidence", *classes, *(f"smoothed_{c}" for c in classes)]


class RowWriter:
    """Rows to a CSV (``columns`` as its header) or JSON Lines (records) file, by ``path``'s suffix."""

    def __init__(self, stream: IO[str], suffix: str, columns: Sequence[str]) -> None:
        self.stream = stream
        self.csv = csv.DictWriter(stream, fieldnames=list(columns)) if suffix == ".csv" else None
        if self.csv is not None:
            self.csv.writeheader()

    def write(self, row: dict[str, Any], record: dict[str, Any]) -> None:
        if self.csv is not None:
            self.csv.writerow(row)
        else:
            self.stream.write(json.dumps(record) + "\n")


@contextmanager
def video_writer(out: BinaryIO, size: tuple[int, int], fps: float) -> Iterator[VideoWriter]:
    """An H.264 MP4 of frames of ``size`` at ``fps`` into ``out`` (a seekable binary file)."""
    writer = VideoWriter(out, size, fps)
    try:
        yield writer
        writer.finish()
    finally:
        writer.container.close()


class VideoWriter:
    def __init__(self, out: BinaryIO, size: tuple[int, int], fps: float) -> None:
        self.container = av.open(out, mode="w", format="mp4")
        # yuv420p needs an even width and height: an odd last column or row is dropped.
        self.size = (size[0] - size[0] % 2, size[1] - size[1] % 2)
        self.stream = self.container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        self.stream.width, self.stream.height = self.size
        self.stream.pix_fmt = "yuv420p"
        # x264's "veryfast": about half the default preset's time per frame, for a file no larger on
        # frames as alike as a video's; with the default, encoding costs as much as the analysis.
        self.stream.options = {"preset": "veryfast"}

    def write(self, image: Image.Image) -> None:
        if image.size != self.size:
            image = image.crop((0, 0, *self.size))
        for packet in self.stream.encode(av.VideoFrame.from_image(image.convert("RGB"))):
            self.container.mux(packet)

    def finish(self) -> None:
        for packet in self.stream.encode():
            self.container.mux(packet)


class Progress:
    """A one-line progress bar on stderr, drawn only when stderr is a terminal (not in a log or a pipe)."""

    def __init__(self, total: int | None, unit: str, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty()
        self.total, self.unit, self.done = total, unit, 0
        self.started = self.last = time.monotonic()

    def update(self, count: int = 1) -> None:
        self.done += count
        now = time.monotonic()
        if self.enabled and (now - self.last >= 0.1 or self.done == self.total):
            self.last = now
            rate = self.done / max(now - self.started, 1e-9)
            if self.total:
                filled = round(30 * min(1.0, self.done / self.total))
                bar = f"[{'#' * filled}{'.' * (30 - filled)}] {self.done}/{self.total}"
            else:
                bar = str(self.done)
            self.stream.write(f"\r{bar} {self.unit} {rate:.1f}/s")
            self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.done:
            self.stream.write("\n")
            self.stream.flush()
