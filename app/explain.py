"""Where the model looked: occlusion sensitivity, from forward passes only.

Each face's model input (S x S, see :meth:`app.model.Predictor.inputs`) is copied once per
position of a ``grid`` x ``grid`` lattice of square patches, each copy with one patch set to the
training mean (0 after normalisation: a grey the model has seen as "nothing"). All the copies of
all the faces go through the model in ONE batched :meth:`~app.model.Predictor.probabilities`
call, with the unoccluded inputs: ``faces * (grid**2 + 1)`` rows, 37 per face at the default
6 x 6. A pixel's drop is how much of the predicted class's probability is lost, on average,
when a patch covering it is hidden, as a fraction of that probability (0: nothing lost, 1: all
of it). Patches are large (40% of the side: the bundled model shrugs off smaller ones) and
overlap, and their drops are interpolated smoothly. The heat is the drop scaled so the strongest region is fully
hot, unless it loses less than :data:`MIN_SCALE` (then the map stays faint: the model did not
depend on any one region). It is upsampled to the crop's size and encoded as an RGBA PNG whose
colour and opacity both grow with the heat, so it can be laid over the face as it is.

Only numpy and Pillow: this runs on whatever runtime serves the model (ONNX Runtime or PyTorch),
and the service does not need the training stack for it.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from PIL import Image

METHOD = "occlusion"
GRID = 6  # patch positions per side: GRID**2 occluded copies + 1 unoccluded per face
PATCH_FRACTION = 0.4  # patch side as a fraction of the input side: patches overlap, the map is smooth
MIN_SCALE = 0.01  # a drop this large or larger is drawn fully hot; under it, noise is not blown up
# A request explains at most this many faces (the largest): GRID**2 + 1 model inputs each, so
# an explanation costs at most 4 * 37 = 148 model inputs, in one forward pass.
MAX_EXPLAINED_FACES = 4

# Colour stops of the heat map, from cold (transparent) to hot, RGB in 0..255 ("inferno"-like).
_STOPS = np.array([0.0, 0.25, 0.5, 0.75, 1.0])
_COLOURS = np.array([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], dtype=np.float64)
_MAX_ALPHA = 200  # the hottest pixel still lets the face show through


class Model(Protocol):
    """What an explanation needs of :class:`app.model.Predictor`."""

    def inputs(self, faces: Sequence[Image.Image]) -> np.ndarray: ...

    def probabilities(self, x: np.ndarray) -> np.ndarray: ...


@dataclass(frozen=True)
class Heatmap:
    """One face's explanation: the class it explains, the heat per crop pixel, and the largest
    drop (share of the class's probability lost when the most telling region is hidden)."""

    class_index: int
    heat: np.ndarray  # float32 (crop height, crop width), 0..1
    max_drop: float

    def png(self) -> bytes:
        """The heat as an RGBA PNG of the crop's size."""
        return encode_png(colourise(self.heat))

    def png_base64(self) -> str:
        return base64.b64encode(self.png()).decode("ascii")


def patch_origins(size: int, grid: int = GRID, fraction: float = PATCH_FRACTION) -> tuple[int, list[int]]:
    """The patch side and the ``grid`` evenly spaced offsets of a patch along one side of ``size``."""
    patch = max(1, round(size * fraction))
    return patch, [round(i * (size - patch) / max(grid - 1, 1)) for i in range(grid)]


def occluded_copies(x: np.ndarray, grid: int = GRID, fraction: float = PATCH_FRACTION) -> np.ndarray:
    """``x`` (N, C, S, S) followed, per face, by its ``grid**2`` occluded copies: (N * (1 + grid**2), C, S, S).

    Rows ``i * (1 + grid**2)`` hold the unoccluded inputs; the copies follow in row-major patch order.
    """
    size = x.shape[-1]
    patch, origins = patch_origins(size, grid, fraction)
    per_face = 1 + grid * grid
    batch = np.repeat(x, per_face, axis=0)  # (N * per_face, C, S, S)
    for k, (top, left) in enumerate((top, left) for top in origins for left in origins):
        batch[1 + k :: per_face, :, top : top + patch, left : left + patch] = 0.0  # the training mean, normalised
    return batch


def heat_grid(
    probs: np.ndarray, n: int, size: int, grid: int = GRID, fraction: float = PATCH_FRACTION
) -> tuple[np.ndarray, np.ndarray]:
    """Per face, the predicted class and the S x S map of the fraction of its probability lost.

    ``probs``: (N * (1 + grid**2), classes), in :func:`occluded_copies`' row order.
    Returns (classes (N,), drop (N, S, S) float32 in 0..1).
    """
    per_face = 1 + grid * grid
    probs = probs.reshape(n, per_face, -1)
    target = probs[:, 0].argmax(axis=1)  # (N,)
    base = probs[np.arange(n), 0, target]  # (N,)
    occluded = probs[np.arange(n), 1:, target]  # (N, grid**2)
    drop = np.clip(base[:, None] - occluded, 0.0, None) / np.maximum(base[:, None], 1e-6)
    # Each patch's drop spread over the pixels around its centre with Gaussian weights (sigma: the
    # spacing of the centres), normalised: a smooth interpolation of the grid of drops, no box edges.
    patch, origins = patch_origins(size, grid, fraction)
    centres = np.array(origins, dtype=np.float64) + (patch - 1) / 2
    pixels = np.arange(size, dtype=np.float64)
    sigma = max((size - patch) / max(grid - 1, 1), 1.0)
    along = np.exp(-(((pixels[None, :] - centres[:, None]) / sigma) ** 2) / 2)  # (grid, S): weight of position i at pixel
    weights = (along[:, None, :, None] * along[None, :, None, :]).reshape(grid * grid, size, size)  # row-major like the copies
    heat = np.einsum("nk,kyx->nyx", drop, weights) / weights.sum(axis=0)
    return target, np.clip(heat, 0.0, 1.0).astype(np.float32)


def explain(model: Model, crops: Sequence[Image.Image], grid: int = GRID) -> list[Heatmap]:
    """Occlusion heatmaps for ``crops``, each of its crop's size, from one batched forward pass."""
    if not crops:
        return []
    x = model.inputs(crops)  # (N, 1, S, S)
    probs = model.probabilities(occluded_copies(x, grid))
    targets, drops = heat_grid(probs, len(crops), x.shape[-1], grid)
    heatmaps = []
    for target, drop, crop in zip(targets, drops, crops, strict=True):
        max_drop = float(drop.max())
        heatmaps.append(Heatmap(int(target), resize_heat(drop / max(max_drop, MIN_SCALE), crop.size), max_drop))
    return heatmaps


def resize_heat(heat: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``heat`` (S, S) bilinearly resized to ``size`` (width, height)."""
    image = Image.fromarray(heat.astype(np.float32)).resize(size, Image.Resampling.BILINEAR)
    return np.clip(np.asarray(image, dtype=np.float32), 0.0, 1.0)


def colourise(heat: np.ndarray) -> np.ndarray:
    """uint8 RGBA (H, W, 4): colour along the map's stops, opacity proportional to the heat."""
    rgb = np.stack([np.interp(heat, _STOPS, _COLOURS[:, c]) for c in range(3)], axis=-1)
    alpha = heat * _MAX_ALPHA
    return np.concatenate([rgb, alpha[..., None]], axis=-1).round().astype(np.uint8)


def encode_png(rgba: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgba).save(buf, format="PNG")  # uint8 (H, W, 4): RGBA
    return buf.getvalue()


def largest(boxes: Sequence[tuple[int, int, int, int]], limit: int = MAX_EXPLAINED_FACES) -> list[int]:
    """The indices of the ``limit`` largest boxes (x, y, w, h), in their original order."""
    by_area = sorted(range(len(boxes)), key=lambda i: boxes[i][2] * boxes[i][3], reverse=True)
    return sorted(by_area[:limit])
