r"""Train several networks side by side on one machine within a wall-clock budget: a teacher
ensemble on a lent GPU (``scripts/gpu-teachers.sh``, docs/training.md).

    python -m training.fleet --data fer/ --output fleet/ --minutes 8 \
        --member configs/compact.yaml:11 --member configs/compact.yaml:12 [training flags...]

A member is ``CONFIG:SEED``. The members share the device, so how fast each one trains depends on
the others: they first train two epochs together (the calibration, in ``OUT/calibration/``), then
each trains from scratch for as many epochs as fit the rest of the budget, with a margin, at the
speed it showed (training and validation), so that its schedule ends inside the budget rather
than being cut at a high learning rate (``--max-epochs`` caps that). A member still running at the
deadline is stopped; the best epoch it reached stays in its run folder (``best.pt``). Flags not
listed here go to every ``training.train`` run, except those the fleet sets itself. Writes one run
folder per member (``--promote never``: they are teachers, not the served model), each member's
log, and ``OUT/fleet.json``; exits 1 unless every member finished.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

CALIBRATION_EPOCHS = 2
MARGIN = 0.05  # of the time left, kept free for the run's jitter
STOP_GRACE_S = 10.0  # between SIGTERM and SIGKILL at the deadline
POLL_S = 0.5
LOG_TAIL_LINES = 30
# training.train flags that the fleet sets for every member (their underscore forms too).
OWN_FLAGS = ("--config", "--seed", "--run-name", "--epochs", "--data", "--output", "--promote", "--resume")


@dataclass(frozen=True)
class Member:
    config: Path
    seed: int

    @property
    def name(self) -> str:
        return f"{self.config.stem}-s{self.seed}"  # training.train's run ids end in <run name>-s<seed>


def parse_member(text: str) -> Member:
    config, sep, seed = text.rpartition(":")
    if not sep or not seed.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r}: expected CONFIG:SEED, e.g. configs/compact.yaml:11")
    if not Path(config).is_file():
        raise argparse.ArgumentTypeError(f"{config}: no such config file")
    return Member(Path(config), int(seed))


class BudgetError(RuntimeError):
    """The budget does not fit what a member needs."""


@dataclass
class Outcome:
    """What one member's ``training.train`` process did."""

    member: Member
    epochs: int
    returncode: int
    stopped: bool  # still running at the deadline, so stopped
    wall_s: float  # from the start of all members to this one's exit (or stop)
    run: Path | None  # its run folder, once it made one

    def metrics(self) -> dict[str, Any]:
        """Its metrics.json; empty if it wrote none (or was stopped while writing it)."""
        path = self.run / "metrics.json" if self.run else None
        try:
            return json.loads(path.read_text()) if path and path.is_file() else {}
        except json.JSONDecodeError:
            return {}


def train_together(
    members: list[Member], epochs: list[int], data: str, output: Path, extra: list[str], deadline: float
) -> list[Outcome]:
    """Run one ``training.train`` per member at once; stop those still running at ``deadline``."""
    output.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for member, n in zip(members, epochs, strict=True):
            cmd = [sys.executable, "-m", "training.train", "--config", str(member.config), "--seed", str(member.seed),
                   "--run-name", member.config.stem, "--epochs", str(n), "--data", data, "--output", str(output),
                   "--promote", "never", *extra]  # fmt: skip
            with (output / f"{member.name}.log").open("ab") as logfile, _stop_signals_held() as unhold:
                # Its own process group: the deadline stops the compile workers it may start too.
                procs.append(subprocess.Popen(cmd, stdout=logfile, stderr=subprocess.STDOUT, start_new_session=True,
                                              preexec_fn=unhold))  # fmt: skip
        ended = wait_all(procs, deadline)
    finally:
        stopped = stop(procs)  # on any way out (an error, Ctrl-C, SIGTERM), no member is left running
    outcomes = []
    for member, n, proc in zip(members, epochs, procs, strict=True):
        end = ended.get(proc.pid, time.monotonic())
        was_stopped = proc.pid in stopped and proc.returncode < 0  # one that exited 0 meanwhile finished
        outcomes.append(Outcome(member, n, proc.returncode, was_stopped, end - started, run_folder(output, member)))
        how = "stopped at the deadline" if was_stopped else f"exit {proc.returncode}"
        log.info("%s: %s after %.0f s", member.name, how, outcomes[-1].wall_s)
        if proc.returncode != 0:
            log.warning("the end of %s:\n%s", output / f"{member.name}.log", _tail(output / f"{member.name}.log"))
    return outcomes


