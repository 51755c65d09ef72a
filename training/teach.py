r"""Teachers for distillation: networks run on every batch, or an ensemble's stored predictions.

    python -m training.teach --checkpoint models/fer-compact.pt --checkpoint runs/<a>/model.pt \
        --checkpoint runs/<b>/snapshot-e30.pt --data ../shared/data/fer2013.zip --output teachers/ens.npz

averages the members' class probabilities (with flip TTA by default) over the training split
and writes them to ``ens.npz``; ``python -m training.train --teacher teachers/ens.npz`` then
distils the ensemble at no cost per epoch (a live one, ``--teacher a.pt,b.pt``, costs a forward
pass per member, view and batch, but predicts on the augmented batch the student sees). It also
evaluates each member and the ensemble on the validation split (PublicTest) and writes
``ens.json`` (each member's run id, its figures and the ensemble's).

The stored probabilities belong to one training split: the file carries its digest, and a run
on other data refuses the file.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from fercore.artifact import ModelLoadError
from fercore.checkpoint import CheckpointError, build_model, load_checkpoint
from fercore.labels import CLASS_NAMES
from fercore.preprocessing import PreprocessSpec
from fercore.storage import atomic_write
from training import runtime
from training.config import is_stored_teacher, teacher_paths
from training.data import Split, load_fer2013, train_val_split
from training.evaluate import TTA, IncompatibleMembers, Loaded, decoding, load_members, predict_probs, score, tta_views

log = logging.getLogger(__name__)

PROB_FLOOR = 1e-6  # stored probabilities become logits (their logs); keep those finite


def split_digest(images: np.ndarray, labels: np.ndarray) -> str:
    """Identity of a training split: the images and labels, in order (a stored row is an index)."""
    h = hashlib.sha256(np.ascontiguousarray(images).tobytes())
    h.update(np.ascontiguousarray(labels).astype(np.int64).tobytes())
    return "sha256:" + h.hexdigest()


class ModelTeacher:
    """Frozen networks run on the (augmented) batch the student sees, optionally on its test-time
    views too. One network on the batch alone gives its logits; otherwise the logits are the log of
    the probabilities averaged over networks and views (as StoredTeacher's)."""

    def __init__(self, models: nn.Module | Sequence[nn.Module], tta: TTA = "none") -> None:
        self.models, self.tta = [models] if isinstance(models, nn.Module) else list(models), tta

    def __call__(self, x: Tensor, idx: Tensor) -> Tensor:
        if self.tta == "none" and len(self.models) == 1:
            return self.models[0](x)
        views = tta_views(x, self.tta)
        probs = torch.stack([m(v).float().softmax(-1) for m in self.models for v in views]).mean(0)
        return probs.clamp_min(PROB_FLOOR).log()


class StoredTeacher:
    """Logits looked up by training-set index: the log of an ensemble's averaged probabilities,
    so that softening them by a temperature T gives p^(1/T), normalised, as for a network."""

    def __init__(self, probs: Tensor) -> None:
        self.logits = probs.clamp_min(PROB_FLOOR).log()

    def __call__(self, x: Tensor, idx: Tensor) -> Tensor:
        return self.logits[idx]


Teacher = ModelTeacher | StoredTeacher


def load_teacher(
    teacher: str, device: torch.device, spec: PreprocessSpec, train_images: Tensor, train_labels: Tensor, tta: TTA = "none"
) -> Teacher:
    """The teacher ``teacher`` names: stored predictions (.npz) for this very training split, or
    checkpoints separated by commas (run on ``tta``'s views of each batch, their probabilities averaged)."""
    if is_stored_teacher(teacher):
        return load_stored_teacher(teacher_paths(teacher)[0], device, train_images, train_labels)
    return ModelTeacher([load_teacher_network(path, device, spec, tta) for path in teacher_paths(teacher)], tta)


def load_stored_teacher(path: str, device: torch.device, train_images: Tensor, train_labels: Tensor) -> StoredTeacher:
    with np.load(path) as stored:
        probs, digest = stored["probs"], str(stored["split_digest"])
    expected = split_digest(train_images.cpu().numpy(), train_labels.cpu().numpy())
    if digest != expected:
        raise ValueError(f"teacher {path} holds predictions for another training split ({digest}, not {expected})")
    if probs.shape != (len(train_labels), len(CLASS_NAMES)):
        raise ValueError(f"teacher {path} holds {probs.shape} probabilities, not ({len(train_labels)}, {len(CLASS_NAMES)})")
    log.info("distilling from stored predictions %s (%d images)", path, len(probs))
    return StoredTeacher(torch.from_numpy(probs).to(device))


def load_teacher_network(path: str, device: torch.device, spec: PreprocessSpec, tta: TTA) -> nn.Module:
    """A checkpoint as a frozen teacher, which must see faces as the student does."""
    ckpt = load_checkpoint(path)
    if ckpt.preprocessing != spec:
        raise ValueError(f"teacher {path} was trained with other preprocessing ({ckpt.preprocessing})")
    if ckpt.classes != CLASS_NAMES:
        raise ValueError(f"teacher {path} predicts other classes: {ckpt.classes}")
    model = build_model(ckpt).to(device).to(memory_format=torch.channels_last)  # in eval mode
    for p in model.parameters():
        p.requires_grad_(False)
    log.info("distilling from %s (%s, val acc %s, TTA %s)", path, ckpt.model.name, ckpt.metrics.get("val_accuracy"), tta)
    return model


# ---------------------------------------------------------------------------- stored predictions


@dataclass
class Member:
    uri: str
    run_id: str  # the uri may name another file later (models/ is overwritten); the run id stays
    train_probs: Tensor  # (N_train, C)
    val_probs: Tensor  # (N_val, C)


def predict_member(loaded: Loaded, train: Split, val: Split, tta: TTA, bf16: bool) -> Member:
    probs = [predict_probs(loaded.model, torch.from_numpy(s.images), loaded.spec, tta=tta, bf16=bf16) for s in (train, val)]
    return Member(loaded.uri, loaded.run_id, *probs)


def scores(probs: Tensor, split: Split) -> dict[str, float]:
    report, _ = score(probs, split, CLASS_NAMES)
    return {"accuracy": report["accuracy"], "macro_f1": report["macro_f1"]}


def build_teacher(args: argparse.Namespace) -> dict[str, Any]:
    """Predict with every member (``--checkpoint``), write ``--output`` (.npz) and its report (.json
    beside it); returns the report."""
    uris, output, tta = args.checkpoint, args.output, args.tta
    device = runtime.pick_device("auto")
    loaded = load_members(uris, device)
    if loaded[0].classes != CLASS_NAMES:  # the stored columns are read in this order
        raise IncompatibleMembers(f"{uris[0]} predicts other classes: {loaded[0].classes}")
    spec = PreprocessSpec()  # as training decodes the faces whose rows are stored
    if decoding(loaded[0].spec) != decoding(spec):
        raise IncompatibleMembers(f"{uris[0]} decodes faces otherwise than training does: {loaded[0].spec}")
    data = load_fer2013(args.data, spec, skip_bad=args.skip_bad)
    train, val, val_desc = train_val_split(data, args.val_fraction, args.seed)
    bf16 = runtime.use_bf16("auto", device)  # as training validates: ~3x faster on CPUs with native bf16
    members = []
    for i, m in enumerate(loaded, 1):
        members.append(predict_member(m, train, val, tta, bf16))
        log.info("member %d/%d %s: val acc %.4f", i, len(uris), m.uri, scores(members[-1].val_probs, val)["accuracy"])
    train_probs = torch.stack([m.train_probs for m in members]).mean(0)
    val_probs = torch.stack([m.val_probs for m in members]).mean(0)
    report = {
        "members": [{"uri": m.uri, "run_id": m.run_id, **scores(m.val_probs, val)} for m in members],
        "ensemble": scores(val_probs, val),
        "tta": tta,
        "val_split": val_desc,
        "dataset_fingerprint": data.fingerprint,
        "split_digest": split_digest(train.images, train.labels),
        "train_accuracy": scores(train_probs, train)["accuracy"],  # how far the soft labels agree with the hard ones
    }
    with atomic_write(output) as f:
        np.savez(f, probs=train_probs.numpy().astype(np.float32), split_digest=np.array(report["split_digest"]))
    with atomic_write(output.with_suffix(".json")) as f:
        f.write(json.dumps(report, indent=2).encode())
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", action="append", required=True, help="a member (model.pt, .onnx, ...); repeat")
    parser.add_argument("--data", required=True, help="FER2013 zip, folder, fer2013.csv, or gs:// URI of one")
    parser.add_argument("--output", type=Path, required=True, help="the .npz to write (its report goes beside it)")
    parser.add_argument("--tta", default="flip", choices=["none", "flip", "tencrop"])
    parser.add_argument("--val-fraction", type=float, default=0.1, help="as the training run's (sources without PublicTest)")
    parser.add_argument("--seed", type=int, default=0, help="as the training run's (sources without PublicTest)")
    parser.add_argument("--skip-bad", action="store_true", help="as the training run's: skip undecodable images")
    args = parser.parse_args(argv)
    if args.output.suffix != ".npz":
        parser.error("--output must end in .npz")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    try:
        report = build_teacher(args)
    except (IncompatibleMembers, CheckpointError, ModelLoadError) as exc:
        parser.error(str(exc))
    for m in report["members"]:
        print(f"{m['accuracy']:.4f}  macro-F1 {m['macro_f1']:.4f}  {m['uri']}")
    e = report["ensemble"]
    n = len(report["members"])
    print(f"{e['accuracy']:.4f}  macro-F1 {e['macro_f1']:.4f}  ensemble of {n} (tta={args.tta}) on {report['val_split']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
