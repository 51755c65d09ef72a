"""Does eye alignment help? FER2013 PublicTest faces turned and pasted into photos, classified three ways.

    python -m bench.alignment                         # ../shared/data/fer2013.zip, 400 faces, seed 0
    python -m bench.alignment --faces 800 --seed 1

Each face (a seeded sample of the zip's ``test/`` folder, the PublicTest split) is enlarged to a
random side of 96-240 px, turned by a random angle, and pasted (its turned-out corners transparent)
at a random place in a 640x480 copy of a photo without people from ``skimage.data``. Two conditions:
``turned`` (10-30 degrees either way) and ``upright`` (0 degrees: does alignment cost anything on
faces that need none?). Each scene goes through the service's detector (``app.faces.FaceDetector``,
default settings); the detection whose box holds the pasted face's centre is classified by the
bundled model (``models/fer-compact.pt``) from:

* ``aligned``: ``crop_faces(..., align=True)``: turned so the eyes are level, framed as FER2013;
* ``unaligned``: ``crop_faces(..., align=False)``: the detector's box with a 10% margin;
* ``plain``: the original 48x48 face, not pasted anywhere (the ceiling).

Accuracy counts a missed face as wrong (``accuracy``); ``accuracy_detected`` only the faces found.
Writes bench/results/alignment.json and alignment.md.
"""

from __future__ import annotations

import argparse
import io
import logging
import math
import random
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image
from skimage import data as skdata

