"""Publishing is not promoting: the gate, the history, rollback and concurrent publishers
(:mod:`fercore.registry`, ``python -m training.promote``, ``training.train --promote``).

The flows run against a local folder and against the gcp-storage-emulator. The emulator does not
enforce generation preconditions (``if_generation_match``), which the registry relies on on GCS:
the GCS race is therefore tested through the fault proxy with ``enforce_preconditions`` on, which
answers 412 as Cloud Storage does (and, for contrast, against the emulator alone, where the race
loses an update). Concurrent promotions into a folder are real processes racing for real.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from app.model import Predictor
from fercore import registry, storage
from fercore.checkpoint import load_checkpoint
from fercore.registry import Actor, Gate
from fercore.storage import LatestPointer
from tests.test_train import TINY
from tests.utils import synthetic
from training import promote, train
from training.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = ROOT / "models" / "fer-compact.pt"
BUNDLED_RUN = load_checkpoint(BUNDLED).run_id
ACTOR = Actor("tester@here", "tests")


@pytest.fixture(params=["folder", "gcs"])
def registry_uri(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Where runs are published and promoted: a folder, or a prefix in a bucket on the emulator."""
    if request.param == "folder":
        return str(tmp_path / "models")
    return f"gs://{request.getfixturevalue('gcs').name}/models"


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    """``python -m training.promote ARGV`` in process: its exit status and what it printed."""
    status = promote.main(list(argv))
    return status, capsys.readouterr().out


def served_file_matches(uri: str) -> bool:
    """Whether latest.json names a complete file: the one its sha256 describes."""
    pointer = storage.read_latest(uri)
    return hashlib.sha256(storage.read_bytes(pointer.model_uri(uri))).hexdigest() == pointer.sha256


def candidate(
    uri: str, tmp_path: Path, run_id: str, accuracy: float | None, split: str = "val", **extra: float | str
) -> LatestPointer:
    """A published run (its model random bytes: the registry never reads models), not promoted;
    ``extra``: more metrics."""
    model = tmp_path / "src" / run_id / "model.pt"
    model.parent.mkdir(parents=True)
    model.write_bytes(os.urandom(1000))
    metrics: dict[str, float | str] = {"val_split": split, **extra}
    if accuracy is not None:
        metrics["val_accuracy"] = accuracy
    return storage.publish_run(uri, run_id, {"model.pt": model}, metrics=metrics, dataset_fingerprint="fp")


