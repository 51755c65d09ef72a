"""The ``fer`` library (PyPI ``fer``, MIT) on the images our service is benchmarked with, and its
accuracy on FER2013 PublicTest.

fer is a Keras mini-Xception (Arriaga et al.'s, trained on FER2013, 64x64 grey input) with
OpenCV's Haar cascade as face detector. It needs TensorFlow, so this runs in its own virtual
environment, never the project's (no torch there; see ``bench/requirements-fer.txt``):

    python3 -m venv .venv-fer
    .venv-fer/bin/pip install --no-deps -r bench/requirements-fer.txt
    .venv/bin/python -m bench.service --write-images /tmp/fer-images     # the service benchmark's two images
    .venv-fer/bin/python -m bench.fer_baseline --crop /tmp/fer-images/crop.png --photo /tmp/fer-images/photo.png

``python -m bench.service --fer-python .venv-fer/bin/python`` does all of this itself, and passes
our model's PublicTest report (``training.evaluate``) with ``--ours-eval`` so both sit in one file.

Everything goes through fer's own API and preprocessing, ``FER.detect_emotions``, per backend
(``--backends``): ``tflite`` is ``FER()``'s default, the quantized model run by
``tf.lite.Interpreter``; ``keras`` is ``FER(use_tflite=False)``, the float ``.hdf5`` model.

* load: ``import tensorflow`` and ``fer.fer`` (once), ``FER()`` (reads the model), first inference;
* the 48x48 crop classified as one whole face:
  ``FER(offsets=(0, 0)).detect_emotions(bgr, face_rectangles=[(0, 0, w, h)])``. With zero offsets
  fer's crop is exactly the image (its default adds 10 px of border around a detector's tight
  box); fer then resizes it to 64x64 and scales it to [-1, 1], as its model was trained;
* the photo with fer's default detection (``FER()``: Haar cascade, scale 1.1, 5 neighbours,
  faces of 50 px or more);
* PublicTest accuracy: every image of the zip's ``test/`` folder (3,589) decoded as ``cv2.imread``
  would (BGR) and classified like the crop. fer rounds its scores to two decimals, which can tie
  the top two classes, so the accuracy is taken from the unrounded model output (captured from
  fer's ``_classify_emotions`` while the public call runs); the rounded-score figure is reported too.

Latency is wall-clock per call in this process, ``--threads`` (default 1) for TensorFlow's and
OpenCV's pools; fer creates its TFLite interpreter itself, with TFLite's default thread count.
Writes ``bench/results/fer_baseline.json`` (``--output`` overrides).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import shlex
import sys
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from bench.machine import RESULTS_DIR, describe_host, memory_mib, write_result
from bench.timing import latency_summary, positive_int, time_calls
from fercore.labels import CLASS_INDEX, CLASS_NAMES
from training.metrics import classification_report

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "fer2013.zip"
BACKENDS = ("tflite", "keras")
# A PublicTest face: test/<class folder>/<file>, the Kaggle layout (optionally under one wrapper folder).
_TEST_MEMBER = re.compile(r"^(?:[^/]+/)?test/([^/]+)/[^/]+\.(?:jpe?g|png)$", re.IGNORECASE)


def publictest_members(names: list[str]) -> list[tuple[str, int]]:
    """(zip member, FER2013 label id) of each image in the ``test/`` folder, sorted by name.

    Only ``test/`` (FER2013's PublicTest): the training split and anything else are ignored.
    """
    found = []
    for name in names:
        match = _TEST_MEMBER.match(name)
        if match and match.group(1).lower() in CLASS_INDEX:
            found.append((name, CLASS_INDEX[match.group(1).lower()]))
    return sorted(found)


def evenly_spaced(items: list[tuple[str, int]], limit: int | None) -> list[tuple[str, int]]:
    """``limit`` items spread over the whole (sorted, so class-grouped) list; all when None."""
    if limit is None or limit >= len(items):
        return items
    picks = np.unique(np.linspace(0, len(items) - 1, limit).round().astype(int))
    return [items[i] for i in picks]


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_bgr(path: Path) -> np.ndarray:
    """The image as ``cv2.imread`` gives it to a fer user: uint8 BGR (H, W, 3), grey files too."""
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise SystemExit(f"{path}: not an image OpenCV can read")
    return image


def import_fer(threads: int) -> tuple[Any, dict[str, str], float]:
    """Import TensorFlow and fer with ``threads`` for TensorFlow's pools: (FER class, versions, seconds)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's start-up chatter, not its errors
    start = time.perf_counter()
    import tensorflow as tf
    from fer.fer import FER  # fer/__init__.py does not export it

    seconds = time.perf_counter() - start
    # Before the first TensorFlow op (loading the Keras model runs some).
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)
    import fer
    import keras

    versions = {
        "fer": fer.__version__,
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "opencv": cv2.__version__,
        "numpy": np.__version__,
    }
    return FER, versions, seconds


def whole_image_box(image: np.ndarray) -> list[tuple[int, int, int, int]]:
    height, width = image.shape[:2]
    return [(0, 0, width, height)]


