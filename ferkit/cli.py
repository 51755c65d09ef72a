"""``fer-analyze``: facial expressions of the faces in photos, folders of photos and videos.

    fer-analyze photo.jpg                          each face's box, emotion and confidence
    fer-analyze photo.jpg --json                   POST /predict's JSON
    fer-analyze photo.jpg --annotate out.jpg --explain
    fer-analyze photos/ --output results.csv       one row per face (or .jsonl); also globs, several files
    fer-analyze clip.mp4 --fps 10 --output frames.csv --plot timeline.png --annotate out.mp4

Exit status: 0 done; 1 a failure of this program, of its model, or an output it cannot write; 2
bad usage or an input that cannot be read (a folder's unreadable files are reported and skipped,
its other files analysed, and the status is 2). Errors are one line on stderr; output files
appear whole or not at all.
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from app.analysis import VideoTracks, decode
from app.failures import CorruptVideo, ServiceError, UnsupportedImage
from app.schemas import Face, FaceTrack, PredictResponse, VideoResponse, VideoSummary
from fercore.artifact import ModelLoadError
from ferkit import draw
from ferkit.api import Analyzer
from ferkit.outputs import (
    ROW_FORMATS,
    OutputError,
    Outputs,
    Progress,
    RowWriter,
    photo_columns,
    photo_record,
    photo_row,
    video_columns,
    video_record,
    video_row,
    video_writer,
)

PROG = "fer-analyze"
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".jpe", ".png", ".gif", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".mpo"})
VIDEO_SUFFIXES = frozenset(
    {".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".wmv", ".flv", ".3gp", ".ts", ".mts", ".ogv"}
)
DEFAULT_FPS = 10.0


class UsageError(Exception):
    """Arguments that do not go together: exit status 2."""


class Unreadable(Exception):
    """An input that cannot be read (missing, not a file we can use): exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Find the faces in photos or videos and classify each one's facial expression"
        " (FER2013's seven emotions), with the service's own model and pipeline.",
        epilog="Exit status: 0 done, 1 failure, 2 bad usage or unreadable input.",
    )
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="a photo, a video, a folder of photos, or a glob")
    parser.add_argument("--json", action="store_true", help="print JSON (the API's) instead of text")
    parser.add_argument("-o", "--output", type=Path, help="write one row per face to this .csv or .jsonl file")
    parser.add_argument("--annotate", type=Path, help="a photo or video: write a copy with the faces boxed and labelled")
    parser.add_argument("--explain", action="store_true", help="a photo: heatmaps of where the model looked (with --annotate)")
    parser.add_argument("--plot", type=Path, help="a video: write a timeline of each face's emotions (PNG)")
    parser.add_argument("--fps", type=float, default=DEFAULT_FPS, help="a video: frames analysed per second (0: every frame)")
    parser.add_argument(
        "--model", help="an ONNX model file, a folder with latest.json, or gs://... (default: MODEL_URI or the bundled model)"
    )
    parser.add_argument("--no-detect", action="store_true", help="each image is one face crop: classify it whole")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # exits 2 itself on bad usage
    try:
        return run(args)
    except UsageError as exc:
        parser.print_usage(sys.stderr)
        return fail(str(exc), 2)
    except Unreadable as exc:
        return fail(str(exc), 2)
    except ServiceError as exc:
        return fail(exc.detail, 2 if exc.client_error else 1)
    except ModelLoadError as exc:
        return fail(f"model not loaded: {exc}", 1)
    except OutputError as exc:
        return fail(str(exc), 1)
    except OSError as exc:  # e.g. the disk filled up while writing: no traceback, the outputs removed
        return fail(f"{exc.filename or 'output'}: {exc.strerror or exc}", 1)
    except KeyboardInterrupt:
        return fail("interrupted", 130)


def fail(message: str, status: int) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return status


def run(args: argparse.Namespace) -> int:
    kind, paths = resolve_inputs(args.inputs)
    check_options(args, kind)
    analyzer = Analyzer(args.model, detect=not args.no_detect)
    if kind == "photos":
        return run_photos(analyzer, paths, args)
    try:
        return run_file(analyzer, kind, paths[0], args)
    except ServiceError as exc:
        if not exc.client_error:
            raise
        raise Unreadable(f"{paths[0]}: {exc.detail}") from None  # the input's fault: say which


