"""Where the time of one classification goes, in process: the plain network against the one
:mod:`fercore.optimize` rewrites (``OPTIMIZE_MODEL``), side by side.

    python -m bench.inference                       # models/fer-compact.pt, 1 and all torch threads
    python -m bench.inference --threads 1 --rounds 10

Both predictors load ``--model`` through ``app.model.Predictor`` (``optimize=False`` / ``True``) and
are given the 48x48 crop of ``bench.service``. Timed, per torch thread count:

* ``predict_faces``: the whole of what the service does for a crop after decoding it;
* its stages: ``preprocess`` (``prepare_face``: grey, resize, equalise; then ``normalize``), the
  ``forward`` pass alone, ``postprocess`` (softmax, ``tolist``, the per-face dicts);
* the forward pass over batches of ``--batch-sizes`` faces, per face: what micro-batching can gain.

Configurations are interleaved: each round runs every measurement of both predictors in a
shuffled order, ``--calls`` calls each, and figures are medians over all rounds, so a machine
whose load changes during the run slows both alike. Both predictors' class probabilities are
compared on the crop and on random faces (largest absolute difference).

Torch is loaded before :mod:`app` sets its default ``OMP_WAIT_POLICY``, so with several threads
these figures use the shell's policy (OpenMP's own, spinning, unless it is set).

Writes ``bench/results/inference.json`` (``--output``) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from app.images import decode_image
from app.model import Prediction, Predictor
from app.settings import BUNDLED_MODEL, available_cpus
from bench.machine import RESULTS_DIR, command_line, write_result
from bench.service import MAX_IMAGE_PIXELS, bench_images, parse_concurrency
from bench.timing import positive_int
from fercore.preprocessing import PreprocessSpec, normalize, prepare_face

log = logging.getLogger(__name__)

VARIANTS = ("plain", "optimized")  # OPTIMIZE_MODEL=false, true


def interleaved(
    calls: dict[str, Callable[[], object]], rounds: int, per_round: dict[str, int], warmup: int
) -> dict[str, list[float]]:
    """Seconds of each call of each of ``calls``: ``rounds`` rounds, each running every one of them
    (``per_round[name]`` times), in a new random order per round."""
    for call in calls.values():
        for _ in range(warmup):
            call()
    samples: dict[str, list[float]] = {name: [] for name in calls}
    order = list(calls)
    rng = random.Random(0)
    for _ in range(rounds):
        rng.shuffle(order)
        for name in order:
            call = calls[name]
            for _ in range(per_round[name]):
                start = time.perf_counter()
                call()
                samples[name].append(time.perf_counter() - start)
    return samples


def _batch(name: str) -> int:
    """The batch size a measurement's name ends with (``.../forward_batch_8``), else 1."""
    _, _, tail = name.rpartition("forward_batch_")
    return int(tail) if tail.isdigit() else 1


def _ms(seconds: list[float]) -> float:
    return statistics.median(seconds) * 1000.0


def _forward(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(x)


def _preprocess(crop: Image.Image, spec: PreprocessSpec) -> torch.Tensor:
    """What ``Predictor.predict_faces`` does to one crop before the forward pass."""
    pixels = np.stack([prepare_face(crop, spec)])
    return normalize(torch.from_numpy(pixels), spec).contiguous(memory_format=torch.channels_last)


def _postprocess(predictor: Predictor, logits: torch.Tensor) -> list[Prediction]:
    """What ``Predictor.predict_faces`` does after the forward pass."""
    return [predictor._postprocess(row) for row in torch.softmax(logits.float(), dim=1).tolist()]


def measurements(predictors: dict[str, Predictor], batch_sizes: list[int]) -> dict[str, Callable[[], object]]:
    """What is timed, by ``<variant>/<measurement>``."""
    crop = decode_image(bench_images()[0].data, MAX_IMAGE_PIXELS)  # as the service decodes it
    calls: dict[str, Callable[[], object]] = {}
    for variant, predictor in predictors.items():
        spec = predictor.spec
        pixels = prepare_face(crop, spec)
        faces = np.stack([pixels] * max(batch_sizes))
        batches = {
            n: normalize(torch.from_numpy(faces[:n]), spec).contiguous(memory_format=torch.channels_last) for n in batch_sizes
        }
        logits = _forward(predictor.model, batches[1])
        calls[f"{variant}/predict_faces"] = functools.partial(predictor.predict_faces, [crop])
        calls[f"{variant}/preprocess"] = functools.partial(_preprocess, crop, spec)
        calls[f"{variant}/postprocess"] = functools.partial(_postprocess, predictor, logits)
        for n, x in batches.items():
            calls[f"{variant}/forward_batch_{n}"] = functools.partial(_forward, predictor.model, x)
    return calls


def agreement(predictors: dict[str, Predictor], faces: int = 64) -> dict[str, float]:
    """Largest difference between the two predictors' probabilities: on the crop, on random faces."""
    plain, optimized = predictors["plain"], predictors["optimized"]
    crop = decode_image(bench_images()[0].data, MAX_IMAGE_PIXELS)
    rng = np.random.default_rng(0)
    size = plain.spec.input_size
    randoms = [Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8), mode="L") for _ in range(faces)]

    def difference(images: list[Image.Image]) -> float:
        a, b = plain.predict_faces(images), optimized.predict_faces(images)
        return max(abs(x["scores"][c] - y["scores"][c]) for x, y in zip(a, b, strict=True) for c in x["scores"])

    same_labels = all(
        x["emotion"] == y["emotion"] for x, y in zip(plain.predict_faces(randoms), optimized.predict_faces(randoms), strict=True)
    )
    return {
        "crop_max_abs_diff": difference([crop]),
        "random_faces": faces,
        "random_faces_max_abs_diff": difference(randoms),
        "random_faces_same_emotion": same_labels,
    }