def top_emotion(faces: list[dict[str, Any]]) -> str | None:
    if not faces:
        return None
    scores: dict[str, float] = faces[0]["emotions"]
    return max(scores, key=scores.__getitem__)


def bench_latency(crop_fer: Any, photo_fer: Any, crop: np.ndarray, photo: np.ndarray, runs: int, warmup: int) -> dict[str, Any]:
    """Per-call latency of the crop (whole image as the face) and of the photo (fer's detection)."""
    box = whole_image_box(crop)
    crop_faces = crop_fer.detect_emotions(crop, face_rectangles=box)
    photo_faces = photo_fer.detect_emotions(photo)
    return {
        "crop": {
            **latency_summary(time_calls(lambda: crop_fer.detect_emotions(crop, face_rectangles=box), runs, warmup)),
            "emotion": top_emotion(crop_faces),
        },
        "photo": {
            **latency_summary(time_calls(lambda: photo_fer.detect_emotions(photo), runs, warmup)),
            "faces": len(photo_faces),
            "boxes": [[int(v) for v in face["box"]] for face in photo_faces],
            "emotion": top_emotion(photo_faces),
        },
    }


def capture_raw_scores(detector: Any) -> list[np.ndarray]:
    """Record the unrounded output of ``detector``'s classifier on each public call from now on.

    ``detect_emotions`` rounds scores to two decimals; wrapping the instance's
    ``_classify_emotions`` keeps fer's whole path as it is and only looks at what it returns.
    """
    captured: list[np.ndarray] = []
    original: Callable[[np.ndarray], Any] = detector._classify_emotions

    def classify(gray_faces: np.ndarray) -> Any:
        out = original(gray_faces)
        captured.append(np.asarray(out, dtype=np.float32))  # (faces, 7), fer's label order
        return out

    detector._classify_emotions = classify
    return captured


def bench_accuracy(fer_class: Any, use_tflite: bool, data: Path, limit: int | None) -> dict[str, Any]:
    """fer's classification of each PublicTest image as one whole face, in FER2013's label order."""
    detector = fer_class(use_tflite=use_tflite, offsets=(0, 0))
    captured = capture_raw_scores(detector)
    fer_labels: dict[int, str] = fer_class._get_labels()
    to_ours = np.asarray([CLASS_INDEX[fer_labels[i]] for i in range(len(fer_labels))])  # fer index -> FER2013 id
    with zipfile.ZipFile(data) as zf:
        members = publictest_members(zf.namelist())
        if not members:
            raise SystemExit(f"{data}: no test/<class>/ images (the Kaggle FER2013 layout)")
        chosen = evenly_spaced(members, limit)
        y_true, y_raw, y_rounded, ties = [], [], [], 0
        start = time.perf_counter()
        for name, label in chosen:
            image = cv2.imdecode(np.frombuffer(zf.read(name), np.uint8), cv2.IMREAD_COLOR)  # BGR, as cv2.imread
            if image is None:
                raise SystemExit(f"{data}:{name}: not an image OpenCV can read")
            captured.clear()
            faces = detector.detect_emotions(image, face_rectangles=whole_image_box(image))
            if len(faces) != 1 or len(captured) != 1:
                raise SystemExit(f"{data}:{name}: fer returned {len(faces)} faces for one whole-image box")
            rounded = np.asarray(list(faces[0]["emotions"].values()))  # fer's label order, 2 decimals
            top = np.sort(rounded)[-2:]
            ties += int(top[0] == top[1])
            y_true.append(label)
            y_raw.append(int(to_ours[int(captured[0][0].argmax())]))
            y_rounded.append(int(to_ours[int(rounded.argmax())]))  # first of tied classes, as max() picks
        seconds = time.perf_counter() - start
    truth = np.asarray(y_true)
    report = classification_report(truth, np.asarray(y_raw), CLASS_NAMES)
    report.update(
        {
            "data": str(data),
            "data_sha256": sha256_file(data),
            "split": "test (PublicTest)",
            "images_in_split": len(members),
            "limit": limit,
            "accuracy_rounded_scores": float((np.asarray(y_rounded) == truth).mean()),
            "rounded_score_ties": ties,
            "seconds": seconds,
            "images_per_s": len(chosen) / seconds,
        }
    )
    return report


