"""Networks trained from scratch on 1-channel 48x48 faces."""

from __future__ import annotations

from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, ResNet

from fercore.models.registry import register_model


def conv_bn_relu(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class ResidualPair(nn.Module):
    """Two 3x3 conv-BN layers with an identity shortcut (channels unchanged)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            conv_bn_relu(channels, channels),
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
        )
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(x + self.body(x))


class CompactNet(nn.Module):
    """The CPU-serving model: four stages at 48/24/12/6 px, each a widening conv plus a
    residual pair, global average pooling, dropout, linear.

    Width 32 (the bundled model) has 1,958,759 parameters and spends 0.20 GMAC per face:
    multiply-adds of the convolutions and the linear layer, most of them in the 3x3 convolutions
    of the first two stages. Cost grows with the square of the width.
    """

    def __init__(self, num_classes: int, width: int = 32, dropout: float = 0.3) -> None:
        super().__init__()
        widths = [width, width * 2, width * 4, width * 8]
        layers: list[nn.Module] = []
        c_in = 1
        for i, c in enumerate(widths):
            if i > 0:
                layers.append(nn.MaxPool2d(2))  # 48 -> 24 -> 12 -> 6
            layers += [conv_bn_relu(c_in, c), ResidualPair(c)]
            c_in = c
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(c_in, num_classes))
        _init_weights(self)

    def forward(self, x: Tensor) -> Tensor:  # x: (N, 1, 48, 48) -> logits (N, num_classes)
        return self.head(self.features(x))


class VGGFer(nn.Module):
    """VGG-style network for 48x48 faces (after Khaireddin & Chen 2021, "Facial Emotion
    Recognition: State of the Art Performance on FER2013", 73.3%): four stages of two
    conv-BN-ReLU layers, max pooling to 3x3, two fully connected layers with dropout."""

    def __init__(self, num_classes: int, width: int = 64, fc: int = 1024, dropout: float = 0.4) -> None:
        super().__init__()
        widths = [width, width * 2, width * 4, width * 8]
        layers: list[nn.Module] = []
        c_in = 1
        for c in widths:
            layers += [conv_bn_relu(c_in, c), conv_bn_relu(c, c), nn.MaxPool2d(2)]  # 48->24->12->6->3
            c_in = c
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(dropout),
            nn.Linear(c_in * 3 * 3, fc),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(fc, num_classes),
        )
        _init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def _init_weights(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)


@register_model
def compact(num_classes: int, width: int = 32, dropout: float = 0.3) -> nn.Module:
    return CompactNet(num_classes, width=width, dropout=dropout)


@register_model
def vgg(num_classes: int, width: int = 64, fc: int = 1024, dropout: float = 0.4) -> nn.Module:
    return VGGFer(num_classes, width=width, fc=fc, dropout=dropout)


@register_model
def resnet18(num_classes: int, dropout: float = 0.2) -> nn.Module:
    """ResNet-18 for 48x48: a 3x3 stride-1 stem and no max pool, so the four stages run at
    48/24/12/6 px instead of shrinking a small face to 2x2."""
    model = ResNet(BasicBlock, [2, 2, 2, 2], num_classes=num_classes)
    model.conv1 = nn.Conv2d(1, 64, 3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()  # type: ignore[assignment]
    model.fc = nn.Sequential(nn.Dropout(dropout), nn.Linear(512, num_classes))  # type: ignore[assignment]
    return model
