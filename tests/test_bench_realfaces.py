"""bench.realfaces: the whole service pipeline on labeled photo sets, on skimage's real photos."""

from __future__ import annotations

import csv
import functools
import json
import subprocess
from pathlib import Path

import pytest
from PIL import Image, ImageOps

from bench import realfaces, realfaces_sets
from fercore import storage
from fercore.labels import CLASS_NAMES
from tests.test_train import TINY
from tests.utils import synthetic
from tests.utils.photos import photo
from training import train
from training.realfaces import read_set, split_photos


def make_set(root: Path) -> Path:
    """A set laid out as the benchmark reads it: the astronaut (one face) under four subjects and
    two labels, mirrored for two of them, and a photo without a face, in class folders with a
    manifest."""
    folder = root / "kdef"
    rows = []
    astronaut = photo("astronaut")
    for i, (label, image) in enumerate(
        [("happy", astronaut), ("happy", ImageOps.mirror(astronaut)), ("sad", astronaut), ("sad", photo("coffee"))]
    ):
        (folder / label).mkdir(parents=True, exist_ok=True)
        name = f"S{i:02d}{label[:2].upper()}.png"
        image.save(folder / label / name)
        rows.append({"file": f"{label}/{name}", "label": label, "subject": f"S{i:02d}"})
    with (folder / "manifest.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["file", "label", "subject"])
        writer.writeheader()
        writer.writerows(rows)
    return folder


def test_a_set_is_split_by_subject_and_scored_through_the_service_pipeline(tmp_path: Path) -> None:
    make_set(tmp_path / "data")
    out = tmp_path / "realfaces.json"
    argv = ["--data", str(tmp_path / "data"), "--variants", "all"]
    assert realfaces.main([*argv, "--output", str(out), "--pictures", str(tmp_path / "pictures")]) == 0
    record = json.loads(out.read_text())
    assert record["command"].startswith("python -m bench.realfaces --data")
    splits = record["results"]["sets"]["kdef"]
    # Subjects S00..S03 sorted, every other one for development: S00 and S02 (happy, sad astronaut).
    assert splits["dev"]["photos"] == 2 and splits["report"]["photos"] == 2
    dev, report = splits["dev"]["variants"], splits["report"]["variants"]
    assert dev["served"]["faces_not_found"] == 0
    assert report["served"]["faces_not_found"] == 1  # the coffee cup: counted wrong, not skipped
    assert report["served"]["accuracy"] <= 0.5
    # The same astronaut under two labels: one of the two is wrong whatever the model says.
    assert dev["served"]["accuracy"] == 0.5
    assert {"flip", "box_margin0.0", realfaces.frame_name(1.0, 0.39)} <= dev.keys()
    # The grid's FER2013 framing is the served crop itself: the same answers.
    assert dev[realfaces.frame_name(1.0, 0.39)]["confusion_matrix"] == dev["served"]["confusion_matrix"]
    assert dev["flip"]["against_served"]["sign_test_p"] <= 1.0
    assert dev["served"]["temperature"] > 0 and 0 <= dev["served"]["ece"] <= 1
    assert (tmp_path / "pictures" / "kdef-dev-served.png").is_file()


def test_a_set_that_is_not_for_development_is_all_reporting(tmp_path: Path) -> None:
    folder = make_set(tmp_path / "data")
    folder.rename(tmp_path / "data" / "jaffe")
    photos = read_set(tmp_path / "data" / "jaffe")
    assert set(split_photos("jaffe", photos)) == {"report"}
    assert len(split_photos("kdef", photos)["dev"]) == 2


def test_class_folders_without_a_manifest_are_read_too(tmp_path: Path) -> None:
    for label in ("angry", "neutral"):
        (tmp_path / label).mkdir()
        Image.new("RGB", (64, 64)).save(tmp_path / label / "a.jpg")
    (tmp_path / "angry" / "notes.txt").write_text("not an image")
    photos = read_set(tmp_path)
    assert [(p.path.parent.name, p.label, p.subject) for p in photos] == [("angry", 0, ""), ("neutral", 6, "")]


def test_a_run_trained_with_realfaces_carries_its_real_photo_figures(tmp_path: Path) -> None:
    """--realfaces: the served export is measured on the development photos through the service
    pipeline, into the run's metrics (what the gate compares); a folder without any is refused
    before training starts."""
    make_set(tmp_path / "real")
    data_zip = synthetic.write_zip(tmp_path / "archive.zip", synthetic.default_splits(per_class=12))
    out = tmp_path / "runs"
    argv = ["--data", str(data_zip), "--output", str(out), "--epochs", "1", *TINY]
    assert train.main([*argv, "--realfaces", str(tmp_path / "real"), "--promote-realfaces-tolerance", "0.1"]) == 0
    (metrics_file,) = out.glob("*/metrics.json")
    metrics = json.loads(metrics_file.read_text())
    assert metrics["realfaces_dev_photos"] == 2 and metrics["realfaces_dev_not_found"] == 0
    assert metrics["realfaces_dev_accuracy"] in (0.0, 0.5)  # the same astronaut under two labels
    assert metrics["realfaces_dev_set"].startswith("sha256:")
    assert storage.read_latest(out).metrics["realfaces_dev_accuracy"] == metrics["realfaces_dev_accuracy"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as exit_info:
        train.main([*argv, "--realfaces", str(tmp_path / "empty")])
    assert exit_info.value.code == 2


def git_repo(folder: Path, files: dict[str, bytes]) -> str:
    """A git repository holding ``files`` (path -> bytes) in one commit; that commit's id."""
    for path, data in files.items():
        (folder / path).parent.mkdir(parents=True, exist_ok=True)
        (folder / path).write_bytes(data)
    run = functools.partial(subprocess.run, cwd=folder, check=True, capture_output=True)
    run(["git", "init", "-q"])
    run(["git", "add", "."])
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "images"])
    return run(["git", "rev-parse", "HEAD"], text=True).stdout.strip()


