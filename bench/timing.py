"""Timing helpers shared by the benchmark scripts.

torch is imported only where a device is synchronised: ``bench.fer_baseline`` uses the CPU
helpers here from a virtual environment without torch.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch


def sync(device: torch.device) -> None:
    """Wait for queued device work, so a timer read afterwards covers it."""
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], runs: int, warmup: int, device: torch.device) -> list[float]:
    """Seconds taken by each of ``runs`` calls of ``fn``, after ``warmup`` untimed calls."""
    times = []
    for i in range(warmup + runs):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


def summarize(seconds: list[float]) -> dict[str, float]:
    """Median and 10th/90th percentiles, in milliseconds."""
    ms = np.asarray(seconds) * 1000.0
    return {
        "median_ms": float(np.median(ms)),
        "p10_ms": float(np.percentile(ms, 10)),
        "p90_ms": float(np.percentile(ms, 90)),
    }


def time_calls(fn: Callable[[], object], runs: int, warmup: int) -> list[float]:
    """Wall-clock seconds of each of ``runs`` calls of ``fn`` on the CPU, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def latency_summary(seconds: list[float]) -> dict[str, float | int]:
    """Count, p50/p90/p99, mean, min and max, in milliseconds (empty: count 0 only).

    Percentiles are interpolated: with fewer than 100 samples p99 lies between the two slowest.
    """
    if not seconds:
        return {"count": 0}
    ms = np.asarray(seconds) * 1000.0
    return {
        "count": len(ms),
        "p50_ms": float(np.percentile(ms, 50)),
        "p90_ms": float(np.percentile(ms, 90)),
        "p99_ms": float(np.percentile(ms, 99)),
        "mean_ms": float(ms.mean()),
        "min_ms": float(ms.min()),
        "max_ms": float(ms.max()),
    }


def positive_int(value: str) -> int:
    """argparse type for counts such as --steps and --repeats."""
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n
