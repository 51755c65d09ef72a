"""Labeled real photos (not FER2013): reading a set, splitting it by person, scoring the whole pipeline.

The service's accuracy on FER2013's own faces says little about users' photos, so a run can also be
measured on real photo sets through the very code the service runs: decode -> detect -> align ->
crop -> classify (:mod:`app.analysis`'s ``decode``, :class:`app.faces.FaceDetector` with the
service's default settings, :func:`app.faces.crop_faces`, the exported ONNX model). Each photo shows
one face: the largest face found is the answer, and a photo without one counts as wrong.

A folder of sets holds ``<set>/<class>/<image>`` with FER2013's class names and, where the set knows
who is in each photo, ``<set>/manifest.csv`` (``file,label,subject``). The subjects of the sets in
:data:`DEV_SETS`, every other one by sorted id, are the **development** half: the only real photos
anything is tuned on (framing, test-time augmentation, the promotion gate's real-photo check,
``--realfaces``); the rest of those sets and every other set are for **reporting** only.
``bench.realfaces`` is the benchmark over this module; docs/realfaces.md says where each set comes from.
"""

from __future__ import annotations

import csv
import hashlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from app.analysis import decode, detector_config
from app.errors import ServiceError
from app.faces import Detection, FaceDetector, crop_faces
from app.model import Predictor
from app.settings import Settings
from fercore.calibration import calibration_report, softmax
from fercore.labels import CLASS_INDEX, CLASS_NAMES
from training.metrics import classification_report

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp"}
# Sets whose subjects are split in two for development; the other sets are for reporting only.
DEV_SETS = ("kdef",)
SPLITS = ("dev", "report")


@dataclass(frozen=True)
class Photo:
    path: Path
    label: int  # FER2013 class id
    subject: str  # who is in it ("" when the set does not say)


def read_set(folder: Path) -> list[Photo]:
    """A set's photos: from ``manifest.csv`` when there is one, else every image in ``<class>/``."""
    manifest = folder / "manifest.csv"
    if manifest.is_file():
        with manifest.open(newline="") as f:
            rows = list(csv.DictReader(f))
        return [
            Photo(resolve(folder, row["file"], row["label"]), CLASS_INDEX[row["label"]], row.get("subject", "")) for row in rows
        ]
    photos = []
    for name in CLASS_NAMES:
        for path in sorted((folder / name).glob("*")):
            if path.suffix.lower() in IMAGE_SUFFIXES:
                photos.append(Photo(path, CLASS_INDEX[name], ""))
    return photos


def resolve(folder: Path, file: str, label: str) -> Path:
    """A manifest's ``file``: relative to the set, or to its class folder."""
    path = folder / file
    return path if path.is_file() else folder / label / Path(file).name


def split_of(set_name: str, subject: str, subjects: list[str]) -> str:
    """``dev`` for every other subject (sorted) of a development set, else ``report``."""
    if set_name not in DEV_SETS or not subject:
        return "report"
    return "dev" if subjects.index(subject) % 2 == 0 else "report"


def split_photos(set_name: str, photos: list[Photo]) -> dict[str, list[Photo]]:
    subjects = sorted({p.subject for p in photos if p.subject})
    out: dict[str, list[Photo]] = {"dev": [], "report": []}
    for photo in photos:
        out[split_of(set_name, photo.subject, subjects)].append(photo)
    return {name: items for name, items in out.items() if items}


def largest_face(detections: list[Detection]) -> Detection | None:
    return max(detections, key=lambda d: d.box[2] * d.box[3], default=None)


