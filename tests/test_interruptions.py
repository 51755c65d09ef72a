"""Work killed part-way with SIGKILL (no handler runs, nothing is cleaned up), then picked up again.

* Training: ``python -m training.train`` as a real process on tiny synthetic data, killed three
  steps into its second epoch (:mod:`tests.utils.stalling_train` stops it there), then resumed
  with ``--resume``: the finished run equals an uninterrupted run with the same seed, metrics and
  weights, bit for bit. (``tests/test_train.py`` has the in-process version, interrupted by an
  exception.)
* Publishing: a process publishing run after run (:mod:`tests.utils.publisher`) is killed at
  random moments, and at the worst ones (the model uploaded, ``latest.json`` not yet written;
  the new ``latest.json`` written to a temp file, not yet renamed), to a local folder and to
  ``gs://`` on the emulator. ``latest.json`` is always either the previous pointer or the new
  one, and always names a complete model whose sha256 it holds.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from google.api_core import exceptions as api_exceptions

from fercore import registry, storage
from fercore.checkpoint import load_checkpoint
from tests.utils import synthetic
from training import train

ROOT = Path(__file__).resolve().parents[1]
# Only catches a hang: these processes take seconds.
HANG_S = 300.0
# Small batches, so an epoch has dozens of steps and lasts long enough to be killed inside.
BATCH = 4
TINY = [
    "--model", "compact", "--model-kwargs", '{"width": 4}', "--batch-size", str(BATCH), "--lr", "0.05",
    "--precision", "fp32", "--warmup-epochs", "0", "--eval-batch-size", "64", "--num-threads", "1",
    "--mixup-alpha", "0.2", "--mix-prob", "0.5",
]  # fmt: skip
# Fields of a history row that are timings, not results.
TIMINGS = {"images_per_s", "epoch_seconds", "val_seconds"}


class Output:
    """What a child process writes (stdout and stderr), read by a thread as it comes.

    Read in raw chunks rather than lines: tqdm draws a progress bar as ``\\r<bar>`` with no line
    end after it, and a line reader would only hand it over once the bar is redrawn.
    """

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self._text = ""
        self._cond = threading.Condition()
        self._proc = proc
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self._proc.stdout is not None
        fd = self._proc.stdout.fileno()
        while chunk := os.read(fd, 1 << 16):
            with self._cond:
                self._text += chunk.decode(errors="replace")
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    @property
    def lines(self) -> list[str]:
        """The output so far, split at ``\\n`` and ``\\r``; the last line may be incomplete."""
        with self._cond:
            return [line for line in re.split(r"[\r\n]+", self._text) if line]

    def wait_for(self, pattern: str, timeout: float = HANG_S) -> re.Match[str]:
        """The first line that ``pattern`` matches (searched), as soon as the process has written it."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            with self._cond:
                for line in self.lines:
                    if match := regex.search(line):
                        return match
                assert self._thread.is_alive(), f"exited without writing {pattern!r}:\n" + "\n".join(self.lines[-40:])
                assert time.monotonic() < deadline, f"no {pattern!r} after {timeout:.0f} s"
                self._cond.wait(timeout=1.0)

    def text(self) -> str:
        """Everything, once the process has closed its output."""
        self._thread.join(timeout=HANG_S)
        return "\n".join(self.lines)


@contextmanager
def child(*args: str) -> Iterator[tuple[subprocess.Popen[bytes], Output]]:
    """``python *args`` in the repository root with this environment; killed if still running at the end."""
    proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        yield proc, Output(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=HANG_S)


def sigkill(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=HANG_S) == -signal.SIGKILL


# --- training -----------------------------------------------------------------------------


def only_run(output: Path) -> Path:
    (run,) = [p for p in output.iterdir() if p.is_dir()]
    return run


def results(run: Path) -> dict:
    """metrics.json without the timings, which differ from run to run."""
    metrics = json.loads((run / "metrics.json").read_text())
    metrics["history"] = [{k: v for k, v in row.items() if k not in TIMINGS} for row in metrics["history"]]
    return metrics


def assert_same_weights(a: Path, b: Path) -> None:
    sa, sb = load_checkpoint(a).state_dict, load_checkpoint(b).state_dict
    assert sa.keys() == sb.keys()
    for key in sa:
        torch.testing.assert_close(sa[key], sb[key], rtol=0, atol=0, msg=key)


@pytest.mark.slow
def test_training_killed_mid_epoch_resumes_to_the_same_result(tmp_path: Path) -> None:
    data = synthetic.write_zip(tmp_path / "archive.zip", synthetic.default_splits(per_class=40))
    args = ["--data", str(data), "--epochs", "3", *TINY]
    assert train.main([*args, "--output", str(tmp_path / "reference")]) == 0  # in process, uninterrupted
    reference = only_run(tmp_path / "reference")

    out = tmp_path / "killed"
    steps_per_epoch = len(synthetic.default_splits(per_class=40)["train"][1]) // BATCH  # the ragged batch is dropped
    stall = ["-m", "tests.utils.stalling_train", "--stall-after-step", str(steps_per_epoch + 3), "--"]
    with child(*stall, *args, "--output", str(out)) as (proc, output):
        output.wait_for(r"stalled after step")  # three steps into epoch 2, epoch 1's last.pt saved
        sigkill(proc)
    run = only_run(out)
    state = load_checkpoint(run / "last.pt").training_state
    assert state is not None and state["run"]["epoch"] == 1
    assert not (run / "model.pt").exists() and not (out / storage.LATEST).exists()  # nothing published

    with child("-m", "training.train", "--resume", str(run), "--data", str(data)) as (proc, output):
        assert proc.wait(timeout=HANG_S) == 0, output.text()
        assert "resuming" in output.text() and "after epoch 1" in output.text()

    assert results(run) == results(reference)
    assert [row["epoch"] for row in results(run)["history"]] == [1, 2, 3]
    for name in ("model.pt", "last.pt", "best.pt"):
        assert_same_weights(run / name, reference / name)
    assert storage.read_latest(out).run_id == run.name


