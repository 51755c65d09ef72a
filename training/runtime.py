"""Device, precision and thread choices shared by training, evaluation and benchmarks."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

import torch

from fercore.cpus import available_cpus

log = logging.getLogger(__name__)


def pick_device(name: str = "auto") -> torch.device:
    if name != "auto":
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def cpu_bf16_is_fast() -> bool:
    """bf16 matmuls/convs are only faster than fp32 on CPUs with native bf16 (AVX512-BF16, AMX)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def use_bf16(precision: str, device: torch.device) -> bool:
    if precision == "fp32":
        return False
    if precision == "bf16":
        return True
    return device.type == "cuda" or (device.type == "cpu" and cpu_bf16_is_fast())


def autocast(device: torch.device, bf16: bool) -> contextlib.AbstractContextManager[object]:
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


def configure_threads(num_threads: int = 0) -> int:
    n = num_threads or available_cpus()
    torch.set_num_threads(n)
    return n


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)
