"""Batched augmentation on tensors, on whatever device the batch is on.

The whole dataset lives on the training device as uint8 (FER2013 is ~80 MB), so on CUDA
augmentation runs on the GPU and nothing waits on a DataLoader. Every random draw uses the
explicit ``generator``, which the checkpoint saves, so resumed runs repeat exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class AugmentConfig:
    flip: bool = True
    rotate_deg: float = 15.0
    scale: tuple[float, float] = (0.85, 1.15)
    translate: float = 0.1  # fraction of the image size
    erase_prob: float = 0.5
    erase_area: tuple[float, float] = (0.02, 0.2)
    # What a face cut from a user's photo has and FER2013's faces may not (docs/realfaces.md): the
    # fraction of samples blurred (Gaussian, sigma up to blur_sigma pixels: focus, motion, a small
    # face upscaled), seen at a lower resolution (down to lowres_min of the side, then back up: a
    # face under 48 px in the photo), and lit from one side (a linear ramp of up to shade_strength
    # standard deviations across the face: histogram equalisation removes global lighting, not this).
    blur_prob: float = 0.0
    blur_sigma: float = 1.2
    lowres_prob: float = 0.0
    lowres_min: float = 0.5
    shade_prob: float = 0.0
    shade_strength: float = 1.0


def _uniform(n: int, low: float, high: float, like: Tensor, gen: torch.Generator) -> Tensor:
    return torch.rand(n, device=like.device, generator=gen) * (high - low) + low


def random_affine(x: Tensor, cfg: AugmentConfig, gen: torch.Generator) -> Tensor:
    """Per-sample flip, rotation, scale and shift of a float batch (N, C, H, W); the border
    is filled with 0, which is the mean after normalisation."""
    n = x.shape[0]
    angle = _uniform(n, -cfg.rotate_deg, cfg.rotate_deg, x, gen) * (math.pi / 180)
    scale = _uniform(n, cfg.scale[0], cfg.scale[1], x, gen)
    shift = _uniform(2 * n, -cfg.translate, cfg.translate, x, gen).view(n, 2) * 2  # grid units span 2
    flip = torch.ones(n, device=x.device)
    if cfg.flip:
        flip = torch.where(torch.rand(n, device=x.device, generator=gen) < 0.5, -1.0, 1.0)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    # theta maps output coordinates to input coordinates: rotate/scale, mirror x, shift.
    theta = torch.stack([torch.stack([cos * flip, -sin, shift[:, 0]], 1), torch.stack([sin * flip, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def random_erasing(x: Tensor, cfg: AugmentConfig, gen: torch.Generator) -> Tensor:
    """Zero a random rectangle (area fraction in ``cfg.erase_area``) in a ``erase_prob``
    fraction of the samples (Zhong et al., 2017)."""
    n, _, h, w = x.shape
    area = _uniform(n, cfg.erase_area[0], cfg.erase_area[1], x, gen)
    log_ratio = _uniform(n, math.log(0.3), math.log(3.3), x, gen)
    ratio = torch.exp(log_ratio)
    eh = (torch.sqrt(area * ratio) * h).clamp(1, h)
    ew = (torch.sqrt(area / ratio) * w).clamp(1, w)
    top = torch.rand(n, device=x.device, generator=gen) * (h - eh)
    left = torch.rand(n, device=x.device, generator=gen) * (w - ew)
    rows = torch.arange(h, device=x.device).view(1, h, 1)
    cols = torch.arange(w, device=x.device).view(1, 1, w)
    inside = (
        (rows >= top.view(n, 1, 1))
        & (rows < (top + eh).view(n, 1, 1))
        & (cols >= left.view(n, 1, 1))
        & (cols < (left + ew).view(n, 1, 1))
    )
    apply = (torch.rand(n, device=x.device, generator=gen) < cfg.erase_prob).view(n, 1, 1)
    return x.masked_fill((inside & apply).unsqueeze(1), 0.0)


def random_blur(x: Tensor, cfg: AugmentConfig, gen: torch.Generator) -> Tensor:
    """A Gaussian blur of random sigma (0.5 to ``blur_sigma`` px) on a ``blur_prob`` fraction of the
    samples: one separable kernel per sample, applied as a grouped convolution."""
    n, c, h, w = x.shape
    radius = max(1, math.ceil(2.5 * cfg.blur_sigma))
    sigma = _uniform(n, 0.5, cfg.blur_sigma, x, gen).view(n, 1)
    taps = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype).view(1, -1)
    kernel = torch.exp(-0.5 * (taps / sigma) ** 2)
    kernel = kernel / kernel.sum(1, keepdim=True)  # (N, 2r+1)
    flat = F.pad(x.reshape(1, n * c, h, w), (radius, radius, radius, radius), mode="replicate")
    rows = kernel.repeat_interleave(c, 0).view(n * c, 1, 1, -1)
    cols = rows.view(n * c, 1, -1, 1)
    blurred = F.conv2d(F.conv2d(flat, rows, groups=n * c), cols, groups=n * c).view(n, c, h, w)
    apply = (torch.rand(n, device=x.device, generator=gen) < cfg.blur_prob).view(n, 1, 1, 1)
    return torch.where(apply, blurred, x)


def random_lowres(x: Tensor, cfg: AugmentConfig, gen: torch.Generator) -> Tensor:
    """A ``lowres_prob`` fraction of the samples shrunk to a random ``lowres_min``-1 of their side
    (area averaging, as Pillow's resize does) and enlarged back (bilinear, as the service does)."""
    n, _, h, w = x.shape
    apply = torch.rand(n, device=x.device, generator=gen) < cfg.lowres_prob
    factor = _uniform(n, cfg.lowres_min, 1.0, x, gen)
    out = x.clone()
    for i in torch.nonzero(apply).flatten().tolist():
        side = max(4, round(h * float(factor[i])))
        small = F.interpolate(x[i : i + 1], size=(side, max(4, round(w * side / h))), mode="area")
        out[i : i + 1] = F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)
    return out


