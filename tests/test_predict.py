"""The shared inference stage: actor-pool sizing on fixed and autoscaling clusters, the flags'
usage errors, and the worker-side GPU check (no Ray needed: the cluster's answers are stubbed)."""
from __future__ import annotations

import pytest
import ray

from distcls import predict, runtime
from distcls.artifact import ModelInfo
from distcls.cli import main
from distcls.config import EvaluateConfig, LabelConfig
from distcls.errors import JobError

INFO = ModelInfo(arch="simple_cnn", classes=["a", "b"], image_size=32, mean=(0.5,) * 3, std=(0.25,) * 3)
GiB = 2**30


def _cluster(monkeypatch: pytest.MonkeyPatch, nodes: list[dict[str, float]], autoscaling: bool,
             limits: dict[str, float] | None = None) -> None:
    """Stub what the sizing asks Ray: the live nodes' resources, whether an autoscaler runs, its maximum."""
    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True, "Resources": r} for r in nodes])
    monkeypatch.setattr(runtime, "autoscaling", lambda: autoscaling)
    monkeypatch.setattr(runtime, "max_resources", lambda: limits)
    monkeypatch.setattr(runtime, "cluster_cpus", lambda: int(sum(r.get("CPU", 0) for r in nodes)))


def _pool(rows: int = 100_000, **flags) -> predict.Pool:
    return predict.pool(LabelConfig(input="lake", model="m", output="out", **flags), INFO, rows)


HEAD = {"CPU": 0, "memory": 8 * GiB}
WORKER = {"CPU": 4, "memory": 16 * GiB}


def test_a_fixed_cluster_gets_a_fixed_pool_that_fills_it(monkeypatch) -> None:
    _cluster(monkeypatch, [HEAD, WORKER, WORKER], autoscaling=False)
    assert (_pool().min_actors, _pool().max_actors) == (8, 8)
    assert (_pool(rows=300).min_actors, _pool(rows=300).max_actors) == (2, 2)  # no more actors than batches
    _cluster(monkeypatch, [{"CPU": 2, "memory": 16 * GiB}], autoscaling=False)
    assert _pool(cpus_per_actor=1).max_actors == 2 and _pool(cpus_per_actor=0.5).max_actors == 4
    _cluster(monkeypatch, [{"CPU": 8, "memory": 4 * GiB}], autoscaling=False)
    assert _pool().max_actors == 3  # memory binds first: ~1 GiB per actor by default


def test_an_autoscaling_cluster_starts_with_what_fits_and_may_grow(monkeypatch) -> None:
    _cluster(monkeypatch, [HEAD], autoscaling=True)  # no worker nodes yet
    pool = _pool()
    assert (pool.min_actors, pool.max_actors) == (1, 64)
    _cluster(monkeypatch, [HEAD, WORKER], autoscaling=True)
    assert (_pool().min_actors, _pool().max_actors) == (4, 64)
    _cluster(monkeypatch, [HEAD], autoscaling=True, limits={"CPU": 10, "memory": 100 * GiB})
    assert (_pool().min_actors, _pool().max_actors) == (1, 10)  # the autoscaler reported how far it grows


def test_flags_override_the_defaults(monkeypatch) -> None:
    _cluster(monkeypatch, [HEAD, WORKER], autoscaling=False)
    assert (_pool(min_actors=6).min_actors, _pool(min_actors=6).max_actors) == (6, 6)
    assert (_pool(max_actors=2).min_actors, _pool(max_actors=2).max_actors) == (2, 2)
    assert (_pool(concurrency=3).min_actors, _pool(concurrency=3).max_actors) == (3, 3)
    pool = _pool(min_actors=1, max_actors=5, cpus_per_actor=2, memory_per_actor=0)
    assert (pool.min_actors, pool.max_actors, pool.cpus, pool.memory, pool.decode_memory) == (1, 5, 2, 0, 0)


def test_gpu_pools_count_gpus_and_reserve_memory_for_decoding(monkeypatch) -> None:
    _cluster(monkeypatch, [HEAD, {"CPU": 8, "GPU": 2, "memory": 64 * GiB}], autoscaling=False)
    pool = _pool(gpu=True)
    assert (pool.min_actors, pool.max_actors, pool.gpus, pool.cpus, pool.memory) == (2, 2, 1, 1, 0)
    assert pool.decode_memory > GiB  # the decode tasks hold the batches
    assert _pool(gpu=True, gpus_per_actor=0.5).max_actors == 4
    _cluster(monkeypatch, [HEAD], autoscaling=True)  # GPU nodes on demand only
    pool = _pool(gpu=True)
    assert (pool.min_actors, pool.max_actors, pool.cpus) == (1, 64, 0)  # no CPUs to leave to decoding yet


@pytest.mark.parametrize("command", ["label", "evaluate"])
@pytest.mark.parametrize(("flags", "message"), [
    (["--max-actors", "0"], "--max-actors must be at least 1, got 0"),
    (["--min-actors", "3", "--max-actors", "2"], "--min-actors 3 is above --max-actors 2"),
    (["--gpus-per-actor", "0.5"], "--gpus-per-actor needs --gpu"),
    (["--gpu", "--gpus-per-actor", "0"], "--gpus-per-actor must be above 0"),
    (["--cpus-per-actor", "0"], "--cpus-per-actor must be above 0 (0 only with --gpu)"),
    (["--memory-per-actor", "-1"], "--memory-per-actor must be a number of bytes"),
])
def test_bad_sizing_flags_are_usage_errors_naming_the_flag(command, flags, message, tmp_path, capsys) -> None:
    inputs = ["--input", str(tmp_path), "--output", str(tmp_path / "out")] if command == "label" else ["--input", str(tmp_path)]
    assert main([command, *inputs, "--model", str(tmp_path / "model"), *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_concurrency_is_min_and_max_and_cannot_be_mixed_with_them(tmp_path, capsys) -> None:
    code = main(["label", "--input", str(tmp_path), "--output", str(tmp_path / "o"), "--model", "m",
                 "--concurrency", "2", "--max-actors", "4"])
    assert code == 2 and "--concurrency (deprecated) and --min-actors/--max-actors" in capsys.readouterr().err


def test_evaluate_has_the_same_pool_flags_as_label() -> None:
    pool_fields = {"gpu", "min_actors", "max_actors", "cpus_per_actor", "gpus_per_actor", "memory_per_actor"}
    assert pool_fields <= set(EvaluateConfig.model_fields) and pool_fields <= set(LabelConfig.model_fields)


def test_an_actor_given_a_gpu_without_cuda_fails_naming_its_node(ray_local, monkeypatch) -> None:
    """The worker-side check, in a real Ray task: never a silent CPU run."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")

    @ray.remote
    def device() -> str:
        return runtime.require_cuda("a test task")

    with pytest.raises(ray.exceptions.RayTaskError) as failed:
        ray.get(device.remote())
    assert isinstance(failed.value.as_instanceof_cause(), JobError)
    node = ray.get_runtime_context().get_node_id()
    assert "--gpu: a test task on node" in str(failed.value) and node in str(failed.value)
    assert "no usable CUDA device" in str(failed.value)
