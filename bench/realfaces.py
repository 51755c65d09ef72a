"""The whole service pipeline on labeled real photos that are not FER2013: how right is it on users' photos?

    python -m bench.realfaces --data /path/to/realfaces                      # every set there, both splits
    python -m bench.realfaces --data DIR --split dev --variants frames       # tuning: development subjects only
    python -m bench.realfaces --data DIR --fer-python .venv-fer/bin/python   # the `fer` library beside ours

Each photo goes through the service's own code (:mod:`app.analysis`'s ``decode``, the service's
:class:`~app.faces.FaceDetector` with the settings' defaults, :func:`app.faces.crop_faces`, the
served int8 ONNX model's :class:`~app.model.Predictor`): decode -> detect -> align -> crop ->
classify, nothing copied. Each photo shows one face; the largest face found is the answer, and a
photo where none is found counts as wrong (``accuracy``; ``accuracy_found`` only counts the photos
with a face). The images are not in the repository (their terms do not allow it): ``--data`` is a
folder of sets, ``<set>/<class>/<image>`` with FER2013's class names, and, where the set knows who
is in each photo, ``<set>/manifest.csv`` (``file,label,subject``), which the split uses. Where to
get each set and how it is laid out: ``bench/README.md``.

Split: the subjects of the sets in :data:`DEV_SETS`, alternately by sorted subject id, are the
development half (``dev``); everything else is kept for reporting (``report``), never tuned on.

Variants (``--variants``): ``served`` (the service as configured), ``flip`` (also the crop's mirror,
logits averaged), ``frames`` (a grid of framings of the aligned crop: square side and eyes' height,
and the unaligned box), ``all``. Each variant's accuracy, macro-F1, per-class recall, confusion
matrix, and calibration (expected calibration error of ``confidence``, 15 bins, at the model's
calibrated temperature and uncalibrated, :mod:`fercore.calibration`) are written to
``bench/results/realfaces.json``; the confusion matrices of the served variant and of fer as
pictures beside it, ``bench/results/realfaces/<set>-<split>-<variant>.png``.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import ImageOps

from app.faces import crop_faces
from app.settings import BUNDLED_MODEL
from bench.alignment import sign_test
from bench.machine import RESULTS_DIR, command_line, describe_host, write_result
from fercore.framing import FER2013_FRAME, SERVED_FRAME, FaceFrame
from fercore.labels import CLASS_NAMES
from training.metrics import plot_confusion_matrix
from training.realfaces import DEV_SETS, Photo, Pipeline, read_set, score, sets_in, split_photos

log = logging.getLogger(__name__)

SERVED_MODEL = BUNDLED_MODEL.with_name("fer-compact.int8.onnx")
# The framings tried by --variants frames: the square's side (times FER2013's) and the eyes' height.
FRAME_SCALES = (0.7, 0.75, 0.8, 0.85, 0.92, 1.0, 1.08, 1.16)
FRAME_EYES_Y = (0.33, 0.36, 0.39, 0.42, 0.45)
BOX_MARGINS = (0.0, 0.1, 0.2, 0.3)  # the unaligned crop's margins tried


def frames(variants: list[str], served_align: bool = True) -> dict[str, tuple[bool, FaceFrame]]:
    """Each crop variant's name, alignment and framing: the service's own first."""
    out = {"served": (served_align, SERVED_FRAME)}
    if "frames" in variants:
        for scale in FRAME_SCALES:
            for eyes_y in FRAME_EYES_Y:
                bigger = FER2013_FRAME.scaled(scale)
                out[frame_name(scale, eyes_y)] = (True, FaceFrame(bigger.side_per_eyes, bigger.side_per_eyes_mouth, eyes_y))
        for margin in BOX_MARGINS:
            out[f"box_margin{margin:.1f}"] = (False, FaceFrame(margin=margin))
    return out


def variant_names(variants: list[str]) -> list[str]:
    return [*frames(variants), *(["flip"] if "flip" in variants else [])]


def frame_name(scale: float, eyes_y: float) -> str:
    return f"aligned_scale{scale:.2f}_eyes{eyes_y:.2f}"


def classify_photo(photo: Photo, pipeline: Pipeline, variants: list[str]) -> dict[str, np.ndarray]:
    """Each variant's logits for ``photo`` (nothing when no face is found or the file is refused as
    the service would refuse it): the service's own decode and detection, then each variant's crop."""
    found = pipeline.face(photo)
    if found is None:
        return {}
    image, face = found
    crops = {
        name: crop_faces(image, [face], align, frame)[0]
        for name, (align, frame) in frames(variants, pipeline.detector.align).items()
    }
    names = list(crops)
    batch = [crops[n] for n in names]
    if "flip" in variants:
        batch.append(ImageOps.mirror(crops["served"]))
    logits = pipeline.predictor.classifier.logits(pipeline.predictor.inputs(batch))  # (len(batch), classes)
    out: dict[str, np.ndarray] = dict(zip(names, logits[: len(names)], strict=True))
    if "flip" in variants:
        out["flip"] = (logits[0] + logits[-1]) / 2
    return out


def run_ours(photos: list[Photo], model: Path, variants: list[str]) -> tuple[dict[str, list[np.ndarray | None]], float]:
    """Every variant's logits over ``photos`` with the service's pipeline and ``model``, and the
    model's calibrated temperature."""
    pipeline = Pipeline.for_model(model)
    answers: dict[str, list[np.ndarray | None]] = {name: [] for name in variant_names(variants)}
    for i, photo in enumerate(photos):
        got = classify_photo(photo, pipeline, variants)
        for name, column in answers.items():
            column.append(got.get(name))
        if (i + 1) % 200 == 0:
            log.info("%d / %d photos", i + 1, len(photos))
    return answers, pipeline.predictor.classifier.meta.temperature