def random_shading(x: Tensor, cfg: AugmentConfig, gen: torch.Generator) -> Tensor:
    """A linear ramp across the face in a random direction, rising up to ``shade_strength`` (standard
    deviations of the normalised pixels) per side length, on a ``shade_prob`` fraction."""
    n, _, h, w = x.shape
    angle = _uniform(n, 0.0, 2 * math.pi, x, gen).view(n, 1, 1)
    strength = _uniform(n, 0.0, cfg.shade_strength, x, gen).view(n, 1, 1)
    ys = torch.linspace(-0.5, 0.5, h, device=x.device, dtype=x.dtype).view(1, h, 1)
    xs = torch.linspace(-0.5, 0.5, w, device=x.device, dtype=x.dtype).view(1, 1, w)
    ramp = strength * (torch.cos(angle) * xs + torch.sin(angle) * ys)  # (N, H, W)
    apply = (torch.rand(n, device=x.device, generator=gen) < cfg.shade_prob).view(n, 1, 1)
    return x + (ramp * apply).unsqueeze(1)


def augment(x: Tensor, cfg: AugmentConfig, gen: torch.Generator) -> Tensor:
    # The camera's defects first (they happen before the face is cut out), then the framing's.
    if cfg.lowres_prob > 0:
        x = random_lowres(x, cfg, gen)
    if cfg.blur_prob > 0:
        x = random_blur(x, cfg, gen)
    if cfg.shade_prob > 0:
        x = random_shading(x, cfg, gen)
    x = random_affine(x, cfg, gen)
    if cfg.erase_prob > 0:
        x = random_erasing(x, cfg, gen)
    return x


def mix_batch(
    x: Tensor, y: Tensor, mixup_alpha: float, cutmix_alpha: float, prob: float, gen: torch.Generator
) -> tuple[Tensor, Tensor]:
    """MixUp or CutMix (one of them, chosen per batch) on images and soft targets ``y``
    (N, classes). With probability ``1 - prob`` the batch is returned unchanged."""
    if prob <= 0 or (mixup_alpha <= 0 and cutmix_alpha <= 0):
        return x, y
    draws = torch.rand(4, generator=gen, device=x.device).tolist()
    if draws[0] >= prob:
        return x, y
    perm = torch.randperm(x.shape[0], device=x.device, generator=gen)
    use_cutmix = cutmix_alpha > 0 and (mixup_alpha <= 0 or draws[1] < 0.5)
    alpha = cutmix_alpha if use_cutmix else mixup_alpha
    lam = _beta(alpha, gen, x.device)
    if use_cutmix:
        h, w = x.shape[-2:]
        cut = math.sqrt(1 - lam)
        ch, cw = int(h * cut), int(w * cut)
        cy, cx = int(draws[2] * h), int(draws[3] * w)
        y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, h)
        x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, w)
        x = x.clone()
        x[..., y0:y1, x0:x1] = x[perm][..., y0:y1, x0:x1]
        lam = 1 - (y1 - y0) * (x1 - x0) / (h * w)
    else:
        x = lam * x + (1 - lam) * x[perm]
    return x, lam * y + (1 - lam) * y[perm]


def _beta(alpha: float, gen: torch.Generator, device: torch.device) -> float:
    """A Beta(alpha, alpha) draw from ``gen`` (via two Gamma draws, which accept a generator)."""
    a = torch._standard_gamma(torch.full((2,), alpha, device=device), generator=gen)
    return float((a[0] / a.sum()).item())
