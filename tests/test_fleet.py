"""training.fleet: members trained side by side within a budget (the GPU teacher recipe)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import time
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


def outcome(tmp_path: Path, epoch_seconds: list[float], wall_s: float, returncode: int | None = 0) -> fleet.Outcome:
    run = tmp_path / "run"
    run.mkdir(exist_ok=True)
    history = [{"epoch": i + 1, "epoch_seconds": s} for i, s in enumerate(epoch_seconds)]
    (run / "metrics.json").write_text(json.dumps({"history": history}))
    return fleet.Outcome(fleet.Member(Path("compact.yaml"), 1), 2, returncode, wall_s, run)


def test_planned_epochs_fit_what_is_left_at_the_calibrated_speed(tmp_path: Path) -> None:
    # 10 s of training per epoch (the first, warming up, took 30) is 11.5 s with validation; what
    # the calibration took beyond two such epochs (57 s: start-up, data, export) is paid again:
    # (172 - 57) / 11.5 = 10.
    calibrated = outcome(tmp_path, [30.0, 10.0], wall_s=57 + 2 * 11.5)
    assert fleet.plan_epochs(calibrated, seconds_left=172, max_epochs=1000) == 10
    assert fleet.plan_epochs(calibrated, seconds_left=172, max_epochs=4) == 4
    assert fleet.plan_epochs(calibrated, seconds_left=20, max_epochs=1000) == 1  # at least one
    with pytest.raises(fleet.CalibrationError, match="compact-s1 failed"):
        fleet.plan_epochs(outcome(tmp_path, [30.0], wall_s=40, returncode=1), 172, 1000)


def test_a_member_running_at_the_deadline_is_stopped(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    started = time.monotonic()
    assert fleet._wait_until(proc, deadline=started + 0.5) is None
    assert proc.poll() is not None  # gone, not left running
    assert time.monotonic() - started < 60


@pytest.mark.parametrize(
    ("member", "message"),
    [(CONFIG, "expected CONFIG:SEED"), (f"{CONFIG}:x", "expected CONFIG:SEED"), ("nope.yaml:1", "no such config file")],
)  # fmt: skip
def test_bad_members_are_refused(member: str, message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        fleet.main(["--member", member, "--data", "x.zip", "--output", "out", "--minutes", "1"])
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_two_members_with_one_run_name_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        fleet.main(["--member", f"{CONFIG}:1", "--member", f"{CONFIG}:1", "--data", "x", "--output", "o", "--minutes", "1"])
    assert "would share a run name" in capsys.readouterr().err


@pytest.mark.slow
def test_the_gpu_script_packs_training_images_and_brings_back_flat_files(tmp_path: Path) -> None:
    """scripts/gpu-teachers.sh as the device call runs it, on CPU: pack here, train there."""
    script = Path(__file__).parents[1] / "scripts" / "gpu-teachers.sh"
    env = {**os.environ, "PYTHON": sys.executable, "SEEDS": "3 4"}
    data = synthetic.write_zip(tmp_path / "archive.zip", synthetic.default_splits(per_class=8))
    packed = tmp_path / "gpu" / "train.tar.xz"
    subprocess.run(["bash", str(script), "pack", str(data), str(packed)], check=True, env=env)
    with tarfile.open(packed) as tar:
        names = tar.getnames()
    assert names and all(n.startswith("train") for n in names)  # PublicTest stays here

    out = tmp_path / "out"
    cmd = ["bash", str(script), "train", str(packed), str(out), "10", "--max-epochs", "1", *TINY]
    subprocess.run(cmd, check=True, env=env, cwd=tmp_path)
    assert sorted(p.name for p in out.iterdir()) == ["compact-s3.pt", "compact-s4.pt", "fleet.json", "fleet.log"]
    report = json.loads((out / "fleet.json").read_text())
    assert [(m["member"], m["finished"]) for m in report["members"]] == [("compact-s3", True), ("compact-s4", True)]
    # Without PublicTest in the pack, each member validated on a held-out tenth of Training.
    assert load_checkpoint(out / "compact-s3.pt").metrics["val_split"] == "10% stratified hold-out of train (seed 3)"