def run_file(analyzer: Analyzer, kind: str, path: Path, args: argparse.Namespace) -> int:
    """One photo or one video; a file named neither way is tried as a photo, then as a video."""
    if kind == "video":
        return run_video(analyzer, path, args)
    try:
        return run_photo(analyzer, path, args)
    except UnsupportedImage:
        if path.suffix.lower() in IMAGE_SUFFIXES:
            raise
    try:
        return run_video(analyzer, path, args)  # no image format Pillow knows: FFmpeg may
    except CorruptVideo:
        raise Unreadable(f"{path}: not a photo or a video this program can read") from None


def resolve_inputs(inputs: Sequence[str]) -> tuple[str, list[Path]]:
    """(``photo`` | ``video`` | ``photos``, the files): one file is a photo or a video by its name;
    folders (their photos, recursively), globs and several files are photos."""
    if len(inputs) == 1 and Path(inputs[0]).is_file():
        path = Path(inputs[0])
        return ("video" if path.suffix.lower() in VIDEO_SUFFIXES else "photo"), [path]
    paths: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            paths += sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        elif path.is_file():
            paths.append(path)
        elif glob.has_magic(item):
            paths += sorted(p for p in map(Path, glob.glob(item, recursive=True)) if p.is_file())
        else:
            raise Unreadable(f"{item}: no such file or folder")
    if not paths:
        raise Unreadable(f"no photos in {' '.join(inputs)}")
    return "photos", paths


def check_options(args: argparse.Namespace, kind: str) -> None:
    if args.output is not None and args.output.suffix.lower() not in ROW_FORMATS:
        raise UsageError(f"--output must end in {' or '.join(ROW_FORMATS)}, not {args.output.name}")
    if args.plot is not None and kind != "video":
        raise UsageError("--plot needs a video")
    if args.plot is not None and args.plot.suffix.lower() != ".png":
        raise UsageError(f"--plot must end in .png, not {args.plot.name}")
    if args.annotate is not None and kind == "photos":
        raise UsageError("--annotate takes one photo or one video")
    if args.annotate is not None and kind == "video" and args.annotate.suffix.lower() != ".mp4":
        raise UsageError(f"--annotate for a video must end in .mp4, not {args.annotate.name}")
    if args.annotate is not None and kind == "photo" and image_format(args.annotate) is None:
        raise UsageError(f"--annotate for a photo must end in .jpg, .png or another image suffix, not {args.annotate.name}")
    if args.explain and kind == "video":
        raise UsageError("--explain is for photos")
    if args.fps < 0:
        raise UsageError("--fps must be 0 (every frame) or more")


