"""Fine-tuning from a torchvision-style checkpoint: tensors that fit load, a head for another number of
classes is re-initialised, the pretrained layers can stay frozen for the first epochs."""
from __future__ import annotations

from pathlib import Path

import pytest
import safetensors.torch
import torch
import torchvision

from distcls.artifact import load_state_dict, match_state_dict
from distcls.cli import main
from distcls.errors import UsageError
from distcls.storage import Store
from distcls.models import create_model


@pytest.fixture(scope="module")
def imagenet_resnet18(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What `torch.save(torchvision.models.resnet18(weights="DEFAULT").state_dict(), ...)` writes,
    with seeded random weights instead of downloaded ones: 1000-class head."""
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("checkpoint") / "resnet18-imagenet.pth"
    torch.save(torchvision.models.resnet18(weights=None, num_classes=1000).state_dict(), path)
    return path


def test_a_head_for_other_classes_is_skipped_and_the_rest_loads(imagenet_resnet18: Path) -> None:
    state = load_state_dict(Store(str(imagenet_resnet18), _storage()))
    match = match_state_dict(create_model("resnet18", num_classes=10), state, "x.pth", partial=True)
    assert match.skipped == {"fc.weight": ((1000, 512), (10, 512)), "fc.bias": ((1000,), (10,))}
    assert sorted(match.loaded) == sorted(k for k in state if not k.startswith("fc."))
    assert match.new == [] and match.unused == []
    line = match.describe("x.pth")
    assert "loaded 120 tensors (bn1, conv1, layer1, layer2, layer3, layer4)" in line
    assert "fc.weight [1000, 512] -> [10, 512]" in line


def test_a_ddp_checkpoint_wrapped_in_state_dict_loads(tmp_path: Path) -> None:
    model = create_model("resnet_small", num_classes=3)
    path = tmp_path / "ckpt.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}, "epoch": 3}, path)
    match = match_state_dict(create_model("resnet_small", num_classes=3), load_state_dict(Store(str(path), _storage())),
                             str(path), partial=False)
    assert sorted(match.loaded) == sorted(model.state_dict())


def test_strict_by_default(imagenet_resnet18: Path) -> None:
    state = load_state_dict(Store(str(imagenet_resnet18), _storage()))
    with pytest.raises(UsageError, match="--init-weights-partial"):
        match_state_dict(create_model("resnet18", num_classes=10), state, "x.pth", partial=False)
    same_head = match_state_dict(create_model("resnet18", num_classes=1000), state, "x.pth", partial=False)
    assert len(same_head.loaded) == len(state)


@pytest.mark.parametrize("extra, message", [
    (["--init-weights-partial"], "no tensor fits the model"),  # a resnet18 checkpoint for simple_cnn
    ([], "no tensor fits the model"),
])
def test_nothing_matching_is_a_usage_error(imagenet_resnet18, synthetic_lake, tmp_path, capsys, extra, message) -> None:
    output = tmp_path / "run"
    code = main(["train", "--input", str(synthetic_lake(6)), "--output", str(output), "--arch", "simple_cnn",
                 "--init-weights", str(imagenet_resnet18), *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert f"{imagenet_resnet18}: {message}" in err
    assert not output.exists()


def test_a_head_swap_without_the_partial_flag_is_a_usage_error(imagenet_resnet18, synthetic_lake, tmp_path,
                                                                capsys) -> None:
    code = main(["train", "--input", str(synthetic_lake(6)), "--output", str(tmp_path / "run"), "--arch", "resnet18",
                 "--init-weights", str(imagenet_resnet18)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "--init-weights-partial" in err and "fc.weight" in err


def test_freezing_needs_init_weights(synthetic_lake, tmp_path, capsys) -> None:
    code = main(["train", "--input", str(synthetic_lake(6)), "--output", str(tmp_path / "run"), "--freeze-epochs", "1"])
    assert code == 2 and "--freeze-epochs needs --init-weights" in capsys.readouterr().err


@pytest.mark.slow
def test_fine_tune_resnet18_with_a_frozen_first_epoch(imagenet_resnet18, synthetic_lake, ray_local, tmp_path,
                                                      capsys) -> None:
    """2 workers (DDP), epoch 1 trains the new head only, epoch 2 everything."""
    output = tmp_path / "run"
    code = main(["train", "--input", str(synthetic_lake(6)), "--output", str(output), "--arch", "resnet18",
                 "--image-size", "32", "--epochs", "2", "--freeze-epochs", "1", "--batch-size", "16",
                 "--lr", "0.01", "--workers", "2", "--init-weights", str(imagenet_resnet18), "--init-weights-partial"])
    out = capsys.readouterr().err
    assert code == 0
    assert f"init weights {imagenet_resnet18}: loaded 120 tensors" in out
    assert "skipped (shape differs): fc.weight [1000, 512] -> [10, 512], fc.bias [1000] -> [10]" in out
    initial = torch.load(imagenet_resnet18, weights_only=True)
    by_epoch = {}
    for folder in (f for f in output.rglob("checkpoint_*") if f.is_dir()):
        state = torch.load(folder / "state.pt", weights_only=True)
        by_epoch[state["epoch"]] = safetensors.torch.load_file(str(folder / "model.safetensors"))
    assert sorted(by_epoch) == [1, 2]
    frozen, unfrozen = by_epoch[1], by_epoch[2]
    assert frozen["fc.weight"].shape == (10, 512)
    for key in ("conv1.weight", "layer4.1.conv2.weight", "layer2.0.bn1.weight"):
        assert torch.equal(frozen[key], initial[key]), key  # frozen in epoch 1
        assert not torch.equal(unfrozen[key], initial[key]), key  # trained in epoch 2
    assert not torch.equal(unfrozen["fc.weight"], frozen["fc.weight"])
    artifact = safetensors.torch.load_file(str(output / "model" / "model.safetensors"))
    assert artifact["fc.weight"].shape == (10, 512)


def _storage():
    from distcls.config import StorageConfig

    return StorageConfig()
