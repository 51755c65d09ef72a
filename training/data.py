"""FER2013 in every form users have it, decoded once into uint8 arrays and cached.

Sources (all detected from the path, no conversion by hand):

* the Kaggle download: a zip with ``train/<class>/*`` and ``test/<class>/*`` (read straight
  from the zip), or that folder extracted;
* the original ``fer2013.csv`` (``emotion,pixels,Usage``);
* any of these at ``gs://bucket/path`` (downloaded with the real GCS client, cached).

``python -m training.data --data SOURCE [--summary-json FILE]`` decodes a source into the
cache and prints its fingerprint and split sizes (the DVC pipeline's ``prepare`` stage).

Split names: ``train`` (Training), ``test`` (PublicTest, the Kaggle ``test/`` folder) and,
from the CSV only, ``private_test`` (PrivateTest). Every image goes through
:func:`fercore.preprocessing.prepare_face`, the same function serving uses.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import logging
import sys
import zipfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from fercore import storage
from fercore.labels import CLASS_INDEX, CLASS_NAMES
from fercore.preprocessing import PreprocessSpec, prepare_face

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
FOLDER_SPLITS = {"train": "train", "test": "test"}
CSV_SPLITS = {"Training": "train", "PublicTest": "test", "PrivateTest": "private_test"}
CACHE_VERSION = "1"


class DataError(ValueError):
    """Bad input data; the message names the file or CSV row."""


@dataclass
class Split:
    images: np.ndarray  # uint8 (N, H, W), already preprocessed
    labels: np.ndarray  # int64 (N,), indices into CLASS_NAMES

    def __len__(self) -> int:
        return len(self.labels)

    def class_counts(self) -> list[int]:
        return np.bincount(self.labels, minlength=len(CLASS_NAMES)).tolist()


@dataclass
class FerData:
    splits: dict[str, Split]
    fingerprint: str  # of the source bytes, not of the decoded arrays
    source: str
    skipped: dict[str, int] = field(default_factory=dict)

    def __getitem__(self, name: str) -> Split:
        if name not in self.splits:
            raise DataError(f"{self.source} has no {name!r} split (it has: {', '.join(self.splits)})")
        return self.splits[name]


def load_fer2013(
    source: str | Path, spec: PreprocessSpec | None = None, skip_bad: bool = False, use_cache: bool = True
) -> FerData:
    """Load every split of ``source``; a second call with the same source reads the cache."""
    spec = spec or PreprocessSpec()
    uri = str(source)
    path = storage.fetch_to_cache(uri) if storage.is_gcs(uri) else Path(uri)
    if not path.exists():
        raise DataError(f"{uri}: no such file or folder")
    fingerprint = fingerprint_source(path)
    key = hashlib.sha256(f"{CACHE_VERSION}|{fingerprint}|{spec.input_size}|{spec.contrast}|{skip_bad}".encode()).hexdigest()[:24]
    cache_file = storage.cache_dir() / "datasets" / f"{key}.npz"
    if use_cache and cache_file.exists():
        log.info("reading decoded data from cache %s", cache_file)
        return _read_cache(cache_file, fingerprint, uri)
    splits, skipped = _decode(path, spec, skip_bad)
    data = FerData(splits=splits, fingerprint=fingerprint, source=uri, skipped=skipped)
    if skipped:
        log.warning("skipped %d bad items in %s: %s", sum(skipped.values()), uri, dict(skipped))
    if use_cache:
        _write_cache(cache_file, data)
    return data


def fingerprint_source(path: Path) -> str:
    """sha256 of a zip/CSV file's bytes; for a folder, of its file names, sizes and mtimes."""
    h = hashlib.sha256()
    if path.is_dir():
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            st = f.stat()
            h.update(f"{f.relative_to(path).as_posix()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        return "dir-sha256:" + h.hexdigest()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def _decode(path: Path, spec: PreprocessSpec, skip_bad: bool) -> tuple[dict[str, Split], dict[str, int]]:
    skipped: Counter[str] = Counter()
    if path.is_dir():
        csv_file = path / "fer2013.csv"
        if csv_file.is_file():
            items = _csv_items(csv_file, spec, skip_bad, skipped)
        else:
            items = _image_items(_folder_entries(path), spec, skip_bad, skipped)
    elif path.suffix.lower() == ".csv":
        items = _csv_items(path, spec, skip_bad, skipped)
    elif zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            splits = _collect(_image_items(_zip_entries(zf, path), spec, skip_bad, skipped))
        return _check_nonempty(splits, path), dict(skipped)
    else:
        raise DataError(f"{path}: not a FER2013 zip, folder or CSV file")
    return _check_nonempty(_collect(items), path), dict(skipped)


# An entry: (split, class name, display name for errors, function returning the bytes).
Entry = tuple[str, str, str, Callable[[], bytes]]


def _zip_entries(zf: zipfile.ZipFile, path: Path) -> Iterator[Entry]:
    names = [n for n in zf.namelist() if not n.endswith("/") and "__MACOSX" not in n]
    for name in names:
        parts = PurePosixPath(name).parts
        entry = _classify(parts, f"{path}:{name}")
        if entry is not None:
            yield (*entry, partial(zf.read, name))


def _folder_entries(root: Path) -> Iterator[Entry]:
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        entry = _classify(f.relative_to(root).parts, str(f))
        if entry is not None:
            yield (*entry, f.read_bytes)


def _classify(parts: tuple[str, ...], where: str) -> tuple[str, str, str] | None:
    """Map ``[wrapper/]split/class/file`` to (split, class, where); ignore other files."""
    if Path(parts[-1]).suffix.lower() not in IMAGE_SUFFIXES or parts[-1].startswith("."):
        return None
    if len(parts) < 3 or parts[-3] not in FOLDER_SPLITS:
        return None
    cls = parts[-2]
    if cls not in CLASS_INDEX:
        raise DataError(f"{where}: unknown class folder {cls!r} (expected one of {', '.join(CLASS_NAMES)})")
    return FOLDER_SPLITS[parts[-3]], cls, where


def _image_items(
    entries: Iterator[Entry], spec: PreprocessSpec, skip_bad: bool, skipped: Counter[str]
) -> Iterator[tuple[str, np.ndarray, int]]:
    for split, cls, where, read in entries:
        try:
            with Image.open(io.BytesIO(read())) as img:
                pixels = prepare_face(img, spec)
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            if not skip_bad:
                raise DataError(f"{where}: cannot decode image ({exc}); pass --skip-bad to skip such files") from None
            skipped["undecodable image"] += 1
            continue
        yield split, pixels, CLASS_INDEX[cls]


def _csv_items(path: Path, spec: PreprocessSpec, skip_bad: bool, skipped: Counter[str]) -> Iterator[tuple[str, np.ndarray, int]]:
    side = 48
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = {"emotion", "pixels"} - set(reader.fieldnames or [])
        if missing:
            raise DataError(f"{path}: missing CSV columns {sorted(missing)} (expected emotion,pixels,Usage)")
        for row_no, row in enumerate(reader, start=2):  # row 1 is the header
            try:
                usage = row.get("Usage") or "Training"
                if usage not in CSV_SPLITS:
                    raise DataError(f"unknown Usage {usage!r}")
                label = int(row["emotion"])
                if not 0 <= label < len(CLASS_NAMES):
                    raise DataError(f"emotion {label} is not in 0..{len(CLASS_NAMES) - 1}")
                values = np.array(row["pixels"].split(), dtype=np.int64)
                if values.size != side * side:
                    raise DataError(f"{values.size} pixels, expected {side * side}")
                if values.min() < 0 or values.max() > 255:
                    raise DataError("pixel values outside 0..255")
            except (DataError, ValueError, AttributeError) as exc:
                if not skip_bad:
                    raise DataError(f"{path}: row {row_no}: {exc}; pass --skip-bad to skip such rows") from None
                skipped["bad CSV row"] += 1
                continue
            image = Image.fromarray(values.reshape(side, side).astype(np.uint8), mode="L")
            yield CSV_SPLITS[usage], prepare_face(image, spec), label


def _collect(items: Iterator[tuple[str, np.ndarray, int]]) -> dict[str, Split]:
    images: dict[str, list[np.ndarray]] = {}
    labels: dict[str, list[int]] = {}
    for split, pixels, label in items:
        images.setdefault(split, []).append(pixels)
        labels.setdefault(split, []).append(label)
    return {s: Split(np.stack(images[s]), np.asarray(labels[s], dtype=np.int64)) for s in images}


def _check_nonempty(splits: dict[str, Split], path: Path) -> dict[str, Split]:
    if not splits.get("train") and not splits.get("test"):
        raise DataError(f"{path}: no images found (expected train/<class>/*.jpg, test/<class>/*.jpg or fer2013.csv rows)")
    return splits


def _write_cache(cache_file: Path, data: FerData) -> None:
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, np.ndarray] = {}
    for name, split in data.splits.items():
        arrays[f"{name}__images"] = split.images
        arrays[f"{name}__labels"] = split.labels
    arrays["__skipped"] = np.array([f"{k}={v}" for k, v in data.skipped.items()], dtype=str)
    with storage.atomic_write(cache_file) as f:
        np.savez(f, **arrays)  # type: ignore[arg-type]  # uncompressed: loads in well under a second


