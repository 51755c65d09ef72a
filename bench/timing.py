"""Timing helpers shared by the benchmark scripts."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np
import torch


def sync(device: torch.device) -> None:
    """Wait for queued device work, so a timer read afterwards covers it."""
    if device.type == "cuda":
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


def positive_int(value: str) -> int:
    """argparse type for counts such as --steps and --repeats."""
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n