@pytest.mark.slow
def test_train_publishes_the_gate_refuses_force_promotes_rollback_restores(
    registry_uri: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    uri = registry_uri
    status, out = cli(capsys, "--output", uri, "--checkpoint", str(BUNDLED))
    assert status == 0 and f"now serving run {BUNDLED_RUN}: passed the gate" in out
    bundled = storage.read_latest(uri)
    assert bundled.dataset_fingerprint and bundled.metrics["val_split"] == "test (PublicTest)"

    # A one-epoch run on other (synthetic) data: published, not promoted, and it says why.
    data = synthetic.write_zip(tmp_path / "archive.zip", synthetic.default_splits(per_class=12))
    assert train.main(["--data", str(data), "--output", uri, "--epochs", "1", *TINY]) == 0
    out = capsys.readouterr().out
    refusal = rf"not promoted: run (\S+) cannot be compared with the promoted run {BUNDLED_RUN}: dataset fingerprints differ"
    found = re.search(refusal, out)
    assert found, out
    new = found.group(1)
    assert storage.read_latest(uri) == bundled
    published = storage.read_run(uri, new)  # the new run's folder is kept, complete
    for name, sha in published.files.items():
        assert hashlib.sha256(storage.read_bytes(storage.join(uri, new, name))).hexdigest() == sha, name
    assert published.sha256 == published.files[published.path.removeprefix(f"{new}/")]  # the served file, an ONNX export
    assert {"metrics.json", "MODEL_CARD.md", "model.pt", "model.onnx"} <= set(published.files)
    assert "last.pt" not in published.files

    status, out = cli(capsys, "--output", uri, "--run", new)
    assert status == 1 and "dataset fingerprints differ" in out and f"still serving run {BUNDLED_RUN}" in out
    status, out = cli(capsys, "--output", uri, "--run", new, "--force")
    assert status == 0 and f"now serving run {new}: forced past the gate: run {new} cannot be compared" in out
    assert storage.read_latest(uri).run_id == new and served_file_matches(uri)

    status, out = cli(capsys, "--output", uri, "--rollback")
    assert status == 0 and f"now serving run {BUNDLED_RUN}: rolled back from run {new}" in out
    back = storage.read_latest(uri)
    assert (back.run_id, back.path, back.sha256) == (bundled.run_id, bundled.path, bundled.sha256) and served_file_matches(uri)
    assert Predictor.from_uri(uri).info.run_id == BUNDLED_RUN  # what the service loads

    status, out = cli(capsys, "--output", uri, "--list")
    rows = [line.split()[:4] for line in out.splitlines() if re.match(r"\s*\d+\s", line)]
    assert status == 0 and [(r[0], r[2], r[3]) for r in rows] == [
        ("1", "promote", BUNDLED_RUN),
        ("2", "promote!", new),  # "!": forced
        ("3", "rollback", BUNDLED_RUN),
    ]
    assert "training.promote --output" in out and "--force" in out and "@" in out  # who and what


def test_the_gate_can_refuse_a_model_that_reads_real_photos_worse(tmp_path: Path) -> None:
    """Better on FER2013 but worse on the real-photo development set: refused with both figures,
    when the gate looks at real photos; promoted when it does not."""
    uri, real = str(tmp_path / "models"), Gate(realfaces_tolerance=0.0)
    photos = {"realfaces_dev_set": "sha256:abc"}
    assert registry.promote(
        uri, candidate(uri, tmp_path, "base", 0.60, realfaces_dev_accuracy=0.50, **photos), real, ACTOR
    ).promoted
    worse = registry.promote(
        uri, candidate(uri, tmp_path, "fer-better", 0.62, realfaces_dev_accuracy=0.45, **photos), real, ACTOR
    )
    assert not worse.promoted
    assert worse.reason == (
        "realfaces_dev_accuracy 0.4500 of run fer-better is below 0.5000 of the promoted run base (tolerance 0.0000)"
    )
    assert registry.promote(uri, storage.read_run(uri, "fer-better"), Gate(realfaces_tolerance=0.06), ACTOR).promoted
    unmeasured = registry.promote(uri, candidate(uri, tmp_path, "unmeasured", 0.63), real, ACTOR)
    assert not unmeasured.promoted and "run unmeasured has no realfaces_dev_accuracy" in unmeasured.reason
    other = candidate(uri, tmp_path, "other", 0.63, realfaces_dev_accuracy=0.9, realfaces_dev_set="sha256:def")
    refused = registry.promote(uri, other, real, ACTOR)
    assert not refused.promoted and "measured on different real photos" in refused.reason
    assert registry.promote(uri, storage.read_run(uri, "unmeasured"), Gate(), ACTOR).promoted  # not asked: not looked at


def test_the_gate_gives_both_figures_and_honours_tolerance_and_floor(tmp_path: Path) -> None:
    uri = str(tmp_path / "models")
    assert registry.promote(uri, candidate(uri, tmp_path, "base", 0.60), Gate(), ACTOR).promoted
    worse = registry.promote(uri, candidate(uri, tmp_path, "worse", 0.58), Gate(), ACTOR)
    assert not worse.promoted
    assert worse.reason == "val_accuracy 0.5800 of run worse is below 0.6000 of the promoted run base (tolerance 0.0000)"
    assert registry.promote(uri, storage.read_run(uri, "worse"), Gate(tolerance=0.03), ACTOR).promoted
    low = registry.promote(uri, candidate(uri, tmp_path, "low", 0.70), Gate(min_accuracy=0.75), ACTOR)
    assert not low.promoted and "below the floor 0.7500" in low.reason
    other_split = registry.promote(uri, candidate(uri, tmp_path, "split", 0.9, split="test"), Gate(), ACTOR)
    assert not other_split.promoted and "validation splits differ ('test' vs 'val')" in other_split.reason
    blind = registry.promote(uri, candidate(uri, tmp_path, "blind", None), Gate(), ACTOR)
    assert not blind.promoted and "has no val_accuracy" in blind.reason
    again = registry.promote(uri, storage.read_run(uri, "worse"), None, ACTOR)
    assert not again.promoted and "already the promoted model" in again.reason
    assert [e.run_id for e in registry.history(uri)] == ["base", "worse"]


def test_promote_policies_and_repeated_rollbacks(tmp_path: Path) -> None:
    uri = str(tmp_path / "models")
    files = {"model.pt": tmp_path / "m.pt"}
    files["model.pt"].write_bytes(b"a model")
    for n, policy in enumerate(["never", "always", "if-better"]):
        info = LatestPointer(run_id=f"r{n}", path="", sha256="", metrics={"val_accuracy": 0.5 - n / 10, "val_split": "v"})
        files["model.pt"].write_bytes(f"model {n}".encode())
        outcome = promote.publish_and_promote(uri, files, "model.pt", info, policy, Gate(), ACTOR)
        assert outcome.promoted == (policy == "always"), outcome.reason
    assert storage.read_latest(uri).run_id == "r1" and storage.read_run(uri, "r0").run_id == "r0"
    for run in ["r0", "r2"]:
        assert registry.promote(uri, storage.read_run(uri, run), None, ACTOR).promoted
    # r1 -> r0 -> r2: rollbacks walk back r0, then r1, then refuse.
    assert registry.rollback(uri, ACTOR).pointer.run_id == "r0"  # type: ignore[union-attr]
    assert registry.rollback(uri, ACTOR).pointer.run_id == "r1"  # type: ignore[union-attr]
    last = registry.rollback(uri, ACTOR)
    assert not last.promoted and "nothing to roll back to" in last.reason
    registry.promote(uri, storage.read_run(uri, "r0"), None, ACTOR)
    (tmp_path / "models" / "r1" / "model.pt").unlink()  # a run deleted by hand
    gone = registry.rollback(uri, ACTOR)
    assert not gone.promoted and "run r1 cannot be served again: r1/model.pt is gone" in gone.reason
    assert storage.read_latest(uri).run_id == "r0"


def test_an_older_latest_json_reads_and_is_rolled_back_to(tmp_path: Path) -> None:
    """A latest.json written before the registry (no new fields; plus one from the future)."""
    uri = tmp_path / "models"
    (uri / "old").mkdir(parents=True)
    (uri / "old" / "model.pt").write_bytes(b"old model")
    sha = hashlib.sha256(b"old model").hexdigest()
    old = {"run_id": "old", "path": "old/model.pt", "sha256": sha, "metrics": {}, "created_at": "", "from_the_future": 1}
    (uri / storage.LATEST).write_text(json.dumps(old))
    assert storage.read_latest(uri) == LatestPointer("old", "old/model.pt", sha)
    assert registry.promote(str(uri), candidate(str(uri), tmp_path, "new", 0.5), None, ACTOR).promoted
    back = registry.rollback(str(uri), ACTOR).pointer
    assert back == LatestPointer("old", "old/model.pt", sha, promotion=storage.read_latest(uri).promotion)
    assert served_file_matches(str(uri))


def test_a_history_cut_short_is_completed_from_latest_json(tmp_path: Path) -> None:
    """A promoter that dies after writing latest.json, before appending to the history."""
    uri = str(tmp_path / "models")
    registry.promote(uri, candidate(uri, tmp_path, "a", 0.5), None, ACTOR)
    registry.promote(uri, candidate(uri, tmp_path, "b", 0.6), None, ACTOR)
    history = tmp_path / "models" / registry.HISTORY
    history.write_text(history.read_text().splitlines()[0] + "\n")  # event 2 never recorded
    assert [e.run_id for e in registry.history(uri)] == ["a", "b"]
    registry.promote(uri, candidate(uri, tmp_path, "c", 0.7), Gate(), ACTOR)
    assert [(e.seq, e.run_id) for e in registry.history(uri)] == [(1, "a"), (2, "b"), (3, "c")]
    assert len(history.read_text().splitlines()) == 3


def test_an_old_training_config_resumes_with_the_promotion_defaults() -> None:
    """last.pt written before the promotion settings existed holds a config without them."""
    old = {k: v for k, v in TrainConfig().to_dict().items() if not k.startswith("promote")}
    cfg = TrainConfig.from_dict(old)
    assert (cfg.promote, cfg.promote_tolerance, cfg.promote_min_accuracy) == ("if-better", 0.0, 0.0)


def check_chain(uri: str) -> list[registry.Event]:
    """The history, checked: consecutive events, each replacing the model the one before served
    (no update lost), and latest.json on the last one."""
    events = registry.history(uri)
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    for before, after in itertools.pairwise(events):
        assert after.previous == before.pointer, f"event {after.seq} replaced a model event {before.seq} did not serve"
    latest = storage.read_latest(uri)
    assert (latest.run_id, latest.sha256) == (events[-1].run_id, events[-1].pointer["sha256"])
    return events


@pytest.mark.slow
def test_concurrent_promotions_in_a_folder(tmp_path: Path) -> None:
    """Six processes promote at once; a reader follows latest.json meanwhile."""
    out, go = tmp_path / "models", tmp_path / "go"
    accuracies = [0.50, 0.62, 0.55, 0.70, 0.58, 0.66]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.utils.promoter", str(out), f"run-{i}", str(acc), "--go", str(go)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
        )
        for i, acc in enumerate(accuracies)
    ]
    try:
        for proc in procs:
            assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        stop, torn = threading.Event(), []

        def follow() -> None:  # every pointer a reader finds names a whole model
            while not stop.is_set():
                try:
                    if not served_file_matches(str(out)):
                        torn.append(storage.read_latest(out).run_id)
                except FileNotFoundError:  # nothing promoted yet
                    pass

        reader = threading.Thread(target=follow)
        reader.start()
        go.touch()
        results = [json.loads(proc.stdout.readline()) for proc in procs if proc.stdout is not None]
        assert [proc.wait(timeout=60) for proc in procs] == [0] * len(procs)
    finally:
        stop.set()
        for proc in procs:
            proc.kill()
    reader.join()
    assert not torn
    events = check_chain(str(out))
    assert sorted(e.run_id for e in events) == sorted(r["run"] for r in results if r["promoted"])
    served = [e.pointer["metrics"]["val_accuracy"] for e in events]
    assert served == sorted(served)  # each promotion passed the gate against the model then served
    assert storage.read_latest(out).run_id == "run-3"  # the best one wins, whatever the order
    refused = [r["reason"] for r in results if not r["promoted"]]
    assert all(re.search(r"val_accuracy 0\.\d{4} of run run-\d is below 0\.\d{4} of the promoted run", r) for r in refused)


