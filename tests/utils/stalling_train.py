"""``python -m training.train`` that stops after a given optimiser step, for tests that kill it there.

    python -m tests.utils.stalling_train --stall-after-step 75 -- --data ... --output ...

Everything after ``--`` goes to :func:`training.train.main`. Once the optimiser has taken step
``--stall-after-step`` (counted over the whole run, 1-based) the process prints
``stalled after step N`` and sleeps until it is killed: the test knows where training stands
when it kills it, whatever the machine's speed. The count comes from PyTorch's global optimiser
hook, so nothing in the training code is changed.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from training import train

STALL_S = 3600.0  # until killed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stall-after-step", type=int, required=True)
    parser.add_argument("train_args", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    train_args = args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args
    steps = 0

    def count_and_stall(optimizer: torch.optim.Optimizer, *_: Any) -> None:
        nonlocal steps
        steps += 1
        if steps == args.stall_after_step:
            print(f"stalled after step {steps}", flush=True)
            time.sleep(STALL_S)

    register_optimizer_step_post_hook(count_and_stall)
    return train.main(train_args)


if __name__ == "__main__":
    sys.exit(main())
