"""How fast a video is analysed: frames per second through the pipeline ``fer-analyze clip.mp4``,
``ferkit.analyze_video`` and ``POST /predict/video`` share, and what each step costs.

    python -m bench.video                         # writes bench/results/video.json
    python -m bench.video --seconds 4 --rounds 2

The video: ``tests.utils.videos.moving_face_video``, skimage's astronaut photo panned across a
640x360 window and brightening, ``--seconds`` long at 30 frames/s, H.264 (written with PyAV):
one face, moving, in every frame. The model: the bundled one (``--model``), with ONNX Runtime on
``--threads`` threads (default: the CPUs this process may use) for the detector and the classifier,
FFmpeg's own decoding threads, as ``fer-analyze`` runs.

* ``end_to_end``: the whole pipeline (``ferkit.Analyzer.video_frames``: decode, detect, align,
  crop, classify in chunks of ``app.analysis.VIDEO_CHUNK`` frames, track and smooth), every frame
  (``fps`` None) and sampled at 10 frames/s, ``--rounds`` times each, interleaved: analysed frames
  per second (median), and how many times real time the whole video goes;
* ``steps``: each step alone over every frame of the video, in the same rounds, per frame: decode
  (PyAV, to a PIL image), detect (``Analyzer.locate``: BlazeFace, alignment, the crop),
  classify (``Predictor.predict_faces`` on the crops, VIDEO_CHUNK frames at a time), track
  (``app.tracking.Tracker.update``: IoU matching and the time-constant EMA); medians over rounds
  of each step's mean per frame.

Writes ``bench/results/video.json`` (``--output`` overrides) and prints a summary.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import logging
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from app.analysis import VIDEO_CHUNK, batched, detector_config
from app.faces import FaceDetector
from app.settings import BUNDLED_MODEL
from app.tracking import Tracker
from app.video import Video
from bench.machine import RESULTS_DIR, command_line, write_result
from bench.timing import positive_int
from fercore.cpus import available_cpus
from ferkit import Analyzer
from tests.utils.videos import SIZE, moving_face_video

log = logging.getLogger(__name__)

FPS = 30
SAMPLED_FPS = 10.0


def seconds_of(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def end_to_end(analyzer: Analyzer, clip: bytes, fps: float | None) -> tuple[float, int]:
    """Seconds to analyse ``clip`` sampled at ``fps``, and the frames analysed."""

    def run() -> int:
        with analyzer.video_frames(clip, fps) as (_, frames):
            return sum(1 for _ in frames)

    return seconds_of(run)


def steps(analyzer: Analyzer, clip: bytes) -> dict[str, float]:
    """Each step alone over every frame of ``clip``, as the pipeline runs it: seconds per frame."""
    core = analyzer.core

    def decode() -> list[Any]:
        with Video(clip, analyzer.video_limits()) as video:
            return list(video.frames(None))

    decode_s, frames = seconds_of(decode)

    def detect() -> list[Any]:
        return [found for chunk in batched(frames, VIDEO_CHUNK) for found in core.locate_all([f.image for f in chunk])]

    detect_s, located = seconds_of(detect)

    def classify() -> list[list[Any]]:
        return [faces for chunk in batched(located, VIDEO_CHUNK) for faces in core.classify(chunk)]

    classify_s, faces = seconds_of(classify)

    def track() -> int:
        tracker = Tracker()
        return sum(len(tracker.update(found, f.index, f.time_s)) for f, found in zip(frames, faces, strict=True))

    track_s, _ = seconds_of(track)
    n = len(frames)
    return {"decode": decode_s / n, "detect": detect_s / n, "classify": classify_s / n, "track": track_s / n}


def one_frame_at_a_time(analyzer: Analyzer, threads: int) -> Analyzer:
    """``analyzer`` as it was before frames were located in parallel: one frame after another, the
    detector's ONNX Runtime session on ``threads`` threads."""
    before = copy.copy(analyzer)
    detector = FaceDetector(detector_config(analyzer.settings), threads=threads)
    before.core = dataclasses.replace(analyzer.core, detector=detector, workers=None)
    return before


def tracks_of(analyzer: Analyzer, clip: bytes) -> list[list[tuple[tuple[int, ...], str, list[float]]]]:
    response = analyzer.analyze_video(clip)
    return [[(f.box, f.smoothed_emotion, list(f.smoothed_scores.values())) for f in t.faces] for t in response.tracks]


