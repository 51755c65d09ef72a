r"""Evaluate a checkpoint on any supported FER2013 source.

    python -m training.evaluate --checkpoint models/fer-compact.pt \
        --data ../shared/data/fer2013.zip --split test --tta flip --output-json eval.json
    python -m training.evaluate --checkpoint runs/ --data ...   # the model runs/latest.json names
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fercore import storage
from fercore.checkpoint import build_model, load_checkpoint
from fercore.preprocessing import PreprocessSpec, normalize
from training import runtime
from training.data import Split, load_fer2013
from training.metrics import classification_report, format_report, plot_confusion_matrix

log = logging.getLogger(__name__)
# Test-time augmentation: the views whose probabilities are averaged (see _views).
TTA = Literal["none", "flip", "tencrop"]


def _views(x: Tensor, tta: TTA) -> list[Tensor]:
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


@torch.no_grad()
def predict_probs(
    model: nn.Module, images: Tensor, spec: PreprocessSpec, batch_size: int = 512, tta: TTA = "none", bf16: bool = False
) -> Tensor:
    """Class probabilities (N, C) for uint8 images (N, H, W) on the model's device."""
    device = next(model.parameters()).device
    out = []
    with runtime.eval_mode(model):
        for start in range(0, len(images), batch_size):
            x = normalize(images[start : start + batch_size].to(device), spec)
            probs = torch.zeros(())
            views = _views(x, tta)
            for v in views:
                with runtime.autocast(device, bf16):
                    logits = model(v.contiguous(memory_format=torch.channels_last))
                probs = probs + logits.float().softmax(-1)
            out.append((probs / len(views)).cpu())
    return torch.cat(out)


def evaluate_split(
    model: nn.Module,
    split: Split,
    spec: PreprocessSpec,
    classes: tuple[str, ...],
    tta: TTA = "none",
    batch_size: int = 512,
    bf16: bool = False,
) -> tuple[dict[str, Any], float]:
    """(classification report, mean cross-entropy) of ``model`` on ``split``."""
    probs = predict_probs(model, torch.from_numpy(split.images), spec, batch_size, tta, bf16)
    labels = torch.from_numpy(split.labels)
    loss = F.nll_loss(probs.clamp_min(1e-8).log(), labels).item()
    report = classification_report(split.labels, probs.argmax(1).numpy(), classes)
    return report, loss


def resolve_checkpoint(path: Path) -> Path:
    """``path`` itself, or for a folder the model file its ``latest.json`` names (a training ``--output``)."""
    if not path.is_dir():
        return path
    return Path(storage.read_latest(path).model_uri(path))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--checkpoint", required=True, type=Path, help="model.pt file, or a folder holding latest.json (a training --output)"
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
    device = runtime.pick_device(args.device)
    checkpoint = resolve_checkpoint(args.checkpoint)
    ckpt = load_checkpoint(checkpoint)
    model = build_model(ckpt).to(device).to(memory_format=torch.channels_last)
    data = load_fer2013(args.data, ckpt.preprocessing, skip_bad=args.skip_bad)
    split = data[args.split]
    # Evaluate in fp32 so the figure does not depend on the CPU's bf16 support.
    report, loss = evaluate_split(model, split, ckpt.preprocessing, ckpt.classes, args.tta, args.batch_size)
    report.update(
        {
            "checkpoint": str(checkpoint),
            "run_id": ckpt.run_id,
            "model": ckpt.model.to_dict(),
            "data": str(args.data),
            "dataset_fingerprint": data.fingerprint,
            "split": args.split,
            "tta": args.tta,
            "loss": loss,
            "skipped": data.skipped,
        }
    )
    print(format_report(report))
    if args.output_json:
        args.output_json.parent.mkdir(parents=True, exist_ok=True)
        args.output_json.write_text(json.dumps(report, indent=2))
        png = args.output_json.with_suffix(".png")
        plot_confusion_matrix(
            report["confusion_matrix"],
            ckpt.classes,
            png,
            f"{ckpt.model.name} on {args.split} (tta={args.tta}): acc {report['accuracy']:.3f}",
        )
        log.info("wrote %s and %s", args.output_json, png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
