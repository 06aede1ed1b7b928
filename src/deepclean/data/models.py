"""Classifier architectures used in the paper, with CIFAR-style stems for small images.

All models take images of shape ``(B, in_channels, H, W)`` and return logits of shape
``(B, num_classes)``. ``width`` multiplies every channel count (1.0 is the paper's size), so that
the default experiment fits a 2-core CPU while ``width=1.0`` reproduces the paper (Shi et al.,
arXiv 2311.10448, section 4: ResNet-18 and VGG-16).

No layer uses in-place operations, so per-sample gradient hooks and residual additions are safe.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from deepclean.errors import ConfigurationError

__all__ = ["MAX_WIDTH", "check_width", "resnet18", "vgg16_bn", "small_cnn", "build_model", "available_models"]

#: The widest channel multiplier accepted: weights grow with its square, so 16 already gives 256
#: times the paper's models; larger values are refused before any layer is built.
MAX_WIDTH = 16.0


def check_width(width: float) -> None:
    """Raise :class:`ConfigurationError` unless ``width`` is a number in (0, :data:`MAX_WIDTH`]."""
    if (isinstance(width, bool) or not isinstance(width, (int, float))
            or not math.isfinite(width) or not 0 < width <= MAX_WIDTH):
        raise ConfigurationError(f"width must be a number in (0, {MAX_WIDTH:g}], got {width}; 1.0 "
                                 "is the full-size model, smaller values narrow every layer")


def _channels(base: int, width: float) -> int:
    return max(1, int(round(base * width)))


class BasicBlock(nn.Module):
    """The two-convolution residual block of ResNet-18 (He et al., CVPR 2016)."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """CIFAR-style ResNet-18: a 3x3 stride-1 stem without max-pooling, four stages of two blocks."""

    def __init__(self, *, in_channels: int = 3, num_classes: int = 10, width: float = 1.0) -> None:
        super().__init__()
        planes = [_channels(c, width) for c in (64, 128, 256, 512)]
        self.conv1 = nn.Conv2d(in_channels, planes[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes[0])
        layers = []
        in_planes = planes[0]
        for stage, p in enumerate(planes):
            stride = 1 if stage == 0 else 2
            layers.append(nn.Sequential(BasicBlock(in_planes, p, stride), BasicBlock(p, p, 1)))
            in_planes = p
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(planes[3], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.fc(torch.flatten(self.pool(out), 1))


_VGG16 = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


class VGG16BN(nn.Module):
    """VGG-16 with BatchNorm (Simonyan & Zisserman, ICLR 2015), CIFAR-style: one linear classifier
    after global average pooling, so any input of at least 32x32 or 28x28 works."""

    def __init__(self, *, in_channels: int = 3, num_classes: int = 10, width: float = 1.0) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = in_channels
        for item in _VGG16:
            if item == "M":
                layers.append(nn.MaxPool2d(2, ceil_mode=True))
            else:
                c_out = _channels(int(item), width)
                layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU()]
                c_in = c_out
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


class SmallCNN(nn.Module):
    """Two convolution blocks with BatchNorm and a two-layer classifier; for quick runs and tests."""

    def __init__(self, *, in_channels: int = 1, num_classes: int = 10, width: float = 1.0) -> None:
        super().__init__()
        c1, c2, hidden = _channels(32, width), _channels(64, width), _channels(128, width)
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, 3, padding=1),
            nn.BatchNorm2d(c1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1),
            nn.BatchNorm2d(c2),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(4),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(c2 * 16, hidden), nn.ReLU(), nn.Linear(hidden, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def resnet18(*, in_channels: int = 3, num_classes: int = 10, width: float = 1.0) -> nn.Module:
    """CIFAR-style ResNet-18. ``width`` multiplies the channel counts 64/128/256/512."""
    return ResNet18(in_channels=in_channels, num_classes=num_classes, width=width)


def vgg16_bn(*, in_channels: int = 3, num_classes: int = 10, width: float = 1.0) -> nn.Module:
    """CIFAR-style VGG-16 with BatchNorm. ``width`` multiplies the channel counts."""
    return VGG16BN(in_channels=in_channels, num_classes=num_classes, width=width)


def small_cnn(*, in_channels: int = 1, num_classes: int = 10, width: float = 1.0) -> nn.Module:
    """A small CNN with BatchNorm (about 0.1 M parameters at ``width=1``)."""
    return SmallCNN(in_channels=in_channels, num_classes=num_classes, width=width)


_MODELS: dict[str, Callable[..., nn.Module]] = {
    "resnet18": resnet18,
    "vgg16_bn": vgg16_bn,
    "small_cnn": small_cnn,
}


def available_models() -> list[str]:
    """Names accepted by :func:`build_model` and ``deepclean run --model``."""
    return sorted(_MODELS)


def build_model(
    name: str, *, in_channels: int, num_classes: int, width: float = 1.0, seed: int | None = None
) -> nn.Module:
    """Build a model by name; with ``seed`` its initial weights come from that seed only.

    Raises:
        ConfigurationError: unknown name or a non-positive width.
    """
    if name not in _MODELS:
        raise ConfigurationError(
            f"unknown model {name!r}; expected one of {available_models()}"
        )
    check_width(width)
    if seed is None:
        return _MODELS[name](in_channels=in_channels, num_classes=num_classes, width=width)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _MODELS[name](in_channels=in_channels, num_classes=num_classes, width=width)
