"""A short model card written next to every published model."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from fercore.checkpoint import Checkpoint, build_model
from fercore.models import count_parameters
from training.config import TrainConfig


def write_model_card(
    path: Path,
    ckpt: Checkpoint,
    report: dict[str, Any],
    cfg: TrainConfig,
    data: str,
    val_desc: str,
    history: list[dict[str, float]],
) -> None:
    params = count_parameters(build_model(ckpt))
    recall = "\n".join(
        f"| {name} | {m['recall']:.3f} | {m['precision']:.3f} | {m['f1']:.3f} | {m['support']} |"
        for name, m in report["per_class"].items()
    )
    epoch_s = sum(h["epoch_seconds"] for h in history)
    best_epoch = max(history, key=lambda h: h["val_accuracy"])["epoch"] if history else "-"
    text = f"""# Model card: {ckpt.run_id}

- Architecture: `{ckpt.model.name}` {ckpt.model.kwargs or ""} ({params:,} parameters)
- Classes (output order): {", ".join(ckpt.classes)}
- Preprocessing: {ckpt.preprocessing.to_dict()}
- Data: `{data}` (fingerprint `{ckpt.dataset_fingerprint}`)
- Model selection: best validation accuracy on {val_desc}, epoch {best_epoch} of {len(history)}
- Training time: {epoch_s / 60:.1f} min of epochs; code version {ckpt.code_version}; created {ckpt.created_at}
- Command: `python -m training.train {" ".join(sys.argv[1:])}`

## Validation results ({val_desc})

Accuracy **{report["accuracy"]:.4f}**, macro-F1 **{report["macro_f1"]:.4f}** (n={report["num_samples"]}).

| class | recall | precision | f1 | support |
|---|---|---|---|---|
{recall}
{_serving(ckpt.metrics)}
## Intended use and limits

Seven-way facial expression classification of a single, roughly frontal, face crop
(FER2013's 48x48 grey faces). FER2013 labels are noisy (human accuracy is ~65%); the
classes are imbalanced (disgust is rare). Expressions are not emotions: do not use this
model to make decisions about people.
"""
    path.write_text(text)


def _serving(metrics: dict[str, Any]) -> str:
    """What the service runs (``training.export``'s checks), when the run was exported."""
    if "onnx_int8_val_accuracy" not in metrics:
        return ""
    return f"""
## Served model (ONNX Runtime)

`{metrics["served_precision"]}` ONNX export. fp32 export: accuracy {metrics["onnx_fp32_val_accuracy"]:.4f}, largest
probability difference from PyTorch {metrics["onnx_max_prob_diff"]:.1e}; int8 (static, per-channel, QDQ):
accuracy {metrics["onnx_int8_val_accuracy"]:.4f} on {metrics["export_val_split"]}.
"""
