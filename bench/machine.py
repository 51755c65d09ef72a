"""What a benchmark ran on, and how its result file is written.

Every figure under ``bench/results/`` is a JSON file made by :func:`write_result`: the
numbers, the command line that produced them and the machine they came from, so a claim in
a README can always be traced back and rerun.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fercore.cpus import available_cpus

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_gib() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 2**20, 1)  # the value is in KiB
    except OSError:
        pass
    return None


def memory_mib(pid: int | str = "self") -> dict[str, float]:
    """Resident memory of process ``pid`` now and its peak so far, in MiB (Linux ``/proc``)."""
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0]) / 1024  # the values are in KiB
    return {"rss_mib": round(fields["VmRSS"], 1), "peak_rss_mib": round(fields["VmHWM"], 1)}


def describe_host() -> dict[str, Any]:
    """CPU, memory, Python and OS of this machine, without torch: for the benchmarks that run in
    another virtual environment (``bench.fer_baseline``). The hostname is left out on purpose."""
    return {
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": available_cpus(),
        "memory_gib": _memory_gib(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def describe_machine() -> dict[str, Any]:
    """CPU, memory, accelerator and library versions of this process's machine.

    The hostname is left out on purpose: result files are committed.
    """
    # Imported here, not at the top: bench.fer_baseline imports this module where torch is absent.
    import torch

    from training import runtime

    cuda = torch.cuda.is_available()
    return {
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": available_cpus(),  # the affinity mask, capped by a cgroup CPU quota
        "memory_gib": _memory_gib(),
        "cpu_bf16_fast": runtime.cpu_bf16_is_fast(),
        "torch_threads": torch.get_num_threads(),
        "cuda_device": torch.cuda.get_device_name(0) if cuda else None,
        "cuda_version": torch.version.cuda if cuda else None,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def command_line(module: str, argv: list[str] | None) -> str:
    """The command that reruns ``module`` with ``argv`` (``sys.argv[1:]`` when None)."""
    args = sys.argv[1:] if argv is None else argv
    return shlex.join(["python", "-m", module, *args])


def write_result(
    path: str | Path, name: str, data: dict[str, Any], command: str | None = None, machine: dict[str, Any] | None = None
) -> Path:
    """Write benchmark ``name``'s ``data`` with the machine and the command line to ``path``.

    ``command`` defaults to this process's ``sys.argv``; scripts whose ``main(argv)`` may be
    called from Python pass :func:`command_line` instead, so the file names the real arguments.
    ``machine`` defaults to :func:`describe_machine` (which needs torch).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "benchmark": name,
        "machine": describe_machine() if machine is None else machine,
        "command": " ".join(sys.argv) if command is None else command,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "results": data,
    }
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path
