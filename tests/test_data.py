from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest

from fercore.labels import CLASS_NAMES
from fercore.preprocessing import PreprocessSpec, equalize_hist
from tests.utils import synthetic
from training import data as data_mod
from training.data import DataError, load_fer2013, train_val_split


def _expected(splits: dict) -> dict[str, np.ndarray]:
    return {name: np.sort(labels) for name, (_, labels) in splits.items()}


@pytest.mark.parametrize("fmt", ["zip", "zip-wrapped", "folder", "csv", "csv-in-folder"])
def test_every_format_gives_the_same_splits_and_labels(tmp_path: Path, splits: dict, fmt: str) -> None:
    if fmt == "zip":
        source = synthetic.write_zip(tmp_path / "archive.zip", splits)
    elif fmt == "zip-wrapped":  # some downloads put everything under one top folder
        source = synthetic.write_zip(tmp_path / "archive.zip", splits, wrapper="fer2013/")
    elif fmt == "folder":
        source = synthetic.write_folder(tmp_path / "fer", splits)
    elif fmt == "csv":
        source = synthetic.write_csv(tmp_path / "fer2013.csv", splits)
    else:
        (tmp_path / "d").mkdir()
        synthetic.write_csv(tmp_path / "d" / "fer2013.csv", splits)
        source = tmp_path / "d"
    data = load_fer2013(source)
    assert set(data.splits) == {"train", "test"}
    for name, labels in _expected(splits).items():
        split = data[name]
        assert split.images.dtype == np.uint8 and split.images.shape[1:] == (48, 48)
        np.testing.assert_array_equal(np.sort(split.labels), labels)


def test_class_order_is_fer2013_not_folder_order(fer_zip: Path, splits: dict) -> None:
    # Kaggle folders sort alphabetically (neutral before sad); labels must follow FER2013.
    data = load_fer2013(fer_zip)
    images, labels = splits["train"]
    first_sad = int(np.flatnonzero(labels == CLASS_NAMES.index("sad"))[0])
    target = equalize_hist(synthetic_roundtrip(images[first_sad]))
    dist = np.abs(data["train"].images.astype(int) - target.astype(int)).mean(axis=(1, 2))
    assert data["train"].labels[int(dist.argmin())] == CLASS_NAMES.index("sad") == 4


def synthetic_roundtrip(img: np.ndarray) -> np.ndarray:
    """The image as it comes back from a JPEG in the zip."""
    import io

    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(synthetic.jpeg_bytes(img))).convert("L"))


def test_csv_private_test_split(tmp_path: Path) -> None:
    splits = {"train": synthetic.make_faces(2), "private_test": synthetic.make_faces(1)}
    data = load_fer2013(synthetic.write_csv(tmp_path / "fer2013.csv", splits))
    assert len(data["private_test"]) == 7 and "test" not in data.splits


def test_csv_wrong_pixel_count_names_the_row(tmp_path: Path) -> None:
    path = synthetic.write_csv(tmp_path / "fer2013.csv", {"train": synthetic.make_faces(1)})
    lines = path.read_text().splitlines()
    lines[3] = "2,1 2 3,Training"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"row 4: 3 pixels, expected 2304"):
        load_fer2013(path)
    data = load_fer2013(path, skip_bad=True)
    assert len(data["train"]) == 6 and data.skipped == {"bad CSV row": 1}


def test_csv_bad_label_and_missing_columns(tmp_path: Path) -> None:
    path = tmp_path / "fer2013.csv"
    path.write_text("emotion,pixels,Usage\n9," + " ".join(["0"] * 2304) + ",Training\n")
    with pytest.raises(DataError, match="row 2: emotion 9"):
        load_fer2013(path)
    path.write_text("label,data\n1,2\n")
    with pytest.raises(DataError, match="missing CSV columns"):
        load_fer2013(path)