def same_tracks(
    a: list[list[tuple[tuple[int, ...], str, list[float]]]], b: list[list[tuple[tuple[int, ...], str, list[float]]]]
) -> bool:
    """The same tracks, boxes and smoothed emotions; smoothed scores within 1e-6."""
    if [len(t) for t in a] != [len(t) for t in b]:
        return False
    pairs = [(x, y) for ta, tb in zip(a, b, strict=True) for x, y in zip(ta, tb, strict=True)]
    return all(x[:2] == y[:2] and max(abs(p - q) for p, q in zip(x[2], y[2], strict=True)) < 1e-6 for x, y in pairs)


def faces_found(analyzer: Analyzer, clip: bytes) -> dict[str, Any]:
    """What the pipeline finds in the clip (every frame): tracks and faces per frame."""
    response = analyzer.analyze_video(clip)
    per_frame = sum(len(t.faces) for t in response.tracks) / response.video.frames_analysed
    emotions = sorted({f.smoothed_emotion for t in response.tracks for f in t.faces})
    return {"tracks": len(response.tracks), "faces_per_frame": per_frame, "smoothed_emotions": emotions}


def bench(analyzers: dict[str, Analyzer], clip: bytes, seconds: float, rounds: int) -> dict[str, Any]:
    """Each analyzer's end-to-end rates and step costs, measured in turn in each round."""
    for analyzer in analyzers.values():
        end_to_end(analyzer, clip, None)  # warm-up: ONNX Runtime's first passes, FFmpeg's first open
    runs: dict[tuple[str, str], list[float]] = {}
    frames: dict[str, int] = {}
    step_runs: dict[str, list[dict[str, float]]] = {name: [] for name in analyzers}
    for _ in range(rounds):
        for name, analyzer in analyzers.items():
            for sampling, fps in (("every_frame", None), ("sampled", SAMPLED_FPS)):
                took, frames[sampling] = end_to_end(analyzer, clip, fps)
                runs.setdefault((name, sampling), []).append(took)
            step_runs[name].append(steps(analyzer, clip))
    results: dict[str, Any] = {}
    for name in analyzers:
        e2e = {}
        for sampling, fps in (("every_frame", None), ("sampled", SAMPLED_FPS)):
            median = statistics.median(runs[name, sampling])
            e2e[sampling] = {
                "sample_fps": fps,
                "frames_analysed": frames[sampling],
                "median_s": round(median, 3),
                "analysed_fps": round(frames[sampling] / median, 1),
                "times_real_time": round(seconds / median, 2),
            }
        per_frame = {step: round(1000 * statistics.median(r[step] for r in step_runs[name]), 3) for step in step_runs[name][0]}
        total = sum(per_frame.values())
        results[name] = {
            "end_to_end": e2e,
            "steps_ms_per_frame": per_frame,
            "steps_share": {step: round(ms / total, 3) for step, ms in per_frame.items()},
        }
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0, help="the video's length (30 frames/s, 640x360)")
    parser.add_argument("--rounds", type=positive_int, default=3, help="timed runs of each measurement (median)")
    parser.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads (0: the usable CPUs)")
    parser.add_argument("--model", type=Path, default=BUNDLED_MODEL)
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "video.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    threads = args.threads or available_cpus()
    clip = moving_face_video(args.seconds, FPS)
    analyzer = Analyzer(args.model, threads=threads)
    analyzers = {"frames_in_parallel": analyzer, "one_frame_at_a_time": one_frame_at_a_time(analyzer, threads)}
    ways = bench(analyzers, clip, args.seconds, args.rounds)
    now, before = (ways[name]["end_to_end"]["every_frame"]["analysed_fps"] for name in analyzers)
    results: dict[str, Any] = {
        "video": {"width": SIZE[0], "height": SIZE[1], "fps": FPS, "seconds": args.seconds, "bytes": len(clip)},
        "threads": threads,
        "found": faces_found(analyzer, clip),
        "same_tracks_both_ways": same_tracks(tracks_of(analyzer, clip), tracks_of(analyzers["one_frame_at_a_time"], clip)),
        "speedup_every_frame": round(now / before, 2),
        **ways,
        "load_average_1_5_15_min": os.getloadavg(),  # the machine is shared: how busy it was at the end
    }
    write_result(args.output, "video", results, command_line("bench.video", argv))
    for name in analyzers:
        for sampling, row in ways[name]["end_to_end"].items():
            rate = f"{row['analysed_fps']} analysed frames/s"
            print(f"{name} {sampling}: {row['frames_analysed']} frames in {row['median_s']} s: {rate}")
        steps_ms = ", ".join(f"{step} {ms:.2f}" for step, ms in ways[name]["steps_ms_per_frame"].items())
        print(f"{name} per frame, ms: {steps_ms}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
