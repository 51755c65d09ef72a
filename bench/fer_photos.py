"""The ``fer`` library on photos, as its users call it: ``FER().detect_emotions(image)``, in its own
environment (``.venv-fer``, see :mod:`bench.fer_baseline`); ``bench.realfaces`` runs this.

    .venv-fer/bin/python -m bench.fer_photos --files files.json --output answers.json

``files.json`` is a list of image paths. ``answers.json`` gets, for each, the unrounded scores of the
largest face fer's own detector (its default Haar cascade) finds, in FER2013's class order, or null
when it finds none or OpenCV cannot read the file.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from bench.fer_baseline import capture_raw_scores, import_fer
from fercore.labels import CLASS_INDEX

log = logging.getLogger(__name__)


def answer(detector: Any, captured: list[np.ndarray], to_ours: np.ndarray, path: str) -> list[float] | None:
    """The largest face's scores (FER2013 order) in the image at ``path``, or None."""
    image = cv2.imread(path, cv2.IMREAD_COLOR)  # BGR, grey files too: what a fer user passes
    if image is None:
        log.warning("%s: OpenCV cannot read it", path)
        return None
    captured.clear()
    faces = detector.detect_emotions(image)
    if not faces:
        return None
    largest = max(range(len(faces)), key=lambda i: faces[i]["box"][2] * faces[i]["box"][3])
    raw = np.concatenate(captured)[largest]  # fer's label order; fer classifies all faces in one call
    ours = np.empty(len(raw), dtype=np.float32)
    ours[to_ours] = raw
    return [float(v) for v in ours]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=Path, required=True, help="JSON list of image paths")
    parser.add_argument("--output", type=Path, required=True, help="JSON list of answers, one per file")
    parser.add_argument("--threads", type=int, default=1, help="TensorFlow and OpenCV threads")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cv2.setNumThreads(args.threads)
    fer_class, _, _ = import_fer(args.threads)
    detector = fer_class()  # fer's defaults: Haar cascade, 10-px offsets, the TFLite model
    captured = capture_raw_scores(detector)
    labels: dict[int, str] = fer_class._get_labels()
    to_ours = np.asarray([CLASS_INDEX[labels[i]] for i in range(len(labels))])  # fer index -> FER2013 id
    files = json.loads(args.files.read_text())
    answers = [answer(detector, captured, to_ours, path) for path in files]
    args.output.write_text(json.dumps(answers))
    return 0


if __name__ == "__main__":
    sys.exit(main())