def run(model: Path, threads: int, rounds: int, per_round: int, warmup: int, batch_sizes: list[int]) -> dict[str, Any]:
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        predictors = {variant: Predictor.from_uri(str(model), optimize=variant == "optimized") for variant in VARIANTS}
        calls = measurements(predictors, batch_sizes)
        # A batch of n faces takes about n times as long: fewer calls of it per round.
        counts = {name: max(2, per_round // _batch(name)) for name in calls}
        samples = interleaved(calls, rounds, counts, warmup)
    finally:
        torch.set_num_threads(previous)
    out: dict[str, Any] = {"threads": threads, "calls": {name: len(s) for name, s in samples.items()}}
    for variant in VARIANTS:
        mine = {name.split("/", 1)[1]: _ms(s) for name, s in samples.items() if name.startswith(f"{variant}/")}
        out[variant] = {
            "predict_faces_ms": mine["predict_faces"],
            "preprocess_ms": mine["preprocess"],
            "forward_ms": mine["forward_batch_1"],
            "postprocess_ms": mine["postprocess"],
            "forward_per_face_ms": {str(n): mine[f"forward_batch_{n}"] / n for n in batch_sizes},
        }
    plain, optimized = out["plain"], out["optimized"]
    out["ratio_optimized_to_plain"] = {
        "predict_faces": optimized["predict_faces_ms"] / plain["predict_faces_ms"],
        "forward": optimized["forward_ms"] / plain["forward_ms"],
        "forward_per_face": {
            n: optimized["forward_per_face_ms"][n] / plain["forward_per_face_ms"][n] for n in plain["forward_per_face_ms"]
        },
    }
    return out


def markdown(results: dict[str, Any]) -> str:
    lines = [
        "| threads | model | predict_faces ms | preprocess ms | forward ms | postprocess ms | forward ms per face, by batch |",
        "|---:|---|---:|---:|---:|---:|---|",
    ]
    for row in results["runs"]:
        for variant in VARIANTS:
            r = row[variant]
            per_face = ", ".join(f"{n}: {ms:.2f}" for n, ms in r["forward_per_face_ms"].items())
            lines.append(
                f"| {row['threads']} | {variant} | {r['predict_faces_ms']:.2f} | {r['preprocess_ms']:.3f} "
                f"| {r['forward_ms']:.2f} | {r['postprocess_ms']:.3f} | {per_face} |"
            )
        ratio = row["ratio_optimized_to_plain"]
        lines.append(
            f"| {row['threads']} | optimized / plain | {ratio['predict_faces']:.3f} | | {ratio['forward']:.3f} | | "
            + ", ".join(f"{n}: {r:.3f}" for n, r in ratio["forward_per_face"].items())
            + " |"
        )
    agree = results["agreement"]
    lines += [
        "",
        f"Largest probability difference, optimized vs plain: crop {agree['crop_max_abs_diff']:.1e}, "
        f"{agree['random_faces']} random faces {agree['random_faces_max_abs_diff']:.1e} "
        f"(same emotion for all: {agree['random_faces_same_emotion']})",
    ]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=BUNDLED_MODEL, help="checkpoint (default: the bundled one)")
    parser.add_argument(
        "--threads", type=parse_concurrency, default=None, help="torch thread counts, e.g. 1,2 (default: 1 and all CPUs)"
    )
    parser.add_argument("--rounds", type=positive_int, default=30, help="interleaved rounds")
    parser.add_argument(
        "--calls", type=positive_int, default=6, help="calls of each measurement per round (a batch of n: calls/n, at least 2)"
    )
    parser.add_argument("--warmup", type=int, default=10, help="untimed calls of each measurement first")
    parser.add_argument("--batch-sizes", type=parse_concurrency, default=[1, 2, 4, 8, 16, 32], help="forward batch sizes")
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "inference.json")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    threads = args.threads or sorted({1, available_cpus()})
    batch_sizes = sorted({1, *args.batch_sizes})
    load_before = os.getloadavg()  # other work on the machine, for the record
    runs = []
    for n in threads:
        log.info("%d thread(s): %d rounds of %d calls per measurement", n, args.rounds, args.calls)
        runs.append(run(args.model, n, args.rounds, args.calls, args.warmup, batch_sizes))
    predictors = {variant: Predictor.from_uri(str(args.model), optimize=variant == "optimized") for variant in VARIANTS}
    results = {
        "settings": {
            "model": str(args.model),
            "rounds": args.rounds,
            "calls": args.calls,
            "warmup": args.warmup,
            "batch_sizes": batch_sizes,
        },
        "runs": runs,
        "load_average_1_5_15min": {"start": load_before, "end": os.getloadavg()},
        "agreement": agreement(predictors),
    }
    write_result(args.output, "inference", results, command_line("bench.inference", argv))
    print(markdown(results))
    print(f"\nwritten to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