def run_fer(photos: list[Photo], fer_python: str) -> list[np.ndarray | None]:
    """The `fer` library's answers (its own detector, its largest face), in its own environment, as
    log-probabilities (so that they score as logits at temperature 1)."""
    with tempfile.TemporaryDirectory() as tmp:
        files, out = Path(tmp) / "files.json", Path(tmp) / "fer.json"
        files.write_text(json.dumps([str(p.path) for p in photos]))
        subprocess.run([fer_python, "-m", "bench.fer_photos", "--files", str(files), "--output", str(out)], check=True)
        rows = json.loads(out.read_text())
    return [None if row is None else np.log(np.clip(np.asarray(row, dtype=np.float32), 1e-12, 1.0)) for row in rows]


def paired(labels: np.ndarray, a: list[np.ndarray | None], b: list[np.ndarray | None]) -> dict[str, Any]:
    """Photos only ``a`` gets right and only ``b`` gets right, and the sign test's p-value."""
    right_a = np.asarray([x is not None and int(x.argmax()) == y for x, y in zip(a, labels, strict=True)])
    right_b = np.asarray([x is not None and int(x.argmax()) == y for x, y in zip(b, labels, strict=True)])
    wins, losses = int((right_a & ~right_b).sum()), int((right_b & ~right_a).sum())
    return {"only_this_right": wins, "only_served_right": losses, "sign_test_p": sign_test(wins, losses)}


def picture(report: dict[str, Any], path: Path, title: str) -> None:
    if "confusion_matrix" in report:
        path.parent.mkdir(parents=True, exist_ok=True)
        plot_confusion_matrix(report["confusion_matrix"], CLASS_NAMES, path, title)


def bench_split(set_name: str, split: str, photos: list[Photo], args: argparse.Namespace, variants: list[str]) -> dict[str, Any]:
    log.info("%s / %s: %d photos", set_name, split, len(photos))
    labels = np.asarray([p.label for p in photos])
    ours, temperature = run_ours(photos, args.model, variants)
    result: dict[str, Any] = {"photos": len(photos), "subjects": len({p.subject for p in photos if p.subject}), "variants": {}}
    for name, answers in ours.items():
        row = score(labels, answers, temperature)
        if name != "served":
            row["against_served"] = paired(labels, answers, ours["served"])
        result["variants"][name] = row
    picture(result["variants"]["served"], args.pictures / f"{set_name}-{split}-served.png", f"ours on {set_name} ({split})")
    if args.fer_python:
        result["fer"] = score(labels, run_fer(photos, args.fer_python), 1.0)
        picture(result["fer"], args.pictures / f"{set_name}-{split}-fer.png", f"fer on {set_name} ({split})")
    return result


def parse_variants(value: str) -> list[str]:
    names = ["flip", "frames"] if value == "all" else [v.strip() for v in value.split(",") if v.strip() and v.strip() != "served"]
    unknown = set(names) - {"flip", "frames"}
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown variants {sorted(unknown)}; choose from served, flip, frames, all")
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--data", type=Path, required=True, help="folder of sets: <set>/<class>/<image>, optional <set>/manifest.csv"
    )
    parser.add_argument("--sets", type=lambda v: [s for s in v.split(",") if s], help="comma-separated set names (default: all)")
    parser.add_argument("--split", choices=("dev", "report", "all"), default="all")
    parser.add_argument("--model", type=Path, default=SERVED_MODEL, help="ONNX model (default: the served int8 model)")
    parser.add_argument("--variants", type=parse_variants, default=[], help="served (default), flip, frames, all")
    parser.add_argument("--fer-python", help="the `fer` library's interpreter (.venv-fer/bin/python): fer beside ours")
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "realfaces.json")
    parser.add_argument("--pictures", type=Path, default=RESULTS_DIR / "realfaces")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.data.is_dir():
        parser.error(f"--data {args.data}: not a folder")

    results: dict[str, Any] = {"model": str(args.model), "dev_sets": list(DEV_SETS), "sets": {}}
    for set_name, folder in sets_in(args.data, args.sets):
        splits = split_photos(set_name, read_set(folder))
        chosen = splits if args.split == "all" else {k: v for k, v in splits.items() if k == args.split}
        results["sets"][set_name] = {
            split: bench_split(set_name, split, photos, args, ["served", *args.variants]) for split, photos in chosen.items()
        }
    if not results["sets"]:
        parser.error(f"--data {args.data}: no sets found")
    write_result(args.output, "realfaces", results, command_line("bench.realfaces", argv), describe_host())
    print(markdown_table(results))
    return 0


def markdown_table(results: dict[str, Any]) -> str:
    lines = ["| set | split | photos | who | not found | accuracy | macro-F1 | ECE |", "|---|---|---:|---|---:|---:|---:|---:|"]
    for set_name, splits in results["sets"].items():
        for split, r in splits.items():
            rows = [("ours", r["variants"]["served"])] + ([("fer", r["fer"])] if "fer" in r else [])
            for who, row in rows:
                lines.append(
                    f"| {set_name} | {split} | {row['photos']} | {who} | {row['faces_not_found']} | {row['accuracy']:.3f} "
                    f"| {row.get('macro_f1', 0):.3f} | {row.get('ece', 0):.3f} |"
                )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
