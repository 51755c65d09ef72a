"""Training configuration: one dataclass, filled from a YAML file, then from CLI flags.

Every field is also a ``--flag`` (``model_kwargs`` takes JSON). Unknown YAML keys are
rejected; the resolved configuration is saved with the run and inside its checkpoints.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


@dataclass
class TrainConfig:
    # model
    model: str = "compact"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    pretrained: bool = False  # start from ImageNet weights (tv_* models)
    pretrained_weights: str | None = None  # local weights file instead of downloading
    init_from: str | None = None  # start from this checkpoint's weights (same model): fine-tuning
    # optimisation
    epochs: int = 60
    batch_size: int = 128
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: Literal["cosine", "onecycle", "constant", "restarts"] = "cosine"
    warmup_epochs: float = 1.0
    # restarts (only): cosine cycles of this many epochs (SGDR); each cycle's end is saved as a snapshot,
    # an ensemble member that costs no extra training (Huang et al., Snapshot Ensembles)
    cycle_epochs: int = 0
    ema_decay: float = 0.0  # > 0: validate, select and save an exponential moving average of the weights
    label_smoothing: float = 0.1
    early_stopping_patience: int = 0  # epochs without a better val accuracy; 0 = off
    # augmentation
    flip: bool = True
    rotate_deg: float = 15.0
    scale_min: float = 0.85
    scale_max: float = 1.15
    translate: float = 0.1
    erase_prob: float = 0.5
    # a user's photo's defects (training.augment.AugmentConfig): blur, low resolution, side lighting
    blur_prob: float = 0.0
    lowres_prob: float = 0.0
    shade_prob: float = 0.0
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    mix_prob: float = 0.0  # fraction of batches that get MixUp or CutMix
    # distillation
    # a checkpoint run on every batch, several separated by commas (an ensemble: their probabilities
    # averaged, one forward pass per member and view), or the .npz of stored predictions
    # `training.teach` writes (an ensemble's averaged probabilities; free per epoch)
    teacher: str | None = None
    distill_alpha: float = 0.7  # weight of the teacher term
    distill_temperature: float = 4.0
    # a checkpoint teacher's test-time views (training.evaluate.tta_views): "flip" distils the average
    # of its predictions on the image and its mirror (a better teacher than itself, at 2 forward passes),
    # "tencrop" over ten crops (10 passes; the bundled model's last generation)
    teacher_tta: Literal["none", "flip", "tencrop"] = "none"
    # data
    val_fraction: float = 0.1  # hold-out size when the source has no PublicTest
    skip_bad: bool = False
    # runtime
    seed: int = 0
    device: str = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    channels_last: bool = True
    compile: bool = False
    num_threads: int = 0  # CPU threads; 0 = all cores this process may use
    eval_batch_size: int = 512
    # publishing (docs/promotion.md): whether latest.json moves to the finished run
    promote: Literal["if-better", "always", "never"] = "if-better"  # if-better: through the gate
    promote_tolerance: float = 0.0  # the gate accepts a val_accuracy this much below the served one
    promote_min_accuracy: float = 0.0  # and never one below this
    # a folder of labeled real-photo sets (training.realfaces): the served export is measured on its
    # development photos through the service pipeline, and the gate refuses a run that reads them
    # worse than the served model by more than promote_realfaces_tolerance
    realfaces: str | None = None
    promote_realfaces_tolerance: float = 0.0
    # tracking
    wandb: bool = False
    wandb_project: str = "fer2013"
    run_name: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown config keys: {', '.join(unknown)}")
        cfg = cls(**data)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        teachers = teacher_paths(self.teacher)
        checks = [
            (self.epochs >= 1, "epochs must be >= 1"),
            (self.batch_size >= 2, "batch_size must be >= 2"),
            (self.lr > 0, "lr must be > 0"),
            (0 <= self.label_smoothing < 1, "label_smoothing must be in [0, 1)"),
            (0 < self.scale_min <= self.scale_max, "need 0 < scale_min <= scale_max"),
            (0 <= self.mix_prob <= 1, "mix_prob must be in [0, 1]"),
            (0 <= self.distill_alpha <= 1, "distill_alpha must be in [0, 1]"),
            (self.optimizer in ("sgd", "adamw"), f"unknown optimizer {self.optimizer!r}"),
            (self.schedule in ("cosine", "onecycle", "constant", "restarts"), f"unknown schedule {self.schedule!r}"),
            *self._restart_checks(),
            (0 <= self.ema_decay < 1, "ema_decay must be in [0, 1)"),
            (
                not is_stored_teacher(self.teacher) or self.mix_prob == 0,
                "stored teacher predictions are per image: they cannot follow MixUp/CutMix (mix_prob must be 0)",
            ),
            (
                all(teachers) and (len(teachers) < 2 or not is_stored_teacher(self.teacher)),
                "teacher: one .npz of stored predictions, or checkpoints separated by commas, none empty",
            ),
            (self.teacher_tta in ("none", "flip", "tencrop"), f"unknown teacher_tta {self.teacher_tta!r}"),
            (
                self.teacher_tta == "none" or (bool(self.teacher) and not is_stored_teacher(self.teacher)),
                "teacher_tta needs a checkpoint teacher (stored predictions were made with their own TTA)",
            ),
            (not (self.init_from and self.pretrained), "init_from and pretrained both set the starting weights: pick one"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def _restart_checks(self) -> list[tuple[bool, str]]:
        # Snapshots are taken at epochs that are multiples of cycle_epochs: the cycles must start
        # at step 0 (no warm-up; a fine-tune needs none, and from scratch the first cycle warms up)
        # and the run must end at a cycle's end.
        if self.schedule != "restarts":
            return []  # cycle_epochs is ignored
        return [
            (self.cycle_epochs >= 1, "schedule restarts needs cycle_epochs >= 1"),
            (self.warmup_epochs == 0, "schedule restarts needs warmup_epochs 0 (each cycle starts at the peak LR)"),
            (self.epochs % max(self.cycle_epochs, 1) == 0, "schedule restarts needs epochs a multiple of cycle_epochs"),
        ]


def teacher_paths(teacher: str | None) -> list[str]:
    """The files ``teacher`` names: the members of a live ensemble, or one checkpoint or .npz."""
    return [p.strip() for p in teacher.split(",")] if teacher else []


def is_stored_teacher(teacher: str | None) -> bool:
    """Whether ``teacher`` names stored predictions (`training.teach`'s .npz) rather than checkpoints."""
    return any(p.endswith(".npz") for p in teacher_paths(teacher))


def load_yaml(path: str | Path) -> dict[str, Any]:
    data = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of config keys")
    return data


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One ``--flag`` per TrainConfig field, defaulting to None (= keep the YAML's value)."""
    group = parser.add_argument_group("config overrides (default: the --config file, then built-in)")
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        # --weight-decay, and --weight_decay as W&B sweep agents spell it.
        flags = sorted({"--" + f.name.replace("_", "-"), "--" + f.name}, key=lambda s: "_" in s)
        kind = hints[f.name]
        if kind is bool:
            group.add_argument(*flags, dest=f.name, action=argparse.BooleanOptionalAction, default=None)
        elif f.name == "model_kwargs":
            group.add_argument(*flags, dest=f.name, type=json.loads, default=None, help="JSON, e.g. '{\"width\": 32}'")
        else:
            group.add_argument(*flags, dest=f.name, type=_scalar_type(kind), default=None, metavar=f.name.upper())


def _scalar_type(kind: Any) -> Any:
    if typing.get_origin(kind) is Literal:
        return str
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        kind = next(a for a in typing.get_args(kind) if a is not type(None))
    return kind


def resolve_config(config_file: str | None, args: argparse.Namespace) -> TrainConfig:
    data = load_yaml(config_file) if config_file else {}
    for f in dataclasses.fields(TrainConfig):
        value = getattr(args, f.name, None)
        if value is not None:
            data[f.name] = value
    return TrainConfig.from_dict(data)
