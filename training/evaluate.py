r"""Evaluate a checkpoint on any supported FER2013 source.

    python -m training.evaluate --checkpoint models/fer-compact.pt \
        --data ../shared/data/fer2013.zip --split test --tta flip --output-json eval.json
    python -m training.evaluate --checkpoint models/fer-compact.int8.onnx --data ...   # what the service runs
    python -m training.evaluate --checkpoint runs/ --data ...   # the model runs/latest.json names
    python -m training.evaluate --checkpoint a.pt --checkpoint b.pt --data ... --tta tencrop   # an ensemble
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fercore.artifact import ModelLoadError, resolve_model
from fercore.checkpoint import CheckpointError, build_model, load_checkpoint
from fercore.classifier import OnnxClassifier
from fercore.preprocessing import PreprocessSpec, normalize
from training import runtime
from training.data import Split, load_fer2013
from training.metrics import classification_report, format_report, plot_confusion_matrix

log = logging.getLogger(__name__)
# Test-time augmentation: the views whose probabilities are averaged (see tta_views; a distillation teacher uses them too).
TTA = Literal["none", "flip", "tencrop"]


def tta_views(x: Tensor, tta: TTA) -> list[Tensor]:
    """The test-time views of a normalised batch (N, 1, H, W)."""
    if tta == "none":
        return [x]
    if tta == "flip":
        return [x, x.flip(-1)]
    if tta == "tencrop":
        h, w = x.shape[-2:]
        c = round(h * 0.9)  # 48 -> 43 px crops, resized back to the model's input size
        offsets = [(0, 0), (0, w - c), (h - c, 0), (h - c, w - c), ((h - c) // 2, (w - c) // 2)]
        crops = [
            F.interpolate(x[..., t : t + c, s : s + c], size=(h, w), mode="bilinear", align_corners=False) for t, s in offsets
        ]
        return crops + [v.flip(-1) for v in crops]
    raise ValueError(f"unknown TTA {tta!r}")


Model = nn.Module | OnnxClassifier  # a PyTorch network, or an exported model run by ONNX Runtime


def _forward(model: Model, bf16: bool) -> Callable[[Tensor], Tensor]:
    """Normalised batch (N, 1, H, W) on the model's device -> class probabilities (N, C), float32."""
    if isinstance(model, OnnxClassifier):
        return lambda x: torch.from_numpy(model.probabilities(np.ascontiguousarray(x.cpu().numpy())))
    device = next(model.parameters()).device

    def forward(x: Tensor) -> Tensor:
        with runtime.autocast(device, bf16):
            logits = model(x.contiguous(memory_format=torch.channels_last))
        return logits.float().softmax(-1)

    return forward


@torch.no_grad()
def predict_probs(
    model: Model, images: Tensor, spec: PreprocessSpec, batch_size: int = 512, tta: TTA = "none", bf16: bool = False
) -> Tensor:
    """Class probabilities (N, C) for uint8 images (N, H, W), averaged over the TTA views."""
    forward = _forward(model, bf16)
    device = torch.device("cpu") if isinstance(model, OnnxClassifier) else next(model.parameters()).device
    out = []
    with contextlib.nullcontext() if isinstance(model, OnnxClassifier) else runtime.eval_mode(model):
        for start in range(0, len(images), batch_size):
            x = normalize(images[start : start + batch_size].to(device), spec)
            views = tta_views(x, tta)
            out.append(torch.stack([forward(v) for v in views]).mean(0).cpu())
    return torch.cat(out)


def evaluate_split(
    model: Model,
    split: Split,
    spec: PreprocessSpec,
    classes: tuple[str, ...],
    tta: TTA = "none",
    batch_size: int = 512,
    bf16: bool = False,
) -> tuple[dict[str, Any], float]:
    """(classification report, mean cross-entropy) of ``model`` on ``split``."""
    return score(predict_probs(model, torch.from_numpy(split.images), spec, batch_size, tta, bf16), split, classes)


def score(probs: Tensor, split: Split, classes: tuple[str, ...]) -> tuple[dict[str, Any], float]:
    """(classification report, mean cross-entropy) of class probabilities (N, C) for ``split``."""
    loss = F.nll_loss(probs.clamp_min(1e-8).log(), torch.from_numpy(split.labels)).item()
    return classification_report(split.labels, probs.argmax(1).numpy(), classes), loss


@dataclass(frozen=True)
class Loaded:
    """A model to evaluate and what the report says about it."""

    uri: str  # as given: snapshots of one run share its run id
    model: Model
    spec: PreprocessSpec
    classes: tuple[str, ...]
    run_id: str
    architecture: dict[str, Any]
    precision: str


