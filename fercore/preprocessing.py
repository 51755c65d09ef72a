"""The preprocessing spec and the functions that apply it, for training and serving alike.

A face crop goes through: grayscale -> resize to ``input_size`` -> contrast normalisation
(histogram equalisation by default) -> uint8. Batches of such uint8 crops are turned into
model input by :func:`normalize`. Training caches the uint8 stage, serving computes it per
face, and both call the same functions with the spec stored in the checkpoint.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
from PIL import Image

Contrast = Literal["equalize", "none"]
# Largest face input a checkpoint may ask for: FER2013 faces are 48x48; this leaves room for any
# upsampled input a backbone may want, and bounds the warm-up face at 1 Mpx.
MAX_INPUT_SIZE = 1024


@dataclass(frozen=True)
class PreprocessSpec:
    """How a face crop becomes model input. Saved inside every checkpoint."""

    input_size: int = 48
    grayscale: bool = True
    contrast: Contrast = "equalize"
    # Mean/std of the equalised FER2013 training pixels, scaled to [0, 1]. Histogram
    # equalisation makes the pixel distribution close to uniform, hence ~0.5 / ~0.29.
    mean: float = 0.5
    std: float = 0.29

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PreprocessSpec:
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown preprocessing keys: {sorted(unknown)}")
        spec = cls(**data)
        # A checkpoint is read from storage: its spec must not make the service allocate a huge
        # input (the warm-up builds one face of input_size squared pixels) or divide by zero.
        if not isinstance(spec.input_size, int) or not 1 <= spec.input_size <= MAX_INPUT_SIZE:
            raise ValueError(f"input_size must be an integer from 1 to {MAX_INPUT_SIZE}, got {spec.input_size!r}")
        if not (math.isfinite(spec.mean) and math.isfinite(spec.std) and spec.std > 0):
            raise ValueError(f"mean and std must be finite numbers and std positive, got {spec.mean!r} and {spec.std!r}")
        if spec.contrast not in ("equalize", "none"):
            raise ValueError(f"unknown contrast normalisation {spec.contrast!r}")
        if not spec.grayscale:
            raise ValueError("only grayscale input is supported (FER2013 is grayscale)")
        return spec


def equalize_hist(images: np.ndarray) -> np.ndarray:
    """Histogram-equalise each uint8 image in ``images`` (shape (H, W) or (N, H, W)).

    Same mapping as OpenCV's ``equalizeHist``: the cumulative histogram, shifted so the
    darkest present level maps to 0, stretched to 255. Constant images are left as they are.
    """
    if images.dtype != np.uint8:
        raise TypeError(f"expected uint8 images, got {images.dtype}")
    single = images.ndim == 2
    batch = images[None] if single else images
    flat = batch.reshape(len(batch), -1)
    out = np.empty_like(flat)
    for i, pixels in enumerate(flat):
        hist = np.bincount(pixels, minlength=256)
        cdf = hist.cumsum()
        cdf_min = cdf[np.flatnonzero(hist)[0]]
        span = cdf[-1] - cdf_min
        if span == 0:  # one grey level: nothing to stretch
            out[i] = pixels
            continue
        lut = np.clip(np.rint((cdf - cdf_min) * 255.0 / span), 0, 255).astype(np.uint8)
        out[i] = lut[pixels]
    out = out.reshape(batch.shape)
    return out[0] if single else out


def prepare_face(image: Image.Image, spec: PreprocessSpec) -> np.ndarray:
    """Turn a face crop (any mode, any size) into the uint8 (size, size) array models eat."""
    gray = image.convert("L")
    size = spec.input_size
    if gray.size != (size, size):
        gray = gray.resize((size, size), Image.Resampling.BILINEAR)
    pixels = np.asarray(gray, dtype=np.uint8)
    if spec.contrast == "equalize":
        pixels = equalize_hist(pixels)
    return pixels


def normalize(batch: Any, spec: PreprocessSpec) -> Any:
    """uint8 (N, H, W) or (N, 1, H, W) -> float32 (N, 1, H, W) standardised with the spec's mean/std.

    ``batch`` is a numpy array (serving) or a torch tensor (training, on its device): the same
    arithmetic for both, and this module never imports torch.
    """
    if batch.ndim == 3:
        batch = batch[:, None]
    x = batch.astype(np.float32) if isinstance(batch, np.ndarray) else batch.float()
    return (x / 255.0 - spec.mean) / spec.std
