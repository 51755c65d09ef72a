"""Transfer learning from torchvision's ImageNet-pretrained backbones, adapted to 1-channel
48x48 faces.

Adaptation: the RGB stem becomes a 1-channel stem (pretrained filters summed over their input
channels, which is exactly what a grey image replicated to RGB would see), its stride drops so
that a 48 px face is not reduced to a single pixel, and the classifier is replaced.

The factories build the architecture only (random weights), because serving rebuilds models
from checkpoints that already hold the trained weights. Training calls
:func:`load_pretrained` afterwards to start from ImageNet weights, downloaded through
torchvision's weights API or read from a local file.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torchvision import models as tvm

from fercore.models.registry import register_model

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Backbone:
    build: Callable[..., nn.Module]
    weights: str  # torchvision weights enum entry, e.g. "ResNet18_Weights.IMAGENET1K_V1"
    stem: str  # state-dict key of the first conv's weight
    head: str  # state-dict prefix of the classifier that is replaced


def _conv_1ch(conv: nn.Conv2d, stride: int) -> nn.Conv2d:
    return nn.Conv2d(
        1,
        conv.out_channels,
        conv.kernel_size,  # type: ignore[arg-type]
        stride=stride,
        padding=conv.padding,  # type: ignore[arg-type]
        bias=conv.bias is not None,
    )


def _resnet(build: Callable[..., tvm.ResNet]) -> Callable[[int, float], nn.Module]:
    def make(num_classes: int, dropout: float) -> nn.Module:
        m = build(weights=None)
        m.conv1 = _conv_1ch(m.conv1, stride=1)
        m.maxpool = nn.Identity()  # type: ignore[assignment]
        m.fc = nn.Sequential(nn.Dropout(dropout), nn.Linear(m.fc.in_features, num_classes))  # type: ignore[assignment]
        return m

    return make


def _vgg_bn(build: Callable[..., tvm.VGG]) -> Callable[[int, float], nn.Module]:
    def make(num_classes: int, dropout: float) -> nn.Module:
        m = build(weights=None)
        m.features[0] = _conv_1ch(m.features[0], stride=1)  # type: ignore[arg-type]
        m.features = m.features[:-1]  # drop the 5th max pool: 48 px -> 3x3 instead of 1x1
        m.avgpool = nn.AdaptiveAvgPool2d(1)  # type: ignore[assignment]
        m.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(512, num_classes))
        return m

    return make


def _efficientnet(build: Callable[..., tvm.EfficientNet]) -> Callable[[int, float], nn.Module]:
    def make(num_classes: int, dropout: float) -> nn.Module:
        m = build(weights=None)
        m.features[0][0] = _conv_1ch(m.features[0][0], stride=1)  # type: ignore[index,arg-type]
        last = m.classifier[1]
        assert isinstance(last, nn.Linear)
        m.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(last.in_features, num_classes))
        return m

    return make


def _convnext(build: Callable[..., tvm.ConvNeXt]) -> Callable[[int, float], nn.Module]:
    def make(num_classes: int, dropout: float) -> nn.Module:
        m = build(weights=None)
        stem = m.features[0][0]  # type: ignore[index]
        assert isinstance(stem, nn.Conv2d)
        # 4x4 patchify at stride 2 (not 4): 48 px -> 24 -> 12 -> 6 -> 3.
        m.features[0][0] = nn.Conv2d(1, stem.out_channels, 4, stride=2, padding=1)  # type: ignore[index]
        last = m.classifier[2]
        assert isinstance(last, nn.Linear)
        m.classifier[2] = nn.Sequential(nn.Dropout(dropout), nn.Linear(last.in_features, num_classes))
        return m

    return make


BACKBONES: dict[str, Backbone] = {
    "tv_resnet18": Backbone(_resnet(tvm.resnet18), "ResNet18_Weights.IMAGENET1K_V1", "conv1.weight", "fc."),
    "tv_resnet50": Backbone(_resnet(tvm.resnet50), "ResNet50_Weights.IMAGENET1K_V2", "conv1.weight", "fc."),
    "tv_vgg16_bn": Backbone(_vgg_bn(tvm.vgg16_bn), "VGG16_BN_Weights.IMAGENET1K_V1", "features.0.weight", "classifier."),
    "tv_efficientnet_b0": Backbone(
        _efficientnet(tvm.efficientnet_b0),
        "EfficientNet_B0_Weights.IMAGENET1K_V1",
        "features.0.0.weight",
        "classifier.",
    ),
    "tv_convnext_tiny": Backbone(
        _convnext(tvm.convnext_tiny), "ConvNeXt_Tiny_Weights.IMAGENET1K_V1", "features.0.0.weight", "classifier.2."
    ),
}


def _register(name: str, backbone: Backbone) -> None:
    def factory(num_classes: int, dropout: float = 0.2) -> nn.Module:
        return backbone.build(num_classes, dropout)

    factory.__name__ = name
    factory.__doc__ = f"torchvision {name[3:]} adapted to 1-channel 48x48 input ({backbone.weights})."
    register_model(factory)


for _name, _backbone in BACKBONES.items():
    _register(_name, _backbone)


class PretrainedWeightsUnavailable(RuntimeError):
    """Neither a download nor a local file could supply the ImageNet weights."""


def fetch_pretrained_state(name: str, path: str | Path | None = None) -> dict[str, torch.Tensor]:
    """ImageNet weights for backbone ``name``.

    From ``path`` if given; else through torchvision's weights API, which downloads once into
    ``$TORCH_HOME/hub/checkpoints`` and reuses that file. ``FER_PRETRAINED_MIRROR`` (a base
    URL) fetches the same file name from an internal mirror instead of download.pytorch.org.
    """
    backbone = BACKBONES[name]
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise PretrainedWeightsUnavailable(f"pretrained weights file {path} does not exist")
        state = torch.load(path, map_location="cpu", weights_only=True)
        return state.get("state_dict", state) if isinstance(state, dict) else state
    weights = tvm.get_weight(backbone.weights)
    file_name = weights.url.rsplit("/", 1)[-1]
    mirror = os.environ.get("FER_PRETRAINED_MIRROR")
    url = f"{mirror.rstrip('/')}/{file_name}" if mirror else weights.url
    try:
        return torch.hub.load_state_dict_from_url(url, file_name=file_name, progress=True, weights_only=True)
    except OSError as exc:  # URLError, HTTPError, socket errors, read-only cache...
        raise PretrainedWeightsUnavailable(
            f"could not download {backbone.weights} from {url} ({exc}). Download {file_name} "
            f"elsewhere and pass it with --pretrained-weights FILE, or put it in "
            f"{Path(torch.hub.get_dir()) / 'checkpoints'}."
        ) from exc


def load_pretrained(model: nn.Module, name: str, path: str | Path | None = None) -> list[str]:
    """Copy ImageNet weights into an adapted backbone built by ``create_model(name)``.

    The stem's RGB filters are summed into one grey channel; the classifier is left as
    initialised. Returns the keys that kept their fresh initialisation.
    """
    if name not in BACKBONES:
        raise ValueError(f"{name!r} has no pretrained weights; choose one of {sorted(BACKBONES)}")
    backbone = BACKBONES[name]
    state = fetch_pretrained_state(name, path)
    if backbone.stem in state and state[backbone.stem].shape[1] == 3:
        state[backbone.stem] = state[backbone.stem].sum(dim=1, keepdim=True)
    own = model.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    skipped = sorted(k for k in state if k not in usable)
    unexpected = [k for k in skipped if not k.startswith(backbone.head)]
    if unexpected:
        raise ValueError(f"pretrained weights do not fit {name}: {unexpected[:5]}")
    model.load_state_dict(usable, strict=False)
    fresh = sorted(k for k in own if k not in usable)
    log.info("loaded ImageNet weights into %s; %d tensors kept fresh: %s", name, len(fresh), fresh[:6])
    return fresh
