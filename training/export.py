"""What a published run holds besides its report: the files the service may run.

Placeholder on this branch: the ONNX export (``model.onnx``, ``model.int8.onnx`` written next to
the checkpoint and checked against the PyTorch network) replaces this module at merge.
"""

from __future__ import annotations

from pathlib import Path

SERVED_FILE = "model.pt"  # the file of a run that latest.json names; the ONNX export serves model.int8.onnx


def export_for_serving(checkpoint_path: Path, data_source: str | None) -> dict[str, Path]:
    """Every file to publish for ``checkpoint_path`` (name in the run folder -> local file),
    ``model.pt`` included; ``data_source`` is the data the export may calibrate or check on."""
    return {"model.pt": checkpoint_path}