def test_undecodable_image_is_named_or_skipped(tmp_path: Path, splits: dict) -> None:
    path = synthetic.write_zip(tmp_path / "archive.zip", splits)
    with zipfile.ZipFile(path, "a") as zf:
        zf.writestr("train/happy/Training_broken.jpg", b"not a jpeg")
    with pytest.raises(DataError, match=r"Training_broken\.jpg: cannot decode image"):
        load_fer2013(path)
    data = load_fer2013(path, skip_bad=True)
    assert data.skipped == {"undecodable image": 1}
    assert len(data["train"]) == len(splits["train"][1])


def test_unknown_class_folder_is_an_error(tmp_path: Path, splits: dict) -> None:
    root = synthetic.write_folder(tmp_path / "fer", splits)
    (root / "train" / "contempt").mkdir()
    (root / "train" / "contempt" / "x.jpg").write_bytes(synthetic.jpeg_bytes(splits["train"][0][0]))
    with pytest.raises(DataError, match="unknown class folder 'contempt'"):
        load_fer2013(root)


def test_empty_source_and_missing_split(tmp_path: Path, fer_zip: Path) -> None:
    empty = tmp_path / "empty.zip"
    zipfile.ZipFile(empty, "w").close()
    with pytest.raises(DataError, match="no images found"):
        load_fer2013(empty)
    with pytest.raises(DataError, match="no such file"):
        load_fer2013(tmp_path / "missing.zip")
    with pytest.raises(DataError, match="has no 'private_test' split"):
        load_fer2013(fer_zip)["private_test"]


def test_test_only_zip_loads(tmp_path: Path) -> None:
    path = synthetic.write_zip(tmp_path / "test_only.zip", {"test": synthetic.make_faces(2)})
    assert len(load_fer2013(path)["test"]) == 14


def test_second_load_reads_the_cache(fer_zip: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = load_fer2013(fer_zip)

    def no_decoding(*args: object, **kwargs: object) -> None:
        raise AssertionError("decoded again instead of reading the cache")

    monkeypatch.setattr(data_mod, "_decode", no_decoding)
    second = load_fer2013(fer_zip)
    np.testing.assert_array_equal(first["train"].images, second["train"].images)
    np.testing.assert_array_equal(first["test"].labels, second["test"].labels)
    assert first.fingerprint == second.fingerprint


def test_cache_key_changes_with_the_source_and_the_spec(fer_zip: Path, tmp_path: Path) -> None:
    a = load_fer2013(fer_zip)
    raw = load_fer2013(fer_zip, PreprocessSpec(contrast="none"))
    assert not np.array_equal(a["train"].images, raw["train"].images)
    other = synthetic.write_zip(tmp_path / "other.zip", synthetic.default_splits(per_class=2, seed=5))
    assert load_fer2013(other).fingerprint != a.fingerprint


def test_holdout_is_stratified_and_seeded(tmp_path: Path) -> None:
    path = synthetic.write_csv(tmp_path / "fer2013.csv", {"train": synthetic.make_faces(10)})
    data = load_fer2013(path)
    train, val, desc = train_val_split(data, val_fraction=0.2, seed=3)
    assert "hold-out" in desc
    assert val.class_counts() == [2] * 7 and len(train) == 56
    _, val_again, _ = train_val_split(data, val_fraction=0.2, seed=3)
    np.testing.assert_array_equal(val.images, val_again.images)


def test_public_test_is_the_validation_split(fer_zip: Path) -> None:
    train, val, desc = train_val_split(load_fer2013(fer_zip))
    assert desc.startswith("test") and len(val) == 14 and len(train) == 42


def test_gcs_source_is_downloaded_once_and_cached(gcs, fer_zip: Path) -> None:
    gcs.blob("data/archive.zip").upload_from_filename(str(fer_zip))
    uri = f"gs://{gcs.name}/data/archive.zip"
    data = load_fer2013(uri)
    assert len(data["train"]) == 42
    assert data.fingerprint == load_fer2013(fer_zip).fingerprint
    with pytest.raises(FileNotFoundError):
        load_fer2013(f"gs://{gcs.name}/data/missing.zip")