@contextlib.contextmanager
def _stop_signals_held() -> Iterator[Callable[[], None]]:
    """Ctrl-C and SIGTERM wait while a member starts, so none starts unrecorded (and so unstopped);
    yields what the member runs before exec to receive them again."""
    held = signal.pthread_sigmask(signal.SIG_BLOCK, ())  # the mask as it is: blocking may raise (a signal just in)

    def unhold() -> None:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)

    try:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        yield unhold
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)  # one that came meanwhile is handled now


def wait_all(procs: list[subprocess.Popen[bytes]], deadline: float) -> dict[int, float]:
    """When each process exited (monotonic clock, by pid), for those that did by ``deadline``."""
    ended: dict[int, float] = {}
    while True:
        for proc in procs:
            if proc.pid not in ended and proc.poll() is not None:
                ended[proc.pid] = time.monotonic()
        left = deadline - time.monotonic()
        if len(ended) == len(procs) or left <= 0:
            return ended
        time.sleep(min(POLL_S, left))  # a poll, not a wait for something: exits are seen within POLL_S


def stop(procs: list[subprocess.Popen[bytes]]) -> set[int]:
    """SIGTERM (and SIGCONT, for a paused one) to the process group of each process still running,
    then SIGKILL to those left after the grace; returns the pids signalled."""
    running = [p for p in procs if p.poll() is None]
    for proc in running:
        _signal_group(proc, signal.SIGTERM)
        _signal_group(proc, signal.SIGCONT)  # a paused member (kill -STOP) acts on the SIGTERM now, as systemd does
    grace_end = time.monotonic() + STOP_GRACE_S
    for proc in running:
        try:
            proc.wait(timeout=max(grace_end - time.monotonic(), 0.0))
        except subprocess.TimeoutExpired:
            log.warning("pid %d still running %.0f s after SIGTERM: killed", proc.pid, STOP_GRACE_S)
            _signal_group(proc, signal.SIGKILL)
            proc.wait()
    return {p.pid for p in running}


def _signal_group(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):  # exited meanwhile
        os.killpg(proc.pid, sig)


def run_folder(output: Path, member: Member) -> Path | None:
    """The member's run folder: ``<UTC time>-<run name>-s<seed>`` (``--output`` starts empty)."""
    pattern = re.compile(r"\d{8}-\d{6}-" + re.escape(member.name))
    runs = sorted(p for p in output.iterdir() if p.is_dir() and pattern.fullmatch(p.name))
    return runs[-1] if runs else None


def _tail(path: Path) -> str:
    lines = path.read_text(errors="replace").replace("\r", "\n").splitlines() if path.is_file() else []
    return "\n".join(lines[-LOG_TAIL_LINES:])


def plan_epochs(calibration: Outcome, seconds_left: float, max_epochs: int) -> int:
    """Epochs of a fresh run that fit ``seconds_left`` (less a margin and the stop grace) at the
    speed of the calibration's last epoch, training and validation (the first one pays for
    warm-up), after the costs beyond its epochs (start-up, data, warm-up, export), paid again."""
    history = calibration.metrics().get("history", [])
    name = calibration.member.name
    if calibration.stopped:
        raise BudgetError(f"the budget ran out during the calibration of {name}")
    if calibration.returncode != 0 or len(history) < CALIBRATION_EPOCHS:
        raise BudgetError(f"the calibration of {name} failed (exit {calibration.returncode}); see its log above")
    per_epoch = history[-1]["epoch_seconds"] + history[-1]["val_seconds"]
    fixed = max(calibration.wall_s - per_epoch * CALIBRATION_EPOCHS, 0.0)
    fits = math.floor((seconds_left * (1 - MARGIN) - STOP_GRACE_S - fixed) / per_epoch)
    if fits < 1:
        raise BudgetError(f"the budget leaves {seconds_left:.0f} s: not one epoch of {name} ({per_epoch:.0f} s + {fixed:.0f} s)")
    return min(fits, max_epochs)


