"""The model artifact: a faithful round trip, and weights that can never run code when loaded."""
from __future__ import annotations

import builtins
import hashlib
import io
import json
import pickle
from pathlib import Path

import pytest
import safetensors.torch
import torch

from distcls import artifact, storage
from distcls.artifact import ModelInfo, load_model, load_state_dict, predict_proba, save_model
from distcls.config import StorageConfig
from distcls.errors import UsageError
from distcls.models import create_model

CLASSES = ["cat", "dog", "frog"]


def _info(**extra) -> ModelInfo:
    return ModelInfo(arch="simple_cnn", classes=CLASSES, image_size=32, mean=(0.5, 0.4, 0.3),
                     std=(0.25, 0.25, 0.25), config={"epochs": 2}, **extra)


def _trained_looking_model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = create_model("simple_cnn", num_classes=len(CLASSES))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def _images() -> torch.Tensor:
    return torch.randint(0, 256, (4, 32, 32, 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)


def _assert_round_trip(uri: str, storage_config: StorageConfig) -> None:
    model = _trained_looking_model()
    saved = save_model(model, _info(), uri, storage_config)
    loaded, info = load_model(uri, storage_config)

    assert not loaded.training
    assert info == saved and info.arch == "simple_cnn" and info.classes == CLASSES
    assert (info.image_size, info.mean, info.std, info.config) == (32, (0.5, 0.4, 0.3), (0.25, 0.25, 0.25), {"epochs": 2})
    weights = storage.read_bytes(storage.join(uri, artifact.WEIGHTS_FILE), storage_config)
    assert info.model_id == hashlib.sha256(weights).hexdigest() and info.created_at
    expected = predict_proba(model, info, _images())
    assert torch.equal(predict_proba(loaded, info, _images()), expected)
    assert torch.allclose(expected.sum(1), torch.ones(4))


def test_round_trip_local(tmp_path: Path) -> None:
    uri = str(tmp_path / "model")
    _assert_round_trip(uri, StorageConfig())
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == ["model.json", "model.safetensors"]
    meta = json.loads((tmp_path / "model" / "model.json").read_text())
    assert meta["model_id"] == hashlib.sha256((tmp_path / "model" / "model.safetensors").read_bytes()).hexdigest()


def test_round_trip_s3(s3_bucket: str) -> None:
    _assert_round_trip(f"s3://{s3_bucket}/runs/a/model", StorageConfig())


def test_saving_a_ddp_style_wrapper_saves_the_inner_module(tmp_path: Path) -> None:
    class Wrapper(torch.nn.Module):
        def __init__(self, module: torch.nn.Module) -> None:
            super().__init__()
            self.module = module

    inner = _trained_looking_model()
    save_model(Wrapper(inner), _info(), str(tmp_path), StorageConfig())
    loaded, info = load_model(str(tmp_path))
    assert torch.equal(predict_proba(loaded, info, _images()), predict_proba(inner, info, _images()))


def test_folder_without_model_json(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=f"^{tmp_path}: not a distcls model artifact"):
        load_model(str(tmp_path))


def test_invalid_model_json_names_the_problem(tmp_path: Path) -> None:
    save_model(_trained_looking_model(), _info(), str(tmp_path), StorageConfig())
    meta = json.loads((tmp_path / "model.json").read_text())
    meta["classes"] = ["only-one"]
    (tmp_path / "model.json").write_text(json.dumps(meta))
    with pytest.raises(UsageError, match=f"^{tmp_path}: invalid model.json: .*classes"):
        load_model(str(tmp_path))


def test_tampered_weights_do_not_match_model_id(tmp_path: Path) -> None:
    save_model(_trained_looking_model(), _info(), str(tmp_path), StorageConfig())
    state = safetensors.torch.load_file(tmp_path / "model.safetensors")
    state = {k: v + 1 if v.is_floating_point() else v for k, v in state.items()}
    safetensors.torch.save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(UsageError, match="do not match model_id"):
        load_model(str(tmp_path))


def test_weights_of_another_arch_are_refused(tmp_path: Path) -> None:
    weights = safetensors.torch.save(create_model("resnet_small", num_classes=3).state_dict())
    _plant(tmp_path, weights)
    with pytest.raises(UsageError, match="do not fit arch 'simple_cnn'"):
        load_model(str(tmp_path))


class _CreatesFile:
    """Unpickling this calls open(path, "w"): the shape of any code-execution payload."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return builtins.open, (self.path, "w")


def _payload(marker: Path, make: str = "pickle") -> bytes:
    evil = {"conv.weight": _CreatesFile(marker)}
    if make == "pickle":
        return pickle.dumps(evil)
    buffer = io.BytesIO()
    torch.save(evil, buffer)
    return buffer.getvalue()


@pytest.mark.parametrize("make", ["pickle", "torch.save"])
def test_the_payload_does_run_code_when_unpickled(tmp_path: Path, make: str) -> None:
    marker = tmp_path / "control-marker"
    data = _payload(marker, make)
    if make == "pickle":
        pickle.loads(data)["conv.weight"].close()
    else:
        torch.load(io.BytesIO(data), weights_only=False)["conv.weight"].close()
    assert marker.exists()  # so the tests below would see it if it ran


def _plant(folder: Path, weights: bytes) -> None:
    """An artifact whose model.json vouches for ``weights``: the hash check alone cannot stop it."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.safetensors").write_bytes(weights)
    info = _info(model_id=hashlib.sha256(weights).hexdigest())
    (folder / "model.json").write_text(info.model_dump_json())


@pytest.mark.parametrize("make", ["pickle", "torch.save"])
def test_malicious_pickle_as_weights_is_never_unpickled(tmp_path: Path, make: str) -> None:
    marker = tmp_path / "pwned"
    _plant(tmp_path / "model", _payload(marker, make))
    with pytest.raises(UsageError, match="is not a safetensors file"):
        load_model(str(tmp_path / "model"))
    assert not marker.exists()


@pytest.mark.parametrize("make", ["pickle", "torch.save"])
def test_load_state_dict_refuses_a_malicious_torch_file(tmp_path: Path, make: str) -> None:
    marker = tmp_path / "pwned"
    target = tmp_path / "init.pt"
    target.write_bytes(_payload(marker, make))
    with pytest.raises(UsageError, match=f"^{target}: refused to load weights"):
        load_state_dict(str(target), StorageConfig())
    assert not marker.exists()


def test_load_state_dict_reads_safetensors_and_torch_files(tmp_path: Path) -> None:
    state = _trained_looking_model().state_dict()
    safetensors.torch.save_file(state, tmp_path / "w.safetensors")
    torch.save(state, tmp_path / "w.pt")
    for name in ("w.safetensors", "w.pt"):
        loaded = load_state_dict(str(tmp_path / name), StorageConfig())
        assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)

    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(UsageError, match="expected a state dict, got list"):
        load_state_dict(str(tmp_path / "list.pt"), StorageConfig())
    (tmp_path / "bad.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(UsageError, match="not a safetensors file"):
        load_state_dict(str(tmp_path / "bad.safetensors"), StorageConfig())
