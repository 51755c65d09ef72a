"""training.fleet: members trained side by side within a budget (the GPU teacher recipe)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from fercore.checkpoint import load_checkpoint
from tests.utils import synthetic
from training import fleet

TINY = ["--model-kwargs", '{"width": 4}', "--batch-size", "16", "--precision", "fp32", "--eval-batch-size", "64",
        "--num-threads", "1"]  # fmt: skip
CONFIG = str(Path(__file__).parents[1] / "configs" / "compact.yaml")


@pytest.mark.slow
def test_members_train_side_by_side_for_the_planned_epochs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = synthetic.write_zip(tmp_path / "archive.zip", synthetic.default_splits(per_class=8))
    out = tmp_path / "fleet"
    args = ["--member", f"{CONFIG}:1", "--member", f"{CONFIG}:2", "--data", str(data), "--output", str(out)]
    assert fleet.main([*args, "--minutes", "10", "--max-epochs", "3", *TINY]) == 0

    report = json.loads((out / "fleet.json").read_text())
    assert [m["member"] for m in report["members"]] == ["compact-s1", "compact-s2"]
    for m in report["members"]:
        assert (m["finished"], m["epochs"]) == (True, 3)  # ten minutes fit far more: the cap holds
        run = Path(m["run"])
        assert run.parent == out and run.name.endswith(f"-compact-s{m['seed']}")
        metrics = json.loads((run / "metrics.json").read_text())
        assert metrics["epochs_run"] == 3 and m["val_accuracy"] == metrics["val_accuracy"]
        ckpt = load_checkpoint(run / "model.pt")
        assert ckpt.model.kwargs["width"] == 4  # the extra flags reached training
        # The calibration ran each member for two epochs first, in its own folder.
        (calibration,) = (out / "calibration").glob(f"*-compact-s{m['seed']}")
        assert json.loads((calibration / "metrics.json").read_text())["epochs_run"] == fleet.CALIBRATION_EPOCHS
    assert not (out / "latest.json").exists()  # teachers are not promoted
    assert "compact-s2: 3 epochs, finished" in capsys.readouterr().out


def outcome(tmp_path: Path, epochs: list[tuple[float, float]], wall_s: float, returncode: int = 0) -> fleet.Outcome:
    """A calibration that took ``wall_s``, its epochs (training s, validation s) in metrics.json."""
    run = tmp_path / "run"
    run.mkdir(exist_ok=True)
    history = [{"epoch": i + 1, "epoch_seconds": t, "val_seconds": v} for i, (t, v) in enumerate(epochs)]
    (run / "metrics.json").write_text(json.dumps({"history": history}))
    return fleet.Outcome(fleet.Member(Path("compact.yaml"), 1), 2, returncode, returncode < 0, wall_s, run)


def test_planned_epochs_fit_what_is_left_at_the_calibrated_speed(tmp_path: Path) -> None:
    # The last epoch took 10 s of training and 1.5 s of validation (the first, warming up, 30 s);
    # what the calibration took beyond two such epochs (57 s: start-up, data, export) is paid
    # again, and 5% of the time left and the 10 s stop grace are kept free:
    # (300 * 0.95 - 10 - 57) / 11.5 = 18.96 -> 18.
    calibrated = outcome(tmp_path, [(30.0, 2.0), (10.0, 1.5)], wall_s=57 + 2 * 11.5)
    assert fleet.plan_epochs(calibrated, seconds_left=300, max_epochs=1000) == 18
    assert fleet.plan_epochs(calibrated, seconds_left=300, max_epochs=4) == 4
    with pytest.raises(fleet.BudgetError, match="not one epoch of compact-s1"):
        fleet.plan_epochs(calibrated, seconds_left=80, max_epochs=1000)
    with pytest.raises(fleet.BudgetError, match="calibration of compact-s1 failed"):
        fleet.plan_epochs(outcome(tmp_path, [(30.0, 2.0)], wall_s=40, returncode=1), 300, 1000)
    with pytest.raises(fleet.BudgetError, match="ran out during the calibration of compact-s1"):
        fleet.plan_epochs(outcome(tmp_path, [(30.0, 2.0)], wall_s=40, returncode=-signal.SIGTERM), 300, 1000)


def spawn(code: str) -> subprocess.Popen[bytes]:
    """A child in its own process group, as the fleet starts its members."""
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, start_new_session=True)


def gone(pid: int) -> bool:
    """No such process, or only its zombie (dead, waiting for a parent to reap it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def eventually(condition: Callable[[], bool], timeout: float = 30.0) -> bool:
    """Whether ``condition`` holds within ``timeout`` (checked every 0.1 s)."""
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            return False
        time.sleep(0.1)
    return True


def test_members_are_timed_each_and_stopped_at_the_deadline(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(fleet, "STOP_GRACE_S", 1.0)
    quick = spawn("pass")
    # A member with a worker of its own (as torch.compile starts): stopping the member stops it too.
    sleeper = spawn("import subprocess, time\np = subprocess.Popen(['sleep', '600'])\nprint(p.pid, flush=True)\ntime.sleep(600)")
    stubborn = spawn(
        "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nprint('ready', flush=True)\ntime.sleep(600)"
    )
    procs = [sleeper, quick, stubborn]  # the quick one is not first: its time is its own, not the sleeper's
    try:
        assert sleeper.stdout is not None and stubborn.stdout is not None
        worker = int(sleeper.stdout.readline())
        assert stubborn.stdout.readline() == b"ready\n"  # ignoring SIGTERM from here on
        quick.wait()
        deadline = time.monotonic() + 3.0
        ended = fleet.wait_all(procs, deadline)
        assert set(ended) == {quick.pid} and ended[quick.pid] < deadline
    finally:
        stopped = fleet.stop(procs)
    assert stopped == {sleeper.pid, stubborn.pid}
    assert (sleeper.returncode, quick.returncode, stubborn.returncode) == (-signal.SIGTERM, 0, -signal.SIGKILL)
    assert f"pid {stubborn.pid} still running" in caplog.text and f"pid {sleeper.pid} " not in caplog.text
    assert eventually(lambda: gone(worker))


@pytest.mark.slow
def test_a_fleet_stopped_by_sigterm_stops_its_members(tmp_path: Path) -> None:
    data = synthetic.write_zip(tmp_path / "archive.zip", synthetic.default_splits(per_class=8))
    out = tmp_path / "fleet"
    cmd = [sys.executable, "-m", "training.fleet", "--member", f"{CONFIG}:1", "--member", f"{CONFIG}:2",
           "--data", str(data), "--output", str(out), "--minutes", "30", *TINY]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=Path(CONFIG).parents[1])
    members: list[int] = []
    try:
        # Each member is paused as soon as it runs in its own session: paused, it cannot finish on its own
        # (importing torch alone outlasts the polling), so only the fleet's stop can end it.
        end = time.monotonic() + 120
        while not (members := _members(out, proc.pid)) and proc.poll() is None and time.monotonic() < end:
            time.sleep(0.01)
        assert len(members) == 2
        for pid in members:
            os.killpg(pid, signal.SIGSTOP)
            assert not _blocked(pid) & {signal.SIGTERM, signal.SIGINT}  # the fleet held them only while starting it
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    finally:
        proc.kill()
        for pid in members:  # on a failure, not left paused for good
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
    assert eventually(lambda: all(gone(pid) for pid in members))
    assert not list(out.glob("calibration/*/metrics.json"))  # stopped, rather than left to finish
    assert proc.stdout is not None
    assert "after SIGTERM: killed" not in proc.stdout.read().decode()  # woken to act on the SIGTERM, not killed


def _members(out: Path, fleet_pid: int) -> list[int]:
    """The fleet's two members once both lead their own process group (empty until then)."""
    pids = [p for p in _pids() if p != fleet_pid and str(out) in _cmdline(p) and "training.train" in _cmdline(p)]
    leaders = [p for p in pids if _pgid(p) == p]
    return leaders if len(leaders) == 2 else []


def _blocked(pid: int) -> set[int]:
    """The signals process ``pid`` blocks (its main thread)."""
    status = Path(f"/proc/{pid}/status").read_text()
    mask = int(re.search(r"^SigBlk:\s*([0-9a-f]+)$", status, re.MULTILINE)[1], 16)  # type: ignore[index]
    return {n for n in range(1, 65) if mask >> (n - 1) & 1}


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def _pids() -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


@pytest.mark.parametrize(
    ("member", "message"),
    [(CONFIG, "expected CONFIG:SEED"), (f"{CONFIG}:x", "expected CONFIG:SEED"), ("nope.yaml:1", "no such config file")],
)  # fmt: skip
def test_bad_members_are_refused(member: str, message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        fleet.main(["--member", member, "--data", "x.zip", "--output", "out", "--minutes", "1"])
    assert exc.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"),
    [(["--member", f"{CONFIG}:1"], "would share a run name"), (["--epochs", "5"], "the fleet sets"),
     (["--epoch=5"], "the fleet sets"), (["--run_name", "x"], "the fleet sets"), (["--minutes", "0"], "must be positive")],
)  # fmt: skip
def test_bad_fleets_are_refused(args: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["--member", f"{CONFIG}:1", "--data", "x.zip", "--output", str(tmp_path / "new"), "--minutes", "1"]
    with pytest.raises(SystemExit) as exc:
        fleet.main([*base, *args])
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_a_fleet_starts_in_an_empty_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "20261201-000000-compact-s1").mkdir()  # an earlier fleet's run: it would be taken for this one's
    with pytest.raises(SystemExit):
        fleet.main(["--member", f"{CONFIG}:1", "--data", "x.zip", "--output", str(tmp_path), "--minutes", "1"])
    assert "is not an empty folder" in capsys.readouterr().err


@pytest.mark.slow
def test_the_gpu_script_packs_training_images_and_brings_back_flat_files(tmp_path: Path) -> None:
    """scripts/gpu-teachers.sh as the device call runs it, on CPU: pack here, train there."""
    script = Path(__file__).parents[1] / "scripts" / "gpu-teachers.sh"
    env = {**os.environ, "PYTHON": sys.executable, "SEEDS": "3 4"}
    # In a wrapper folder, as some downloads have it.
    data = synthetic.write_zip(tmp_path / "archive.zip", synthetic.default_splits(per_class=8), wrapper="fer2013/")
    packed = tmp_path / "gpu" / "train.tar.xz"
    subprocess.run(["bash", str(script), "pack", str(data), str(packed)], check=True, env=env)
    with tarfile.open(packed) as tar:
        names = [n.removeprefix("./") for n in tar.getnames() if n != "."]
    assert "fer2013/train/happy" in names and all(n.startswith("fer2013") for n in names)
    assert not any("/test" in n for n in names)  # PublicTest stays here
    again = tmp_path / "again.tar.xz"
    subprocess.run(["bash", str(script), "pack", str(data), str(again)], check=True, env=env)
    assert again.read_bytes() == packed.read_bytes()  # reproducible

    out = tmp_path / "out"
    cmd = ["bash", str(script), "train", str(packed), str(out), "10", "--max-epochs", "1", *TINY]
    subprocess.run(cmd, check=True, env=env, cwd=tmp_path)
    assert sorted(p.name for p in out.iterdir()) == ["compact-s3.pt", "compact-s4.pt", "fleet.json", "fleet.log"]
    report = json.loads((out / "fleet.json").read_text())
    assert [(m["member"], m["finished"]) for m in report["members"]] == [("compact-s3", True), ("compact-s4", True)]
    # Without PublicTest in the pack, each member validated on a held-out tenth of Training.
    assert load_checkpoint(out / "compact-s3.pt").metrics["val_split"] == "10% stratified hold-out of train (seed 3)"