def test_a_set_is_laid_out_from_its_source_repository(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    prefix = "code_v2/data/Images"
    commit = git_repo(
        tmp_path / "sfew",
        {
            f"{prefix}/Happy/Movie_001_1.png": b"happy frame",
            f"{prefix}/Happy/Movie_001_2.png": b"happy frame",  # the same bytes again: kept once
            f"{prefix}/Sad/Other_002_1.png": b"sad frame",
            f"{prefix}/Fear/Film_003_1.png": b"fear or surprise",  # under two labels: dropped from both
            f"{prefix}/Surprise/Film_003_1.png": b"fear or surprise",
            f"{prefix}/README.txt": b"not an image",
        },
    )
    out = tmp_path / "sets"
    assert realfaces_sets.main(["sfew_subset", str(tmp_path / "sfew"), str(out), "--commit", commit]) == 0
    assert "dropped, labeled both ways: code_v2/data/Images/Fear/Film_003_1.png" in capsys.readouterr().err
    photos = read_set(out / "sfew_subset")
    assert sorted((CLASS_NAMES[p.label], p.subject) for p in photos) == [("happy", "Movie"), ("sad", "Other")]
    assert (out / "sfew_subset/happy/Movie_001_1.png").read_bytes() == b"happy frame"
    assert not list(out.glob("**/*.partial"))
    # Not a clone, or a commit it does not have: a clear error, exit code 2, nothing written.
    assert realfaces_sets.main(["kdef", str(tmp_path / "sfew"), str(tmp_path / "none")]) == 2
    assert "not a clone of Ignautics/NUS_GAN_KDEF" in capsys.readouterr().err
    assert not (tmp_path / "none").exists()


def test_each_sets_file_names_give_its_labels_and_subjects() -> None:
    assert realfaces_sets.kdef("data/KDEF/AF01AFS.JPG") == ("fear", "F01")
    assert realfaces_sets.kdef("data/KDEF/BM35HAHL.JPG") is None  # not frontal
    assert realfaces_sets.jaffe("jaffedbase/KA.AN1.39.tiff") == ("angry", "KA")
    assert realfaces_sets.rafdb_test("DATASET/test/7/test_0005_aligned.jpg") == ("neutral", "")
    assert realfaces_sets.sfew_subset("code_v2/data/Images/Neutral/21_001404920_00000004.png") == ("neutral", "21")