from app.faces import Detection, FaceDetector, crop_faces
from app.model import Predictor
from app.settings import BUNDLED_MODEL
from bench.machine import RESULTS_DIR, command_line, write_result
from bench.timing import positive_int

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "fer2013.zip"
BACKGROUNDS = ("coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "chelsea")
SCENE = (640, 480)
SIDES = (96, 240)
TURNED = (10.0, 30.0)
ARMS = ("aligned", "unaligned", "plain")


@dataclass(frozen=True)
class Sample:
    face: Image.Image  # the 48x48 original, L
    label: str


def load_faces(path: Path, count: int, seed: int) -> list[Sample]:
    """``count`` PublicTest faces, a seeded random sample, with their labels."""
    with zipfile.ZipFile(path) as zf:
        names = sorted(n for n in zf.namelist() if n.startswith("test/") and n.endswith((".jpg", ".png")))
        chosen = random.Random(seed).sample(names, min(count, len(names)))
        return [Sample(Image.open(io.BytesIO(zf.read(n))).convert("L"), n.split("/")[1]) for n in chosen]


def paste(
    face: Image.Image, background: Image.Image, angle: float, rng: random.Random
) -> tuple[Image.Image, tuple[float, float]]:
    """``face`` enlarged, turned by ``angle`` degrees and pasted on ``background``; where its centre lies."""
    side = rng.randint(*SIDES)
    big = face.resize((side, side), Image.Resampling.BICUBIC).convert("RGBA")
    turned = big.rotate(angle, resample=Image.Resampling.BICUBIC, expand=True)  # corners: transparent
    scene = background.copy()
    x = rng.randint(0, scene.width - turned.width)
    y = rng.randint(0, scene.height - turned.height)
    scene.paste(turned, (x, y), turned)
    return scene, (x + turned.width / 2, y + turned.height / 2)


def holding(detections: list[Detection], point: tuple[float, float]) -> Detection | None:
    """The detection whose box holds ``point`` (the largest if several), or None."""
    hits = [d for d in detections if d.box[0] <= point[0] <= d.box[0] + d.box[2] and d.box[1] <= point[1] <= d.box[1] + d.box[3]]
    return max(hits, key=lambda d: d.box[2] * d.box[3]) if hits else None


def run_condition(samples: list[Sample], turned: bool, detector: FaceDetector, predictor: Predictor, seed: int) -> dict[str, Any]:
    """Accuracy of each arm over ``samples`` pasted upright or turned."""
    rng = random.Random(seed)
    backgrounds = [Image.fromarray(getattr(skdata, name)()).convert("RGB").resize(SCENE) for name in BACKGROUNDS]
    correct = dict.fromkeys(ARMS, 0)
    plain_detected = 0  # the ceiling on the same faces the other two arms see
    only = {"aligned": 0, "unaligned": 0}
    detected = 0
    for sample in samples:
        angle = rng.choice((-1, 1)) * rng.uniform(*TURNED) if turned else 0.0
        scene, centre = paste(sample.face, rng.choice(backgrounds), angle, rng)
        crops = {"plain": sample.face}
        face = holding(detector.detect(scene), centre)
        if face is not None:
            detected += 1
            crops["aligned"] = crop_faces(scene, [face], align=True)[0]
            crops["unaligned"] = crop_faces(scene, [face], align=False)[0]
        names = list(crops)
        right = {
            n: p["emotion"] == sample.label
            for n, p in zip(names, predictor.predict_faces([crops[n] for n in names]), strict=True)
        }
        for name, ok in right.items():
            correct[name] += ok
        if face is not None:
            plain_detected += right["plain"]
            # The faces one arm gets right and the other wrong: what a paired (sign) test compares.
            only["aligned"] += right["aligned"] and not right["unaligned"]
            only["unaligned"] += right["unaligned"] and not right["aligned"]
    n = len(samples)
    return {
        "faces": n,
        "detected": detected,
        "detection_rate": detected / n,
        "accuracy": {arm: correct[arm] / n for arm in ARMS},
        "only_right": only,
        "sign_test_p": sign_test(only["aligned"], only["unaligned"]),
        "accuracy_detected": {
            "aligned": correct["aligned"] / detected,
            "unaligned": correct["unaligned"] / detected,
            "plain": plain_detected / detected,
        }
        if detected
        else {},
    }


def sign_test(wins: int, losses: int) -> float:
    """Two-sided p-value of ``wins`` against ``losses`` if either arm were as likely to win (ties left out)."""
    n, k = wins + losses, min(wins, losses)
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def markdown(results: dict[str, Any], command: str) -> str:
    lines = [
        "# Alignment on pasted, turned FER2013 PublicTest faces",
        "",
        f"`{command}` (bench/alignment.py; figures in alignment.json). Model: `models/fer-compact.pt`.",
        "",
        "Accuracy over every face (a missed face counts as wrong), then over the faces the detector found.",
        "",
        "| condition | faces | detected | aligned | unaligned | plain 48x48 (ceiling) "
        "| detected: aligned | detected: unaligned | detected: plain | only aligned right / only unaligned right (sign test p) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in results["conditions"].items():
        acc, det = row["accuracy"], row["accuracy_detected"]
        lines.append(
            f"| {name} | {row['faces']} | {row['detected']} ({row['detection_rate']:.1%}) | {acc['aligned']:.1%} | "
            f"{acc['unaligned']:.1%} | {acc['plain']:.1%} | {det.get('aligned', 0):.1%} | {det.get('unaligned', 0):.1%} | "
            f"{det.get('plain', 0):.1%} | {row['only_right']['aligned']} / {row['only_right']['unaligned']} "
            f"(p = {row['sign_test_p']:.2f}) |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--faces", type=positive_int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "alignment.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    samples = load_faces(args.data, args.faces, args.seed)
    detector, predictor = FaceDetector(), Predictor.from_uri(str(BUNDLED_MODEL))
    conditions = {}
    for name, turned in (("turned_10_30deg", True), ("upright", False)):
        conditions[name] = run_condition(samples, turned, detector, predictor, args.seed)
        log.info("%s: %s", name, conditions[name])
    results = {"conditions": conditions, "model": str(BUNDLED_MODEL.relative_to(ROOT)), "seed": args.seed}
    command = command_line("bench.alignment", argv)
    write_result(args.output, "alignment", results, command)
    args.output.with_suffix(".md").write_text(markdown(results, command))
    print(markdown(results, command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