class RacingStore(registry.BucketStore):
    """A GCS store whose first read of latest.json lets another promoter finish in between: the
    race made deterministic."""

    def __init__(self, prefix: str, rival: LatestPointer) -> None:
        super().__init__(prefix)
        self.prefix_uri, self.rival = prefix, rival

    def read(self, name: str) -> tuple[bytes | None, str]:
        got = super().read(name)
        if name == storage.LATEST and self.rival is not None:
            rival, self.rival = self.rival, None  # type: ignore[assignment]
            assert registry.promote(self.prefix_uri, rival, Gate(), Actor("rival@there", "tests")).promoted
        return got


@pytest.mark.parametrize("accuracy", [0.60, 0.80], ids=["worse", "better"])  # ids short: they name the bucket
def test_gcs_race_is_decided_again(gcs_proxy, gcs, tmp_path: Path, accuracy: float) -> None:
    """A's decision is made against the base model; B (0.70) is promoted before A writes. A's write
    is refused (412) and A decides again, against B: refused at 0.60, promoted on top of B at 0.80."""
    gcs_proxy.enforce_preconditions = True
    prefix = f"gs://{gcs.name}/models"
    registry.promote(prefix, candidate(prefix, tmp_path, "base", 0.50), Gate(), ACTOR)
    rival = candidate(prefix, tmp_path, "b", 0.70)
    racing = RacingStore(prefix, rival)
    outcome = registry.promote(prefix, candidate(prefix, tmp_path, "a", accuracy), Gate(), ACTOR, store=racing)
    assert [s.path for s in gcs_proxy.seen(r"ifGenerationMatch") if s.fault == "precondition"], "A's stale write was refused"
    events = check_chain(prefix)
    if accuracy < 0.70:
        assert not outcome.promoted and "val_accuracy 0.6000 of run a is below 0.7000 of the promoted run b" in outcome.reason
        assert [e.run_id for e in events] == ["base", "b"]
    else:
        assert outcome.promoted and [e.run_id for e in events] == ["base", "b", "a"]


