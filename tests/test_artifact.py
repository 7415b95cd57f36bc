"""The model artifact: a faithful round trip, a model_id that covers weights and every field that
changes a prediction, bounds on model.json, and weights that can never run code when loaded."""
from __future__ import annotations

import builtins
import hashlib
import io
import json
import pickle
import re
from pathlib import Path

import pytest
import safetensors.torch
import torch

from distcls import artifact
from distcls.artifact import ModelInfo, load_model, load_state_dict, model_id_of, predict_proba, resave, save_model
from distcls.cli import main
from distcls.storage import Store
from distcls.errors import UsageError
from distcls.models import create_model

CLASSES = ["cat", "dog", "frog"]


def _info(**fields) -> ModelInfo:
    return ModelInfo(**{"arch": "simple_cnn", "classes": CLASSES, "image_size": 32, "mean": (0.5, 0.4, 0.3),
                        "std": (0.25, 0.25, 0.25), "config": {"epochs": 2}, **fields})


def _trained_looking_model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = create_model("simple_cnn", num_classes=len(CLASSES))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def _images() -> torch.Tensor:
    return torch.randint(0, 256, (4, 32, 32, 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)


def _assert_round_trip(store: Store) -> None:
    model = _trained_looking_model()
    saved = save_model(model, _info(), store)
    loaded, info = load_model(store)

    assert not loaded.training
    assert info == saved and info.arch == "simple_cnn" and info.classes == CLASSES
    assert (info.image_size, info.mean, info.std, info.config) == (32, (0.5, 0.4, 0.3), (0.25, 0.25, 0.25), {"epochs": 2})
    weights = store.read(artifact.WEIGHTS_FILE)
    assert info.weights_sha256 == hashlib.sha256(weights).hexdigest() and info.created_at
    assert info.model_id == model_id_of(info) != info.weights_sha256 and info.format_version == 2
    expected = predict_proba(model, info, _images())
    assert torch.equal(predict_proba(loaded, info, _images()), expected)
    assert torch.allclose(expected.sum(1), torch.ones(4))


def test_round_trip_local(tmp_path: Path) -> None:
    uri = str(tmp_path / "model")
    _assert_round_trip(Store(uri))
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == ["model.json", "model.safetensors"]
    meta = json.loads((tmp_path / "model" / "model.json").read_text())
    assert meta["weights_sha256"] == hashlib.sha256((tmp_path / "model" / "model.safetensors").read_bytes()).hexdigest()
    assert meta["model_id"] == model_id_of(ModelInfo.model_validate(meta))


def test_round_trip_s3(s3_bucket: str) -> None:
    _assert_round_trip(Store(f"s3://{s3_bucket}/runs/a/model"))


def test_saving_a_ddp_style_wrapper_saves_the_inner_module(tmp_path: Path) -> None:
    class Wrapper(torch.nn.Module):
        def __init__(self, module: torch.nn.Module) -> None:
            super().__init__()
            self.module = module

    inner = _trained_looking_model()
    save_model(Wrapper(inner), _info(), Store(str(tmp_path)))
    loaded, info = load_model(Store(str(tmp_path)))
    assert torch.equal(predict_proba(loaded, info, _images()), predict_proba(inner, info, _images()))


def test_folder_without_model_json(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=f"^{tmp_path}: not a distcls model artifact"):
        load_model(Store(str(tmp_path)))


def test_invalid_model_json_names_the_problem(tmp_path: Path) -> None:
    save_model(_trained_looking_model(), _info(), Store(str(tmp_path)))
    meta = json.loads((tmp_path / "model.json").read_text())
    meta["classes"] = ["only-one"]
    (tmp_path / "model.json").write_text(json.dumps(meta))
    with pytest.raises(UsageError, match=f"^{tmp_path}: invalid model.json: .*classes"):
        load_model(Store(str(tmp_path)))


def test_tampered_weights_do_not_match_model_id(tmp_path: Path) -> None:
    save_model(_trained_looking_model(), _info(), Store(str(tmp_path)))
    state = safetensors.torch.load_file(tmp_path / "model.safetensors")
    state = {k: v + 1 if v.is_floating_point() else v for k, v in state.items()}
    safetensors.torch.save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(UsageError, match="weights do not match weights_sha256"):
        load_model(Store(str(tmp_path)))


def test_weights_of_another_arch_are_refused(tmp_path: Path) -> None:
    weights = safetensors.torch.save(create_model("resnet_small", num_classes=3).state_dict())
    _plant(tmp_path, weights)
    with pytest.raises(UsageError, match="do not fit arch 'simple_cnn'"):
        load_model(Store(str(tmp_path)))


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


def _plant(folder: Path, weights: bytes, **fields) -> None:
    """An artifact whose model.json vouches for ``weights`` and its own fields with consistent
    ids: what someone who recomputes the ids can write. The hash checks alone cannot stop it."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.safetensors").write_bytes(weights)
    info = _info(weights_sha256=hashlib.sha256(weights).hexdigest(), **fields)
    (folder / "model.json").write_text(info.model_copy(update={"model_id": model_id_of(info)}).model_dump_json())


@pytest.mark.parametrize("make", ["pickle", "torch.save"])
def test_malicious_pickle_as_weights_is_never_unpickled(tmp_path: Path, make: str) -> None:
    marker = tmp_path / "pwned"
    _plant(tmp_path / "model", _payload(marker, make))
    with pytest.raises(UsageError, match="is not a safetensors file"):
        load_model(Store(str(tmp_path / "model")))
    assert not marker.exists()


@pytest.mark.parametrize("make", ["pickle", "torch.save"])
def test_load_state_dict_refuses_a_malicious_torch_file(tmp_path: Path, make: str) -> None:
    marker = tmp_path / "pwned"
    target = tmp_path / "init.pt"
    target.write_bytes(_payload(marker, make))
    with pytest.raises(UsageError, match=f"^{target}: refused to load weights"):
        load_state_dict(Store(str(target)))
    assert not marker.exists()


def test_load_state_dict_reads_safetensors_and_torch_files(tmp_path: Path) -> None:
    state = _trained_looking_model().state_dict()
    safetensors.torch.save_file(state, tmp_path / "w.safetensors")
    torch.save(state, tmp_path / "w.pt")
    for name in ("w.safetensors", "w.pt"):
        loaded = load_state_dict(Store(str(tmp_path / name)))
        assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)

    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(UsageError, match="expected a state dict, got list"):
        load_state_dict(Store(str(tmp_path / "list.pt")))
    (tmp_path / "bad.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(UsageError, match="not a safetensors file"):
        load_state_dict(Store(str(tmp_path / "bad.safetensors")))


# ---------------------------------------------------------------------------------------------
# model.json is verified: model_id covers the fields that change predictions; bounds on load


def test_model_id_covers_the_weights_and_every_field_inference_reads() -> None:
    info = _info(weights_sha256="ab" * 32)
    changed = {"arch": "resnet_small", "classes": ["dog", "cat", "frog"], "image_size": 33,
               "mean": (0.5, 0.4, 0.31), "std": (0.25, 0.25, 0.26), "weights_sha256": "cd" * 32}
    assert sorted(changed) == sorted([*artifact.IDENTITY_FIELDS, "weights_sha256"])
    ids = {name: model_id_of(info.model_copy(update={name: value})) for name, value in changed.items()}
    assert len({model_id_of(info), *ids.values()}) == len(changed) + 1
    # What does not change a prediction does not change the id.
    same = info.model_copy(update={"config": {"epochs": 9}, "metrics": {"val_accuracy": 1.0}, "created_at": "x"})
    assert model_id_of(same) == model_id_of(info)


def _rewrite(folder: Path, **changes) -> None:
    meta = json.loads((folder / "model.json").read_text())
    (folder / "model.json").write_text(json.dumps({**meta, **changes}))


def _cli_error(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """Run the CLI; asserts exit code 2 and a one-line error; returns that line."""
    code = main(list(argv))
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert (code, len(lines), captured.out) == (2, 1, ""), captured.err
    return lines[0]


# (change to model.json, expected error); the ids are not recomputed unless the case says so.
TAMPERED = {
    "classes reordered": ({"classes": ["dog", "cat", "frog"]}, "does not match its model_id"),
    "mean changed": ({"mean": [0.5, 0.4, 0.31]}, "does not match its model_id"),
    "std 0": ({"std": [0.25, 0.0, 0.25]}, r"field 'std\.1': Input should be greater than 0"),
    "std inf": ({"std": [0.25, "Infinity", 0.25]}, r"field 'std\.1': Input should be a finite number"),
    "mean above 1": ({"mean": [0.5, 40.0, 0.3]}, r"field 'mean\.1': Input should be less than or equal to 1"),
    "image_size 0": ({"image_size": 0}, "field 'image_size': Input should be greater than or equal to 8"),
    "image_size 100000": ({"image_size": 100000}, "field 'image_size': Input should be less than or equal to 1024"),
    "classes repeat": ({"classes": ["cat", "dog", "cat"]}, "field 'classes': Value error, class names repeat: 'cat'"),
    "no classes": ({"classes": []}, "field 'classes': List should have at least 2 items"),
    "unknown arch": ({"arch": "nope"}, "field 'arch': Value error, unknown arch 'nope'"),
    "class added": ({"classes": [*CLASSES, "newt"]}, "does not match its model_id"),
    "tta switched on": ({"tta": "flip"}, "does not match its model_id"),
    "tta unknown": ({"tta": "rotate"}, "field 'tta': Input should be 'none', 'flip' or 'flip_translate'"),
    "format 1": ({"format_version": 1}, "is format 1, whose model_id covers the weights but not classes"),
    "format 3": ({"format_version": 3}, "has format_version 3; this distcls reads 2"),
}


@pytest.mark.parametrize("case", sorted(TAMPERED))
def test_tampered_model_json_is_refused_by_load_model_and_the_cli(tmp_path: Path, capsys, case: str) -> None:
    """Each a one-line exit-2 error naming the artifact (and the field), from load_model and from
    the driver of `distcls label` and `distcls evaluate`, before Ray or any output."""
    uri = str(tmp_path / "model")
    save_model(_trained_looking_model(), _info(), Store(uri))
    changes, expected = TAMPERED[case]
    _rewrite(Path(uri), **changes)
    with pytest.raises(UsageError) as raised:
        load_model(Store(uri))
    message = str(raised.value)
    assert message.startswith(f"{uri}: ") and "\n" not in message and re.search(expected, message), message

    out = tmp_path / "labels"
    for argv in (["label", "--input", str(tmp_path / "lake"), "--model", uri, "--output", str(out)],
                 ["evaluate", "--input", str(tmp_path / "lake"), "--model", uri, "--report", str(out)]):
        assert _cli_error(capsys, *argv) == f"distcls {argv[0]}: error: {message}"
    assert not out.exists()


def test_a_class_count_that_does_not_match_the_head_is_refused_even_with_consistent_ids(tmp_path: Path,
                                                                                    capsys) -> None:
    weights = safetensors.torch.save(_trained_looking_model().state_dict())
    _plant(tmp_path / "model", weights, classes=[*CLASSES, "newt"])
    uri = str(tmp_path / "model")
    expected = f"{uri}: model.json field 'classes' lists 4 classes but the weights' head outputs 3"
    with pytest.raises(UsageError, match=f"^{re.escape(expected)}$"):
        load_model(Store(uri))
    line = _cli_error(capsys, "label", "--input", str(tmp_path / "lake"), "--model", uri,
                      "--output", str(tmp_path / "labels"))
    assert line == f"distcls label: error: {expected}"


def test_save_model_refuses_a_head_that_does_not_match_the_classes(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="lists 3 classes but the weights' head outputs 10"):
        save_model(create_model("simple_cnn", num_classes=10), _info(), Store(str(tmp_path / "model")))
    assert not (tmp_path / "model").exists()


def test_resave_upgrades_a_checked_format_1_artifact(tmp_path: Path) -> None:
    """Format 1: model_id was the weights' sha256 and there was no weights_sha256."""
    uri = str(tmp_path / "model")
    model = _trained_looking_model()
    saved = save_model(model, _info(), Store(uri))
    meta = json.loads((tmp_path / "model" / "model.json").read_text())
    del meta["weights_sha256"]
    (tmp_path / "model" / "model.json").write_text(json.dumps({**meta, "format_version": 1,
                                                                "model_id": saved.weights_sha256}))
    with pytest.raises(UsageError, match="format 1"):
        load_model(Store(uri))

    upgraded = resave(Store(uri))
    loaded, info = load_model(Store(uri))
    assert info == upgraded and info.model_id == saved.model_id and info.created_at == saved.created_at
    assert torch.equal(predict_proba(loaded, info, _images()), predict_proba(model, info, _images()))
    with pytest.raises(UsageError, match="not a format-1 artifact"):
        resave(Store(uri))


def test_tta_changes_the_model_id_only_when_it_is_on() -> None:
    """An artifact saved before tta existed (none) keeps its model_id; flip gets another one."""
    info = _info(weights_sha256="ab" * 32)
    before = info.model_dump(mode="json", include={"format_version", "weights_sha256", *artifact.IDENTITY_FIELDS})
    assert model_id_of(info) == hashlib.sha256(json.dumps(before, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    assert model_id_of(info.model_copy(update={"tta": "flip"})) != model_id_of(info)


def test_an_artifact_with_tta_predicts_with_it(tmp_path: Path) -> None:
    model = _trained_looking_model()
    saved = save_model(model, _info(tta="flip"), Store(str(tmp_path)))
    loaded, info = load_model(Store(str(tmp_path)))
    assert info == saved and info.tta == "flip"
    x = artifact.normalize(_images(), info.mean, info.std)
    with torch.no_grad():
        expected = torch.softmax((model(x) + model(x.flip(3))) / 2, dim=1)
    assert torch.allclose(predict_proba(loaded, info, _images()), expected, atol=1e-6)
    # Saving what load_model returned saves the plain weights again, not the wrapper's.
    again = save_model(loaded, info, Store(str(tmp_path / "again")))
    assert again.weights_sha256 == saved.weights_sha256


def test_weights_saved_from_a_loaded_tta_artifact_fit_its_architecture(tmp_path: Path) -> None:
    """load_model wraps a tta=flip model in WithTTA; its state dict had every key prefixed 'model.',
    so those weights, saved for --init-weights, were refused as 'a checkpoint of another architecture?'."""
    from distcls.artifact import load_state_dict, match_state_dict
    from distcls.models import create_model

    model = _trained_looking_model()
    save_model(model, _info(tta="flip"), Store(str(tmp_path / "model")))
    loaded, info = load_model(Store(str(tmp_path / "model")))
    torch.save(loaded.state_dict(), tmp_path / "weights.pt")
    state = load_state_dict(Store(str(tmp_path / "weights.pt")))
    fresh = create_model(info.arch, num_classes=len(info.classes))
    match = match_state_dict(fresh, state, "weights.pt", partial=False)
    assert sorted(match.loaded) == sorted(model.state_dict())
    assert all(torch.equal(state[name], value) for name, value in model.state_dict().items())
    loaded.load_state_dict(state)  # and back into the wrapper
