r"""Train several networks side by side on one machine within a wall-clock budget: a teacher
ensemble on a lent GPU (``scripts/gpu-teachers.sh``, docs/training.md).

    python -m training.fleet --data fer/ --output fleet/ --minutes 8 \
        --member configs/compact.yaml:11 --member configs/compact.yaml:12 [training flags...]

A member is ``CONFIG:SEED``. The members share the device, so how fast each one trains depends on
the others: they first train two epochs together (the calibration, in ``OUT/calibration/``), then
each trains from scratch for as many epochs as fit the rest of the budget at the speed it showed,
so that its schedule ends inside the budget rather than being cut at a high learning rate
(``--max-epochs`` caps that). A member still running at the deadline is stopped; the best epoch
it reached stays in its run folder (``best.pt``). Flags not listed here go to every
``training.train`` run. Writes one run folder per member (``--promote never``: they are teachers,
not the served model) and ``OUT/fleet.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

CALIBRATION_EPOCHS = 2
STOP_GRACE_S = 10.0  # between SIGTERM and SIGKILL at the deadline
VALIDATION_SHARE = 1.15  # an epoch's wall time over its training time (validation, checkpoints)


@dataclass(frozen=True)
class Member:
    config: Path
    seed: int

    @property
    def name(self) -> str:
        return f"{self.config.stem}-s{self.seed}"  # training.train names the run <time>-<stem>-s<seed>


def parse_member(text: str) -> Member:
    config, sep, seed = text.rpartition(":")
    if not sep or not seed.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r}: expected CONFIG:SEED, e.g. configs/compact.yaml:11")
    if not Path(config).is_file():
        raise argparse.ArgumentTypeError(f"{config}: no such config file")
    return Member(Path(config), int(seed))


class CalibrationError(RuntimeError):
    """A member did not get through its calibration epochs."""


@dataclass
class Outcome:
    """What one member's ``training.train`` process did."""

    member: Member
    epochs: int
    returncode: int | None  # None: stopped at the deadline
    wall_s: float
    run: Path | None  # its run folder, once it made one

    def metrics(self) -> dict[str, Any]:
        path = self.run / "metrics.json" if self.run else None
        return json.loads(path.read_text()) if path and path.is_file() else {}


def train_together(
    members: list[Member], epochs: list[int], data: str, output: Path, extra: list[str], deadline: float
) -> list[Outcome]:
    """Run one ``training.train`` per member at once; stop those still running at ``deadline``."""
    output.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    procs = []
    for member, n in zip(members, epochs, strict=True):
        cmd = [sys.executable, "-m", "training.train", "--config", str(member.config), "--seed", str(member.seed),
               "--run-name", member.config.stem, "--epochs", str(n), "--data", data, "--output", str(output),
               "--promote", "never", *extra]  # fmt: skip
        with (output / f"{member.name}.log").open("ab") as logfile:
            procs.append(subprocess.Popen(cmd, stdout=logfile, stderr=subprocess.STDOUT))
    outcomes = []
    for member, n, proc in zip(members, epochs, procs, strict=True):
        code = _wait_until(proc, deadline)
        outcomes.append(Outcome(member, n, code, time.monotonic() - started, _run_folder(output, member)))
        how = "stopped at the deadline" if code is None else f"exit {code}"
        log.info("%s: %s after %.0f s", member.name, how, outcomes[-1].wall_s)
    return outcomes


def _wait_until(proc: subprocess.Popen[bytes], deadline: float) -> int | None:
    try:
        return proc.wait(timeout=max(deadline - time.monotonic(), 0.0))
    except subprocess.TimeoutExpired:
        proc.terminate()
        try:
            proc.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        return None


def _run_folder(output: Path, member: Member) -> Path | None:
    runs = sorted(output.glob(f"*-{member.name}"))  # run ids start with their UTC time
    return runs[-1] if runs else None


def plan_epochs(calibration: Outcome, seconds_left: float, max_epochs: int) -> int:
    """Epochs of a fresh run that fit ``seconds_left`` at the speed the calibration showed: its last
    epoch's training time (the first one pays for warm-up) plus validation per epoch, after the
    fixed costs (start-up, data, export) that the calibration paid too."""
    history = calibration.metrics().get("history", [])
    if calibration.returncode != 0 or len(history) < CALIBRATION_EPOCHS:
        name, code = calibration.member.name, calibration.returncode
        raise CalibrationError(f"the calibration of {name} failed (exit {code}); see its log")
    per_epoch = history[-1]["epoch_seconds"] * VALIDATION_SHARE
    fixed = max(calibration.wall_s - per_epoch * CALIBRATION_EPOCHS, 0.0)
    return max(1, min(max_epochs, math.floor((seconds_left - fixed) / per_epoch)))


def run_fleet(args: argparse.Namespace, extra: list[str]) -> dict[str, Any]:
    start = time.monotonic()
    deadline = start + args.minutes * 60
    members: list[Member] = args.member
    n = len(members)
    calibration = train_together(members, [CALIBRATION_EPOCHS] * n, args.data, args.output / "calibration", extra, deadline)
    epochs = [plan_epochs(c, deadline - time.monotonic(), args.max_epochs) for c in calibration]
    planned = {m.name: e for m, e in zip(members, epochs, strict=True)}
    log.info("calibrated in %.0f s; epochs: %s", time.monotonic() - start, planned)
    outcomes = train_together(members, epochs, args.data, args.output, extra, deadline)
    report = {"minutes": args.minutes, "wall_s": time.monotonic() - start, "members": [_summary(o) for o in outcomes]}
    (args.output / "fleet.json").write_text(json.dumps(report, indent=2))
    return report


def _summary(outcome: Outcome) -> dict[str, Any]:
    metrics = outcome.metrics()
    return {
        "member": outcome.member.name,
        **{k: str(v) if isinstance(v, Path) else v for k, v in asdict(outcome.member).items()},
        "epochs": outcome.epochs,
        "finished": outcome.returncode == 0,
        "returncode": outcome.returncode,
        "wall_s": round(outcome.wall_s, 1),
        "run": str(outcome.run) if outcome.run else None,
        "val_accuracy": metrics.get("val_accuracy"),
        "val_macro_f1": metrics.get("val_macro_f1"),
        "best_epoch": metrics.get("best_epoch"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--member", type=parse_member, action="append", required=True, help="CONFIG:SEED; repeat")
    parser.add_argument("--data", required=True, help="FER2013 zip, folder, fer2013.csv, or gs:// URI of one")
    parser.add_argument("--output", type=Path, required=True, help="a local folder: the members' run folders")
    parser.add_argument("--minutes", type=float, required=True, help="the wall-clock budget, calibration included")
    parser.add_argument("--max-epochs", type=int, default=1000, help="no member trains longer than this")
    args, extra = parser.parse_known_args(argv)
    names = [m.name for m in args.member]
    if len(set(names)) != len(names):
        parser.error(f"two members would share a run name: {names}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        report = run_fleet(args, extra)
    except CalibrationError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for m in report["members"]:
        acc = "-" if m["val_accuracy"] is None else f"{m['val_accuracy']:.4f}"
        print(f"{acc}  {m['member']}: {m['epochs']} epochs, {'finished' if m['finished'] else 'stopped'}, {m['run']}")
    return 0 if all(m["finished"] for m in report["members"]) else 1


if __name__ == "__main__":
    sys.exit(main())
