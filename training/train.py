r"""Train a FER2013 model.

    python -m training.train --config configs/compact.yaml \
        --data ../shared/data/fer2013.zip --output runs/ [--epochs 10 --lr 0.02 ...]
    python -m training.train --resume runs/<run-id> --data ../shared/data/fer2013.zip

Writes ``<output>/<run-id>/`` (model.pt, last.pt, metrics.json, config.yaml, plots, model
card), publishes it, and promotes it (moves ``<output>/latest.json`` to it) as ``--promote``
says: ``if-better`` (default) under the gate of :mod:`fercore.registry`, ``always``, or
``never``; when it is not promoted, the reason is printed with both figures (docs/promotion.md).
``--output`` may be ``gs://bucket/prefix``.
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
from torch.optim.lr_scheduler import LambdaLR
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

from fercore import registry, storage
from fercore.checkpoint import Checkpoint, build_model, load_checkpoint, make_checkpoint, save_checkpoint
from fercore.labels import CLASS_NAMES
from fercore.models import ModelConfig, count_parameters
from fercore.models.transfer import load_pretrained
from fercore.preprocessing import PreprocessSpec, normalize
from training import promote, realfaces, runtime
from training.augment import AugmentConfig, augment, mix_batch
from training.config import TrainConfig, add_config_flags, resolve_config
from training.data import FerData, Split, load_fer2013, train_val_split
from training.evaluate import evaluate_split
from training.export import Export, export_for_serving
from training.metrics import format_report, plot_confusion_matrix, plot_curves
from training.model_card import write_model_card
from training.teach import Teacher, load_teacher
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
    if cfg.init_from:
        start = load_checkpoint(cfg.init_from)
        if start.model != model_cfg:
            raise ValueError(f"init_from {cfg.init_from} is a {start.model.to_dict()}, not the configured {model_cfg.to_dict()}")
        if start.preprocessing != PreprocessSpec() or start.classes != CLASS_NAMES:
            raise ValueError(f"init_from {cfg.init_from} was trained with other preprocessing or classes")
        model.load_state_dict(start.state_dict)
        log.info("starting from the weights of %s (val acc %s)", cfg.init_from, start.metrics.get("val_accuracy"))
    return model, model_cfg


def build_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    # No weight decay on biases and norm parameters (1-d tensors), as the best recipes do.
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=True)
    return torch.optim.AdamW(groups, lr=cfg.lr)


ONECYCLE_RISE = 0.3  # share of the run the one-cycle LR rises over when there is no warm-up
ONECYCLE_START = 1 / 25  # its first LR, as a share of the peak (div_factor of torch's OneCycleLR)


def lr_factor(step: int, total: int, warmup: int, schedule: str, cycle: int = 0) -> float:
    """Multiplier of the base LR at optimiser step ``step``: linear warm-up, then the schedule.

    One-cycle rises linearly from ``ONECYCLE_START`` over the warm-up (``ONECYCLE_RISE`` of the
    run without one), then falls along a cosine to ~0. Restarts: after the warm-up, cosines of
    ``cycle`` steps, each from the base LR to ~0."""
    if schedule == "onecycle":
        peak = warmup if warmup > 0 else max(int(ONECYCLE_RISE * total), 1)
        if step < peak:
            return ONECYCLE_START + (1 - ONECYCLE_START) * step / peak
        return 0.5 * (1 + math.cos(math.pi * (step - peak) / max(total - peak, 1)))
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    if schedule == "restarts":
        cycle = max(cycle, 1)
        return 0.5 * (1 + math.cos(math.pi * ((step - warmup) % cycle) / cycle))
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))


def build_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int) -> LambdaLR:
    total = cfg.epochs * steps_per_epoch
    warmup = int(cfg.warmup_epochs * steps_per_epoch)
    cycle = cfg.cycle_epochs * steps_per_epoch
    return LambdaLR(optimizer, lambda step: lr_factor(step, total, warmup, cfg.schedule, cycle))


def build_ema(cfg: TrainConfig, model: nn.Module) -> AveragedModel | None:
    # use_buffers: BatchNorm's running statistics are averaged along with the weights (the raw
    # model's, not recomputed for the averaged weights: close enough at a decay this high).
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=True) if cfg.ema_decay else None


def augment_config(cfg: TrainConfig) -> AugmentConfig:
    return AugmentConfig(
        flip=cfg.flip,
        rotate_deg=cfg.rotate_deg,
        scale=(cfg.scale_min, cfg.scale_max),
        translate=cfg.translate,
        erase_prob=cfg.erase_prob,
        blur_prob=cfg.blur_prob,
        lowres_prob=cfg.lowres_prob,
        shade_prob=cfg.shade_prob,
    )


# ---------------------------------------------------------------------------- one epoch


@dataclass
class Batch:
    x: Tensor  # float (N, 1, H, W), normalised and augmented
    y: Tensor  # float (N, C), soft targets
    hard: Tensor  # int (N,), the original labels
    idx: Tensor  # int (N,), the images' rows in the training set (for stored teacher predictions)


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
    return Batch(x, y, hard, idx)


def train_step(
    model: nn.Module,
    teacher: Teacher | None,
    batch: Batch,
    optimizer: torch.optim.Optimizer,
    scheduler: LambdaLR,
    cfg: TrainConfig,
    bf16: bool,
) -> tuple[Tensor, Tensor]:
    """One optimiser step on ``batch``; returns (loss, logits), not yet synced to the host."""
    with runtime.autocast(batch.x.device, bf16):
        logits = model(batch.x)
        loss = soft_cross_entropy(logits, batch.y, cfg.label_smoothing)
        if teacher is not None:
            with torch.no_grad():
                teacher_logits = teacher(batch.x, batch.idx)
            kd = distillation_loss(logits, teacher_logits, cfg.distill_temperature)
            loss = (1 - cfg.distill_alpha) * loss + cfg.distill_alpha * kd
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    scheduler.step()
    return loss, logits


def _progress(steps: int, epoch: int, epochs: int) -> tqdm:  # type: ignore[type-arg]
    # Every 2 s on a terminal; once a minute in a log file (a Vertex job's), not a line per batch.
    interval = 2.0 if sys.stderr.isatty() else 60.0
    return tqdm(range(steps), desc=f"epoch {epoch}/{epochs}", unit="batch", leave=False, mininterval=interval, file=sys.stderr)


def train_one_epoch(run: Run, epoch: int) -> dict[str, float]:
    """One pass over the training set (a fresh permutation from the run's generator)."""
    cfg, images, labels = run.cfg, run.data.images, run.data.labels
    aug = augment_config(cfg)
    run.train_model.train()
    perm = torch.randperm(len(labels), device=images.device, generator=run.generator)
    steps = len(labels) // cfg.batch_size  # drop the ragged last batch: BatchNorm dislikes tiny ones
    total_loss, correct, seen = 0.0, 0, 0
    start = time.perf_counter()
    bar = _progress(steps, epoch, cfg.epochs)
    for step in bar:
        idx = perm[step * cfg.batch_size : (step + 1) * cfg.batch_size]
        batch = make_batch(images, labels, idx, cfg, aug, run.spec, run.generator)
        loss, logits = train_step(run.train_model, run.teacher, batch, run.optimizer, run.scheduler, cfg, run.bf16)
        if run.ema is not None:
            run.ema.update_parameters(run.model)
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
        "lr": float(run.scheduler.get_last_lr()[0]),
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


def training_state(run: Run) -> dict[str, Any]:
    """What last.pt holds beyond the weights, for an exact --resume (RNG states included)."""
    rng: dict[str, Any] = {"generator": run.generator.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    state = run.state
    return {
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "ema": run.ema.state_dict() if run.ema is not None else None,
        "rng": rng,
        "run": {
            "run_id": state.run_id,
            "epoch": state.epoch,
            "best_val_accuracy": state.best_val_accuracy,
            "best_epoch": state.best_epoch,
            "history": state.history,
        },
        "config": run.cfg.to_dict(),
        "output": run.output,
    }


def restore_rng(rng: dict[str, Any], gen: torch.Generator) -> None:
    gen.set_state(rng["generator"])
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


@dataclass
class RunData:
    """The data of a run: the training set on the device, the validation split on the host."""

    dataset: FerData  # its fingerprint and source travel with every checkpoint
    images: Tensor  # uint8 (N, 48, 48) on the device, ~66 MB for FER2013
    labels: Tensor  # int64 (N,)
    val: Split
    val_desc: str  # e.g. "test (PublicTest)": which split val_accuracy is measured on


@dataclass
class Run:
    """Everything a training run holds, built by :func:`setup`."""

    cfg: TrainConfig
    output: str
    device: torch.device
    bf16: bool
    spec: PreprocessSpec
    data: RunData
    model: nn.Module  # the plain module: checkpoints and evaluation
    model_cfg: ModelConfig
    train_model: nn.Module  # what the loop calls: ``model``, compiled if asked
    ema: AveragedModel | None  # the moving average of ``model``'s weights, if cfg.ema_decay
    teacher: Teacher | None
    optimizer: torch.optim.Optimizer
    scheduler: LambdaLR
    generator: torch.Generator  # every random draw of the loop (permutations, augmentation)
    state: RunState
    folder: Path
    tracker: Tracker

    @property
    def selected(self) -> nn.Module:
        """The weights that are validated, selected and saved: the moving average when there is one."""
        return self.ema.module if self.ema is not None else self.model


def load_data(cfg: TrainConfig, data_source: str, spec: PreprocessSpec, device: torch.device) -> RunData:
    """Decode ``data_source``, split off the validation set, move the training set to ``device``."""
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
    images = torch.from_numpy(train_split.images).to(device)
    labels = torch.from_numpy(train_split.labels).to(device)
    if len(labels) < cfg.batch_size:
        raise ValueError(f"batch_size {cfg.batch_size} is larger than the training set ({len(labels)})")
    return RunData(data, images, labels, val_split, val_desc)


def restore(
    resume: Checkpoint,
    optimizer: torch.optim.Optimizer,
    scheduler: LambdaLR,
    ema: AveragedModel | None,
    generator: torch.Generator,
) -> RunState:
    """Put the optimiser, scheduler, moving average and RNGs back where ``resume`` left them; its run state."""
    assert resume.training_state is not None
    ts = resume.training_state
    optimizer.load_state_dict(ts["optimizer"])
    scheduler.load_state_dict(ts["scheduler"])
    if ema is not None:
        ema.load_state_dict(ts["ema"])
    restore_rng(ts["rng"], generator)
    state = RunState(**ts["run"])
    log.info("resuming %s after epoch %d", state.run_id, state.epoch)
    return state


def open_folder(cfg: TrainConfig, output: str, run_id: str) -> Path:
    """The run's local folder, with the resolved config written into it."""
    folder = work_dir_for(output, run_id)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return folder


def setup(cfg: TrainConfig, data_source: str, output: str, resume: Checkpoint | None = None) -> Run:
    """Build (or restore from ``resume``) a run: runtime, data, model, optimiser, state, folder.

    A resumed run continues bit for bit only if the steps that draw random numbers (seeding,
    data split, model init) come in this order before the RNG states are restored; keep it."""
    threads = runtime.configure_threads(cfg.num_threads)
    device = runtime.pick_device(cfg.device)
    bf16 = runtime.use_bf16(cfg.precision, device)
    torch.manual_seed(cfg.seed)
    generator = torch.Generator(device=device)
    generator.manual_seed(cfg.seed)
    spec = PreprocessSpec()
    log.info("device %s (%d CPU threads), bf16 autocast %s", device, threads, bf16)
    data = load_data(cfg, data_source, spec, device)
    if resume is None:
        model, model_cfg = build_model_for(cfg)
    else:
        model, model_cfg = resume.model.build(), resume.model
        model.load_state_dict(resume.state_dict)
    model = model.to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(cfg, model)
    scheduler = build_scheduler(cfg, optimizer, len(data.labels) // cfg.batch_size)
    ema = build_ema(cfg, model)
    if resume is None:
        state = RunState(run_id=new_run_id(cfg))
    else:
        state = restore(resume, optimizer, scheduler, ema, generator)
        if resume.dataset_fingerprint != data.dataset.fingerprint:
            log.warning("resuming on different data (%s != %s)", data.dataset.fingerprint, resume.dataset_fingerprint)
    teacher = load_teacher(cfg.teacher, device, spec, data.images, data.labels, cfg.teacher_tta) if cfg.teacher else None
    folder = open_folder(cfg, output, state.run_id)  # after everything that can refuse the run
    log.info("run %s in %s: %s, %d parameters", state.run_id, folder, cfg.model, count_parameters(model))
    train_model = cast(nn.Module, torch.compile(model)) if cfg.compile else model
    tracker = Tracker(cfg, state.run_id, folder)
    return Run(cfg, output, device, bf16, spec, data, model, model_cfg, train_model, ema, teacher,
               optimizer, scheduler, generator, state, folder, tracker)  # fmt: skip


def run(cfg: TrainConfig, data_source: str, output: str, resume: Checkpoint | None = None) -> dict[str, Any]:
    """Train (or continue) a run, publish it and promote it as ``cfg.promote`` says; returns the final metrics."""
    job = setup(cfg, data_source, output, resume)
    while job.state.epoch < cfg.epochs:
        stale = job.state.epoch - job.state.best_epoch
        if cfg.early_stopping_patience and stale >= cfg.early_stopping_patience:
            log.info("early stop: no better val accuracy for %d epochs", stale)
            break
        epoch = job.state.epoch + 1
        stats = train_one_epoch(job, epoch)
        end_epoch(job, epoch, stats)
    final = finish_run(job)
    job.tracker.finish(final)
    return final


def validate(run: Run, model: nn.Module) -> tuple[dict[str, Any], float]:
    return evaluate_split(model, run.data.val, run.spec, CLASS_NAMES, batch_size=run.cfg.eval_batch_size, bf16=run.bf16)


def end_epoch(run: Run, epoch: int, stats: dict[str, float]) -> None:
    """Validate, record the epoch, write best.pt (if better), a snapshot (at a cycle's end) and last.pt, log it."""
    start = time.perf_counter()
    report, val_loss = validate(run, run.selected)
    row = {"epoch": epoch, **stats, "val_loss": val_loss, "val_accuracy": report["accuracy"], "val_macro_f1": report["macro_f1"]}
    if run.ema is not None:  # the raw weights' figure too: what the average adds, in the same run
        row["val_accuracy_raw"] = validate(run, run.model)[0]["accuracy"]
    row["val_seconds"] = time.perf_counter() - start
    state = run.state
    state.history.append(row)
    state.epoch = epoch
    improved = report["accuracy"] > state.best_val_accuracy
    common = {"preprocessing": run.spec, "dataset_fingerprint": run.data.dataset.fingerprint, "run_id": state.run_id}
    snapshot = run.cfg.schedule == "restarts" and epoch % run.cfg.cycle_epochs == 0  # a cycle's end
    if improved or snapshot:
        selected = make_checkpoint(run.selected, run.model_cfg, metrics=_summary(row), **common)
    if improved:
        state.best_val_accuracy, state.best_epoch = report["accuracy"], epoch
        save_checkpoint(selected, run.folder / "best.pt", with_training_state=False)
    if snapshot:
        save_checkpoint(selected, run.folder / f"snapshot-e{epoch}.pt", with_training_state=False)
    last = make_checkpoint(run.model, run.model_cfg, metrics=_summary(row), **common, training_state=training_state(run))
    save_checkpoint(last, run.folder / "last.pt")
    run.tracker.log(row)
    log.info(
        "epoch %d/%d  train loss %.4f acc %.4f  val loss %.4f acc %.4f f1 %.4f  %.0f img/s %.0fs%s",
        epoch,
        run.cfg.epochs,
        stats["train_loss"],
        stats["train_accuracy"],
        val_loss,
        report["accuracy"],
        report["macro_f1"],
        stats["images_per_s"],
        stats["epoch_seconds"],
        "  *best*" if improved else "",
    )


def _summary(row: dict[str, float]) -> dict[str, float]:
    return {k: float(v) for k, v in row.items()}


def finish_run(run: Run) -> dict[str, Any]:
    """Evaluate the best checkpoint, write model.pt and the report files, publish and promote the run."""
    best = load_checkpoint(run.folder / "best.pt")
    model = build_model(best).to(run.device)
    report, val_loss = evaluate_split(model, run.data.val, run.spec, best.classes, batch_size=run.cfg.eval_batch_size)
    metrics = {
        "val_accuracy": report["accuracy"],
        "val_macro_f1": report["macro_f1"],
        "val_loss": val_loss,
        "val_split": run.data.val_desc,
        "best_epoch": run.state.best_epoch,
        "epochs_run": run.state.epoch,
        "parameters": count_parameters(model),
        "per_class_recall": {k: v["recall"] for k, v in report["per_class"].items()},
    }
    best.metrics = metrics
    save_checkpoint(best, run.folder / "model.pt", with_training_state=False)
    export = export_for_serving(run.folder / "model.pt", run.data.dataset)
    metrics = best.metrics = {**metrics, **export.metrics}  # the export's checks go into the report files too
    if run.cfg.realfaces:  # what users' photos get: the served file through the service pipeline
        metrics = best.metrics = {**metrics, **realfaces.evaluate(export.files[export.serve], Path(run.cfg.realfaces))}
    write_report_files(run, best, report, metrics)
    print(format_report(report))
    outcome = publish(run, best, export)
    print(promote.describe(outcome))
    return metrics


def write_report_files(run: Run, best: Checkpoint, report: dict[str, Any], metrics: dict[str, Any]) -> None:
    """metrics.json, the confusion matrix, the learning curves and the model card, in the run folder."""
    work, history = run.folder, run.state.history
    (work / "metrics.json").write_text(json.dumps({**metrics, "report": report, "history": history}, indent=2))
    title = f"{run.cfg.model} on {run.data.val_desc}: acc {report['accuracy']:.3f}"
    plot_confusion_matrix(report["confusion_matrix"], best.classes, work / "confusion_matrix.png", title)
    plot_curves(history, work / "curves.png")
    write_model_card(work / "MODEL_CARD.md", best, report, run.cfg, run.data.dataset.source, run.data.val_desc, history)


def publish(run: Run, best: Checkpoint, export: Export) -> registry.Outcome:
    """Publish the run folder (without its resume state) and the serving exports, then promote."""
    private = {"last.pt", "best.pt", storage.RUN_POINTER}
    files = {p.name: p for p in run.folder.iterdir() if p.is_file() and not p.name.startswith(".") and p.name not in private}
    files.update(export.files)
    info = storage.LatestPointer(
        run_id=run.state.run_id,
        path="",
        sha256="",
        metrics=best.metrics,
        created_at=best.created_at,
        dataset_fingerprint=run.data.dataset.fingerprint,
    )
    gate = registry.Gate(
        tolerance=run.cfg.promote_tolerance,
        min_accuracy=run.cfg.promote_min_accuracy,
        realfaces_tolerance=run.cfg.promote_realfaces_tolerance if run.cfg.realfaces else None,
    )
    actor = registry.Actor.here("training.train")
    return promote.publish_and_promote(run.output, files, export.serve, info, run.cfg.promote, gate, actor)


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
    if cfg.realfaces:  # refused now, not after hours of training
        try:
            realfaces.photos_of(Path(cfg.realfaces), "dev")
        except ValueError as exc:
            parser.error(f"--realfaces: {exc}")
    run(cfg, args.data, output, resume)
    return 0


if __name__ == "__main__":
    sys.exit(main())
