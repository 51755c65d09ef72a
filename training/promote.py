r"""The model registry's command: publish, promote under the gate, roll back, list.

    python -m training.promote --output runs/ --checkpoint CKPT [--data SRC]  # publish a checkpoint as a run, then promote it
    python -m training.promote --output runs/ --run RUN_ID [--force]          # promote a run already published
    python -m training.promote --output runs/ --rollback                      # serve the previous model again
    python -m training.promote --output runs/ --list                          # the promotion history

``--output`` is a folder or ``gs://bucket/prefix`` (the service's ``MODEL_URI``). A promotion
passes the gate (:class:`fercore.registry.Gate`: same split and dataset as the served model,
``val_accuracy`` no lower than its minus ``--tolerance``, at least ``--min-accuracy``) or is
refused with both figures; ``--force`` skips the gate and says what it skipped. Exit status: 0
changed (or listed), 1 refused (nothing changed), 2 bad usage. See docs/promotion.md.
"""

from __future__ import annotations

import argparse
import logging
import re
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fercore import registry, storage
from fercore.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from fercore.registry import Actor, Gate, Outcome
from fercore.storage import LatestPointer
from training.export import export_for_serving

log = logging.getLogger(__name__)

POLICIES = ("if-better", "always", "never")  # TrainConfig.promote
_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # one path component, never "..": it names a folder


def scalar_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """The metrics a pointer carries: numbers and strings (no per-class tables)."""
    return {k: v for k, v in metrics.items() if isinstance(v, int | float | str)}


def publish_and_promote(
    output: str, files: dict[str, Path], serve: str, info: LatestPointer, policy: str, gate: Gate, actor: Actor
) -> Outcome:
    """Publish ``files`` as run ``info.run_id``, the service to run ``serve`` (``info`` gives
    the metrics, creation time and dataset fingerprint), then promote it as ``policy`` says:
    ``if-better`` under ``gate``, ``always`` past it, ``never`` not at all. The run is published
    whatever happens."""
    if policy not in POLICIES:
        raise ValueError(f"unknown promotion policy {policy!r} (one of {', '.join(POLICIES)})")
    candidate = storage.publish_run(
        output,
        info.run_id,
        files,
        model_name=serve,
        metrics=scalar_metrics(info.metrics),
        created_at=info.created_at,
        dataset_fingerprint=info.dataset_fingerprint,
    )
    if policy == "never":
        return Outcome(False, f"published run {info.run_id} without promoting it (--promote never)", None)
    return registry.promote(
        output, candidate, gate if policy == "if-better" else None, actor, fingerprint_of=served_fingerprint(output)
    )


def served_fingerprint(output: str) -> Callable[[LatestPointer], str]:
    """For a served model whose ``latest.json`` has no dataset fingerprint (written before the
    registry): the one in its published checkpoint, if that is the file served; "" otherwise."""

    def fingerprint_of(current: LatestPointer) -> str:
        try:
            published = read_published(output, current.run_id)
        except ValueError:
            return ""
        return published.dataset_fingerprint if published.sha256 == current.sha256 else ""

    return fingerprint_of


def describe(outcome: Outcome) -> str:
    """One line for people: what is served now and why."""
    if outcome.promoted and outcome.pointer is not None:
        return f"now serving run {outcome.pointer.run_id}: {outcome.reason}"
    served = f" (still serving run {outcome.pointer.run_id})" if outcome.pointer is not None else ""
    return f"not promoted: {outcome.reason}{served}"


def _publish_checkpoint(args: argparse.Namespace, gate: Gate, actor: Actor) -> Outcome:
    """``--checkpoint``: a copy without training state and its serving exports, published as a
    run and promoted. A run already published from the same checkpoint is promoted as it is."""
    source = storage.fetch_to_cache(args.checkpoint) if storage.is_gcs(args.checkpoint) else Path(args.checkpoint)
    ckpt = load_checkpoint(source)
    run_id = ckpt.run_id or f"ckpt-{storage.sha256_file(source)[:12]}"
    if not _RUN_ID.fullmatch(run_id):
        raise ValueError(f"{args.checkpoint}: run id {run_id!r} cannot name a folder")
    staging = storage.cache_dir() / "publish" / run_id  # the exports are written next to the copy, not next to CKPT
    save_checkpoint(ckpt, staging / "model.pt", with_training_state=False)
    applied = None if args.force else gate
    existing = _published(args.output, run_id)
    if existing is not None:
        # Exporting again would rewrite the served file with other bytes than latest.json names.
        if existing.files.get("model.pt") != storage.sha256_file(staging / "model.pt"):
            raise ValueError(f"run {run_id} is already published in {args.output} from another checkpoint")
        return registry.promote(args.output, existing, applied, actor, fingerprint_of=served_fingerprint(args.output))
    export = export_for_serving(staging / "model.pt", args.data)
    info = LatestPointer(
        run_id=run_id,
        path="",
        sha256="",
        metrics={**ckpt.metrics, **export.metrics},
        created_at=ckpt.created_at,
        dataset_fingerprint=ckpt.dataset_fingerprint,
    )
    return publish_and_promote(
        args.output, export.files, export.serve, info, "always" if args.force else "if-better", gate, actor
    )


