"""Checkpoints as bytes, for tests that tamper with them or load them without a file."""

from __future__ import annotations

import io

import torch

from fercore.checkpoint import Checkpoint


def checkpoint_bytes(ckpt: Checkpoint, with_training_state: bool = False) -> bytes:
    """What :func:`fercore.checkpoint.save_checkpoint` would write, in memory."""
    buf = io.BytesIO()
    torch.save(ckpt.to_dict(with_training_state), buf)
    return buf.getvalue()