def read_input(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise Unreadable(f"{path}: {exc.strerror or exc}") from None


def run_photo(analyzer: Analyzer, path: Path, args: argparse.Namespace) -> int:
    """One photo: text, JSON, rows, an annotated copy."""
    data = read_input(path)
    faces = analyzer.analyze(data, explain=args.explain)
    with Outputs() as outputs:
        if args.output is not None:
            rows = RowWriter(outputs.text(args.output), args.output.suffix.lower(), photo_columns(analyzer.classes))
            write_photo_rows(rows, path, faces)
        if args.annotate is not None:
            image, _ = decode(data, analyzer.settings.max_image_pixels, None)  # full size: the boxes are in its pixels
            annotated = draw.annotate(image, faces, heatmaps=args.explain)
            annotated.save(outputs.binary(args.annotate), format=image_format(args.annotate))  # checked: not None
    if args.json:
        print(PredictResponse(faces=faces, model=analyzer.model).model_dump_json(indent=2))
    elif args.output is None:
        print_faces(str(path), faces)
    return 0


def image_format(path: Path) -> str | None:
    """Pillow's format name for an output file's suffix, if Pillow can write it."""
    Image.init()
    name = Image.EXTENSION.get(path.suffix.lower())
    return name if name in Image.SAVE else None


def print_faces(name: str, faces: Sequence[Face]) -> None:
    if not faces:
        print(f"{name}: no face found")
    for i, face in enumerate(faces, start=1):
        x, y, w, h = face.box
        print(f"{name}: face {i}: {face.emotion} {face.confidence:.0%} at x={x} y={y} w={w} h={h}")


def write_photo_rows(rows: RowWriter, path: Path, faces: Sequence[Face]) -> None:
    for i, face in enumerate(faces, start=1):
        rows.write(photo_row(str(path), i, face), photo_record(str(path), i, face))


def run_photos(analyzer: Analyzer, paths: Sequence[Path], args: argparse.Namespace) -> int:
    """Many photos: a row per face to --output (JSON Lines on stdout with --json, else text), the
    unreadable ones reported on stderr and skipped; several analysed at once (``Analyzer.analyze_files``)."""
    skipped = 0
    progress = Progress(len(paths), "photos")
    with Outputs() as outputs:
        rows = None
        if args.output is not None:
            rows = RowWriter(outputs.text(args.output), args.output.suffix.lower(), photo_columns(analyzer.classes))
        elif args.json:
            rows = RowWriter(sys.stdout, ".jsonl", [])
        for path, faces in analyzer.analyze_files(paths):
            progress.update()
            if not isinstance(faces, list):
                skipped += 1
                print(f"{PROG}: skipped {path}: {reason(faces)}", file=sys.stderr)
            elif rows is None:
                print_faces(str(path), faces)
            else:
                write_photo_rows(rows, path, faces)
    progress.close()
    if skipped:
        print(f"{PROG}: {len(paths) - skipped} photos analysed, {skipped} skipped", file=sys.stderr)
    return 2 if skipped else 0


def reason(error: Exception) -> str:
    """Why a file was not analysed, in a few words."""
    if isinstance(error, ServiceError):
        return error.detail
    if isinstance(error, OSError):
        return error.strerror or str(error)
    return str(error)


def run_video(analyzer: Analyzer, path: Path, args: argparse.Namespace) -> int:
    """A video: rows per face per sampled frame, a timeline, an annotated copy, a summary."""
    if not os.access(path, os.R_OK):
        raise Unreadable(f"{path}: permission denied")
    fps = args.fps or None
    tracks = VideoTracks()
    with Outputs() as outputs, analyzer.video_frames(path, fps) as (video, frames):
        rate = fps or video.info.fps or 25.0
        rows = None
        if args.output is not None:
            rows = RowWriter(outputs.text(args.output), args.output.suffix.lower(), video_columns(analyzer.classes))
        writer = None
        if args.annotate is not None:
            size = (video.info.width, video.info.height)
            writer = outputs.enter(video_writer(outputs.binary(args.annotate), size, rate))
        progress = Progress(round(video.info.duration_s * rate) + 1 if video.info.duration_s else None, "frames")
        for item in frames:
            progress.update()
            tracks.add(item)
            if rows is not None:
                for face in item.faces:
                    rows.write(video_row(str(path), face), video_record(str(path), face))
            if writer is not None:
                writer.write(draw.annotate(item.frame.image, item.faces))
        progress.close()
        summary, found = tracks.result(video, fps)
        if args.plot is not None:
            draw.timeline(found, analyzer.classes).save(outputs.binary(args.plot), format="PNG")
    if args.json:
        print(VideoResponse(video=summary, tracks=found, model=analyzer.model).model_dump_json(indent=2))
    elif args.output is None:
        print_tracks(str(path), summary, found)
    return 0


def print_tracks(name: str, summary: VideoSummary, tracks: Sequence[FaceTrack]) -> None:
    print(f"{name}: {summary.frames_analysed} frames analysed over {summary.duration_s:.1f} s, {len(tracks)} faces")
    for track in tracks:
        counts = Counter(face.smoothed_emotion for face in track.faces)
        top, count = counts.most_common(1)[0]
        span = f"{track.first_s:.1f}-{track.last_s:.1f} s"
        print(f"{name}: face #{track.id}: {span}, {len(track.faces)} frames, mostly {top} ({count / len(track.faces):.0%})")
