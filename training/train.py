r"""Train a FER2013 model.

    python -m training.train --config configs/compact.yaml \
        --data ../shared/data/fer2013.zip --output runs/ [--epochs 10 --lr 0.02 ...]
    python -m training.train --resume runs/<run-id> --data ../shared/data/fer2013.zip

Writes ``<output>/<run-id>/`` (model.pt, last.pt, metrics.json, config.yaml, plots, model
card) and then ``<output>/latest.json``. ``--output`` may be ``gs://bucket/prefix``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
import yaml
from torch import Tensor, nn
from tqdm import tqdm

from fercore import storage
from fercore.checkpoint import Checkpoint, build_model, load_checkpoint, make_checkpoint, save_checkpoint
from fercore.labels import CLASS_NAMES
from fercore.models import ModelConfig, count_parameters
from fercore.models.transfer import load_pretrained
from fercore.preprocessing import PreprocessSpec, normalize
from training import runtime
from training.augment import AugmentConfig, augment, mix_batch
from training.config import TrainConfig, add_config_flags, resolve_config
from training.data import FerData, Split, load_fer2013, train_val_split
from training.evaluate import evaluate_split
from training.metrics import format_report, plot_confusion_matrix, plot_curves
from training.model_card import write_model_card
from training.tracking import Tracker

log = logging.getLogger(__name__)


@dataclass
class RunState:
    """What --resume needs beyond the weights; saved in every last.pt."""

    run_id: str
    epoch: int = 0  # epochs completed
    best_val_accuracy: float = -1.0
    best_epoch: int = 0
    history: list[dict[str, float]] = field(default_factory=list)


# ---------------------------------------------------------------------------- building


def build_model_for(cfg: TrainConfig) -> tuple[nn.Module, ModelConfig]:
    model_cfg = ModelConfig(cfg.model, dict(cfg.model_kwargs))
    model = model_cfg.build()
    if cfg.pretrained:
        load_pretrained(model, cfg.model, cfg.pretrained_weights)
    return model, model_cfg


def build_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    # No weight decay on biases and norm parameters (1-d tensors), as the best recipes do.
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=True)
    return torch.optim.AdamW(groups, lr=cfg.lr)


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the base LR at optimiser step ``step``: linear warm-up, then the schedule."""
    if schedule == "onecycle":  # triangular up over 30%, cosine down to ~0
        peak = max(int(0.3 * total), 1)
        if step < peak:
            return 0.04 + 0.96 * step / peak
        return 0.5 * (1 + math.cos(math.pi * (step - peak) / max(total - peak, 1)))
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))


def build_scheduler(
    cfg: TrainConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    total = cfg.epochs * steps_per_epoch
    warmup = int(cfg.warmup_epochs * steps_per_epoch)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total, warmup, cfg.schedule))


def augment_config(cfg: TrainConfig) -> AugmentConfig:
    return AugmentConfig(
        flip=cfg.flip,
        rotate_deg=cfg.rotate_deg,
        scale=(cfg.scale_min, cfg.scale_max),
        translate=cfg.translate,
        erase_prob=cfg.erase_prob,
    )


# ---------------------------------------------------------------------------- one epoch


@dataclass
class Batch:
    x: Tensor  # float (N, 1, H, W), normalised and augmented
    y: Tensor  # float (N, C), soft targets
    hard: Tensor  # int (N,), the original labels


def soft_cross_entropy(logits: Tensor, target: Tensor, smoothing: float) -> Tensor:
    return F.cross_entropy(logits.float(), target, label_smoothing=smoothing)


