"""`distcls export` and `--engine onnx`: the ONNX graph keeps the artifact's lineage, and ONNX
Runtime labels and evaluates like PyTorch does."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from torch import nn

from distcls import export, models
from distcls.artifact import ModelInfo, load_model, predict_proba, save_model
from distcls.cli import main
from distcls.storage import Store
from distcls.engines import OnnxEngine, create_engine
from distcls.errors import UsageError
from distcls.synthetic import CLASSES as SHAPES

CIFAR = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _artifact(folder: Path, arch: str = "resnet_small", classes: list[str] = CIFAR) -> Path:
    """A seeded resnet_small whose weights are perturbed, so that its predictions spread over the
    classes (a freshly initialised one gives most images the same class, and parity would be trivial)."""
    torch.manual_seed(0)
    model = models.create_model(arch, num_classes=len(classes))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    info = ModelInfo(arch=arch, classes=classes, image_size=32, mean=(0.49, 0.48, 0.45), std=(0.25, 0.24, 0.26))
    save_model(model, info, Store(str(folder)))
    return folder


def _pixels(n: int = 64) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


def test_export_writes_the_graph_and_its_lineage(tmp_path: Path, capsys) -> None:
    model_dir = _artifact(tmp_path / "model")
    assert main(["export", "--model", str(model_dir), "--format", "onnx"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    graph = (model_dir / "model.onnx").read_bytes()
    meta = json.loads((model_dir / "model.onnx.json").read_text())
    model_json = json.loads((model_dir / "model.json").read_text())
    assert meta["model_id"] == model_json["model_id"] == result["model_id"]
    assert meta["sha256"] == hashlib.sha256(graph).hexdigest()
    # The graph alone (uint8 NHWC in, probabilities out) gives predict_proba's numbers.
    model, info = load_model(Store(str(model_dir)))
    expected = predict_proba(model, info, _pixels()).numpy()
    got = OnnxEngine(graph, info)(_pixels()).numpy()
    assert got.shape == expected.shape and got.dtype == np.float32
    assert np.abs(got - expected).max() <= 1e-5
    assert (got.argmax(1) == expected.argmax(1)).all()


def test_an_unknown_format_is_a_usage_error(tmp_path: Path, capsys) -> None:
    model_dir = _artifact(tmp_path / "model")
    assert main(["export", "--model", str(model_dir), "--format", "tflite"]) == 2
    assert "format" in capsys.readouterr().err
    assert not (model_dir / "model.onnx").exists()


def test_a_replaced_graph_is_refused_and_a_stale_one_is_not_used(tmp_path: Path) -> None:
    model_dir = _artifact(tmp_path / "model")
    assert main(["export", "--model", str(model_dir)]) == 0
    good = (model_dir / "model.onnx").read_bytes()
    (model_dir / "model.onnx").write_bytes(good + b"\0")
    with pytest.raises(UsageError, match="model.onnx does not match the sha256"):
        export.onnx_for(Store(str(model_dir)))
    # Retrained into the same folder: model.json has a new model_id, the old graph is ignored.
    (model_dir / "model.onnx").write_bytes(good)
    _artifact(model_dir, classes=CIFAR[:5])
    graph = export.onnx_for(Store(str(model_dir)))
    info = load_model(Store(str(model_dir)))[1]
    assert OnnxEngine(graph, info)(_pixels(2)).shape == (2, 5)


def test_the_engines_are_drop_ins_for_predict_proba(tmp_path: Path) -> None:
    model_dir = _artifact(tmp_path / "model")
    torch_engine, info = create_engine("torch", Store(str(model_dir)))
    onnx_engine, onnx_info = create_engine("onnx", Store(str(model_dir)))
    assert info == onnx_info
    a, b = torch_engine(_pixels()), onnx_engine(torch.from_numpy(_pixels()))
    assert isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype == torch.float32
    assert torch.allclose(a, b, atol=1e-5)


def test_label_and_evaluate_with_onnx_agree_with_torch(cifar_root, tiny_model, ray_local, tmp_path, capsys) -> None:
    """300 CIFAR-10 JPEGs through the CLI with each engine; the artifact has no model.onnx, so the
    driver exports one for the run (and does not write it into the artifact)."""
    lake = cifar_root(30)
    model_dir = _artifact(tmp_path / "model")
    outputs = {}
    for engine in ("torch", "onnx"):
        argv = ["label", "--input", str(lake), "--model", str(model_dir), "--output", str(tmp_path / engine),
                "--engine", engine]
        assert main(argv) == 0
        outputs[engine] = pq.read_table(tmp_path / engine).sort_by("path").to_pydict()
    assert "exported one for this run" in capsys.readouterr().err
    assert not (model_dir / "model.onnx").exists()
    torch_rows, onnx_rows = outputs["torch"], outputs["onnx"]
    assert len(torch_rows["path"]) == 300 and torch_rows["path"] == onnx_rows["path"]
    assert len(set(torch_rows["label_id"])) >= 3  # the model spreads its predictions: parity is not trivial
    agree = np.mean(np.array(torch_rows["label_id"]) == np.array(onnx_rows["label_id"]))
    assert agree >= 0.999
    # topk_scores holds 5 of the 10 probabilities, sorted: same classes, same numbers.
    difference = np.abs(np.array(torch_rows["topk_scores"]) - np.array(onnx_rows["topk_scores"]))
    assert difference.max() <= 1e-3
    assert set(onnx_rows["model_id"]) == set(torch_rows["model_id"]) == {load_model(Store(str(model_dir)))[1].model_id}

    scores = {}
    for engine in ("torch", "onnx"):
        assert main(["evaluate", "--input", str(lake), "--model", str(model_dir), "--engine", engine]) == 0
        scores[engine] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert scores["onnx"]["images"] == scores["torch"]["images"] == 300
    assert abs(scores["onnx"]["accuracy"] - scores["torch"]["accuracy"]) <= 1 / 300


class _Unexportable(nn.Module):
    """Singular values: an op ONNX has no operator for."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.head = nn.Linear(3, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.linalg.svdvals(x).mean(2))


