"""Experiment tracking for ``distcls train`` with MLflow, the optional extra ``distcls[mlflow]``.

On when ``MLFLOW_TRACKING_URI`` is set: a run in the experiment ``$MLFLOW_EXPERIMENT_NAME`` (default
``distcls``), named after ``--name``, gets the resolved config as params (``public_dict``: no
secrets by construction), one point per epoch of every number the workers report (train_loss,
train_images, val_loss, val_accuracy, val_images, images_per_s, elapsed_s, restores; step = epoch), and the model artifact
(model.json + model.safetensors under ``model/``; an artifact on an object store larger than
ARTIFACT_COPY_BYTES is only named, by the tag ``distcls.model_uri``, which every run has).

Everything is logged from the driver, which has the tracking server's address and credentials
(``MLFLOW_TRACKING_TOKEN`` and the like) in its environment; Ray Train 2.60 runs its callbacks in
the controller actor, whose environment is not the driver's (only Ray Train's own variables are
passed on, ``ray.train.v2._internal.constants.get_env_vars_to_propagate``). The epoch rows reach the
driver on the queue that also carries the epoch lines (``train._log_progress`` calls ``Epochs.log``).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from distcls import storage
from distcls.config import TrainConfig, public_dict
from distcls.errors import UsageError

log = logging.getLogger(__name__)

EXPERIMENT = "distcls"
# A remote artifact larger than this is named by a tag instead of copied into the tracking store.
ARTIFACT_COPY_BYTES = 256 * 2**20
_ARTIFACT_FILES = ("model.json", "model.safetensors")
# mlflow's own HTTP defaults (7 retries with backoff from 2 s, 120 s per attempt) spend ~4 min per
# request on a server that refuses and ~16 min on one that never answers: before training starts,
# and again at every epoch. Tracking is a record of the run, so a dead server gets seconds; the
# user's own MLFLOW_HTTP_REQUEST_* settings are kept.
_HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                  "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


def tracker(config: TrainConfig) -> Any:
    """An ``mlflow.tracking.MlflowClient`` with the experiment made, or None when
    ``MLFLOW_TRACKING_URI`` is not set. UsageError (before any Ray work) when it is set but mlflow is
    not installed or the tracking store refuses it."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        return None
    try:
        from mlflow.tracking import MlflowClient
    except ImportError:
        raise UsageError("MLFLOW_TRACKING_URI is set but mlflow is not installed: pip install 'distcls[mlflow]' "
                         "(or unset MLFLOW_TRACKING_URI)") from None
    for name, value in _HTTP_DEFAULTS.items():
        os.environ.setdefault(name, value)  # read by mlflow at each request
    try:
        client = MlflowClient(uri)
        name = _experiment_name()
        if client.get_experiment_by_name(name) is None:
            client.create_experiment(name)
    except Exception as exc:  # mlflow raises its own and its stores' exceptions: name the setting, one line
        raise UsageError(f"MLFLOW_TRACKING_URI {uri}: {str(exc).splitlines()[0][:300]}") from None
    return client


@contextlib.contextmanager
def run(client: Any, config: TrainConfig) -> Iterator[Epochs]:
    """The MLflow run of one training (a no-op ``Epochs`` when ``client`` is None): params logged
    now, epochs as they are reported, FINISHED at the end or FAILED when the block raises."""
    if client is None:
        yield Epochs(None, None)
        return
    experiment = client.get_experiment_by_name(_experiment_name()).experiment_id
    tags = {"distcls.command": "train", "distcls.model_uri": storage.join(config.output, "model")}
    mlflow_run = client.create_run(experiment, run_name=config.name, tags=tags)
    run_id = mlflow_run.info.run_id
    _log_params(client, run_id, public_dict(config))
    status = "FAILED"
    try:
        yield Epochs(client, run_id)
        status = "FINISHED"
    finally:
        _quietly(f"end MLflow run {run_id}", client.set_terminated, run_id, status)
        log.info(f"mlflow: run {run_id} of experiment {_experiment_name()!r} ({status.lower()}) at {client.tracking_uri}")


class Epochs:
    """Epoch rows -> MLflow metrics of one run (nothing when there is no tracking). After a request
    fails it sends no more: each would wait out the same dead server again, and the driver logs
    the epochs in order, so the run's end would wait for all of them."""

    def __init__(self, client: Any, run_id: str | None) -> None:
        self.client, self.run_id = client, run_id

    def log(self, row: dict[str, Any]) -> None:
        """Every number of an epoch's row as a metric at step = its epoch."""
        if self.client is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(key, float(value), now, int(row["epoch"])) for key, value in row.items()
                   if key != "epoch" and isinstance(value, (int, float))]
        if "val_tta" in row:  # a string; the last epoch's val_accuracy is measured with the tta, the others not
            metrics.append(Metric("val_with_tta", float(row["val_tta"] != "none"), now, int(row["epoch"])))
        if not _quietly(f"log epoch {row.get('epoch')}", self.client.log_batch, self.run_id, metrics=metrics):
            self._give_up()

    def log_artifact(self, model: storage.Store) -> None:
        """model.json and model.safetensors of the artifact folder ``model`` under ``model/`` of the
        run; a remote one larger than ARTIFACT_COPY_BYTES stays where it is (the tag names it)."""
        if self.client is None:
            return
        if not model.remote:
            _quietly("log the model artifact", self._log_files, Path(model.path()))
            return
        size = model.info("model.safetensors").size or 0
        if size > ARTIFACT_COPY_BYTES:
            log.info(f"mlflow: the artifact ({size / 2**20:.0f} MiB) is not copied; tag distcls.model_uri names it")
            return
        with tempfile.TemporaryDirectory() as folder:
            for name in _ARTIFACT_FILES:
                (Path(folder) / name).write_bytes(model.read(name))
            _quietly("log the model artifact", self._log_files, Path(folder))

    def _give_up(self) -> None:
        log.warning("mlflow: no more epochs or artifact are sent to this run")
        self.client = None

    def _log_files(self, folder: Path) -> None:
        for name in _ARTIFACT_FILES:
            self.client.log_artifact(self.run_id, str(folder / name), "model")


def _log_params(client: Any, run_id: str, config: dict[str, Any]) -> None:
    from mlflow.entities import Param

    params = [Param(key, value if isinstance(value, str) else json.dumps(value))
              for key, value in sorted(config.items())]
    client.log_batch(run_id, params=params)


def _quietly(what: str, call: Any, *args: Any, **kwargs: Any) -> bool:
    """Tracking is a record of the run, not part of it: a tracking server that fails mid-run costs
    its record one line on stderr, never the training. False when the call failed."""
    try:
        call(*args, **kwargs)
    except Exception as exc:  # any store's error: the run goes on
        log.warning(f"mlflow: could not {what}: {type(exc).__name__}: "
                    f"{str(exc).splitlines()[0][:200] if str(exc) else ''}")
        return False
    return True


def _experiment_name() -> str:
    return os.environ.get("MLFLOW_EXPERIMENT_NAME") or EXPERIMENT

