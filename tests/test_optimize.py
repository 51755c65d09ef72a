"""The network rewritten for inference (fercore.optimize, OPTIMIZE_MODEL) gives the probabilities
of the checkpoint's plain network, for the bundled model and for every registered architecture,
and falls back to the plain network whenever it cannot be rewritten or the rewrite disagrees."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import fx, nn

from app.faces import FaceDetector, crop_faces
from app.model import Predictor
from app.settings import BUNDLED_MODEL
from fercore import optimize
from fercore.labels import CLASS_NAMES
from fercore.models import create_model, list_models
from fercore.optimize import OneDNNConv2d, max_probability_difference, optimize_for_inference
from tests.utils.photos import photo
from tests.utils.service import clean_service_env, face_pixels, gray_png, post_image, running_app

TOLERANCE = 1e-5  # on class probabilities; float rounding alone gives ~1e-7
needs_onednn = pytest.mark.skipif(not optimize.onednn_available(), reason="this torch has no oneDNN")


def random_faces(n: int, size: int = 48, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8), mode="L") for _ in range(n)]


def assert_same_predictions(a: Predictor, b: Predictor, faces: list[Image.Image]) -> None:
    for x, y in zip(a.predict_faces(faces), b.predict_faces(faces), strict=True):
        assert x["emotion"] == y["emotion"]
        for name in CLASS_NAMES:
            assert x["scores"][name] == pytest.approx(y["scores"][name], abs=TOLERANCE)


def randomize_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Running statistics and affine parameters unlike a fresh BatchNorm's identity, as after training."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            c = module.num_features
            assert module.running_mean is not None and module.running_var is not None
            module.running_mean.copy_(torch.rand(c, generator=generator) - 0.5)
            module.running_var.copy_(torch.rand(c, generator=generator) + 0.5)
            module.weight.data.copy_(torch.rand(c, generator=generator) + 0.5)
            module.bias.data.copy_(torch.rand(c, generator=generator) - 0.5)
    return model.eval()


def test_bundled_model_gives_the_checkpoints_probabilities() -> None:
    plain = Predictor.from_uri(str(BUNDLED_MODEL), optimize=False)
    optimized = Predictor.from_uri(str(BUNDLED_MODEL), optimize=True)
    assert isinstance(optimized.model, fx.GraphModule) and not isinstance(plain.model, fx.GraphModule)
    astronaut = photo("astronaut")
    crops = crop_faces(astronaut, FaceDetector().detect(astronaut))
    assert len(crops) == 1
    # The real face, random faces, a whole photo and a gradient: one at a time and as a batch.
    inputs = [*crops, *random_faces(16), astronaut, Image.fromarray(face_pixels(), mode="L")]
    assert_same_predictions(plain, optimized, inputs)
    for face in inputs[:4]:
        assert_same_predictions(plain, optimized, [face])


@needs_onednn
def test_compact_keeps_no_batchnorm_and_no_separate_relu_after_a_convolution() -> None:
    model = randomize_batchnorm(create_model("compact", width=8))
    result = optimize_for_inference(model, (1, 48, 48))
    assert result.applied == ("12 BatchNorm folded", "12 oneDNN convolutions") and result.reason == ""
    modules = list(result.model.modules())
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.Conv2d)) for m in modules)
    convs = [m for m in modules if isinstance(m, OneDNNConv2d)]
    # conv-BN-ReLU layers fuse their ReLU; the second conv of a residual pair feeds the addition.
    assert [m.unary for m in convs].count("relu") == 8 and len(convs) == 12
    assert not model.training and any(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # the input is untouched


@pytest.mark.slow
@pytest.mark.parametrize("name", list_models())
def test_every_architecture_is_rewritten_to_the_same_function(name: str) -> None:
    torch.manual_seed(0)
    model = randomize_batchnorm(create_model(name))
    result = optimize_for_inference(model, (1, 48, 48))
    assert result.applied, result.reason
    x = torch.randn(3, 1, 48, 48).contiguous(memory_format=torch.channels_last)
    assert max_probability_difference(model, result.model, x) <= TOLERANCE
    assert max_probability_difference(model, result.model, x[:1]) <= TOLERANCE
    assert max_probability_difference(model, result.model, x.contiguous()) <= TOLERANCE  # any memory format


def test_rewritten_model_is_safe_to_share_between_threads(checkpoint_path: Path) -> None:
    predictor = Predictor.from_uri(str(checkpoint_path))
    assert isinstance(predictor.model, fx.GraphModule)
    faces = random_faces(8, seed=1)
    expected = [predictor.predict_faces([face]) for face in faces]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda i: predictor.predict_faces([faces[i % 8]]), range(64)))
    for i, got in enumerate(results):
        assert got == expected[i % 8]


class Branchy(nn.Module):
    """Control flow that depends on the data: torch.fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.head = nn.Linear(4, len(CLASS_NAMES))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if y.mean() > 0:
            y = -y
        return self.head(y.mean(dim=(2, 3)))


def test_a_network_fx_cannot_trace_is_served_plain() -> None:
    model = Branchy().eval()
    result = optimize_for_inference(model, (1, 48, 48))
    assert result.model is model and result.applied == ()
    assert "torch.fx cannot trace it" in result.reason


def test_a_rewrite_that_disagrees_is_not_served(monkeypatch: pytest.MonkeyPatch) -> None:
    right_fold = optimize.fuse_conv_bn_eval

    def wrong_fold(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
        fused = right_fold(conv, bn)
        fused.weight.data.mul_(1.5)
        return fused

    model = randomize_batchnorm(create_model("compact", width=8))
    monkeypatch.setattr(optimize, "fuse_conv_bn_eval", wrong_fold)
    result = optimize_for_inference(model, (1, 48, 48))
    assert result.model is model and result.applied == ()
    assert "differs from the plain one" in result.reason


def test_without_onednn_batchnorm_is_still_folded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(optimize, "onednn_available", lambda: False)
    model = randomize_batchnorm(create_model("compact", width=8))
    result = optimize_for_inference(model, (1, 48, 48))
    assert result.applied == ("12 BatchNorm folded",)
    assert max_probability_difference(model, result.model, torch.randn(2, 1, 48, 48)) <= TOLERANCE


def test_optimize_model_setting(monkeypatch: pytest.MonkeyPatch, checkpoint_path: Path) -> None:
    clean_service_env(monkeypatch)
    answers = {}
    for setting in ("true", "false"):
        with running_app(monkeypatch, MODEL_URI=str(checkpoint_path), OPTIMIZE_MODEL=setting) as client:
            rewritten = isinstance(client.app.state.predictor.model, fx.GraphModule)
            assert rewritten == (setting == "true")
            answers[setting] = post_image(client, gray_png(), detect=False).json()["faces"][0]
    for name in CLASS_NAMES:
        assert answers["true"]["scores"][name] == pytest.approx(answers["false"]["scores"][name], abs=TOLERANCE)