def _read_cache(cache_file: Path, fingerprint: str, uri: str) -> FerData:
    with np.load(cache_file) as z:
        splits = {
            k[: -len("__images")]: Split(z[k], z[k[: -len("__images")] + "__labels"]) for k in z.files if k.endswith("__images")
        }
        skipped = {k: int(v) for k, _, v in (s.partition("=") for s in z["__skipped"].tolist())}
    return FerData(splits=splits, fingerprint=fingerprint, source=uri, skipped=skipped)


def train_val_split(data: FerData, val_fraction: float = 0.1, seed: int = 0) -> tuple[Split, Split, str]:
    """The training split and the one used for model selection.

    PublicTest (``test``) when the source has it; otherwise a seeded, stratified hold-out of
    ``val_fraction`` of the training data. Returns (train, val, description of val).
    """
    train = data["train"]
    if "test" in data.splits and len(data.splits["test"]):
        return train, data.splits["test"], "test (PublicTest)"
    rng = np.random.default_rng(seed)
    val_idx: list[np.ndarray] = []
    for c in range(len(CLASS_NAMES)):
        idx = np.flatnonzero(train.labels == c)
        rng.shuffle(idx)
        val_idx.append(idx[: round(len(idx) * val_fraction)])
    val_mask = np.zeros(len(train), dtype=bool)
    val_mask[np.concatenate(val_idx)] = True
    if val_mask.all() or not val_mask.any():
        raise DataError(f"{data.source}: too few training images for a {val_fraction:.0%} hold-out")
    return (
        Split(train.images[~val_mask], train.labels[~val_mask]),
        Split(train.images[val_mask], train.labels[val_mask]),
        f"{val_fraction:.0%} stratified hold-out of train (seed {seed})",
    )


def summarize(data: FerData) -> dict[str, Any]:
    """Fingerprint, split sizes and per-class counts of ``data``, as plain JSON types."""
    return {
        "source": data.source,
        "fingerprint": data.fingerprint,
        "splits": {
            name: {"images": len(split), "class_counts": dict(zip(CLASS_NAMES, split.class_counts(), strict=True))}
            for name, split in sorted(data.splits.items())
        },
        "skipped": data.skipped,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Decode a FER2013 source into the cache; print its fingerprint and splits.")
    parser.add_argument("--data", required=True, help="FER2013 zip, folder, fer2013.csv, or gs:// URI of one")
    parser.add_argument("--summary-json", type=Path, help="also write the summary here")
    parser.add_argument("--skip-bad", action="store_true", help="skip undecodable images and bad CSV rows instead of failing")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    text = json.dumps(summarize(load_fer2013(args.data, skip_bad=args.skip_bad)), indent=2)
    print(text)
    if args.summary_json:
        args.summary_json.parent.mkdir(parents=True, exist_ok=True)
        args.summary_json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