def score(labels: np.ndarray, answers: list[np.ndarray | None], temperature: float) -> dict[str, Any]:
    """Accuracy (a photo without a face is wrong), the figures on the photos with a face, and the
    calibration of ``confidence`` at ``temperature`` and uncalibrated; ``answers`` are logits."""
    found = np.asarray([a is not None for a in answers])
    n = len(labels)
    out: dict[str, Any] = {
        "photos": n,
        "faces_not_found": int((~found).sum()),
        "not_found_rate": float((~found).mean()) if n else 0.0,
    }
    if not found.any():
        return {**out, "accuracy": 0.0}
    logits = np.stack([a for a in answers if a is not None])
    truth = labels[found]
    report = classification_report(truth, logits.argmax(axis=1), CLASS_NAMES)
    out.update(
        accuracy=report["accuracy"] * found.sum() / n,
        accuracy_found=report["accuracy"],
        macro_f1=report["macro_f1"],
        per_class_recall={k: v["recall"] for k, v in report["per_class"].items()},
        confusion_matrix=report["confusion_matrix"],
    )
    calibration = calibration_report(logits, truth, temperature)
    out.update(
        temperature=temperature,
        mean_confidence=float(softmax(logits, temperature).max(axis=1).mean()),
        ece=calibration["ece_calibrated"],
        ece_uncalibrated=calibration["ece_uncalibrated"],
    )
    return out


def sets_in(data: Path, names: list[str] | None = None) -> Iterator[tuple[str, Path]]:
    """(name, folder) of each set under ``data``, or of those ``names``."""
    for folder in sorted(p for p in data.iterdir() if p.is_dir()):
        if names is None or folder.name in names:
            yield folder.name, folder


def set_fingerprint(photos: list[Photo]) -> str:
    """sha256 over the photos' names and labels: two figures compare only on the same photos."""
    digest = hashlib.sha256()
    for photo in sorted(photos, key=lambda p: (p.path.name, p.label)):
        digest.update(f"{photo.path.name}\t{photo.label}\n".encode())
    return f"sha256:{digest.hexdigest()}"


@dataclass
class Pipeline:
    """The service's own steps, built as the service builds them (default settings)."""

    detector: FaceDetector
    predictor: Predictor
    settings: Settings

    @classmethod
    def for_model(cls, model: Path) -> Pipeline:
        settings = Settings()
        return cls(FaceDetector(detector_config(settings)), Predictor.from_file(model, source=str(model)), settings)

    def face(self, photo: Photo) -> tuple[Any, Detection] | None:
        """The decoded photo and its largest face, or None (no face, or a file the service refuses)."""
        try:
            image, _ = decode(photo.path.read_bytes(), self.settings.max_image_pixels, self.detector)
        except ServiceError as exc:
            log.warning("%s: refused (%s)", photo.path, exc.detail)
            return None
        face = largest_face(self.detector.detect(image))
        return None if face is None else (image, face)

    def logits(self, photo: Photo) -> np.ndarray | None:
        """The served crop's logits for ``photo``, or None."""
        found = self.face(photo)
        if found is None:
            return None
        image, face = found
        crops = crop_faces(image, [face], self.detector.align)
        return self.predictor.classifier.logits(self.predictor.inputs(crops))[0]  # type: ignore[no-any-return]


def photos_of(data: Path, split: str) -> list[Photo]:
    """Every set's ``split`` photos under ``data``; ValueError if there are none."""
    if not data.is_dir():
        raise ValueError(f"{data}: not a folder of real-photo sets")
    photos = [p for _, folder in sets_in(data) for p in split_photos(folder.name, read_set(folder)).get(split, [])]
    if not photos:
        names = ", ".join(name for name, _ in sets_in(data)) or "none"
        raise ValueError(f"{data}: no {split} photos (sets there: {names}; development sets: {', '.join(DEV_SETS)})")
    return photos


def evaluate(model: Path, data: Path, split: str = "dev") -> dict[str, Any]:
    """``model`` through the service pipeline on every set's ``split`` under ``data``, all photos
    pooled: the figures the promotion gate compares (``realfaces_<split>_*`` in a run's metrics)."""
    photos = photos_of(data, split)
    pipeline = Pipeline.for_model(model)
    report = score(
        np.asarray([p.label for p in photos]),
        [pipeline.logits(p) for p in photos],
        pipeline.predictor.classifier.meta.temperature,
    )
    return {
        f"realfaces_{split}_accuracy": report["accuracy"],
        f"realfaces_{split}_macro_f1": report.get("macro_f1", 0.0),
        f"realfaces_{split}_not_found": report["faces_not_found"],
        f"realfaces_{split}_photos": len(photos),
        f"realfaces_{split}_set": set_fingerprint(photos),
    }
