"""What a wider compact network would cost to serve: its int8 forward pass per face, side by side.

    python -m bench.compact_widths                   # widths 32 (the bundled model's), 40, 48
    python -m bench.compact_widths --widths 32,36 --rounds 10

The served model must stay within 2 ms per face in int8 on one thread. Accuracy needs hours of
training per width; cost needs none: each width's network (random weights: the cost does not
depend on them) is exported and quantised exactly as the exporter does for serving
(``training.export``: the TorchScript ONNX graph, static int8 QDQ calibrated on faces), then run by
ONNX Runtime on one thread, one face per call, interleaved in rounds with ``bench.inference``'s
timer so the machine's load falls on all widths alike. The ratio to the bundled width is what to
read on a busy machine; the absolute figure, on a quiet one.

Writes ``bench/results/compact_widths.json`` (``--output``) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from bench.inference import interleaved
from bench.machine import RESULTS_DIR, command_line, write_result
from bench.service import parse_concurrency
from bench.timing import positive_int
from fercore.classifier import session_options
from fercore.models import count_parameters, create_model
from training.export import _export, quantize_int8

BUNDLED_WIDTH = 32
INPUT_SIDE = 48


def served_file(width: int, folder: Path, calibration: np.ndarray) -> tuple[Path, int]:
    """The int8 ONNX file of a compact network ``width`` wide, as the exporter writes it; its parameters."""
    model = create_model("compact", 7, width=width).eval()
    fp32, int8 = folder / f"w{width}.onnx", folder / f"w{width}.int8.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's "legacy" warning
        _export(model, torch.zeros(1, 1, INPUT_SIDE, INPUT_SIDE), fp32)
    return quantize_int8(fp32, int8, calibration), count_parameters(model)


def session(path: Path) -> ort.InferenceSession:
    """The file in ONNX Runtime with the service's options (fercore.classifier), one thread."""
    return ort.InferenceSession(str(path), session_options(1), providers=["CPUExecutionProvider"])


def measure(widths: list[int], rounds: int, calls: int) -> list[dict[str, Any]]:
    rng = np.random.default_rng(0)
    calibration = rng.standard_normal((256, 1, INPUT_SIDE, INPUT_SIDE)).astype(np.float32)
    face = calibration[:1]
    with tempfile.TemporaryDirectory() as tmp:
        files = {w: served_file(w, Path(tmp), calibration) for w in widths}
        forwards: dict[str, Callable[[], object]] = {
            str(w): functools.partial(session(path).run, None, {"input": face}) for w, (path, _) in files.items()
        }
        samples = interleaved(forwards, rounds, dict.fromkeys(forwards, calls), warmup=5)
    base = statistics.median(samples[str(BUNDLED_WIDTH)]) if str(BUNDLED_WIDTH) in samples else None
    rows = []
    for width, (_, parameters) in files.items():
        ms = 1000 * statistics.median(samples[str(width)])
        rows.append(
            {
                "width": width,
                "parameters": parameters,
                "int8_forward_ms_per_face": ms,
                "ratio_to_bundled": ms / (1000 * base) if base else None,
            }
        )
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| width | parameters | int8 ms/face, 1 thread | x the bundled width |", "|---:|---:|---:|---:|"]
    for row in rows:
        ratio = f"{row['ratio_to_bundled']:.2f}" if row["ratio_to_bundled"] else "-"
        lines.append(f"| {row['width']} | {row['parameters']:,} | {row['int8_forward_ms_per_face']:.2f} | {ratio} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--widths", type=parse_concurrency, default=[32, 40, 48], help="comma-separated widths")
    parser.add_argument("--rounds", type=positive_int, default=30)
    parser.add_argument("--calls", type=positive_int, default=20, help="calls per width and round")
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "compact_widths.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = measure(args.widths, args.rounds, args.calls)
    settings = {"widths": args.widths, "rounds": args.rounds, "calls": args.calls, "threads": 1}
    write_result(
        args.output, "compact_widths", {"settings": settings, "widths": rows}, command_line("bench.compact_widths", argv)
    )
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
