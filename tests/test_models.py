from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torchvision import models as tvm

from fercore.labels import NUM_CLASSES
from fercore.models import count_parameters, create_model, list_models
from fercore.models.transfer import PretrainedWeightsUnavailable, load_pretrained

# Parameter counts pin the architectures: a change to one is a change to saved checkpoints.
EXPECTED_PARAMS = {
    "compact": (1_500_000, 2_500_000),
    "vgg": (8_000_000, 11_000_000),
    "resnet18": (10_500_000, 11_500_000),
    "tv_resnet18": (10_500_000, 11_500_000),
    "tv_resnet50": (23_000_000, 24_000_000),
    "tv_vgg16_bn": (14_000_000, 15_500_000),
    "tv_efficientnet_b0": (3_500_000, 4_500_000),
    "tv_convnext_tiny": (27_000_000, 28_500_000),
}


def test_registry_lists_every_architecture() -> None:
    assert set(list_models()) == set(EXPECTED_PARAMS)


# The torchvision backbones take seconds each on a CPU: slow tests.
@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if n.startswith("tv_") else n for n in sorted(EXPECTED_PARAMS)]
)
def test_forward_shape_and_size(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name).eval()
    low, high = EXPECTED_PARAMS[name]
    assert low <= count_parameters(model) <= high
    with torch.no_grad():
        out = model(torch.randn(2, 1, 48, 48))
    assert out.shape == (2, NUM_CLASSES)
    assert torch.isfinite(out).all()


def test_compact_is_small_enough_to_serve() -> None:
    assert count_parameters(create_model("compact")) <= 5_000_000


def test_unknown_model_and_bad_arguments_are_clear() -> None:
    with pytest.raises(ValueError, match="unknown model 'nope'; available: compact"):
        create_model("nope")
    with pytest.raises(ValueError, match="bad arguments for model 'compact'"):
        create_model("compact", depth=3)


def test_width_and_class_count_are_configurable() -> None:
    model = create_model("compact", num_classes=3, width=8).eval()
    assert model(torch.zeros(1, 1, 48, 48)).shape == (1, 3)


@pytest.fixture
def resnet18_weights(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """A stand-in for the ImageNet file: torchvision's own ResNet-18, randomly initialised,
    saved the way download.pytorch.org serves it (a plain state dict)."""
    torch.manual_seed(1)
    state = tvm.resnet18(weights=None).state_dict()
    path = tmp_path / "resnet18-f37072fd.pth"
    torch.save(state, path)
    return path, state


def _assert_adapted(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    own = model.state_dict()
    # The RGB stem filters are summed into one grey channel...
    torch.testing.assert_close(own["conv1.weight"], state["conv1.weight"].sum(1, keepdim=True))
    # ...the body is copied as is, the classifier is not.
    torch.testing.assert_close(own["layer3.1.conv2.weight"], state["layer3.1.conv2.weight"])
    assert own["fc.1.weight"].shape == (NUM_CLASSES, 512)


def test_pretrained_from_a_local_file(resnet18_weights: tuple[Path, dict]) -> None:
    path, state = resnet18_weights
    model = create_model("tv_resnet18")
    fresh = load_pretrained(model, "tv_resnet18", path)
    assert fresh == ["fc.1.bias", "fc.1.weight"]
    _assert_adapted(model, state)
    assert model(torch.randn(2, 1, 48, 48)).shape == (2, NUM_CLASSES)


@pytest.fixture
def weights_server(resnet18_weights: tuple[Path, dict]) -> Iterator[str]:
    folder = resnet18_weights[0].parent

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, directory=str(folder), **kwargs)  # type: ignore[arg-type]

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()


def test_pretrained_download_through_the_weights_api(
    weights_server: str, resnet18_weights: tuple[Path, dict], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The real download path (torch.hub into $TORCH_HOME), from a local mirror.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("FER_PRETRAINED_MIRROR", weights_server)
    model = create_model("tv_resnet18")
    load_pretrained(model, "tv_resnet18")
    _assert_adapted(model, resnet18_weights[1])
    assert (tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth").is_file()
    # Second time: read from the hub cache, no server needed.
    monkeypatch.setenv("FER_PRETRAINED_MIRROR", "http://127.0.0.1:9/")
    load_pretrained(create_model("tv_resnet18"), "tv_resnet18")


def test_no_weights_anywhere_fails_clearly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("FER_PRETRAINED_MIRROR", "http://127.0.0.1:9/")  # discard port: refused
    with pytest.raises(PretrainedWeightsUnavailable, match="--pretrained-weights FILE"):
        load_pretrained(create_model("tv_resnet18"), "tv_resnet18")
    with pytest.raises(PretrainedWeightsUnavailable, match="does not exist"):
        load_pretrained(create_model("tv_resnet18"), "tv_resnet18", tmp_path / "missing.pth")
    with pytest.raises(ValueError, match="has no pretrained weights"):
        load_pretrained(create_model("compact"), "compact")


def test_pretrained_efficientnet_stem_adaptation(tmp_path: Path) -> None:
    torch.manual_seed(2)
    state = tvm.efficientnet_b0(weights=None).state_dict()
    path = tmp_path / "effnet.pth"
    torch.save(state, path)
    model = create_model("tv_efficientnet_b0")
    load_pretrained(model, "tv_efficientnet_b0", path)
    torch.testing.assert_close(model.state_dict()["features.0.0.weight"], state["features.0.0.weight"].sum(1, keepdim=True))
