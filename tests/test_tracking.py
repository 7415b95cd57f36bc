"""MLflow tracking of `distcls train`, against a local file-backed store read back with MlflowClient."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from distcls.cli import main


def test_training_logs_params_epochs_and_the_artifact(ray_local, synthetic_lake, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    mlflow_tracking = pytest.importorskip("mlflow.tracking")
    store, output, lake = f"file:{tmp_path / 'mlruns'}", tmp_path / "run", str(synthetic_lake(6))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    # mlflow 3 refuses new file stores unless asked (they are "in maintenance mode"); sqlite: needs
    # SQLAlchemy, which mlflow-skinny does not bring.
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "distcls-test")
    assert main(["train", "--input", lake, "--output", str(output), "--arch", "simple_cnn", "--epochs", "2",
                 "--batch-size", "32", "--workers", "1", "--name", "tracked"]) == 0

    client = mlflow_tracking.MlflowClient(store)
    [run] = client.search_runs([client.get_experiment_by_name("distcls-test").experiment_id])
    assert (run.info.status, run.info.run_name) == ("FINISHED", "tracked")
    params = run.data.params
    assert (params["input"], params["epochs"], params["arch"], params["labels"]) == (lake, "2", "simple_cnn", "null")
    assert not any("testing-secret-canary" in value for value in params.values())
    assert run.data.tags["distcls.model_uri"] == str(output / "model")

    epochs = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    for key in ("train_loss", "val_loss", "val_accuracy", "images_per_s"):
        history = client.get_metric_history(run.info.run_id, key)
        assert [m.step for m in history] == [e["epoch"] for e in epochs], key
        assert [m.value for m in history] == pytest.approx([e[key] for e in epochs]), key
    assert [e["epoch"] for e in epochs] == [1, 2]

    assert sorted(f.path for f in client.list_artifacts(run.info.run_id, "model")) == \
        ["model/model.json", "model/model.safetensors"]
    logged = Path(client.download_artifacts(run.info.run_id, "model/model.json", str(tmp_path / "download")))
    assert logged.read_bytes() == (output / "model" / "model.json").read_bytes()


def test_tracking_asked_for_without_mlflow_is_a_usage_error(synthetic_lake, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file:{tmp_path / 'mlruns'}")
    monkeypatch.setitem(sys.modules, "mlflow.tracking", None)  # what an install without the extra imports
    output = tmp_path / "run"
    code = main(["train", "--input", str(synthetic_lake(6)), "--output", str(output)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "pip install 'distcls[mlflow]'" in err
    assert not output.exists() and not (tmp_path / "mlruns").exists()
