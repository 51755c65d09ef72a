"""training.augment: the photo defects a face cut from a user's photo has (blur, low resolution, side light)."""

from __future__ import annotations

import dataclasses

import torch

from training.augment import AugmentConfig, augment, random_blur, random_lowres, random_shading

NONE = AugmentConfig(flip=False, rotate_deg=0.0, scale=(1.0, 1.0), translate=0.0, erase_prob=0.0)


def faces(n: int = 8, seed: int = 0) -> torch.Tensor:
    """Random normalised 'faces' with sharp detail: (N, 1, 48, 48)."""
    return torch.randn(n, 1, 48, 48, generator=torch.Generator().manual_seed(seed))


def gen(seed: int = 1) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def roughness(x: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference of horizontally neighbouring pixels, per sample."""
    return (x[..., 1:] - x[..., :-1]).abs().mean(dim=(1, 2, 3))


def test_blur_smooths_the_chosen_faces_and_keeps_their_mean() -> None:
    x = faces()
    out = random_blur(x, dataclasses.replace(NONE, blur_prob=1.0), gen())
    assert out.shape == x.shape
    assert (roughness(out) < 0.9 * roughness(x)).all()
    torch.testing.assert_close(out.mean(dim=(1, 2, 3)), x.mean(dim=(1, 2, 3)), atol=0.05, rtol=0)
    untouched = random_blur(x, dataclasses.replace(NONE, blur_prob=0.0), gen())
    torch.testing.assert_close(untouched, x)


def test_low_resolution_loses_detail_on_a_fraction_of_the_faces() -> None:
    x = faces(64)
    out = random_lowres(x, dataclasses.replace(NONE, lowres_prob=0.5, lowres_min=0.5), gen())
    changed = (out - x).abs().amax(dim=(1, 2, 3)) > 1e-6
    assert 16 <= int(changed.sum()) <= 48  # about half
    assert (roughness(out[changed]) < roughness(x[changed])).all()


def test_shading_adds_a_ramp_that_averages_to_nothing() -> None:
    x = torch.zeros(16, 1, 48, 48)
    out = random_shading(x, dataclasses.replace(NONE, shade_prob=1.0, shade_strength=1.0), gen())
    span = out.amax(dim=(1, 2, 3)) - out.amin(dim=(1, 2, 3))
    assert (span > 0).all() and (span <= 2**0.5 + 1e-5).all()  # corner to corner at most
    torch.testing.assert_close(out.mean(dim=(1, 2, 3)), torch.zeros(16), atol=1e-5, rtol=0)


def test_augment_is_reproducible_from_its_generator_and_off_by_default() -> None:
    x = faces()
    cfg = dataclasses.replace(NONE, blur_prob=0.5, lowres_prob=0.5, shade_prob=0.5)
    torch.testing.assert_close(augment(x, cfg, gen(3)), augment(x, cfg, gen(3)))
    assert AugmentConfig().blur_prob == AugmentConfig().lowres_prob == AugmentConfig().shade_prob == 0.0
    torch.testing.assert_close(augment(x, NONE, gen()), x)
