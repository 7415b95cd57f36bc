"""Every registered model: right output shape, and a backward pass that reaches every parameter."""
from __future__ import annotations

import pytest
import torch

from distcls.models import create_model, list_models


@pytest.mark.parametrize("name", list_models())
def test_forward_and_backward(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name, num_classes=7).train()
    x = torch.randn(2, 3, 32, 32)

    logits = model(x)
    assert logits.shape == (2, 7) and logits.dtype == torch.float32 and torch.isfinite(logits).all()

    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 6])).backward()
    params = dict(model.named_parameters())
    assert params, "a model with no parameters cannot learn"
    without_grad = [n for n, p in params.items() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not without_grad
    assert sum(bool(p.grad.abs().sum() > 0) for p in params.values()) >= 0.9 * len(params)


@pytest.mark.parametrize("name", list_models())
def test_fresh_models_are_random_not_downloaded(name: str) -> None:
    torch.manual_seed(0)
    first = create_model(name, num_classes=3).state_dict()
    torch.manual_seed(1)
    second = create_model(name, num_classes=3).state_dict()
    weights = [k for k, v in first.items() if v.is_floating_point() and v.dim() > 1]
    assert any(not torch.equal(first[k], second[k]) for k in weights)


def test_registry_lists_the_defaults() -> None:
    assert list_models() == sorted(list_models())
    assert {"resnet_small", "simple_cnn"} <= set(list_models())


def test_unknown_model_lists_the_known_names() -> None:
    with pytest.raises(KeyError) as info:
        create_model("resnet9000", num_classes=10)
    message = str(info.value)
    assert "resnet9000" in message and all(name in message for name in list_models())


def test_airbench_whitening_makes_every_patch_direction_unit_variance() -> None:
    """fit() sets the 2x2 filters from data: the first half of the outputs (the eigen-directions;
    the second half are their negatives) are uncorrelated, each of variance ~1, on those images."""
    generator = torch.Generator().manual_seed(0)
    # Correlated pixels: smooth images, as photos are.
    images = torch.nn.functional.avg_pool2d(torch.randn(64, 3, 34, 34, generator=generator), 3, stride=1) * 3
    model = create_model("airbench", num_classes=10)
    model.fit_to_data(images)
    out = torch.nn.functional.conv2d(images, model.whiten.weight)[:, :12].permute(1, 0, 2, 3).reshape(12, -1)
    covariance = torch.cov(out)
    # Within a few percent: fit() adds eps=5e-4 to each variance, which damps the faintest direction a little.
    assert torch.allclose(covariance, torch.eye(12), atol=0.03), covariance.diagonal()
    assert torch.equal(model.whiten.weight[:12], -model.whiten.weight[12:])
    assert "whiten.weight" in model.state_dict() and "whiten.weight" not in dict(model.named_parameters())


def test_every_architecture_has_a_recipe_and_describes_it() -> None:
    from distcls.models import describe_models, recipe

    text = describe_models()
    for name in list_models():
        settings = recipe(name)
        assert set(settings) == {"epochs", "batch_size", "lr", "momentum", "weight_decay", "tta", "lookahead"}
        assert f"--batch-size {settings['batch_size']}, --lr {settings['lr']}" in text.split(name, 1)[1]
    assert recipe("airbench")["tta"] == "flip" and recipe("resnet18")["tta"] == "none"


def test_the_defaults_distcls_models_shows_are_flags_train_accepts(capsys) -> None:
    """They read '--lookahead True', which train refuses (the flag is a switch: unrecognized argument 'True')."""
    from distcls.cli import build_parser, main

    assert main(["models"]) == 0
    lines = [line.split("defaults: ", 1)[1] for line in capsys.readouterr().out.splitlines() if "defaults: " in line]
    assert len(lines) == len(list_models())
    for defaults in lines:
        args = build_parser().parse_args(["train", "--input", "x", "--output", "y", *defaults.replace(",", "").split()])
        assert args.lookahead == ("--lookahead" in defaults.split(", ")) and args.epochs is not None


def test_tta_flip_averages_the_logits_of_the_image_and_its_mirror() -> None:
    from distcls.models import WithTTA, tta_logits

    torch.manual_seed(0)
    model = create_model("simple_cnn", num_classes=3).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        expected = (model(x) + model(x.flip(3))) / 2
        assert torch.allclose(tta_logits(model, x, "flip"), expected)
        assert torch.allclose(WithTTA(model, "flip")(x), expected)
        assert torch.equal(tta_logits(model, x, "none"), model(x))
        assert not torch.allclose(expected, model(x))  # the mirror image does change something


def test_airbench_whitening_of_large_images_fits_in_little_memory() -> None:
    """fit() held every patch of its sample at once, in float64: 2,048 images at 224 px took 14 GiB
    per training worker. It sums the patch covariance a million pixels at a time; the filters are
    those of the whole sample's covariance."""
    import subprocess
    import sys

    script = """
import resource, torch
from distcls.models import Whitening
torch.set_num_threads(1)
images = torch.nn.functional.avg_pool2d(torch.randn(96, 3, 226, 226, generator=torch.Generator().manual_seed(0)), 3, stride=1)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
whitening = Whitening()
whitening.fit(images)
grew = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
patches = images[:8].double().unfold(2, 2, 1).unfold(3, 2, 1).transpose(1, 3).reshape(-1, 12)
out = torch.nn.functional.conv2d(images[:8].double(), whitening.weight.double())[:, :12].permute(1, 0, 2, 3).reshape(12, -1)
print(grew, float((torch.cov(out) - torch.eye(12, dtype=torch.float64)).abs().max()))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    grew_mib, off_identity = map(float, done.stdout.split())
    # Its sample is 55 MiB of float32; all its patches at once took ~650 MiB more.
    assert grew_mib < 250, grew_mib
    assert off_identity < 0.1  # still whitening: unit, uncorrelated directions on these images


def test_the_sample_a_model_is_fitted_to_is_bounded_by_pixels() -> None:
    """Every image of the stats sample up to 64 px; fewer, larger ones above (a sample of 2,048
    images at 1024 px was 25 GiB of float32 in every worker)."""
    import numpy as np

    from distcls.train import FIT_PIXELS, STATS_IMAGES, _fitting_sample

    def Sample(images: int, side: int):  # batches of 64, as the stats sample's pass yields them
        return (np.zeros((min(64, images - start), side, side, 3), np.uint8) for start in range(0, images, 64))

    stats = ((0.5,) * 3, (0.25,) * 3)
    assert _fitting_sample(Sample(STATS_IMAGES, 64), *stats).shape == (STATS_IMAGES, 3, 64, 64)
    large = _fitting_sample(Sample(STATS_IMAGES, 256), *stats)
    assert FIT_PIXELS <= len(large) * 256 * 256 < FIT_PIXELS + 64 * 256 * 256
    assert _fitting_sample(Sample(0, 32), *stats) is None


def test_tta_flip_translate_adds_the_image_shifted_up_left_and_down_right() -> None:
    """airbench's level 2: half the flip mean, half the flip mean of two reflect-padded shifts of
    1/32 of the side (a pixel at 32 px, two at 64 px)."""
    from distcls.config import TrainConfig
    from distcls.models import TTAS, tta_logits

    torch.manual_seed(0)
    model = create_model("simple_cnn", num_classes=3).eval()
    for size, shift in ((32, 1), (64, 2), (48, 1)):
        x = torch.randn(2, 3, size, size)
        padded = torch.nn.functional.pad(x, (shift,) * 4, mode="reflect")
        up_left, down_right = padded[:, :, :size, :size], padded[:, :, 2 * shift:, 2 * shift:]
        assert torch.equal(up_left[:, :, shift:, shift:], x[:, :, :-shift, :-shift])
        assert torch.equal(down_right[:, :, :-shift, :-shift], x[:, :, shift:, shift:])
        with torch.no_grad():
            flip = tta_logits(model, x, "flip")
            shifted = (tta_logits(model, up_left, "flip") + tta_logits(model, down_right, "flip")) / 2
            assert torch.allclose(tta_logits(model, x, "flip_translate"), (flip + shifted) / 2, atol=1e-6)
    assert TrainConfig.model_fields["tta"].annotation.__args__ == TTAS
    with pytest.raises(ValueError, match="unknown tta 'rotate'"):
        tta_logits(model, x, "rotate")
