"""A process that publishes one run and promotes it under the gate, for the concurrency tests.

    python -m tests.utils.promoter OUTPUT RUN_ID VAL_ACCURACY --go FILE

Publishes ``RUN_ID`` (a model of random bytes: the registry never reads models) with
``val_accuracy`` VAL_ACCURACY on split "val" of dataset "fp", prints ``ready``, waits until FILE
exists (the start signal, so that all promoters race), promotes it with the default gate and
prints the outcome as one JSON line: ``{"run": ..., "promoted": ..., "reason": ...}``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from fercore import registry, storage

POLL_S = 0.001  # how often the start signal is looked for: all promoters start within ~1 ms


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output")
    parser.add_argument("run_id")
    parser.add_argument("val_accuracy", type=float)
    parser.add_argument("--go", type=Path, required=True)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="promoter-") as tmp:
        model = Path(tmp, "model.pt")
        model.write_bytes(os.urandom(200_000))
        candidate = storage.publish_run(
            args.output,
            args.run_id,
            {"model.pt": model},
            metrics={"val_accuracy": args.val_accuracy, "val_split": "val"},
            dataset_fingerprint="fp",
        )
    print("ready", flush=True)
    while not args.go.exists():
        time.sleep(POLL_S)
    outcome = registry.promote(args.output, candidate, registry.Gate(), registry.Actor.here(f"promoter {args.run_id}"))
    print(json.dumps({"run": args.run_id, "promoted": outcome.promoted, "reason": outcome.reason}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
