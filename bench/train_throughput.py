"""Training throughput and single-face inference latency of every registered model.

    python -m bench.train_throughput                      # all models, auto device/precision
    python -m bench.train_throughput --models compact,vgg --device cpu --precision fp32
    python -m bench.train_throughput --config configs/compact.yaml --models compact

Each training step is the project's own: ``make_batch`` (normalise + augment on the device),
forward/backward under the same autocast, ``soft_cross_entropy``, the optimiser and LR
scheduler from ``training.train``, and the same per-step host syncs as ``train_one_epoch``.
The input is random uint8 faces, so no dataset is needed: the step costs the same.

Latency is one 48x48 uint8 face through ``training.evaluate.predict_probs`` (normalise,
forward, softmax) on the CPU with one thread, eval mode, fp32: what a single-request CPU
server pays per face.

Writes ``bench/results/train_throughput-<device>.json`` (``--output`` overrides) and prints
a markdown table.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any, cast

import torch

from bench.machine import RESULTS_DIR, command_line, write_result
from bench.timing import positive_int, summarize, timed
from fercore.labels import CLASS_NAMES
from fercore.models import count_parameters, create_model, list_models
from fercore.preprocessing import PreprocessSpec
from training import runtime
from training.config import TrainConfig, load_yaml
from training.evaluate import predict_probs
from training.train import augment_config, build_model_for, build_optimizer, build_scheduler, make_batch, train_step

log = logging.getLogger(__name__)

FER2013_TRAIN_IMAGES = 28_709  # the Training split; an epoch drops the ragged last batch


def model_config(name: str, base: dict[str, Any], batch_size: int | None, device: str, precision: str) -> TrainConfig:
    """The recipe ``base`` (a TrainConfig mapping) applied to model ``name``.

    The recipe's ``model_kwargs`` belong to the recipe's model, so other models get their
    defaults. Pretrained weights only change values, not cost, and are never downloaded here.
    """
    data = dict(base)
    if data.get("model", name) != name:
        data["model_kwargs"] = {}
    data.update(model=name, pretrained=False, device=device, precision=precision)
    if batch_size is not None:
        data["batch_size"] = batch_size
    return TrainConfig.from_dict(data)


def train_steps(cfg: TrainConfig, device: torch.device, bf16: bool, steps: int, warmup: int, seed: int) -> dict[str, Any]:
    """Time ``steps`` training steps of ``cfg.model`` on random faces (after ``warmup``)."""
    torch.manual_seed(seed)
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    spec = PreprocessSpec()
    model, _ = build_model_for(cfg)
    model = model.to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    step_model = cast(torch.nn.Module, torch.compile(model)) if cfg.compile else model  # as training.train runs it
    n = cfg.batch_size * (steps + warmup)
    images = torch.randint(0, 256, (n, spec.input_size, spec.input_size), dtype=torch.uint8, device=device)  # (N, 48, 48)
    labels = torch.randint(0, len(CLASS_NAMES), (n,), device=device)
    optimizer = build_optimizer(cfg, model)
    scheduler = build_scheduler(cfg, optimizer, steps + warmup)
    aug = augment_config(cfg)
    perm = torch.randperm(n, device=device, generator=gen)
    step = 0

    def one_step() -> None:
        # training.train_one_epoch's loop body, minus its running averages.
        nonlocal step
        batch = make_batch(images, labels, perm[step * cfg.batch_size : (step + 1) * cfg.batch_size], cfg, aug, spec, gen)
        step += 1
        loss, logits = train_step(step_model, None, batch, optimizer, scheduler, cfg, bf16)
        loss.item()  # train_one_epoch reads the loss and the hit count every step: two host syncs
        int((logits.argmax(1) == batch.hard).sum())

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = timed(one_step, steps, warmup, device)
    stats = summarize(times)
    images_per_s = cfg.batch_size / (stats["median_ms"] / 1000.0)
    return {
        "step": stats,
        "images_per_s": images_per_s,
        "fer2013_epoch_s": (FER2013_TRAIN_IMAGES // cfg.batch_size) * stats["median_ms"] / 1000.0,
        "parameters": count_parameters(model),
        "peak_device_memory_mb": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
    }


def inference_latency(name: str, model_kwargs: dict[str, Any], runs: int, warmup: int = 5) -> dict[str, float]:
    """Single-face CPU latency of a fresh ``name`` model: one thread, eval mode, fp32."""
    spec = PreprocessSpec()
    model = create_model(name, **model_kwargs).eval().to(memory_format=torch.channels_last)
    face = torch.randint(0, 256, (1, spec.input_size, spec.input_size), dtype=torch.uint8)  # (1, 48, 48)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        times = timed(lambda: predict_probs(model, face, spec), runs, warmup, torch.device("cpu"))
    finally:
        torch.set_num_threads(threads)
    return summarize(times)


def bench_model(name: str, cfg: TrainConfig, device: torch.device, bf16: bool, args: argparse.Namespace) -> dict[str, Any]:
    log.info("%s: %d+%d training steps of %d on %s (bf16 %s)", name, args.warmup, args.steps, cfg.batch_size, device, bf16)
    row: dict[str, Any] = {"model": name, "model_kwargs": cfg.model_kwargs, "batch_size": cfg.batch_size}
    try:
        row.update(train_steps(cfg, device, bf16, args.steps, args.warmup, args.seed))
    except torch.cuda.OutOfMemoryError as exc:  # one model too big for this card should not end the sweep
        log.warning("%s: out of device memory at batch %d", name, cfg.batch_size)
        row["error"] = f"out of memory: {str(exc).splitlines()[0]}"
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()
    row["inference_1thread"] = inference_latency(name, cfg.model_kwargs, args.latency_runs)
    return row


def markdown_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| model | params (M) | step ms p10 / median / p90 | images/s | s per FER2013 epoch | 1-face CPU latency ms (1 thread) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        latency = f"{r['inference_1thread']['median_ms']:.2f}"
        if "error" in r:
            lines.append(f"| {r['model']} | | {r['error']} | | | {latency} |")
            continue
        s = r["step"]
        lines.append(
            f"| {r['model']} | {r['parameters'] / 1e6:.2f} | {s['p10_ms']:.1f} / {s['median_ms']:.1f} / {s['p90_ms']:.1f} "
            f"| {r['images_per_s']:.0f} | {r['fer2013_epoch_s']:.0f} | {latency} |"
        )
    return "\n".join(lines)


def parse_models(value: str) -> list[str]:
    names = [m.strip() for m in value.split(",") if m.strip()]
    unknown = [m for m in names if m not in list_models()]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown model(s) {', '.join(unknown) or '(none given)'}; available: {', '.join(list_models())}"
        )
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=parse_models, default=None, help="comma-separated registry names (default: all)")
    parser.add_argument("--config", help="training recipe YAML (configs/*.yaml) for augmentation/optimiser settings")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    parser.add_argument("--batch-size", type=positive_int, default=None, help="default: the recipe's, else 128")
    parser.add_argument("--steps", type=positive_int, default=20, help="timed training steps per model")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (allocator, cuDNN autotuning)")
    parser.add_argument("--latency-runs", type=positive_int, default=50, help="timed single-face inferences per model")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for training; 0 = all this process may use")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, help="JSON file (default: bench/results/train_throughput-<device>.json)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    threads = runtime.configure_threads(args.threads)
    device = runtime.pick_device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    bf16 = runtime.use_bf16(args.precision, device)
    base = load_yaml(args.config) if args.config else {}
    models = args.models or list_models()

    rows = []
    for name in models:
        cfg = model_config(name, base, args.batch_size, args.device, args.precision)
        rows.append(bench_model(name, cfg, device, bf16, args))

    base_cfg = model_config(models[0], base, args.batch_size, args.device, args.precision)
    settings = {
        "device": str(device),
        "precision": "bf16" if bf16 else "fp32",
        "threads": threads,
        "steps": args.steps,
        "warmup": args.warmup,
        "latency_runs": args.latency_runs,
        "config": args.config,
        "recipe": {k: v for k, v in base_cfg.to_dict().items() if k not in ("model", "model_kwargs")},
    }
    output = args.output or RESULTS_DIR / f"train_throughput-{device.type}.json"
    write_result(output, "train_throughput", {"settings": settings, "models": rows}, command_line("bench.train_throughput", argv))
    print(markdown_table(rows))
    print(f"\n{device}, {settings['precision']}, {threads} CPU threads; written to {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
