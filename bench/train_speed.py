"""Which runtime options train the compact network fastest here? Measured side by side, in rounds.

    python -m bench.train_speed                          # configs/compact_80.yaml's recipe, every option
    python -m bench.train_speed --rounds 5 --steps 10

Each option is :func:`bench.train_throughput.train_steps` (the project's own training step:
``make_batch``'s augmentation on the device, forward and backward under the same autocast, the
optimiser, the same host syncs) with one runtime setting changed from the recipe's default
(bf16 autocast where the CPU has native bf16, channels-last, eager, every core): precision, memory
format, ``torch.compile``, thread count. The options run in turn, ``--rounds`` times, so that
whatever else the machine is doing falls on all of them alike; each option's figure is the median
of its rounds, with its ratio to the default measured in the same rounds.

Data loading is not an option here: training holds the whole decoded dataset on the device as
uint8 and augments batches there (:mod:`training.data`, :mod:`training.augment`), so there is no
DataLoader and no worker process to compare (``bench.data_loading`` times the decode and cache).
Writes ``bench/results/train_speed-<device>.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

from bench.machine import RESULTS_DIR, command_line, write_result
from bench.timing import positive_int
from bench.train_throughput import model_config, train_steps
from training import runtime
from training.config import load_yaml

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_RECIPE = ROOT / "configs" / "compact_80.yaml"


def options(cpus: int) -> dict[str, dict[str, Any]]:
    """Each option's changes to the recipe; "default" is what training.train runs."""
    out: dict[str, dict[str, Any]] = {
        "default": {},
        "fp32": {"precision": "fp32"},
        "bf16_nchw": {"channels_last": False},
        "fp32_nchw": {"precision": "fp32", "channels_last": False},
        "compile": {"compile": True},
    }
    if cpus > 1:
        out["threads_1"] = {"num_threads": 1}
    return out


def run_option(base: dict[str, Any], change: dict[str, Any], steps: int, warmup: int, device: torch.device) -> float:
    """Images per second of one option (its own threads, then every core again)."""
    recipe = {**base, **change}
    cfg = model_config("compact", recipe, None, device.type, recipe.get("precision", "auto"))
    threads = runtime.configure_threads(cfg.num_threads)
    try:
        bf16 = runtime.use_bf16(cfg.precision, device)
        return float(train_steps(cfg, device, bf16, steps, warmup, seed=0)["images_per_s"])
    finally:
        runtime.configure_threads(0)
        log.debug("ran on %d threads", threads)


def markdown_table(rows: dict[str, dict[str, Any]]) -> str:
    lines = ["| option | changes | images/s (median) | vs default | s per FER2013 epoch |", "|---|---|---:|---:|---:|"]
    for name, row in rows.items():
        changes = ", ".join(f"{k}={v}" for k, v in row["changes"].items()) or "as training.train runs"
        lines.append(
            f"| {name} | {changes} | {row['images_per_s']:.0f} | {row['ratio_to_default']:.2f} | {row['fer2013_epoch_s']:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=DEFAULT_RECIPE, help="training recipe YAML")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--rounds", type=positive_int, default=3, help="times each option runs, in turn")
    parser.add_argument("--steps", type=positive_int, default=12, help="timed training steps per round")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compile's tracing among them)")
    parser.add_argument("--batch-size", type=positive_int, help="default: the recipe's")
    parser.add_argument("--options", type=lambda v: [o for o in v.split(",") if o], help="a subset, e.g. default,fp32")
    parser.add_argument("--output", type=Path, help="default: bench/results/train_speed-<device>.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    device = torch.device(args.device)
    base = load_yaml(str(args.config))
    if args.batch_size:
        base["batch_size"] = args.batch_size
    cpus = runtime.configure_threads(0)
    chosen = options(cpus)
    if args.options:
        unknown = set(args.options) - chosen.keys()
        if unknown or "default" not in args.options:
            parser.error(f"--options: choose from {', '.join(chosen)}, default included (got {', '.join(args.options)})")
        chosen = {name: chosen[name] for name in args.options}
    samples: dict[str, list[float]] = {name: [] for name in chosen}
    for r in range(args.rounds):
        for name, change in chosen.items():
            samples[name].append(run_option(base, change, args.steps, args.warmup, device))
            log.info("round %d/%d  %-10s %.0f images/s", r + 1, args.rounds, name, samples[name][-1])
    epoch = 28_709 // int(base.get("batch_size", 128)) * int(base.get("batch_size", 128))
    rows = {
        name: {
            "changes": chosen[name],
            "images_per_s": statistics.median(values),
            "rounds": values,
            "ratio_to_default": statistics.median(v / d for v, d in zip(values, samples["default"], strict=True)),
            "fer2013_epoch_s": epoch / statistics.median(values),
        }
        for name, values in samples.items()
    }
    settings = {"config": str(args.config.relative_to(ROOT)) if args.config.is_relative_to(ROOT) else str(args.config)}
    settings.update(device=str(device), cpus=str(cpus), rounds=str(args.rounds), steps=str(args.steps))
    output = args.output or RESULTS_DIR / f"train_speed-{device.type}.json"
    write_result(output, "train_speed", {"settings": settings, "options": rows}, command_line("bench.train_speed", argv))
    print(markdown_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