def run_fleet(args: argparse.Namespace, extra: list[str]) -> dict[str, Any]:
    """Calibrate, train every member for its planned epochs, write ``fleet.json``; returns its content."""
    start = time.monotonic()
    deadline = start + args.minutes * 60
    members: list[Member] = args.member
    n = len(members)
    calibration = train_together(members, [CALIBRATION_EPOCHS] * n, args.data, args.output / "calibration", extra, deadline)
    epochs = [plan_epochs(c, deadline - time.monotonic(), args.max_epochs) for c in calibration]
    planned = {m.name: e for m, e in zip(members, epochs, strict=True)}
    log.info("calibrated in %.0f s; epochs: %s", time.monotonic() - start, planned)
    outcomes = train_together(members, epochs, args.data, args.output, extra, deadline)
    report = {"minutes": args.minutes, "wall_s": round(time.monotonic() - start, 1), "members": [_summary(o) for o in outcomes]}
    (args.output / "fleet.json").write_text(json.dumps(report, indent=2))
    return report


def _summary(outcome: Outcome) -> dict[str, Any]:
    metrics = outcome.metrics()
    return {
        "member": outcome.member.name,
        "config": str(outcome.member.config),
        "seed": outcome.member.seed,
        "epochs": outcome.epochs,
        "finished": outcome.returncode == 0,
        "stopped": outcome.stopped,
        "returncode": outcome.returncode,
        "wall_s": round(outcome.wall_s, 1),
        "run": str(outcome.run) if outcome.run else None,
        "val_accuracy": metrics.get("val_accuracy"),
        "val_macro_f1": metrics.get("val_macro_f1"),
        "best_epoch": metrics.get("best_epoch"),
    }


def _check(parser: argparse.ArgumentParser, args: argparse.Namespace, extra: list[str]) -> None:
    names = [m.name for m in args.member]
    if len(set(names)) != len(names):
        parser.error(f"two members would share a run name: {names}")
    for token in extra:
        flag = token.split("=", 1)[0].replace("_", "-")
        # training.train takes unambiguous prefixes of its flags too (--epoch for --epochs).
        if flag.startswith("--") and len(flag) > 2 and any(own.startswith(flag) for own in OWN_FLAGS):
            parser.error(f"{token}: the fleet sets {', '.join(OWN_FLAGS)} for every member")
    if args.minutes <= 0 or args.max_epochs < 1:
        parser.error("--minutes must be positive and --max-epochs at least 1")
    if args.output.exists() and (not args.output.is_dir() or any(args.output.iterdir())):
        parser.error(f"{args.output} is not an empty folder: the fleet finds its members' runs there")


def _exit_on_signal(signum: int, frame: object) -> None:
    sys.exit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--member", type=parse_member, action="append", required=True, help="CONFIG:SEED; repeat")
    parser.add_argument("--data", required=True, help="FER2013 zip, folder, fer2013.csv, or gs:// URI of one")
    parser.add_argument("--output", type=Path, required=True, help="a new or empty local folder: the members' runs")
    parser.add_argument("--minutes", type=float, required=True, help="the wall-clock budget, calibration included")
    parser.add_argument("--max-epochs", type=int, default=1000, help="no member trains longer than this")
    args, extra = parser.parse_known_args(argv)
    _check(parser, args, extra)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # SIGTERM (a timeout, the script's trap) unwinds like Ctrl-C, so the members are stopped too:
    # they run in their own process groups, which a signal to this one does not reach.
    signal.signal(signal.SIGTERM, _exit_on_signal)
    try:
        report = run_fleet(args, extra)
    except BudgetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for m in report["members"]:
        acc = "-" if m["val_accuracy"] is None else f"{m['val_accuracy']:.4f}"
        print(f"{acc}  {m['member']}: {m['epochs']} epochs, {'finished' if m['finished'] else 'stopped'}, {m['run']}")
    return 0 if all(m["finished"] for m in report["members"]) else 1


if __name__ == "__main__":
    sys.exit(main())
