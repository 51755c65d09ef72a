"""Lay out a real-photo set for ``bench.realfaces`` from the public repository that holds its images.

The images cannot be in this repository (their terms allow research use, not redistribution), so
this command rebuilds each set from a clone of the repository the benchmark's figures came from,
at the commit they came from, into ``OUT/<set>/<class>/<file>`` plus ``OUT/<set>/manifest.csv``
(``file,label,subject,source_path``), the layout :mod:`training.realfaces` reads::

    git clone https://github.com/Ignautics/NUS_GAN_KDEF /tmp/kdef && git -C /tmp/kdef checkout 14f8a43
    python -m bench.realfaces_sets kdef /tmp/kdef /data/realfaces

Bytes are copied unchanged. A file present twice byte for byte is kept once; one present under two
different labels is dropped from both (SFEW has one). docs/realfaces.md gives each set's source,
terms, labels and counts.
"""

from __future__ import annotations

import argparse
import collections
import csv
import hashlib
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from fercore.labels import CLASS_NAMES

# A path in the source repository -> (FER2013 class, subject), or None for a file that is not taken.
Select = Callable[[str], "tuple[str, str] | None"]


@dataclass(frozen=True)
class SetSource:
    repo: str  # github owner/name
    commit: str  # the commit the committed figures were measured on
    prefix: str  # the folder holding the images
    select: Select


def jaffe(path: str) -> tuple[str, str] | None:
    # <subject>.<EXPR><n>.<serial>.tiff: the expression the expresser was asked to pose
    codes = {"AN": "angry", "DI": "disgust", "FE": "fear", "HA": "happy", "SA": "sad", "SU": "surprise", "NE": "neutral"}
    name = PurePosixPath(path).name
    parts = name.split(".")
    if len(parts) != 4 or parts[-1].lower() not in ("tif", "tiff") or parts[1][:2] not in codes:
        return None
    return codes[parts[1][:2]], parts[0]


KDEF_NAME = re.compile(r"^[AB]([FM]\d\d)(AF|AN|DI|HA|NE|SA|SU)(S|HL|HR|FL|FR)\.JPG$", re.IGNORECASE)


def kdef(path: str) -> tuple[str, str] | None:
    # <series A|B><sex F|M><person nn><expression><angle>.JPG: only the frontal ("S") photos
    codes = {"AF": "fear", "AN": "angry", "DI": "disgust", "HA": "happy", "NE": "neutral", "SA": "sad", "SU": "surprise"}
    match = KDEF_NAME.match(PurePosixPath(path).name)
    if not match or match.group(3).upper() != "S":
        return None
    return codes[match.group(2).upper()], match.group(1).upper()


def rafdb_test(path: str) -> tuple[str, str] | None:
    # DATASET/test/<RAF-DB basic code 1-7>/test_NNNN_aligned.jpg; no person ids
    codes = {"1": "surprise", "2": "fear", "3": "disgust", "4": "happy", "5": "sad", "6": "angry", "7": "neutral"}
    parts = PurePosixPath(path).parts
    if len(parts) != 4 or parts[2] not in codes or not parts[3].endswith(".jpg"):
        return None
    return codes[parts[2]], ""


def sfew_subset(path: str) -> tuple[str, str] | None:
    # code_v2/data/Images/<Class>/<Movie>_<frame>_<n>.png: the subject is the movie (frames of one
    # movie share actors, so the split keeps them together)
    parts = PurePosixPath(path).parts
    label = parts[-2].lower() if len(parts) >= 2 else ""
    if label not in CLASS_NAMES or not parts[-1].endswith(".png"):
        return None
    return label, parts[-1].split("_")[0]


SETS = {
    "jaffe": SetSource(
        "farzadips/JAFFE-Facial-and-Emotion-Recognition", "b6a0994b64a259160b6ae30bb529c6396f88d50d", "jaffedbase", jaffe
    ),
    "kdef": SetSource("Ignautics/NUS_GAN_KDEF", "14f8a4379838703b9b3245c01bf64329f3e51dda", "data/KDEF", kdef),
    "rafdb_test": SetSource(
        "koorosh-moaveninejad/Facial-Expression-Recognition",
        "85308be3a8809877bb5d07dbc847f8725b0be9c9",
        "DATASET/test",
        rafdb_test,
    ),
    "sfew_subset": SetSource(
        "panxnan/SFEW_emotion_classification_pruning",
        "df5a365860293bb8950b9fc864f1d10e360df3cc",
        "code_v2/data/Images",
        sfew_subset,
    ),
}


def git(clone: Path, *args: str) -> bytes:
    return subprocess.run(["git", "-C", str(clone), *args], check=True, capture_output=True).stdout


def gather(clone: Path, source: SetSource, commit: str) -> dict[str, tuple[str, str, str, bytes]]:
    """sha256 -> (label, subject, path, bytes) of the files ``source`` takes at ``commit``;
    byte-identical copies once, a file under two labels not at all."""
    paths = git(clone, "ls-tree", "-r", "--name-only", commit, "--", source.prefix).decode().splitlines()
    taken: dict[str, tuple[str, str, str, bytes]] = {}
    conflicting: set[str] = set()
    for path in sorted(paths):
        chosen = source.select(path)
        if chosen is None:
            continue
        data = git(clone, "show", f"{commit}:{path}")
        digest = hashlib.sha256(data).hexdigest()
        if digest in taken and taken[digest][0] != chosen[0]:
            conflicting.add(digest)
        taken.setdefault(digest, (*chosen, path, data))
    for digest in conflicting:
        print(f"dropped, labeled both ways: {taken.pop(digest)[2]}", file=sys.stderr)
    return taken


def write_set(files: dict[str, tuple[str, str, str, bytes]], folder: Path) -> collections.Counter[str]:
    """The images under ``folder/<class>/`` and their manifest, written last (a set whose manifest
    is there is complete); the count per class."""
    rows, counts = [], collections.Counter[str]()
    names = collections.Counter(f"{label}/{PurePosixPath(path).name}" for label, _, path, _ in files.values())
    if clashes := sorted(name for name, n in names.items() if n > 1):
        raise ValueError(f"different files would be written as {', '.join(clashes)}")
    for label, subject, path, data in files.values():
        name = f"{label}/{PurePosixPath(path).name}"
        (folder / label).mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
        rows.append((name, label, subject, path))
        counts[label] += 1
    partial = folder / "manifest.csv.partial"
    with partial.open("w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["file", "label", "subject", "source_path"])
        writer.writerows(sorted(rows))
    partial.replace(folder / "manifest.csv")
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("set", choices=sorted(SETS))
    parser.add_argument("clone", type=Path, help="a clone of the set's repository (a bare one will do)")
    parser.add_argument("out", type=Path, help="the folder of sets (bench.realfaces --data)")
    parser.add_argument("--commit", help="another commit than the one the committed figures came from")
    args = parser.parse_args(argv)
    source = SETS[args.set]
    commit = args.commit or source.commit
    try:
        files = gather(args.clone, source, commit)
    except subprocess.CalledProcessError as exc:
        print(f"error: not a clone of {source.repo} at {commit}: {exc.stderr.decode().strip()}", file=sys.stderr)
        return 2
    if not files:
        print(f"error: no {args.set} images under {source.prefix} in {args.clone}", file=sys.stderr)
        return 2
    try:
        counts = write_set(files, args.out / args.set)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    per_class = ", ".join(f"{name} {counts[name]}" for name in CLASS_NAMES)
    print(f"{args.set}: {sum(counts.values())} photos in {args.out / args.set}: {per_class}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