def _published(output: str, run_id: str) -> LatestPointer | None:
    """The run's candidate pointer, if it is published already."""
    try:
        return storage.read_run(output, run_id)
    except Exception:  # not published (FileNotFoundError, GCS NotFound...)
        return None


def read_published(output: str, run_id: str) -> LatestPointer:
    """The candidate pointer of a published run; for a run published before ``pointer.json``
    existed, rebuilt from its ``model.pt``."""
    if not _RUN_ID.fullmatch(run_id):
        raise ValueError(f"{run_id!r} is not a run id")
    try:
        return storage.read_run(output, run_id)
    except Exception as exc:
        legacy = storage.join(output, run_id, "model.pt")
        try:
            path = storage.fetch_to_cache(legacy) if storage.is_gcs(legacy) else Path(legacy)
            ckpt = load_checkpoint(path)
        except (CheckpointError, OSError, ValueError):
            raise ValueError(f"run {run_id} is not published in {output} ({type(exc).__name__}: {exc})") from None
        sha = storage.sha256_file(path)
        return LatestPointer(
            run_id=run_id,
            path=f"{run_id}/model.pt",
            sha256=sha,
            metrics=scalar_metrics(ckpt.metrics),
            created_at=ckpt.created_at,
            files={"model.pt": sha},
            dataset_fingerprint=ckpt.dataset_fingerprint,
        )


def format_history(events: list[registry.Event]) -> str:
    """The history as a table, oldest first."""
    lines = [f"{'#':>3}  {'when (UTC)':<25}  {'action':<8}  {'run':<40}  {'val_acc':>7}  {'by':<24}  command"]
    for e in events:
        acc = e.pointer.get("metrics", {}).get("val_accuracy")
        shown = f"{acc:.4f}" if isinstance(acc, int | float) else "-"
        what = f"{e.action}{'!' if e.forced and e.action == 'promote' else ''}"
        lines.append(f"{e.seq:>3}  {e.at:<25}  {what:<8}  {e.run_id:<40}  {shown:>7}  {e.by:<24}  {e.command}")
        lines.append(f"{'':>3}  {e.note}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True, help="the registry: a folder or gs://bucket/prefix holding latest.json")
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--checkpoint", help="publish this checkpoint (path or gs://) as a run, then promote it")
    action.add_argument("--run", help="promote this published run (a folder under --output)")
    action.add_argument("--rollback", action="store_true", help="serve the previously promoted model again")
    action.add_argument("--list", action="store_true", help="print the promotion history")
    parser.add_argument("--data", help="with --checkpoint: the data the serving export may calibrate on")
    parser.add_argument("--force", action="store_true", help="skip the gate (saying what it skipped)")
    parser.add_argument("--tolerance", type=float, default=0.0, help="accept a val_accuracy this much below the served one")
    parser.add_argument("--min-accuracy", type=float, default=0.0, help="refuse a val_accuracy below this, always")
    parser.add_argument(
        "--realfaces-tolerance",
        type=float,
        help="also refuse a run whose realfaces_dev_accuracy (trained with --realfaces) is this much below the served one's",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    gate = Gate(tolerance=args.tolerance, min_accuracy=args.min_accuracy, realfaces_tolerance=args.realfaces_tolerance)
    actor = Actor.here(shlex.join(["training.promote", *(sys.argv[1:] if argv is None else argv)]))
    try:
        if args.list:
            print(format_history(registry.history(args.output)))
            return 0
        if args.rollback:
            outcome = registry.rollback(args.output, actor)
        elif args.run:
            candidate = read_published(args.output, args.run)
            gate_or_none = None if args.force else gate
            outcome = registry.promote(
                args.output, candidate, gate_or_none, actor, fingerprint_of=served_fingerprint(args.output)
            )
        else:
            outcome = _publish_checkpoint(args, gate, actor)
    except (ValueError, CheckpointError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(describe(outcome))
    return 0 if outcome.promoted else 1


if __name__ == "__main__":
    sys.exit(main())
