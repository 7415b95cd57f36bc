"""Models by name: ``create_model("resnet_small", num_classes=10)``.

A dict filled by a decorator, as timm does. Every entry takes ``num_classes`` and returns an
``nn.Module`` mapping a normalised NCHW float batch to logits. torchvision models are built with
random weights: nothing is downloaded at run time (use ``--init-weights`` to start from a file).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    _REGISTRY[fn.__name__] = fn
    return fn


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def describe_models() -> str:
    """One line per registered architecture: its name and the first line of its docstring."""
    width = max(len(name) for name in _REGISTRY)
    return "\n".join(f"{name:<{width}}  {(_REGISTRY[name].__doc__ or '').strip().splitlines()[0]}"
                     for name in list_models())


def create_model(name: str, num_classes: int, **kwargs: object) -> nn.Module:
    """Build a registered model with fresh weights. Raises KeyError listing the known names."""
    if name not in _REGISTRY:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(list_models())}")
    return _REGISTRY[name](num_classes=num_classes, **kwargs)


@register
def simple_cnn(num_classes: int) -> nn.Module:
    """The seed article's Keras CNN: conv32-pool-conv64-pool-dense128 (~70% on CIFAR-10)."""
    return nn.Sequential(
        nn.Conv2d(3, 32, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3), nn.ReLU(),
        nn.AdaptiveAvgPool2d(4), nn.Flatten(),
        nn.Linear(64 * 16, 128), nn.ReLU(), nn.Dropout(0.3),
        nn.Linear(128, num_classes),
    )


def _conv_bn(c_in: int, c_out: int, pool: bool = False) -> list[nn.Module]:
    layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return layers + [nn.BatchNorm2d(c_out), nn.GELU()]


class _Stage(nn.Module):
    """conv-pool-bn-act, then a residual conv-bn-act. The pooled conv is the block of Keller Jordan's
    airbench (2024), which trains CIFAR-10 to 94% in a few epochs: pooling right after the conv
    halves the resolution of everything that follows at no extra cost."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.down = nn.Sequential(*_conv_bn(c_in, c_out, pool=True))
        self.residual = nn.Sequential(*_conv_bn(c_out, c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.down(x)
        return x + self.residual(x)


class ResNetSmall(nn.Module):
    """Fast small residual network for low-resolution images (CIFAR-sized): airbench's layout with
    stages a quarter as wide, so that an epoch of CIFAR-10 takes seconds, not minutes, on two CPU cores."""

    def __init__(self, num_classes: int, widths: tuple[int, int, int] = (32, 64, 128), stem: int = 24) -> None:
        super().__init__()
        self.stem = nn.Sequential(*_conv_bn(3, stem))
        self.stages = nn.Sequential(_Stage(stem, widths[0]), _Stage(widths[0], widths[1]), _Stage(widths[1], widths[2]))
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.head = nn.Linear(widths[2], num_classes, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        return self.head(torch.flatten(self.pool(x), 1))


@register
def resnet_small(num_classes: int) -> nn.Module:
    """Default for small images (32-64 px): ~0.3M parameters."""
    return ResNetSmall(num_classes)


@register
def resnet18(num_classes: int) -> nn.Module:
    """torchvision ResNet-18, for images of 128 px and up."""
    return _torchvision("resnet18", num_classes)


@register
def resnet50(num_classes: int) -> nn.Module:
    """torchvision ResNet-50, for images of 160 px and up."""
    return _torchvision("resnet50", num_classes)


@register
def mobilenet_v3_small(num_classes: int) -> nn.Module:
    """torchvision MobileNetV3-Small: cheap inference on CPUs for larger images."""
    return _torchvision("mobilenet_v3_small", num_classes)


def _torchvision(name: str, num_classes: int) -> nn.Module:
    # Imported here, not at the top: torchvision pulls in torch._dynamo, ~2.5 s in every process that
    # loads any model (label driver, inference actors, training workers).
    import torchvision

    return getattr(torchvision.models, name)(weights=None, num_classes=num_classes)
