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