def test_gcs_race_without_preconditions(gcs, tmp_path: Path) -> None:
    """Why the GCS test needs the proxy: the emulator alone accepts A's stale write over B's."""
    prefix = f"gs://{gcs.name}/models"
    registry.promote(prefix, candidate(prefix, tmp_path, "base", 0.50), Gate(), ACTOR)
    rival = candidate(prefix, tmp_path, "b", 0.70)
    registry.promote(prefix, candidate(prefix, tmp_path, "a", 0.60), Gate(), ACTOR, store=RacingStore(prefix, rival))
    events = registry.history(prefix)
    assert [e.run_id for e in events] == ["base", "b", "a"] and events[2].previous == events[0].pointer  # b was lost


def test_an_unreadable_latest_json_is_replaced_by_a_promotion(tmp_path: Path) -> None:
    """A broken hand edit: the service cannot follow it, so the gate treats it as serving nothing."""
    uri = tmp_path / "models"
    uri.mkdir()
    (uri / storage.LATEST).write_text("{not json")
    outcome = registry.promote(str(uri), candidate(str(uri), tmp_path, "fix", 0.5), Gate(), ACTOR)
    assert outcome.promoted and storage.read_latest(uri).run_id == "fix" and served_file_matches(str(uri))
    assert registry.history(str(uri))[0].previous is None


def test_a_run_publishes_every_file_and_serves_the_one_named(tmp_path: Path) -> None:
    """The served file is a parameter (the ONNX export serves model.int8.onnx); every file's sha256 is recorded."""
    src = tmp_path / "src"
    src.mkdir()
    files = {name: src / name for name in ("model.pt", "model.onnx", "metrics.json")}
    for name, path in files.items():
        path.write_bytes(name.encode())
    uri = tmp_path / "models"
    pointer = registry.publish_promoted(uri, "r", files, model_name="model.onnx")
    assert (pointer.path, pointer.sha256) == ("r/model.onnx", hashlib.sha256(b"model.onnx").hexdigest())
    assert pointer.files == {name: hashlib.sha256(name.encode()).hexdigest() for name in files}
    assert storage.read_latest(uri) == pointer and served_file_matches(str(uri))
    with pytest.raises(ValueError, match=r"must include model\.int8\.onnx"):
        storage.publish_run(uri, "s", files, model_name="model.int8.onnx")
