"""Faults during labeling on the multi-node fixture (three one-CPU Ray nodes): a killed inference
actor, a lost worker node, an object store that goes away for a while, an output that cannot be
written. Each run must end with every input exactly once in the committed output, or with a clear
error and nothing committed.

Covered elsewhere, and not repeated here:
- a killed Ray Train worker is replaced and training resumes from its last checkpoint with no
  epoch lost or repeated, on the multi-node fixture:
  test_train.py::test_killed_worker_is_replaced_and_training_resumes, and a SIGKILLed ``distcls train``
  rerun resumes: test_train.py::test_rerunning_a_stopped_run_resumes;
- a SIGKILLed labeling driver, rerun (with and without --resume), labels every input exactly once
  and leaves no staging behind: test_label.py::test_killed_run_then_rerun_labels_every_input_exactly_once;
  a commit interrupted half-way is rolled forward: test_label.py::test_interrupted_commit_is_rolled_forward_not_redone.
"""
from __future__ import annotations

import os
import re
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any, Callable

import boto3
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from distcls import storage
from distcls.cli import main
from distcls.config import LabelConfig, StorageConfig
from distcls.dataset import COMMITTING, STAGING
from distcls.errors import JobError, UsageError
from distcls.images import read_batch
from distcls.label import label


class _Run:
    """``label(config)`` on a thread of this process (the driver), so that the test can break
    things while it runs."""

    def __init__(self, config: LabelConfig) -> None:
        self.result: dict[str, Any] = {}
        self.thread = threading.Thread(target=self._run, args=(config,), daemon=True)
        self.thread.start()

    def _run(self, config: LabelConfig) -> None:
        try:
            self.result["summary"] = label(config)
        except BaseException as exc:  # the test asserts on it
            self.result["error"] = exc

    def wait_until(self, condition: Callable[[], bool], what: str, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert self.thread.is_alive(), f"the run ended before {what}: {self.result}"
            assert time.monotonic() < deadline, f"no {what} within {timeout}s"
            time.sleep(0.02)

    def join(self, timeout: float = 300) -> dict[str, Any]:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"the run did not finish within {timeout}s"
        return self.result


def _staged_parquet(output: Path) -> bool:
    """A staged file exists: the pipeline is past its first batch and mid-run."""
    return any((output / STAGING).glob("*/*.parquet"))


def _assert_exactly_once(output: Path, expected: list[str]) -> pa.Table:
    """Every expected path once in the committed dataset, with _SUCCESS and no leftovers."""
    table = pq.read_table(output)
    assert table.num_rows == len(expected) and sorted(table["path"].to_pylist()) == sorted(expected)
    assert (output / "_SUCCESS").exists()
    assert not (output / STAGING).exists() and not (output / COMMITTING).exists()
    return table


def _predictor_actors() -> dict[str, dict]:
    """The inference actors Ray Data made (class MapWorker(MapBatches(Predictor))), by id."""
    from ray._private import state

    return {k: a for k, a in state.actors().items() if "(Predictor)" in a["ActorClassName"]}


def _alive_since(before: set[str]) -> list[dict]:
    """Inference actors made after ``before`` that have finished their constructor (loaded the model)."""
    return [a for k, a in _predictor_actors().items() if k not in before and a["State"] == "ALIVE"]


def _reader_nodes() -> list[str]:
    """The nodes of the live InputReader actors (the owners of a label run's input blocks)."""
    from ray._private import state

    return [a["Address"]["NodeID"] for a in state.actors().values()
            if a["ActorClassName"] == "InputReader" and a["State"] == "ALIVE"]


def _config(lake: Path, model_uri: str, output: Path, **extra: Any) -> LabelConfig:
    return LabelConfig(input=str(lake), model=model_uri, output=str(output), batch_size=10, rows_per_file=10, **extra)


def test_killed_inference_actors_are_replaced_and_every_input_lands_once(
        ray_cluster, tmp_path: Path, synthetic_lake, model_uri: str) -> None:
    """SIGKILL the inference actors as soon as they are up (ALIVE in the GCS: the model is
    loaded), while their batches are in flight: Ray Data gives its actors max_restarts=-1 and
    max_task_retries=-1 by default (ActorPoolMapOperator._apply_default_remote_args), so Ray
    restarts them and resubmits the lost batches; each input still lands exactly once."""
    lake = synthetic_lake(30, labelled=False)
    output = tmp_path / "out"
    before = set(_predictor_actors())
    run = _Run(_config(lake, model_uri, output))
    run.wait_until(lambda: _alive_since(before), "a live inference actor")
    assert not _staged_parquet(output)  # nothing written yet: the kill loses work in flight
    killed = {a["ActorID"]: a["Pid"] for a in _alive_since(before)}
    for pid in killed.values():
        os.kill(pid, signal.SIGKILL)
    result = run.join()

    assert "summary" in result, result
    _assert_exactly_once(output, [str(p) for p in lake.glob("*.jpg")])
    assert result["summary"]["images"] == 300 and result["summary"]["errors"] == 0
    restarts = {k: a["NumRestarts"] for k, a in _predictor_actors().items() if k in killed}
    assert restarts and all(n >= 1 for n in restarts.values()), restarts


def test_losing_a_worker_node_mid_run_loses_no_input(ray_cluster, tmp_path: Path, synthetic_lake,
                                                     model_uri: str) -> None:
    """The worker node of the first inference actor to come up is removed while its batches are
    in flight (another worker node if that actor is on the head or the driver's node, which a
    cluster cannot lose: on a real cluster the driver runs on the head, and the InputReader, which
    owns the input blocks, beside it), and nothing replaces it: its tasks are retried, its objects
    rebuilt from lineage, its actor restarted on the two nodes left."""
    import ray

    lake = synthetic_lake(30, labelled=False)
    output = tmp_path / "out"
    before = set(_predictor_actors())
    run = _Run(_config(lake, model_uri, output))
    run.wait_until(lambda: _alive_since(before), "a live inference actor")
    assert not _staged_parquet(output)  # nothing written yet: the node takes work in flight with it
    actor_node = _alive_since(before)[0]["Address"]["NodeID"]
    # All nodes share this machine's address, so the driver may have joined a worker node's raylet.
    driver_node = ray.get_runtime_context().get_node_id()
    workers = sorted((n for n in ray_cluster.worker_nodes if n.node_id != driver_node),
                     key=lambda n: n.node_id != actor_node)
    victim = workers[0]
    reader_nodes = _reader_nodes()  # asserted once the run is joined: a failure here must not leave it running
    ray_cluster.remove_node(victim)
    try:
        result = run.join()
    finally:
        # The fixture's cluster is shared: bring it back to three nodes for the tests after this one.
        ray_cluster.add_node(num_cpus=1)
        ray_cluster.wait_for_nodes()

    # The reader asks for no resources: only a hard affinity keeps it on the driver's node.
    assert reader_nodes == [driver_node]
    assert "summary" in result, result
    _assert_exactly_once(output, [str(p) for p in lake.glob("*.jpg")])
    assert result["summary"]["images"] == 300 and result["summary"]["errors"] == 0
    assert victim.node_id not in {n["NodeID"] for n in ray.nodes() if n["Alive"]}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_an_object_store_outage_is_ridden_out_or_fails_cleanly(ray_cluster, tmp_path: Path, synthetic_lake,
                                                               model_uri: str) -> None:
    """The S3 server stops for 4 s while images are being read, then comes back on the same port
    with the same buckets (moto keeps its state in-process). pyarrow's retries (8 attempts with
    back-off, storage.py) should carry the run through; if they do not, the run must fail with
    nothing committed. Never: rows that say "endpoint unreachable" in a committed dataset."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        client = boto3.client("s3", endpoint_url=endpoint)
        client.create_bucket(Bucket="outage")
        local = synthetic_lake(30, labelled=False)
        for file in sorted(local.glob("*.jpg")):
            client.upload_file(str(file), "outage", f"lake/{file.name}")
        config = LabelConfig(input="s3://outage/lake", model=model_uri, output="s3://outage/labels",
                             endpoint_url=endpoint, batch_size=10, rows_per_file=10)
        run = _Run(config)
        # Stop as soon as the pipeline starts (write_parquet makes _staging/<run_id>/ first, after
        # the driver's own checks): the reads of the images then meet the outage.
        run_folder = re.compile(r"^labels/_staging/\d{8}T\d{6}Z-")
        run.wait_until(lambda: any(run_folder.match(o["Key"]) for o in client.list_objects_v2(
            Bucket="outage", Prefix="labels/_staging/").get("Contents", [])), "pipeline start")
        server.stop()
        time.sleep(4)
        assert run.thread.is_alive(), "the run finished before the outage ended: it proves nothing"
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
        result = run.join()

        objects = [o["Key"] for o in client.list_objects_v2(Bucket="outage", Prefix="labels/").get("Contents", [])]
        committed = [k for k in objects if not k.startswith("labels/_") and k != "labels/"] + \
                    [k for k in objects if k == "labels/_SUCCESS"]
        if "error" in result:  # a clean failure: a one-line reason, nothing committed
            assert isinstance(result["error"], (JobError, UsageError)), repr(result["error"])
            assert committed == []
            return
        fs, path = storage.arrow_filesystem(config.output, StorageConfig(endpoint_url=endpoint))
        table = pq.read_table(path, filesystem=fs)
        assert sorted(table["path"].to_pylist()) == sorted(f"s3://outage/lake/{p.name}" for p in local.glob("*.jpg"))
        assert table["error"].null_count == table.num_rows, set(table["error"].to_pylist())
        assert "labels/_SUCCESS" in objects and not any("_staging" in k or "_COMMITTING" in k for k in objects)
    finally:
        server.stop()


def test_a_store_that_stays_down_fails_the_batch_not_the_rows() -> None:
    """After the SDK's retries an unreachable endpoint is the store's fault, not the file's: it
    fails the decode batch (and so the run, uncommitted) instead of becoming error rows that
    --incremental would never label again. A missing object is still a row error."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead = StorageConfig(endpoint_url=f"http://127.0.0.1:{sock.getsockname()[1]}", max_attempts=1)
        with pytest.raises(JobError, match=r"^s3://bucket/a\.jpg: endpoint unreachable \(after retries\)"):
            read_batch(["s3://bucket/a.jpg"], dead, 32)


@pytest.mark.slow
def test_a_store_that_stays_down_fails_the_run_with_nothing_committed(ray_cluster, tmp_path: Path,
                                                                      model_uri: str, capsys) -> None:
    """End to end: a local manifest of S3 paths behind an endpoint where nothing listens. Each
    read is retried (--max-attempts 3: about a second of back-off, not the default's ~45 s), then
    the run fails with one clear line and exit code 1."""
    output = tmp_path / "out"
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("path\n" + "".join(f"s3://bucket/img-{i}.jpg\n" for i in range(10)))  # one batch
    port = _free_port()
    code = main(["label", "--manifest", str(manifest), "--model", model_uri, "--output", str(output),
                 "--endpoint-url", f"http://127.0.0.1:{port}", "--batch-size", "10", "--max-attempts", "3"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert err[-1].startswith("distcls label: failed: s3://bucket/img-") and "endpoint unreachable" in err[-1]
    assert not (output / "_SUCCESS").exists() and not list(output.glob("*.parquet"))


def test_an_output_below_a_regular_file_is_a_clear_error_before_any_work(tmp_path: Path, synthetic_lake,
                                                                          model_uri: str, capsys) -> None:
    """(Tests run as root, for whom a chmod'ed folder is still writable: a path below a regular
    file cannot be written by anyone.)"""
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a folder")
    output = blocker / "out"
    started = time.monotonic()
    code = main(["label", "--input", str(synthetic_lake(1, labelled=False)), "--model", model_uri,
                 "--output", str(output)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith(f"distcls label: error: cannot write {output}/") and len(err.splitlines()) == 1
    assert "Not a directory" in err and blocker.read_text() == "not a folder"
    assert time.monotonic() - started < 10  # refused before Ray or any labeling


def test_an_output_in_a_missing_bucket_is_a_clear_error_before_any_work(s3_bucket: str, upload_folder,
                                                                         synthetic_lake, model_uri: str,
                                                                         capsys) -> None:
    lake = upload_folder(synthetic_lake(1, labelled=False), f"{s3_bucket}/lake")
    started = time.monotonic()
    code = main(["label", "--input", lake, "--model", model_uri, "--output", "s3://no-such-bucket-7f3a/labels"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert err == "distcls label: error: cannot write s3://no-such-bucket-7f3a/labels/_LOCK: bucket does not exist"
    assert time.monotonic() - started < 10
    assert "no-such-bucket-7f3a" not in [b["Name"] for b in boto3.client("s3").list_buckets()["Buckets"]]
