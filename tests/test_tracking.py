"""MLflow tracking of `distcls train`, against a local file-backed store read back with MlflowClient."""
from __future__ import annotations

import json
import socket
import sys
import threading
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
                 "--batch-size", "32", "--workers", "1", "--name", "tracked", "--tta", "flip"]) == 0

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
    # --tta flip: only the last epoch's val_accuracy includes it, and the run's metrics say so.
    assert [m.value for m in client.get_metric_history(run.info.run_id, "val_with_tta")] == [0.0, 1.0]

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


def test_a_tracking_server_that_hangs_up_is_a_usage_error_after_few_attempts(synthetic_lake, tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch,
                                                                            capsys) -> None:
    """mlflow's defaults retry each request 7 times with backoff (~4 min); before training a server
    that hangs up is tried at most twice, named in one line, and nothing is written."""
    pytest.importorskip("mlflow.tracking")
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    accepted: list[int] = []

    def hang_up() -> None:
        while True:
            try:
                connection, _ = server.accept()
            except OSError:  # closed at the end of the test
                return
            accepted.append(1)
            connection.close()

    threading.Thread(target=hang_up, daemon=True).start()
    for name in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)  # mlflow's defaults, and restored after the test
    uri = f"http://127.0.0.1:{server.getsockname()[1]}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    output = tmp_path / "run"
    try:
        code = main(["train", "--input", str(synthetic_lake(6)), "--output", str(output)])
    finally:
        server.close()
    captured = capsys.readouterr()
    assert code == 2 and captured.out == ""
    assert len(captured.err.strip().splitlines()) == 1 and f"MLFLOW_TRACKING_URI {uri}" in captured.err
    assert 1 <= len(accepted) <= 2 and not output.exists()


def test_after_a_failed_request_no_more_epochs_are_sent(caplog: pytest.LogCaptureFixture) -> None:
    """A server that dies mid-run: every further epoch (and the artifact) would wait out the same
    timeouts again, and the driver logs epochs in order, so the end of a long run would wait for all."""
    pytest.importorskip("mlflow.entities")
    from distcls.storage import Store
    from distcls.tracking import Epochs

    class DeadServer:
        calls = 0

        def log_batch(self, *args, **kwargs) -> None:
            DeadServer.calls += 1
            raise ConnectionError("server gone")

        log_artifact = log_batch

    epochs = Epochs(DeadServer(), "run-1")
    for epoch in (1, 2, 3):
        epochs.log({"epoch": epoch, "train_loss": 1.0})
    epochs.log_artifact(Store("/nonexistent/model"))
    assert DeadServer.calls == 1
    assert [r.getMessage() for r in caplog.records] == [
        "mlflow: could not log epoch 1: ConnectionError: server gone",
        "mlflow: no more epochs or artifact are sent to this run"]
