"""label and evaluate on a cluster that starts with a 0-CPU head and no worker nodes: the inference
actor pool asks for nodes and the real autoscaler (Ray's fake multi-node provider) adds them; --gpu
(label, train) is accepted because the autoscaler can add a GPU node, and as that node has no CUDA
the run fails with one line naming it. One cluster for the file: later tests may reuse its nodes."""
from __future__ import annotations

import json
import time

import pyarrow.parquet as pq
import pytest
import torch

from distcls.cli import main

# Small batches over a 60-image lake: enough of them to keep two or three actors busy.
POOL = ["--batch-size", "10", "--min-actors", "2", "--max-actors", "3", "--memory-per-actor", "0"]


@pytest.fixture()
def on_autoscaling_cluster(autoscaling_cluster: str, no_ray, monkeypatch: pytest.MonkeyPatch):
    """The CLI in this process connects to the autoscaling cluster (as `ray job submit` would)."""
    import ray

    monkeypatch.setenv("RAY_ADDRESS", autoscaling_cluster)
    yield
    ray.shutdown()


def _inference_nodes() -> set[str]:
    """Ids of the nodes that ran inference actors (MapWorker(MapBatches(Predictor))) in this job."""
    import ray
    from ray._private import state

    job = ray.get_runtime_context().get_job_id()
    return {a["Address"]["NodeID"] for a in state.actors().values()
            if "(Predictor)" in a["ActorClassName"] and a["JobID"] == job}


def _worker_nodes(resource: str = "CPU") -> set[str]:
    import ray

    return {n["NodeID"] for n in ray.nodes()
            if n["Alive"] and n["Resources"].get(resource) and "node:__internal_head__" not in n["Resources"]}


def test_label_pool_grows_past_its_minimum_onto_nodes_the_autoscaler_adds(
        on_autoscaling_cluster, autoscaling_cluster: str, synthetic_lake, tiny_model, tmp_path, capsys) -> None:
    """--min-actors 1 --max-actors 2: Ray Data starts one inference actor and adds the second on
    its own. It adds actors only within the resources the cluster has now, and asks for nodes
    itself only after its CPUs were over half busy for 10 s (longer than this small lake takes),
    so the autoscaler is first asked for two 1-CPU nodes (as a busy earlier run would have)."""
    import ray
    from ray.autoscaler.sdk import request_resources

    ray.init(address=autoscaling_cluster)
    request_resources(bundles=[{"CPU": 1}] * 2)
    deadline = time.time() + 180
    while len(_worker_nodes()) < 2 and time.time() < deadline:
        time.sleep(1)
    request_resources(bundles=[])
    assert len(_worker_nodes()) == 2, "the autoscaler did not add two nodes in 180 s"

    lake = synthetic_lake(6, labelled=False)
    output = tmp_path / "labels"
    code = main(["label", "--input", str(lake), "--model", str(tiny_model), "--output", str(output),
                 "--batch-size", "2", "--min-actors", "1", "--max-actors", "2", "--memory-per-actor", "0"])
    assert code == 0, capsys.readouterr().err[-3000:]

    rows = pq.read_table(output)
    assert sorted(rows["path"].to_pylist()) == sorted(str(p) for p in lake.rglob("*.jpg"))  # each image once
    assert rows["error"].null_count == rows.num_rows == 60
    used = _inference_nodes()
    assert len(used) == 2 and used <= _worker_nodes(), used  # the pool grew to 2 actors, one per worker node


def test_evaluate_runs_on_nodes_the_autoscaler_adds(on_autoscaling_cluster, synthetic_lake, tiny_model,
                                                    capsys) -> None:
    code = main(["evaluate", "--input", str(synthetic_lake(6)), "--model", str(tiny_model), *POOL])
    out = capsys.readouterr().out
    assert code == 0
    summary = json.loads(out.strip().splitlines()[-1])
    assert (summary["images"], summary["errors"]) == (60, 0)  # the confusion matrix holds every image once
    used = _inference_nodes()
    assert len(used) >= 2 and used <= _worker_nodes(), used


def test_gpu_is_accepted_and_a_node_without_cuda_fails_the_run_naming_it(
        on_autoscaling_cluster, synthetic_lake, tiny_model, tmp_path, capsys) -> None:
    """No GPU node at the start: --gpu is accepted because the autoscaler launches one; its GPU is
    a fake one (no CUDA here), so the run fails with one line naming that node and commits nothing."""
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the fake GPU node would work")
    output = tmp_path / "labels"
    code = main(["label", "--input", str(synthetic_lake(6, labelled=False)), "--model", str(tiny_model),
                 "--output", str(output), "--gpu", "--batch-size", "10", "--memory-per-actor", "0"])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 1
    gpu_nodes = _worker_nodes("GPU")
    assert len(gpu_nodes) == 1, gpu_nodes  # launched by the autoscaler for this run
    assert last.startswith("distcls label: failed: --gpu: an inference actor on node ")
    assert next(iter(gpu_nodes)) in last and "no usable CUDA device" in last and "nothing was committed" in last
    assert not output.exists() or not [p for p in output.rglob("*") if "_staging" not in p.parts]


def test_train_gpu_is_accepted_and_a_gpu_node_without_cuda_fails_the_run_naming_it(
        on_autoscaling_cluster, synthetic_lake, tmp_path, capsys) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the fake GPU node would work")
    code = main(["train", "--input", str(synthetic_lake(2)), "--output", str(tmp_path / "run"), "--gpu",
                 "--workers", "1", "--epochs", "1", "--max-failures", "0", "--arch", "simple_cnn",
                 "--val-fraction", "0.5"])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 1, last
    gpu_nodes = _worker_nodes("GPU")
    assert len(gpu_nodes) == 1 and next(iter(gpu_nodes)) in last, last
    assert last.startswith("distcls train: failed: --gpu: a training worker on node "), last
    assert not (tmp_path / "run" / "model").exists()


def test_train_runs_its_workers_on_nodes_the_autoscaler_adds(on_autoscaling_cluster, synthetic_lake, tmp_path,
                                                             capsys) -> None:
    """Two 1-CPU workers on a cluster of 1-CPU nodes: each needs a node of its own, and the decode
    actors that stream the lake into them every epoch need CPUs beside them."""
    from ray._private import state

    code = main(["train", "--input", str(synthetic_lake(4)), "--output", str(tmp_path / "run"), "--workers", "2",
                 "--epochs", "2", "--batch-size", "8", "--arch", "simple_cnn", "--val-fraction", "0.25",
                 "--max-failures", "0", "--cache", "none"])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-3000:]
    summary = json.loads(captured.out.strip().splitlines()[-1])
    epochs = [json.loads(line)["epoch"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2] and summary["epoch"] in epochs  # the artifact is the best epoch's
    assert (tmp_path / "run" / "model" / "model.json").exists()
    workers = {a["Address"]["NodeID"] for a in state.actors().values() if a["ActorClassName"] == "RayTrainWorker"}
    assert len(workers) >= 2 and workers <= _worker_nodes(), workers  # autoscaled nodes, never the head