def load_model(uri: str, device: torch.device) -> Loaded:
    """A PyTorch checkpoint or an exported ONNX model, found and verified as the service finds it
    (:func:`fercore.artifact.resolve_model`: a file, a folder holding latest.json, or gs://)."""
    path = resolve_model(uri).path
    if path.suffix == ".onnx":
        onnx_model = OnnxClassifier.load(path, threads=runtime.configure_threads())
        meta = onnx_model.meta
        return Loaded(uri, onnx_model, meta.preprocessing, meta.classes, meta.run_id, meta.architecture, meta.precision)
    ckpt = load_checkpoint(path)
    model = build_model(ckpt).to(device).to(memory_format=torch.channels_last)
    return Loaded(uri, model, ckpt.preprocessing, ckpt.classes, ckpt.run_id, ckpt.model.to_dict(), "pytorch fp32")


def evaluate_members(loaded: list[Loaded], split: Split, tta: TTA, batch_size: int) -> tuple[dict[str, Any], float]:
    """(report, loss) of one model, or of the ensemble of several: the mean of the members'
    probabilities, each member normalising with its own spec. Evaluated without bf16, so the
    figure does not depend on the CPU's bf16 support. An ensemble's report lists every member's
    own figures."""
    images = torch.from_numpy(split.images)
    member_probs = [predict_probs(m.model, images, m.spec, batch_size, tta) for m in loaded]
    report, loss = score(torch.stack(member_probs).mean(0), split, loaded[0].classes)
    if len(loaded) > 1:
        report["members"] = []
        for m, probs in zip(loaded, member_probs, strict=True):
            alone, _ = score(probs, split, m.classes)
            report["members"].append({"checkpoint": m.uri, "run_id": m.run_id, "model": m.architecture,
                                      "precision": m.precision, "accuracy": alone["accuracy"],
                                      "macro_f1": alone["macro_f1"]})  # fmt: skip
    return report, loss


class IncompatibleMembers(ValueError):
    """Models that cannot be averaged as one ensemble."""


def load_members(uris: list[str], device: torch.device) -> list[Loaded]:
    """Every model of an ensemble. They must agree on the classes (the columns that are averaged)
    and on how a face is decoded (size, colour, contrast: the data is decoded once, with the first
    member's spec); each normalises with its own mean and std."""
    loaded = [load_model(uri, device) for uri in uris]
    first = loaded[0]
    for m in loaded[1:]:
        if m.classes != first.classes:
            raise IncompatibleMembers(f"{m.uri} predicts other classes than {first.uri}: {m.classes}")
        if decoding(m.spec) != decoding(first.spec):
            raise IncompatibleMembers(f"{m.uri} decodes faces otherwise than {first.uri}: {m.spec} vs {first.spec}")
    return loaded


def decoding(spec: PreprocessSpec) -> tuple[object, ...]:
    """What of a spec shapes the decoded faces (mean and std are applied later, per model)."""
    return spec.input_size, spec.grayscale, spec.contrast


def write_report(report: dict[str, Any], path: Path, classes: tuple[str, ...], title: str) -> None:
    """The report as JSON, and its confusion matrix as a PNG beside it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))
    png = path.with_suffix(".png")
    plot_confusion_matrix(report["confusion_matrix"], classes, png, f"{title}: acc {report['accuracy']:.3f}")
    log.info("wrote %s and %s", path, png)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--checkpoint",
        action="append",
        required=True,
        help="model.pt or .onnx file, a folder holding latest.json (a training --output), or gs:// forms of these; "
        "repeat it to evaluate the ensemble of several (the mean of their probabilities)",
    )
    parser.add_argument("--data", required=True, help="zip, folder, fer2013.csv or gs:// URI")
    parser.add_argument("--split", default="test", help="train, test (PublicTest) or private_test (CSV only)")
    parser.add_argument("--tta", default="none", choices=get_args(TTA))
    parser.add_argument("--output-json", type=Path, help="write the metrics here (a PNG goes beside it)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--skip-bad", action="store_true", help="skip undecodable images instead of failing")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    runtime.configure_threads()
    try:
        loaded = load_members(args.checkpoint, runtime.pick_device(args.device))
    except (IncompatibleMembers, CheckpointError, ModelLoadError) as e:
        parser.error(str(e))
    first = loaded[0]
    data = load_fer2013(args.data, first.spec, skip_bad=args.skip_bad)
    report, loss = evaluate_members(loaded, data[args.split], args.tta, args.batch_size)
    single = len(loaded) == 1
    report.update(
        {
            "checkpoint": args.checkpoint[0] if single else args.checkpoint,
            "run_id": first.run_id if single else [m.run_id for m in loaded],
            "model": first.architecture if single else f"ensemble of {len(loaded)}",
            "precision": first.precision if single else sorted({m.precision for m in loaded}),
            "data": str(args.data),
            "dataset_fingerprint": data.fingerprint,
            "split": args.split,
            "tta": args.tta,
            "loss": loss,
            "skipped": data.skipped,
        }
    )
    print(format_report(report))
    for m in report.get("members", []):
        print(f"  member {m['checkpoint']}: accuracy {m['accuracy']:.4f}, macro-F1 {m['macro_f1']:.4f}")
    if args.output_json:
        name = f"{first.architecture.get('name')} ({first.precision})" if single else f"ensemble of {len(loaded)}"
        write_report(report, args.output_json, first.classes, f"{name} on {args.split} (tta={args.tta})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
