"""One classification in process: the PyTorch network against its ONNX exports, side by side.

    python -m bench.inference                       # the bundled model, 1 and all threads
    python -m bench.inference --threads 1 --rounds 10

Three runtimes of the same network: ``pytorch`` (the checkpoint, eager, channels-last,
``inference_mode``: what the service ran before ONNX), ``onnx-fp32`` and ``onnx-int8`` (its exports,
run by ONNX Runtime as the service runs them, :class:`fercore.classifier.OnnxClassifier`). Each is
given the 48x48 crop of ``bench.service``, preprocessed once (``preprocess`` is timed apart, it is
the same code for all). Timed per thread count: the forward pass and softmax over batches of
``--batch-sizes`` faces, per face. Measurements are interleaved: each round runs every one in a
shuffled order, ``--calls`` calls each; figures are medians over all rounds, so a machine whose load
changes during the run slows all alike. The runtimes' probabilities are compared on random faces.

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

from app.images import decode_image
from app.settings import BUNDLED_MODEL
from bench.machine import RESULTS_DIR, command_line, write_result
from bench.service import MAX_IMAGE_PIXELS, bench_images, parse_concurrency
from bench.timing import positive_int
from fercore.calibration import softmax
from fercore.checkpoint import build_model, load_checkpoint
from fercore.classifier import OnnxClassifier
from fercore.cpus import available_cpus

log = logging.getLogger(__name__)

Forward = Callable[[np.ndarray], np.ndarray]  # model input (N, 1, S, S) -> probabilities (N, C)


def runtimes(checkpoint: Path, fp32: Path, int8: Path, threads: int) -> dict[str, Forward]:
    """The three runtimes of one network, each with ``threads`` intra-op threads."""
    torch.set_num_threads(threads)
    model = build_model(load_checkpoint(checkpoint)).to(memory_format=torch.channels_last)

    def pytorch(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            logits = model(torch.from_numpy(x).contiguous(memory_format=torch.channels_last))
        return softmax(logits.numpy())

    return {
        "pytorch": pytorch,
        "onnx-fp32": OnnxClassifier.load(fp32, threads).probabilities,
        "onnx-int8": OnnxClassifier.load(int8, threads).probabilities,
    }


def interleaved(
    calls: dict[str, Callable[[], object]], rounds: int, per_round: dict[str, int], warmup: int
) -> dict[str, list[float]]:
    """Seconds of each call of each measurement, in rounds that run every measurement in a shuffled order."""
    for fn in calls.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in calls}
    rng = random.Random(0)
    for _ in range(rounds):
        for name in rng.sample(sorted(calls), len(calls)):
            for _ in range(per_round[name]):
                start = time.perf_counter()
                calls[name]()
                samples[name].append(time.perf_counter() - start)
    return samples


def run(paths: tuple[Path, Path, Path], threads: int, args: argparse.Namespace, x1: np.ndarray) -> dict[str, Any]:
    """Per-face forward time of every runtime and batch size, with ``threads`` threads."""
    forwards = runtimes(*paths, threads=threads)
    batches = {n: np.repeat(x1, n, axis=0) for n in args.batch_sizes}
    calls: dict[str, Callable[[], object]] = {
        f"{name}/{n}": functools.partial(forward, batch) for name, forward in forwards.items() for n, batch in batches.items()
    }
    counts = {name: max(2, args.calls // int(name.split("/")[1])) for name in calls}
    samples = interleaved(calls, args.rounds, counts, args.warmup)
    per_face = {
        name: {str(n): 1000 * statistics.median(samples[f"{name}/{n}"]) / n for n in args.batch_sizes} for name in forwards
    }
    return {"threads": threads, "forward_per_face_ms": per_face}


def agreement(paths: tuple[Path, Path, Path], x: np.ndarray) -> dict[str, Any]:
    """Largest probability difference from PyTorch, and the share of faces with the same top class."""
    forwards = runtimes(*paths, threads=1)
    expected = forwards["pytorch"](x)
    return {
        name: {
            "max_abs_prob_diff": float(np.abs(forward(x) - expected).max()),
            "same_top_class": float((forward(x).argmax(1) == expected.argmax(1)).mean()),
        }
        for name, forward in forwards.items()
        if name != "pytorch"
    }


def markdown(results: dict[str, Any]) -> str:
    sizes = results["settings"]["batch_sizes"]
    lines = [
        "| threads | runtime | " + " | ".join(f"batch {n}: ms/face" for n in sizes) + " |",
        "|---:|---|" + "---:|" * len(sizes),
    ]
    for row in results["runs"]:
        for name, per_face in row["forward_per_face_ms"].items():
            lines.append(f"| {row['threads']} | {name} | " + " | ".join(f"{per_face[str(n)]:.2f}" for n in sizes) + " |")
    lines.append(f"\npreprocess (grey, resize, equalise, normalise) of one crop: {results['preprocess_ms']:.3f} ms")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=BUNDLED_MODEL, help="the int8 ONNX model (default: the bundled one)")
    parser.add_argument("--threads", type=parse_concurrency, default=None, help="thread counts, e.g. 1,2 (default: 1 and all)")
    parser.add_argument("--rounds", type=positive_int, default=20, help="interleaved rounds")
    parser.add_argument("--calls", type=positive_int, default=8, help="calls per measurement and round (batch n: calls/n, >= 2)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed calls of each measurement first")
    parser.add_argument("--batch-sizes", type=parse_concurrency, default=[1, 8, 32], help="forward batch sizes")
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "inference.json")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    int8 = args.model
    paths = (int8.with_name(int8.name.replace(".int8.onnx", ".pt")), int8.with_name(int8.name.replace(".int8", "")), int8)
    classifier = OnnxClassifier.load(int8)
    crop = decode_image(bench_images()[0].data, MAX_IMAGE_PIXELS)
    x1 = classifier.inputs([crop])
    preprocess = interleaved(
        {"preprocess": lambda: classifier.inputs([crop])}, args.rounds, {"preprocess": args.calls}, args.warmup
    )
    load_before = os.getloadavg()
    runs = [run(paths, n, args, x1) for n in (args.threads or sorted({1, available_cpus()}))]
    rng = np.random.default_rng(0)
    faces = classifier.inputs([crop]) + rng.normal(0, 0.5, (256, 1, 48, 48)).astype(np.float32)
    results = {
        "settings": {"model": str(int8), "rounds": args.rounds, "calls": args.calls, "batch_sizes": args.batch_sizes},
        "runs": runs,
        "preprocess_ms": 1000 * statistics.median(preprocess["preprocess"]),
        "agreement_with_pytorch_on_256_noisy_crops": agreement(paths, faces),
        "load_average_1_5_15min": {"start": load_before, "end": os.getloadavg()},
    }
    write_result(args.output, "inference", results, command_line("bench.inference", argv))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
