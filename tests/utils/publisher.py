"""A process that publishes runs one after another, for tests that kill it part-way.

    python -m tests.utils.publisher OUTPUT --scratch DIR --first 3 --count 50 --model-bytes 2000000 [--stall-at pointer]

Publishes ``run-003``, ``run-004``... to OUTPUT (a folder or ``gs://bucket/prefix``) with
:func:`fercore.registry.publish_promoted` (which promotes unconditionally): each run's files, then
``latest.json``, then the promotion history. Each run's files are written under ``--scratch`` first
(a folder the test owns and removes: the tests SIGKILL this process, so it can clean up nothing).
Each model is ``--model-bytes`` of random bytes (publishing does not read them). It prints
``publishing <run> <sha256>`` before each run and ``published <run>`` after it.

``--stall-at pointer`` stops (sleeps) at the worst moment, once the model is uploaded and just
before ``latest.json`` is written, after printing ``stalled <run>``: the test kills it there.
``--stall-at rename`` (a local folder only) stops later, inside the atomic write of
``latest.json``: the new pointer is in a temp file, not yet renamed over the old one.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import time
from pathlib import Path

from fercore import registry, storage

STALL_S = 3600.0  # until killed


def _stall(run: str) -> None:
    print(f"stalled {run}", flush=True)
    time.sleep(STALL_S)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output")
    parser.add_argument("--scratch", type=Path, required=True)
    parser.add_argument("--first", type=int, default=0)
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--model-bytes", type=int, default=1_000_000)
    parser.add_argument("--stall-at", choices=["pointer", "rename"])
    args = parser.parse_args(argv)

    current = {"run": ""}
    if args.stall_at == "pointer":
        write_bytes = storage.write_bytes

        def stalling_write_bytes(uri: str | Path, data: bytes, **conditions: int | None) -> None:
            if str(uri).endswith(storage.LATEST):
                _stall(current["run"])
            write_bytes(uri, data, **conditions)

        storage.write_bytes = stalling_write_bytes  # type: ignore[assignment]
    elif args.stall_at == "rename":
        replace = os.replace

        def stalling_replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
            if str(dst).endswith(storage.LATEST):
                _stall(current["run"])
            replace(src, dst)

        os.replace = stalling_replace  # type: ignore[assignment]

    args.scratch.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="publisher-", dir=args.scratch))  # one per process
    for i in range(args.first, args.first + args.count):
        run = current["run"] = f"run-{i:03d}"
        folder = scratch / run
        folder.mkdir()
        data = os.urandom(args.model_bytes)
        (folder / "model.pt").write_bytes(data)
        (folder / "metrics.json").write_text('{"val_accuracy": 0.5}')
        print(f"publishing {run} {hashlib.sha256(data).hexdigest()}", flush=True)
        registry.publish_promoted(args.output, run, {"model.pt": folder / "model.pt", "metrics.json": folder / "metrics.json"})
        print(f"published {run}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
