"""The checkpoint format: one ``torch.save`` file of plain tensors and builtins.

It loads with ``torch.load(path, weights_only=True)``, so a checkpoint can never run code.
Training writes it (:func:`make_checkpoint`, :func:`save_checkpoint`); serving and
evaluation read it (:func:`load_checkpoint`, :func:`build_model`).

Layout (``format_version`` 1)::

    format            "fer-checkpoint"
    format_version    1
    model             {"name": registry name, "kwargs": {...}}
    state_dict        model weights
    classes           class names in output order
    preprocessing     PreprocessSpec as a dict
    metrics           {"val_accuracy": ..., ...} (numbers and strings)
    dataset_fingerprint, code_version, created_at (ISO 8601 UTC), run_id
    training_state    optional: optimizer/scheduler/RNG state for --resume (absent in
                      published models)
"""

from __future__ import annotations

import io
import pickle
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fercore import __version__
from fercore.labels import CLASS_NAMES
from fercore.models import ModelConfig
from fercore.preprocessing import PreprocessSpec
from fercore.storage import atomic_write

FORMAT = "fer-checkpoint"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """The file is not a checkpoint this code can load (corrupt, malicious, mismatching)."""


@dataclass
class Checkpoint:
    model: ModelConfig
    state_dict: dict[str, torch.Tensor]
    classes: tuple[str, ...] = CLASS_NAMES
    preprocessing: PreprocessSpec = field(default_factory=PreprocessSpec)
    metrics: dict[str, Any] = field(default_factory=dict)
    dataset_fingerprint: str = ""
    code_version: str = __version__
    created_at: str = ""
    run_id: str = ""
    training_state: dict[str, Any] | None = None

    def to_dict(self, with_training_state: bool = True) -> dict[str, Any]:
        data: dict[str, Any] = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "model": self.model.to_dict(),
            "state_dict": self.state_dict,
            "classes": list(self.classes),
            "preprocessing": self.preprocessing.to_dict(),
            "metrics": dict(self.metrics),
            "dataset_fingerprint": self.dataset_fingerprint,
            "code_version": self.code_version,
            "created_at": self.created_at or datetime.now(UTC).isoformat(timespec="seconds"),
            "run_id": self.run_id,
        }
        if with_training_state and self.training_state is not None:
            data["training_state"] = self.training_state
        return data


def make_checkpoint(model: nn.Module, config: ModelConfig, **fields: Any) -> Checkpoint:
    """Snapshot ``model``'s weights (copied to CPU, so the file is device-independent)."""
    state = {k: v.detach().to("cpu", copy=True) for k, v in _unwrap(model).state_dict().items()}
    return Checkpoint(model=config, state_dict=state, **fields)


def save_checkpoint(ckpt: Checkpoint, path: str | Path, with_training_state: bool = True) -> None:
    """Write atomically (:func:`fercore.storage.atomic_write`): a reader, or a run killed
    mid-write, sees the old file or the new one, never half of one."""
    with atomic_write(path) as f:
        torch.save(ckpt.to_dict(with_training_state), f)


def load_checkpoint(source: str | Path | bytes) -> Checkpoint:
    """Read and validate a checkpoint file (or its bytes) with ``weights_only=True``."""
    where = "checkpoint bytes" if isinstance(source, bytes) else str(source)
    stream: Any = io.BytesIO(source) if isinstance(source, bytes) else source
    try:
        raw = torch.load(stream, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{where}: no such file") from None
    except pickle.UnpicklingError as exc:
        # weights_only refuses any global it does not know: a pickled object is refused here
        # before it can execute.
        raise CheckpointError(f"{where}: refused, not a plain-tensor checkpoint ({_first_line(exc)})") from None
    except Exception as exc:  # torch's unpickler raises all sorts (IndexError, EOFError...) on garbage
        raise CheckpointError(f"{where}: unreadable or truncated ({type(exc).__name__}: {_first_line(exc)})") from None
    return _parse(raw, where)


def _parse(raw: Any, where: str) -> Checkpoint:
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise CheckpointError(f"{where}: not a {FORMAT} file")
    if raw.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{where}: format version {raw.get('format_version')} is not {FORMAT_VERSION}")
    try:
        ckpt = Checkpoint(
            model=ModelConfig.from_dict(raw["model"]),
            state_dict=raw["state_dict"],
            classes=tuple(raw["classes"]),
            preprocessing=PreprocessSpec.from_dict(raw["preprocessing"]),
            metrics=dict(raw.get("metrics", {})),
            dataset_fingerprint=str(raw.get("dataset_fingerprint", "")),
            code_version=str(raw.get("code_version", "")),
            created_at=str(raw.get("created_at", "")),
            run_id=str(raw.get("run_id", "")),
            training_state=raw.get("training_state"),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{where}: malformed field ({exc})") from None
    if not ckpt.classes or len(set(ckpt.classes)) != len(ckpt.classes):
        raise CheckpointError(f"{where}: class names must be unique and non-empty")
    return ckpt


def build_model(ckpt: Checkpoint) -> nn.Module:
    """Rebuild the network through the registry, load the weights strictly, ``eval()``.

    The network is first built on the ``meta`` device (shapes, no memory) and compared with the
    weights: a checkpoint naming an architecture it has no weights for (``{"width": 100000}``,
    19 trillion parameters) is refused before anything that large is allocated. The real network
    is then no larger than the weights the file holds.
    """
    name = ckpt.model.name
    num_classes = len(ckpt.classes)
    try:
        with torch.device("meta"):
            skeleton = ckpt.model.build(num_classes=num_classes)
    except (ValueError, TypeError) as exc:  # not in the registry, or arguments it does not take
        raise CheckpointError(f"cannot build model {name!r}: {_first_line(exc)}") from None
    mismatch = _state_dict_mismatch(skeleton.state_dict(), ckpt.state_dict)
    if mismatch:
        raise CheckpointError(f"weights do not fit model {name!r} ({ckpt.model.kwargs}, {num_classes} classes): {mismatch}")
    try:
        model = ckpt.model.build(num_classes=num_classes)
        model.load_state_dict(ckpt.state_dict, strict=True)
    except (RuntimeError, ValueError, TypeError) as exc:
        raise CheckpointError(f"weights do not fit model {name!r}: {_first_line(exc)}") from None
    return model.eval()


def _state_dict_mismatch(expected: dict[str, torch.Tensor], given: dict[str, Any]) -> str:
    """How ``given`` weights differ from the keys and shapes of ``expected``; empty if they do not."""
    if not isinstance(given, dict):
        return f"state_dict is a {type(given).__name__}, not a dict"
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    wrong = [
        f"{k} {tuple(given[k].shape) if isinstance(given[k], torch.Tensor) else type(given[k]).__name__}"
        f" instead of {tuple(expected[k].shape)}"
        for k in expected
        if k in given and not (isinstance(given[k], torch.Tensor) and given[k].shape == expected[k].shape)
    ]
    parts = [
        f"{len(items)} {what} (first: {', '.join(map(str, items[:3]))})"
        for what, items in (("missing", missing), ("unexpected", unexpected), ("of the wrong shape", wrong))
        if items
    ]
    return "; ".join(parts)


def _unwrap(model: nn.Module) -> nn.Module:
    # torch.compile wraps the module; checkpoints hold the plain module's keys.
    return getattr(model, "_orig_mod", model)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__