# --- publishing ---------------------------------------------------------------------------


@pytest.fixture(params=["local", "gcs"])
def target(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Where runs are published: a local folder, or a prefix in a bucket on the emulator."""
    if request.param == "local":
        return str(tmp_path / "registry")
    bucket = request.getfixturevalue("gcs")
    return f"gs://{bucket.name}/registry"


def latest(target: str) -> storage.LatestPointer | None:
    """``latest.json``, checked against the model it names (which must be there, complete); None
    if there is none yet."""
    try:
        pointer = storage.read_latest(target)
    except (FileNotFoundError, api_exceptions.NotFound):
        return None
    model = storage.read_bytes(pointer.model_uri(target))
    assert hashlib.sha256(model).hexdigest() == pointer.sha256, f"{pointer.path} does not match latest.json"
    return pointer


def publishing(output: Output) -> list[tuple[str, str]]:
    """(run, sha256) of each run the publisher started, in order (once it has exited)."""
    output.text()  # all it wrote read: a line written just before a kill is not missed
    return [(m[1], m[2]) for line in output.lines if (m := re.match(r"publishing (\S+) (\w+)", line))]


@pytest.mark.slow
def test_publisher_killed_at_random_moments(target: str, tmp_path: Path) -> None:
    rng = random.Random(0)
    publisher = ["-m", "tests.utils.publisher", target, "--scratch", str(tmp_path), "--model-bytes", "2000000"]
    # How long one run takes to publish here (milliseconds locally, more on the emulator): the
    # kills are spread over a few of those.
    with child(*publisher, "--count", "3") as (proc, output):
        output.wait_for(r"^publishing ")
        started_at = time.monotonic()
        assert proc.wait(timeout=HANG_S) == 0, output.text()
        per_run = (time.monotonic() - started_at) / 3
    shas = dict(publishing(output))
    current = "run-002"  # the run latest.json names
    first = 3
    for _ in range(8):
        with child(*publisher, "--first", str(first)) as (proc, output):
            output.wait_for(r"^publishing ")  # imports done: from here on it is publishing
            time.sleep(rng.uniform(0.0, 2.5 * per_run))
            sigkill(proc)
        started = publishing(output)
        shas.update(started)
        done = [line.split()[1] for line in output.lines if line.startswith("published ")]
        pointer = latest(target)
        assert pointer is not None
        # The last run published, or the one killed after its latest.json was written.
        assert pointer.run_id in {done[-1] if done else current, started[-1][0]}
        assert pointer.sha256 == shas[pointer.run_id]
        current = pointer.run_id
        first = int(started[-1][0].split("-")[1]) + 1


def killed_before_the_pointer_moves(target: str, tmp_path: Path, where: str) -> None:
    """Publish a run, kill the publisher of the next one at ``where`` (see :mod:`tests.utils.publisher`),
    check that the first run is still current, then publish another one."""
    model = tmp_path / "run-000.pt"
    model.write_bytes(b"the previous model")
    before = registry.publish_promoted(target, "run-000", {"model.pt": model})

    publisher = ["-m", "tests.utils.publisher", target, "--scratch", str(tmp_path / "scratch")]
    with child(*publisher, "--first", "1", "--stall-at", where) as (proc, output):
        output.wait_for(r"^stalled run-001")
        sigkill(proc)
    (run, sha), *_ = publishing(output)
    assert latest(target) == before  # the old pointer, whole, still naming a complete model
    new_model = storage.read_bytes(storage.join(target, run, "model.pt"))
    assert hashlib.sha256(new_model).hexdigest() == sha  # uploaded, complete, but not yet current

    with child(*publisher, "--first", "2", "--count", "1") as (proc, output):
        assert proc.wait(timeout=HANG_S) == 0, output.text()
    pointer = latest(target)
    assert pointer is not None and (pointer.run_id, pointer.sha256) == publishing(output)[0]


@pytest.mark.slow
def test_publisher_killed_between_model_and_pointer(target: str, tmp_path: Path) -> None:
    killed_before_the_pointer_moves(target, tmp_path, "pointer")


@pytest.mark.slow
def test_publisher_killed_before_the_pointer_rename(tmp_path: Path) -> None:
    """Locally the new latest.json is written to a temp file, then renamed over the old one; a kill
    in between leaves that temp file behind (a dot file readers never look at) and the old pointer.
    (On GCS an object appears whole or not at all: there is no such moment.)"""
    killed_before_the_pointer_moves(str(tmp_path / "registry"), tmp_path, "rename")
    assert [p.name.startswith(".latest.json.") for p in (tmp_path / "registry").glob(".*")] == [True]