@pytest.fixture()
def unexportable_model(tmp_path: Path) -> Path:
    def svd_net(num_classes: int) -> nn.Module:
        return _Unexportable(num_classes)

    models.register(svd_net)
    yield _artifact(tmp_path / "svd_model", arch="svd_net", classes=list(SHAPES))
    models._REGISTRY.pop("svd_net")


@pytest.mark.parametrize("command", ["label", "evaluate", "export"])
def test_an_architecture_that_cannot_be_exported_is_a_usage_error(command, unexportable_model, synthetic_lake,
                                                                   ray_local, tmp_path, capsys) -> None:
    argv = {"label": ["label", "--input", str(synthetic_lake(6)), "--output", str(tmp_path / "out"), "--engine", "onnx"],
            "evaluate": ["evaluate", "--input", str(synthetic_lake(6)), "--engine", "onnx"],
            "export": ["export"]}[command]
    assert main([*argv, "--model", str(unexportable_model)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert f"{unexportable_model}: architecture 'svd_net' cannot be exported to ONNX" in err and "svdvals" in err
    assert not (unexportable_model / "model.onnx").exists()
    assert not [p for p in tmp_path.joinpath("out").rglob("*") if p.is_file()]


def test_onnx_with_gpu_is_a_usage_error(tiny_model, synthetic_lake, tmp_path, capsys) -> None:
    code = main(["label", "--input", str(synthetic_lake(6)), "--model", str(tiny_model), "--output",
                 str(tmp_path / "out"), "--engine", "onnx", "--gpu"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "--engine onnx runs on CPUs only" in err


@pytest.mark.parametrize("arch", models.list_models())
def test_every_registered_architecture_exports_and_agrees(arch: str) -> None:
    torch.manual_seed(0)
    model = models.create_model(arch, num_classes=4).eval()
    info = ModelInfo(arch=arch, classes=list("abcd"), image_size=32, mean=(0.5,) * 3, std=(0.25,) * 3)
    got = OnnxEngine(export.to_onnx(model, info, arch), info)(_pixels(8))
    assert torch.allclose(got, predict_proba(model, info, _pixels(8)), atol=1e-5)



@pytest.mark.parametrize("arch", models.list_models())
def test_every_registered_architecture_exports_with_flip_translate_and_agrees(arch: str) -> None:
    """flip_translate reflect-padded its shifted copies with F.pad, whose ONNX Pad leaves the
    spatial sides unknown under the graph's dynamic batch axis: simple_cnn's adaptive pooling then
    could not be exported (`distcls export`, `--engine onnx` refused the model). An odd side too."""
    torch.manual_seed(0)
    info = ModelInfo(arch=arch, classes=list("abcd"), image_size=33, mean=(0.5,) * 3, std=(0.25,) * 3,
                     tta="flip_translate")
    model = models.WithTTA(models.create_model(arch, num_classes=4), info.tta).eval()
    pixels = np.random.default_rng(0).integers(0, 256, (4, 33, 33, 3), dtype=np.uint8)
    got = OnnxEngine(export.to_onnx(model, info, arch), info)(pixels)
    assert torch.allclose(got, predict_proba(model, info, pixels), atol=1e-5)

@pytest.mark.parametrize("tta", ["flip", "flip_translate"])
def test_the_onnx_graph_of_a_tta_artifact_averages_the_mirror_image_too(tmp_path: Path, tta: str) -> None:
    torch.manual_seed(0)
    model = models.create_model("airbench", num_classes=4)
    model.fit_to_data(torch.randn(16, 3, 32, 32))
    info = ModelInfo(arch="airbench", classes=list("abcd"), image_size=32, mean=(0.5,) * 3, std=(0.25,) * 3, tta=tta)
    save_model(model, info, Store(str(tmp_path)))
    loaded, info = load_model(Store(str(tmp_path)))
    got = OnnxEngine(export.to_onnx(loaded, info, str(tmp_path)), info)(_pixels(8))
    assert torch.allclose(got, predict_proba(loaded, info, _pixels(8)), atol=1e-5)
    plain = predict_proba(model.eval(), info.model_copy(update={"tta": "none"}), _pixels(8))
    assert not torch.allclose(got, plain, atol=1e-4)  # the graph does not ignore the mirror image


def test_export_and_use_on_s3(s3_bucket: str, tmp_path: Path) -> None:
    local = _artifact(tmp_path / "model")
    uri = f"s3://{s3_bucket}/runs/a/model"
    for name in ("model.json", "model.safetensors"):
        Store(f"{uri}/{name}").write((local / name).read_bytes())
    assert main(["export", "--model", uri]) == 0
    graph = Store(f"{uri}/model.onnx").read()
    assert export.onnx_for(Store(uri)) == graph
