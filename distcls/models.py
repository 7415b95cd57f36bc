"""Models by name: ``create_model("resnet_small", num_classes=10)``.

A dict filled by a decorator, as timm does. Every entry takes ``num_classes`` and returns an
``nn.Module`` mapping a normalised NCHW float batch to logits. torchvision models are built with
random weights: nothing is downloaded at run time (use ``--init-weights`` to start from a file).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch
from torch import nn
from torch.nn import functional as F


@dataclass(frozen=True)
class Recipe:
    """An architecture's training defaults: what ``distcls train --arch NAME`` uses for each of
    these settings that is not given."""

    epochs: int = 16
    batch_size: int = 256
    lr: float = 0.2
    momentum: float = 0.9
    weight_decay: float = 5e-4
    tta: str = "none"
    lookahead: bool = False
    # Not a setting: the learning-rate multiplier's (start, peak at this share of the run, end) of
    # train.one_cycle. airbench ends above zero, where its lookahead averages the last steps.
    schedule: tuple[float, float, float] = (0.1, 0.2, 0.0)


_REGISTRY: dict[str, Callable[..., nn.Module]] = {}
_RECIPES: dict[str, Recipe] = {}


def register(fn: Callable[..., nn.Module] | None = None, *, recipe: Recipe = Recipe()) -> Any:
    """``@register`` or ``@register(recipe=Recipe(...))``: add a model under its function's name."""
    def add(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _REGISTRY[fn.__name__] = fn
        _RECIPES[fn.__name__] = recipe
        return fn

    return add(fn) if fn is not None else add


def recipe(name: str) -> dict[str, Any]:
    """The training defaults of a registered architecture, as settings."""
    settings = asdict(_RECIPES[name])
    del settings["schedule"]
    return settings


def schedule(name: str) -> tuple[float, float, float]:
    """The learning-rate schedule of a registered architecture (Recipe.schedule)."""
    return _RECIPES[name].schedule


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def describe_models() -> str:
    """Two lines per registered architecture: its name and the first line of its docstring, then
    its training defaults as the flags that change them."""
    width = max(len(name) for name in _REGISTRY)
    lines = []
    for name in list_models():
        defaults = ", ".join(_flag(key, value) for key, value in recipe(name).items())
        lines += [f"{name:<{width}}  {(_REGISTRY[name].__doc__ or '').strip().splitlines()[0]}",
                  f"{'':<{width}}  defaults: {defaults}"]
    return "\n".join(lines)


def _flag(key: str, value: Any) -> str:
    """A setting as the train flag that gives it: booleans are switches (--lookahead, --no-lookahead)."""
    name = key.replace("_", "-")
    if isinstance(value, bool):
        return f"--{name}" if value else f"--no-{name}"
    return f"--{name} {value}"


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
    """Small residual network for small images (32-64 px): ~0.3M parameters, the default before airbench."""
    return ResNetSmall(num_classes)


class Whitening(nn.Module):
    """A fixed 2x2 convolution that decorrelates the pixels of each 2x2 patch: its filters are the
    eigenvectors of the training images' patch covariance, scaled to unit variance, and their
    negatives (airbench's first layer). The network then starts from inputs whose directions all
    have the same scale, which is what lets a short run at a high learning rate converge. The
    filters are a buffer, not a parameter: they are set from data (``fit``) and never trained. Its
    bias trains for the first ``bias_epochs`` only (airbench's setting; training freezes it then, which
    also spares each step the gradient of the whitened images, ~9% of a step here)."""

    bias_epochs = 3

    def __init__(self, c_in: int = 3, size: int = 2) -> None:
        super().__init__()
        weight = torch.empty(2 * c_in * size * size, c_in, size, size)
        nn.init.kaiming_uniform_(weight, a=5 ** 0.5)  # nn.Conv2d's default, until fit() is called
        self.register_buffer("weight", weight)
        self.bias = nn.Parameter(torch.zeros(len(weight)))

    @torch.no_grad()
    def fit(self, images: torch.Tensor, eps: float = 5e-4) -> None:
        """Set the filters from a sample of normalised NCHW training images."""
        c, (h, w) = images.shape[1], self.weight.shape[2:]
        covariance, count = torch.zeros(c * h * w, c * h * w, dtype=torch.float64), 0
        # A million pixels' patches at a time: all at once they take 2 x 4 x the sample's float32
        # pixels (float64, one patch per pixel), 14 GiB for 2,048 images at 224 px.
        for chunk in images.split(max(1, 2**20 // (images.shape[2] * images.shape[3]))):
            patches = chunk.double().unfold(2, h, 1).unfold(3, w, 1).transpose(1, 3).reshape(-1, c * h * w)
            covariance += patches.T @ patches
            count += len(patches)
        eigenvalues, eigenvectors = torch.linalg.eigh(covariance / count)
        filters = (eigenvectors.T / torch.sqrt(eigenvalues.clamp(min=0) + eps)[:, None]).reshape(-1, c, h, w)
        self.weight.copy_(torch.cat([filters, -filters]).flip(0).to(self.weight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight, self.bias)


class _BatchNorm(nn.BatchNorm2d):
    """BatchNorm with a learnt shift and no learnt scale: the convolution before it can scale. As in
    airbench, which found the scale only slows a short run down. Its shift learns 64x faster than
    the weights (training reads ``bias_lr_scale``), airbench's setting."""

    bias_lr_scale = 64.0

    def __init__(self, channels: int) -> None:
        super().__init__(channels, affine=False, momentum=0.4, eps=1e-12)
        self.bias = nn.Parameter(torch.zeros(channels))


def _air_conv(c_in: int, c_out: int) -> nn.Conv2d:
    conv = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
    with torch.no_grad():
        # The first c_in filters start as the identity, so that a fresh block passes its input on.
        nn.init.dirac_(conv.weight[:c_in])
    return conv


class AirBench(nn.Module):
    """Keller Jordan's airbench94 network (2024): a whitening layer, then three conv-pool-BN-GELU,
    conv-BN-GELU groups and a max-pooled linear head whose logits are scaled by 1/9."""

    def __init__(self, num_classes: int, widths: tuple[int, int, int] = (64, 128, 256)) -> None:
        super().__init__()
        self.whiten = Whitening()
        layers: list[nn.Module] = [nn.GELU()]
        c_in = len(self.whiten.weight)
        for width in widths:
            layers += [_air_conv(c_in, width), nn.MaxPool2d(2), _BatchNorm(width), nn.GELU(),
                       _air_conv(width, width), _BatchNorm(width), nn.GELU()]
            c_in = width
        self.body = nn.Sequential(*layers)
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.head = nn.Linear(c_in, num_classes, bias=False)

    def fit_to_data(self, images: torch.Tensor) -> None:
        """Called by training with a sample of normalised training images before the first step."""
        self.whiten.fit(images)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.body(self.whiten(x))
        return self.head(torch.flatten(self.pool(x), 1)) / 9


# airbench94's hyperparameters, for a loss averaged over the batch: its lr 11.5 per 1024 images of a
# summed loss is 1.5; its decoupled decay 0.002 per step is 1.3e-3 x lr.
_AIRBENCH = {"batch_size": 1024, "lr": 1.5, "momentum": 0.85, "weight_decay": 1.3e-3, "tta": "flip", "lookahead": True,
             "schedule": (0.2, 0.23, 0.07)}


# 20 epochs of CIFAR-10 fit 15 minutes of two CPU cores, where 91% held out needs them (BENCHMARKS.md).
@register(recipe=Recipe(epochs=20, **_AIRBENCH))
def airbench94(num_classes: int) -> nn.Module:
    """Default for small images (32-64 px): airbench94's network, widths 64-256-256, ~1.97M parameters."""
    return AirBench(num_classes, widths=(64, 256, 256))


@register(recipe=Recipe(epochs=12, **_AIRBENCH))
def airbench(num_classes: int) -> nn.Module:
    """airbench94's layout at widths 64-128-256, ~1.2M parameters: 2/3 of airbench94's inference per image."""
    return AirBench(num_classes)


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


# The names --tta and model.json accept (tta_logits: which views of an image it averages the logits of).
TTAS = ("none", "flip", "flip_translate")


def tta_logits(model: nn.Module, x: torch.Tensor, tta: str) -> torch.Tensor:
    """Logits of a normalised NCHW batch under test-time augmentation ``tta``: ``none``; ``flip``,
    the mean of the logits of the images and of their mirror images (twice the inference cost);
    ``flip_translate``, airbench's level 2: half that, half the flip mean of the images shifted by
    1/32 of their side (at least a pixel) up-left and down-right (reflect-padded), six times the
    cost. airbench94 reports +0.8% for it over none on CIFAR-10. Training's evaluation and
    inference both call this."""
    if tta == "none":
        return model(x)
    flipped = (model(x) + model(x.flip(3))) / 2
    if tta == "flip":
        return flipped
    if tta != "flip_translate":
        raise ValueError(f"unknown tta {tta!r}; known: {', '.join(TTAS)}")
    # int(): a constant in the traced ONNX graph, whose layers need the sides.
    shift = max(1, int(min(x.shape[2:])) // 32)
    views = [_reflect_shift(_reflect_shift(x, step, 2), step, 3) for step in (shift, -shift)]
    translated = sum(tta_logits(model, view, "flip") for view in views) / 2
    return (flipped + translated) / 2


def _reflect_shift(x: torch.Tensor, shift: int, dim: int) -> torch.Tensor:
    """``x`` moved ``shift`` pixels along ``dim`` (towards higher indices when positive), the edge it
    uncovers reflected: F.pad(mode="reflect") cropped back to the same side, made of slices because
    ONNX's Pad loses the spatial sides under the graph's dynamic batch axis, and the export of an
    adaptive pooling to a size (simple_cnn's) then fails."""
    def part(start: int | None, stop: int | None) -> torch.Tensor:
        return x[(slice(None),) * dim + (slice(start, stop),)]

    if shift > 0:
        return torch.cat([part(1, shift + 1).flip(dim), part(None, -shift)], dim)
    return torch.cat([part(-shift, None), part(shift - 1, -1).flip(dim)], dim)


class WithTTA(nn.Module):
    """``model`` whose forward applies ``tta_logits``: what inference loads for an artifact trained
    with --tta, so that every engine (and the exported ONNX graph) predicts the same way. Its state
    dict is the model's, keys unprefixed: weights saved from what ``load_model`` returns fit the
    architecture (``--init-weights``) whatever the artifact's tta, as they did before tta existed."""

    def __init__(self, model: nn.Module, tta: str) -> None:
        super().__init__()
        self.model = model
        self.tta = tta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return tta_logits(self.model, x, self.tta)

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return self.model.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        return self.model.load_state_dict(state_dict, strict=strict, assign=assign)


def _torchvision(name: str, num_classes: int) -> nn.Module:
    # Imported here, not at the top: torchvision pulls in torch._dynamo, ~2.5 s in every process that
    # loads any model (label driver, inference actors, training workers).
    import torchvision

    return getattr(torchvision.models, name)(weights=None, num_classes=num_classes)
