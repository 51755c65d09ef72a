"""The model shipped in models/ is what its card says it is."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from fercore.checkpoint import build_model, load_checkpoint
from fercore.labels import CLASS_NAMES
from fercore.models import count_parameters

MODELS = Path(__file__).parents[1] / "models"


def test_bundled_checkpoint_loads_safely_and_matches_its_card() -> None:
    path = MODELS / "fer-compact.pt"
    torch.load(path, weights_only=True)  # plain tensors and builtins only
    ckpt = load_checkpoint(path)
    assert ckpt.classes == CLASS_NAMES and ckpt.training_state is None
    model = build_model(ckpt)
    assert count_parameters(model) <= 5_000_000
    assert path.stat().st_size <= 20 * 2**20
    card = (MODELS / "MODEL_CARD.md").read_text()
    quoted = re.search(r"Accuracy \*\*(0\.\d{4})\*\*", card)
    assert quoted, "the card quotes the validation accuracy"
    assert f"{ckpt.metrics['val_accuracy']:.4f}" == quoted.group(1)
    assert ckpt.run_id in card and ckpt.dataset_fingerprint in card
    with torch.no_grad():
        assert model(torch.zeros(1, 1, 48, 48)).shape == (1, len(CLASS_NAMES))