def bench_backend(
    fer_class: Any, backend: str, crop: np.ndarray | None, photo: np.ndarray | None, args: argparse.Namespace
) -> dict[str, Any]:
    use_tflite = backend == "tflite"
    row: dict[str, Any] = {"model_file": "emotion_model_quantized.tflite" if use_tflite else "emotion_model.hdf5"}
    start = time.perf_counter()
    crop_fer = fer_class(use_tflite=use_tflite, offsets=(0, 0))  # first instance: reads the model (fer caches it per class)
    row["init_s"] = time.perf_counter() - start
    probe = crop if crop is not None else np.full((48, 48, 3), 128, np.uint8)
    start = time.perf_counter()
    crop_fer.detect_emotions(probe, face_rectangles=whole_image_box(probe))
    row["first_inference_s"] = time.perf_counter() - start
    if crop is not None and photo is not None:
        log.info("%s: latency, %d+%d calls per image", backend, args.warmup, args.runs)
        photo_fer = fer_class(use_tflite=use_tflite)  # fer's defaults: Haar cascade, 10 px offsets
        row.update(bench_latency(crop_fer, photo_fer, crop, photo, args.runs, args.warmup))
        # This process's memory: TensorFlow, OpenCV and every backend benchmarked so far (in --backends order).
        row["memory_after_latency"] = memory_mib()
    else:
        row["latency"] = {"skipped": "no --crop/--photo given"}
    if args.no_accuracy:
        row["accuracy"] = {"skipped": "--no-accuracy"}
    elif not args.data.is_file():
        row["accuracy"] = {"skipped": f"{args.data} not found"}
    else:
        log.info("%s: PublicTest accuracy on %s", backend, args.data)
        row["accuracy"] = bench_accuracy(fer_class, use_tflite, args.data, args.limit)
    return row


def image_info(path: Path, image: np.ndarray) -> dict[str, Any]:
    height, width = image.shape[:2]
    return {"file": path.name, "sha256": sha256_file(path), "width": width, "height": height}


def parse_backends(value: str) -> list[str]:
    names = [b.strip() for b in value.split(",") if b.strip()]
    if not names or any(b not in BACKENDS for b in names):
        raise argparse.ArgumentTypeError(f"choose from {', '.join(BACKENDS)} (comma-separated), got {value!r}")
    return names


def interpreter() -> str:
    """This interpreter as the command line should show it: relative to the repository when inside it."""
    path = Path(sys.executable)
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def markdown_table(results: dict[str, Any]) -> str:
    lines = [
        "| fer backend | init s | crop p50 / p99 ms | photo p50 / p99 ms | faces | PublicTest acc | macro F1 | n |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, row in results["backends"].items():
        crop, photo, acc = row.get("crop", {}), row.get("photo", {}), row["accuracy"]
        cells = [
            name,
            f"{row['init_s']:.2f}",
            f"{crop['p50_ms']:.2f} / {crop['p99_ms']:.2f}" if "p50_ms" in crop else "-",
            f"{photo['p50_ms']:.2f} / {photo['p99_ms']:.2f}" if "p50_ms" in photo else "-",
            str(photo.get("faces", "-")),
            f"{acc['accuracy']:.4f}" if "accuracy" in acc else "-",
            f"{acc['macro_f1']:.4f}" if "macro_f1" in acc else "-",
            str(acc.get("num_samples", "-")),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    ours = results.get("ours")
    if ours:
        lines.append(
            f"| ours ({ours.get('model', {}).get('name', '?')}) | | | | | {ours['accuracy']:.4f} | {ours['macro_f1']:.4f} "
            f"| {ours['num_samples']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--crop", type=Path, help="the 48x48 face crop (bench.service --write-images)")
    parser.add_argument("--photo", type=Path, help="the photo with a face (bench.service --write-images)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="FER2013 zip whose test/ folder is PublicTest")
    parser.add_argument("--no-accuracy", action="store_true", help="skip the PublicTest accuracy")
    parser.add_argument(
        "--limit", type=positive_int, help="classify only this many PublicTest images, evenly spread (smoke runs)"
    )
    parser.add_argument("--backends", type=parse_backends, default=list(BACKENDS), help="tflite (fer's default), keras")
    parser.add_argument("--runs", type=positive_int, default=200, help="timed calls per image")
    parser.add_argument("--warmup", type=int, default=10, help="untimed calls per image first")
    parser.add_argument("--threads", type=positive_int, default=1, help="TensorFlow and OpenCV threads")
    parser.add_argument("--ours-eval", type=Path, help="our model's training.evaluate --output-json file, to put beside fer's")
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "fer_baseline.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if (args.crop is None) != (args.photo is None):
        parser.error("give both --crop and --photo, or neither")

    cv2.setNumThreads(args.threads)
    crop = read_bgr(args.crop) if args.crop else None
    photo = read_bgr(args.photo) if args.photo else None
    fer_class, versions, import_s = import_fer(args.threads)
    results: dict[str, Any] = {
        "settings": {
            "backends": args.backends,
            "runs": args.runs,
            "warmup": args.warmup,
            "threads": args.threads,
            "crop": image_info(args.crop, crop) if args.crop and crop is not None else None,
            "photo": image_info(args.photo, photo) if args.photo and photo is not None else None,
            "data": None if args.no_accuracy else str(args.data),
            "limit": args.limit,
        },
        "import_s": import_s,
        "memory_after_import": memory_mib(),
        "backends": {backend: bench_backend(fer_class, backend, crop, photo, args) for backend in args.backends},
        "ours": json.loads(args.ours_eval.read_text()) if args.ours_eval else None,
    }
    machine = {**describe_host(), **versions, "interpreter": interpreter()}
    command = shlex.join([interpreter(), "-m", "bench.fer_baseline", *(sys.argv[1:] if argv is None else argv)])
    write_result(args.output, "fer_baseline", results, command, machine=machine)
    print(markdown_table(results))
    print(f"\nwritten to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
