"""Small synthetic FER2013-like data, written in the three formats users have.

Each class gets a bright square at its own position on a noisy background, so a tiny model
can learn it in a few steps (tests check that loss goes down, not that emotions are read).
"""

from __future__ import annotations

import csv
import io
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

from fercore.labels import CLASS_NAMES

SIDE = 48
# Folder names in the Kaggle download's (alphabetical) order, not FER2013's label order.
KAGGLE_FOLDERS = sorted(CLASS_NAMES)


def make_faces(per_class: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (N, 48, 48) images and int64 labels, ``per_class`` of each class."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for label in range(len(CLASS_NAMES)):
        for _ in range(per_class):
            img = rng.integers(0, 90, (SIDE, SIDE), dtype=np.uint8)
            r, c = divmod(label, 3)
            img[4 + r * 14 : 16 + r * 14, 4 + c * 14 : 16 + c * 14] = rng.integers(200, 256)
            images.append(img)
            labels.append(label)
    return np.stack(images), np.asarray(labels, dtype=np.int64)


def jpeg_bytes(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img, mode="L").save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _members(splits: dict[str, tuple[np.ndarray, np.ndarray]]) -> list[tuple[str, bytes]]:
    prefix = {"train": "Training", "test": "PublicTest"}
    out = []
    for split, (images, labels) in splits.items():
        for i, (img, label) in enumerate(zip(images, labels, strict=True)):
            out.append((f"{split}/{CLASS_NAMES[label]}/{prefix[split]}_{i:05d}.jpg", jpeg_bytes(img)))
    return out


def write_zip(path: Path, splits: dict[str, tuple[np.ndarray, np.ndarray]], wrapper: str = "") -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in _members(splits):
            zf.writestr(wrapper + name, data)
    return path


def write_folder(root: Path, splits: dict[str, tuple[np.ndarray, np.ndarray]]) -> Path:
    for name, data in _members(splits):
        f = root / name
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(data)
    return root


def write_csv(path: Path, splits: dict[str, tuple[np.ndarray, np.ndarray]]) -> Path:
    usage = {"train": "Training", "test": "PublicTest", "private_test": "PrivateTest"}
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["emotion", "pixels", "Usage"])
        for split, (images, labels) in splits.items():
            for img, label in zip(images, labels, strict=True):
                w.writerow([int(label), " ".join(map(str, img.ravel().tolist())), usage[split]])
    return path


def default_splits(per_class: int = 6, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return {"train": make_faces(per_class, seed), "test": make_faces(max(per_class // 3, 1), seed + 1)}
