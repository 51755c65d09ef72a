"""How long FER2013 takes to become a training tensor.

    python -m bench.data_loading                                  # ../shared/data/fer2013.zip
    python -m bench.data_loading --data /path/to/fer2013.csv --device cuda --repeats 5

Three stages of ``training.data.load_fer2013`` and ``training.train.run``:

* cold: first call with an empty cache (a fresh temporary ``FER_CACHE_DIR``): hash the
  source, decode and preprocess every image, write the ``.npz`` cache;
* warm: later calls with that cache: hash the source, read the ``.npz``;
* to device: the train split as uint8/int64 tensors on ``--device`` (on the CPU
  ``torch.from_numpy(...).to("cpu")`` copies nothing, so this is ~0 there).

Writes ``bench/results/data_loading.json`` (``--output`` overrides) and prints a summary.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from bench.machine import RESULTS_DIR, command_line, write_result
from bench.timing import positive_int, timed
from fercore.preprocessing import PreprocessSpec
from training import runtime
from training.data import FerData, Split, load_fer2013

log = logging.getLogger(__name__)

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "fer2013.zip"


@contextlib.contextmanager
def cache_dir_env(path: Path) -> Iterator[None]:
    """Point ``FER_CACHE_DIR`` at ``path`` for the duration, then restore it."""
    old = os.environ.get("FER_CACHE_DIR")
    os.environ["FER_CACHE_DIR"] = str(path)
    try:
        yield
    finally:
        if old is None:
            del os.environ["FER_CACHE_DIR"]
        else:
            os.environ["FER_CACHE_DIR"] = old


def time_load(source: Path, spec: PreprocessSpec) -> tuple[float, FerData]:
    start = time.perf_counter()
    data = load_fer2013(source, spec)
    return time.perf_counter() - start, data


def time_to_device(split: Split, device: torch.device, repeats: int) -> list[float]:
    """Seconds to turn ``split`` into device tensors, as ``training.train.run`` does; the
    untimed first move pays for CUDA initialisation."""

    def move() -> None:
        torch.from_numpy(split.images).to(device)  # uint8 (N, 48, 48)
        torch.from_numpy(split.labels).to(device)

    return timed(move, repeats, warmup=1, device=device)


def stage(seconds: list[float]) -> dict[str, Any]:
    return {"runs_s": seconds, "median_s": statistics.median(seconds)}


def bench_loading(source: Path, device: torch.device, cold_repeats: int, warm_repeats: int) -> dict[str, Any]:
    spec = PreprocessSpec()
    cold: list[float] = []
    warm: list[float] = []
    with tempfile.TemporaryDirectory(prefix="fer-bench-cache-") as tmp:
        for i in range(cold_repeats):
            with cache_dir_env(Path(tmp) / f"cold-{i}"):
                seconds, data = time_load(source, spec)
            log.info("cold load %d/%d: %.2fs", i + 1, cold_repeats, seconds)
            cold.append(seconds)
        cache = Path(tmp) / "cold-0"
        cache_bytes = sum(f.stat().st_size for f in cache.rglob("*.npz"))
        with cache_dir_env(cache):
            for i in range(warm_repeats):
                seconds, data = time_load(source, spec)
                log.info("warm load %d/%d: %.3fs", i + 1, warm_repeats, seconds)
                warm.append(seconds)
    train = data["train"]
    moves = time_to_device(train, device, warm_repeats)
    images = sum(len(s) for s in data.splits.values())
    train_bytes = train.images.nbytes + train.labels.nbytes
    move_s = statistics.median(moves)
    return {
        "source": str(source),
        "source_mb": source.stat().st_size / 2**20 if source.is_file() else None,
        "splits": {name: len(split) for name, split in data.splits.items()},
        "cache_mb": cache_bytes / 2**20,
        "cold": {**stage(cold), "images_per_s": images / statistics.median(cold)},
        "warm": stage(warm),
        "to_device": {
            "device": str(device),
            "train_mb": train_bytes / 2**20,
            "runs_s": moves,
            "median_ms": move_s * 1000.0,
            # None on the CPU: no copy is made, so there is no bandwidth to speak of.
            "gb_per_s": train_bytes / move_s / 1e9 if device.type != "cpu" and move_s > 0 else None,
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help=f"zip, folder or fer2013.csv (default: {DEFAULT_DATA})")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--repeats", type=positive_int, default=3, help="warm loads and device moves (median reported)")
    parser.add_argument("--cold-repeats", type=positive_int, default=1, help="cold loads, each into a fresh empty cache")
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "data_loading.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    if not args.data.exists():
        parser.error(f"--data {args.data}: no such file or folder")
    device = runtime.pick_device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    results = bench_loading(args.data, device, args.cold_repeats, args.repeats)
    write_result(args.output, "data_loading", results, command_line("bench.data_loading", argv))
    move = results["to_device"]
    print(
        f"{args.data}: {results['splits']}\n"
        f"cold (decode + cache write): {results['cold']['median_s']:.2f}s ({results['cold']['images_per_s']:.0f} images/s)\n"
        f"warm (cached):               {results['warm']['median_s']:.3f}s\n"
        f"train split to {move['device']}:   {move['median_ms']:.3f} ms ({move['train_mb']:.1f} MB)\n"
        f"written to {args.output}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