def distillation_loss(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """Hinton et al.'s KL term, scaled by T^2 so its gradients match the CE term's size."""
    t = temperature
    return F.kl_div(F.log_softmax(student.float() / t, -1), F.softmax(teacher.float() / t, -1), reduction="batchmean") * t * t


def make_batch(
    images: Tensor, labels: Tensor, idx: Tensor, cfg: TrainConfig, aug: AugmentConfig, spec: PreprocessSpec, gen: torch.Generator
) -> Batch:
    hard = labels[idx]
    x = augment(normalize(images[idx], spec), aug, gen)
    y = F.one_hot(hard, len(CLASS_NAMES)).float()
    x, y = mix_batch(x, y, cfg.mixup_alpha, cfg.cutmix_alpha, cfg.mix_prob, gen)
    if cfg.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return Batch(x, y, hard)


def train_step(
    model: nn.Module,
    teacher: nn.Module | None,
    batch: Batch,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LambdaLR,
    cfg: TrainConfig,
    bf16: bool,
) -> tuple[Tensor, Tensor]:
    """One optimiser step on ``batch``; returns (loss, logits), not yet synced to the host."""
    with runtime.autocast(batch.x.device, bf16):
        logits = model(batch.x)
        loss = soft_cross_entropy(logits, batch.y, cfg.label_smoothing)
        if teacher is not None:
            with torch.no_grad():
                teacher_logits = teacher(batch.x)
            kd = distillation_loss(logits, teacher_logits, cfg.distill_temperature)
            loss = (1 - cfg.distill_alpha) * loss + cfg.distill_alpha * kd
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    scheduler.step()
    return loss, logits


def train_one_epoch(
    model: nn.Module,
    teacher: nn.Module | None,
    images: Tensor,
    labels: Tensor,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LambdaLR,
    cfg: TrainConfig,
    spec: PreprocessSpec,
    gen: torch.Generator,
    bf16: bool,
    epoch: int,
) -> dict[str, float]:
    device = images.device
    aug = augment_config(cfg)
    model.train()
    perm = torch.randperm(len(labels), device=device, generator=gen)
    steps = len(labels) // cfg.batch_size  # drop the ragged last batch: BatchNorm dislikes tiny ones
    total_loss, correct, seen = 0.0, 0, 0
    start = time.perf_counter()
    bar = tqdm(
        range(steps),
        desc=f"epoch {epoch}/{cfg.epochs}",
        unit="batch",
        leave=False,
        mininterval=2.0 if sys.stderr.isatty() else 60.0,
        file=sys.stderr,
    )
    for step in bar:
        batch = make_batch(images, labels, perm[step * cfg.batch_size : (step + 1) * cfg.batch_size], cfg, aug, spec, gen)
        loss, logits = train_step(model, teacher, batch, optimizer, scheduler, cfg, bf16)
        n = len(batch.hard)
        total_loss += loss.item() * n
        correct += int((logits.argmax(1) == batch.hard).sum())
        seen += n
        bar.set_postfix(
            loss=f"{total_loss / seen:.3f}",
            acc=f"{correct / seen:.3f}",
            img_s=f"{seen / (time.perf_counter() - start):.0f}",
            refresh=False,
        )
    bar.close()
    elapsed = time.perf_counter() - start
    return {
        "train_loss": total_loss / max(seen, 1),
        "train_accuracy": correct / max(seen, 1),
        "images_per_s": seen / elapsed,
        "epoch_seconds": elapsed,
        "lr": float(scheduler.get_last_lr()[0]),
    }


# ---------------------------------------------------------------------------- a run


def new_run_id(cfg: TrainConfig) -> str:
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    return f"{stamp}-{cfg.run_name or cfg.model}-s{cfg.seed}"


def work_dir_for(output: str, run_id: str) -> Path:
    """Local folder the run writes to; for a gs:// output, a cache folder published at the end."""
    if storage.is_gcs(output):
        return storage.cache_dir() / "runs" / run_id
    return Path(output) / run_id


def training_state(
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LambdaLR,
    gen: torch.Generator,
    state: RunState,
    cfg: TrainConfig,
    output: str,
) -> dict[str, Any]:
    rng: dict[str, Any] = {"generator": gen.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return {
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": rng,
        "run": {
            "run_id": state.run_id,
            "epoch": state.epoch,
            "best_val_accuracy": state.best_val_accuracy,
            "best_epoch": state.best_epoch,
            "history": state.history,
        },
        "config": cfg.to_dict(),
        "output": output,
    }


def restore_rng(rng: dict[str, Any], gen: torch.Generator) -> None:
    gen.set_state(rng["generator"])
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def load_teacher(path: str, device: torch.device, spec: PreprocessSpec) -> nn.Module:
    ckpt = load_checkpoint(path)
    if ckpt.preprocessing != spec:
        raise ValueError(f"teacher {path} was trained with other preprocessing ({ckpt.preprocessing})")
    if ckpt.classes != CLASS_NAMES:
        raise ValueError(f"teacher {path} predicts other classes: {ckpt.classes}")
    teacher = build_model(ckpt).to(device).to(memory_format=torch.channels_last)
    for p in teacher.parameters():
        p.requires_grad_(False)
    log.info("distilling from %s (%s, val acc %s)", path, ckpt.model.name, ckpt.metrics.get("val_accuracy"))
    return teacher


def run(cfg: TrainConfig, data_source: str, output: str, resume: Checkpoint | None = None) -> dict[str, Any]:
    """Train (or continue) a run; returns the final metrics."""
    threads = runtime.configure_threads(cfg.num_threads)
    device = runtime.pick_device(cfg.device)
    bf16 = runtime.use_bf16(cfg.precision, device)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator(device=device)
    gen.manual_seed(cfg.seed)
    spec = PreprocessSpec()
    log.info("device %s (%d CPU threads), bf16 autocast %s", device, threads, bf16)

    t0 = time.perf_counter()
    data = load_fer2013(data_source, spec, skip_bad=cfg.skip_bad)
    train_split, val_split, val_desc = train_val_split(data, cfg.val_fraction, cfg.seed)
    log.info(
        "data %s: %d train, %d val [%s], loaded in %.1fs",
        data_source,
        len(train_split),
        len(val_split),
        val_desc,
        time.perf_counter() - t0,
    )
    images = torch.from_numpy(train_split.images).to(device)  # uint8 (N, 48, 48), ~66 MB for FER2013
    labels = torch.from_numpy(train_split.labels).to(device)

    if resume is None:
        model, model_cfg = build_model_for(cfg)
    else:
        model, model_cfg = resume.model.build(), resume.model
        model.load_state_dict(resume.state_dict)
    model = model.to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(cfg, model)
    steps_per_epoch = len(labels) // cfg.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"batch_size {cfg.batch_size} is larger than the training set ({len(labels)})")
    scheduler = build_scheduler(cfg, optimizer, steps_per_epoch)

    if resume is not None:
        assert resume.training_state is not None
        ts = resume.training_state
        optimizer.load_state_dict(ts["optimizer"])
        scheduler.load_state_dict(ts["scheduler"])
        restore_rng(ts["rng"], gen)
        state = RunState(**ts["run"])
        if resume.dataset_fingerprint != data.fingerprint:
            log.warning("resuming on different data (%s != %s)", data.fingerprint, resume.dataset_fingerprint)
        log.info("resuming %s after epoch %d", state.run_id, state.epoch)
    else:
        state = RunState(run_id=new_run_id(cfg))
    work = work_dir_for(output, state.run_id)
    work.mkdir(parents=True, exist_ok=True)
    (work / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    log.info("run %s in %s: %s, %d parameters", state.run_id, work, cfg.model, count_parameters(model))

    teacher = load_teacher(cfg.teacher, device, spec) if cfg.teacher else None
    train_model = cast(nn.Module, torch.compile(model)) if cfg.compile else model
    tracker = Tracker(cfg, state.run_id, work)
    common = {"preprocessing": spec, "dataset_fingerprint": data.fingerprint, "run_id": state.run_id}

    stale = state.epoch - state.best_epoch
    while state.epoch < cfg.epochs:
        if cfg.early_stopping_patience and stale >= cfg.early_stopping_patience:
            log.info("early stop: no better val accuracy for %d epochs", stale)
            break
        epoch = state.epoch + 1
        stats = train_one_epoch(train_model, teacher, images, labels, optimizer, scheduler, cfg, spec, gen, bf16, epoch)
        report, val_loss = evaluate_split(model, val_split, spec, CLASS_NAMES, batch_size=cfg.eval_batch_size, bf16=bf16)
        row = {
            "epoch": epoch,
            **stats,
            "val_loss": val_loss,
            "val_accuracy": report["accuracy"],
            "val_macro_f1": report["macro_f1"],
        }
        state.history.append(row)
        state.epoch = epoch
        improved = report["accuracy"] > state.best_val_accuracy
        if improved:
            state.best_val_accuracy, state.best_epoch = report["accuracy"], epoch
            best = make_checkpoint(model, model_cfg, metrics=_summary(row), **common)
            save_checkpoint(best, work / "best.pt", with_training_state=False)
        stale = epoch - state.best_epoch
        last = make_checkpoint(
            model,
            model_cfg,
            metrics=_summary(row),
            **common,
            training_state=training_state(optimizer, scheduler, gen, state, cfg, output),
        )
        save_checkpoint(last, work / "last.pt")
        tracker.log(row)
        log.info(
            "epoch %d/%d  train loss %.4f acc %.4f  val loss %.4f acc %.4f f1 %.4f  %.0f img/s %.0fs%s",
            epoch,
            cfg.epochs,
            stats["train_loss"],
            stats["train_accuracy"],
            val_loss,
            report["accuracy"],
            report["macro_f1"],
            stats["images_per_s"],
            stats["epoch_seconds"],
            "  *best*" if improved else "",
        )

    final = finish_run(work, state, val_split, val_desc, spec, device, cfg, data, output)
    tracker.finish(final)
    return final


def _summary(row: dict[str, float]) -> dict[str, float]:
    return {k: float(v) for k, v in row.items()}


def finish_run(
    work: Path,
    state: RunState,
    val: Split,
    val_desc: str,
    spec: PreprocessSpec,
    device: torch.device,
    cfg: TrainConfig,
    data: FerData,
    output: str,
) -> dict[str, Any]:
    """Evaluate the best checkpoint, write the report files, publish the run."""
    best = load_checkpoint(work / "best.pt")
    model = build_model(best).to(device)
    report, val_loss = evaluate_split(model, val, spec, best.classes, batch_size=cfg.eval_batch_size)
    metrics = {
        "val_accuracy": report["accuracy"],
        "val_macro_f1": report["macro_f1"],
        "val_loss": val_loss,
        "val_split": val_desc,
        "best_epoch": state.best_epoch,
        "epochs_run": state.epoch,
        "parameters": count_parameters(model),
        "per_class_recall": {k: v["recall"] for k, v in report["per_class"].items()},
    }
    best.metrics = metrics
    save_checkpoint(best, work / "model.pt", with_training_state=False)
    (work / "metrics.json").write_text(json.dumps({**metrics, "report": report, "history": state.history}, indent=2))
    plot_confusion_matrix(
        report["confusion_matrix"],
        best.classes,
        work / "confusion_matrix.png",
        f"{cfg.model} on {val_desc}: acc {report['accuracy']:.3f}",
    )
    plot_curves(state.history, work / "curves.png")
    write_model_card(work / "MODEL_CARD.md", best, report, cfg, data.source, val_desc, state.history)
    print(format_report(report))
    files = {p.name: p for p in work.iterdir() if p.is_file() and p.name not in ("last.pt", "best.pt")}
    pointer = storage.publish_run(
        output,
        state.run_id,
        files,
        metrics={k: v for k, v in metrics.items() if not isinstance(v, dict)},
        created_at=best.created_at,
    )
    log.info("published %s -> %s", state.run_id, storage.join(output, pointer.path))
    return metrics


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m training.train`` (also what deploy/vertex-train.yaml passes)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML file of TrainConfig fields (see configs/)")
    parser.add_argument("--data", required=True, help="FER2013 zip, folder, fer2013.csv, or gs:// URI of one")
    parser.add_argument("--output", default="runs", help="local folder or gs://bucket/prefix (default: runs)")
    parser.add_argument("--resume", help="a run folder or its last.pt: continue where it stopped")
    add_config_flags(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    resume = None
    if args.resume:
        path = Path(args.resume)
        resume = load_checkpoint(path / "last.pt" if path.is_dir() else path)
        if resume.training_state is None:
            parser.error(f"{args.resume} has no training state (is it a published model.pt?)")
        cfg = TrainConfig.from_dict(resume.training_state["config"])
        output = resume.training_state["output"]
    else:
        cfg = resolve_config(args.config, args)
        output = args.output
    run(cfg, args.data, output, resume)
    return 0


if __name__ == "__main__":
    sys.exit(main())
