"""Connecting to Ray: the cluster at $RAY_ADDRESS when set (``ray job submit`` sets it; ``auto``
joins a ``ray start`` cluster on this machine), else a local Ray started in-process with this
machine's CPUs."""
from __future__ import annotations

import ctypes
import functools
import json
import os
import socket
import time

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from distcls import console
from distcls.errors import JobError, UsageError, carried

# How long --gpu waits for an autoscaler to start launching a GPU node before calling it unable to.
# Ray's autoscaler acts on a request within an update interval (5 s by default).
GPU_PROBE_S = 30.0


def ensure_ray() -> None:
    """Connect once per process. Raises UsageError naming RAY_ADDRESS when that cluster is unreachable.
    Without --verbose, what Ray's workers and actors print or log stays in their log files on the
    nodes (``log_to_driver``): per-report dumps of Ray Train, its PlacementGroupCleaner's
    tracebacks, Ray Data's per-operator lines. Errors still reach the driver as exceptions, and
    Ray's own error messages (a worker killed for memory, a dead node) through its error channel."""
    console.quiet_ray()
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        _probe(address)
    settings = {"logging_level": console.ray_level(), "log_to_driver": console.verbose()}
    try:
        if address:
            ray.init(address=address, **settings)
        else:
            # "local", not Ray's default: a Ray someone left running here must not be joined silently.
            ray.init(address="local", include_dashboard=False, **settings)
    except (ConnectionError, RuntimeError, ValueError, TimeoutError) as exc:
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"Ray not reachable at RAY_ADDRESS={address}: {first}") from None


def _probe(address: str, timeout_s: float = 5.0) -> None:
    """Fail in seconds, not minutes: ray.init keeps retrying an address where nothing listens."""
    host_port = address.split("://", 1)[-1]
    if host_port in ("auto", "local") or ":" not in host_port:
        return
    host, _, port = host_port.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except (OSError, ValueError) as exc:
        raise UsageError(f"Ray not reachable at RAY_ADDRESS={address}: {exc}") from None


def on_this_node() -> NodeAffinitySchedulingStrategy:
    """Placement on this process's node. For the 0-CPU actors a run keeps beside its driver: a
    worker node may go away mid-run (an autoscaler scaling down), taking what they hold with it,
    while the run cannot outlive the driver's node anyway. For the 0-CPU tasks a training worker
    fills its cache with: they use the CPU it holds and waits with, not another node's. Hard: Ray
    places work that asks for no resources on a random node when its affinity is soft
    (ray-project/ray#25344 fixed only the hard case)."""
    return NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)


def cluster_cpus() -> int:
    return int(ray.cluster_resources().get("CPU", 0))


def cluster_gpus() -> int:
    return int(ray.cluster_resources().get("GPU", 0))


def autoscaling() -> bool:
    """Whether an autoscaler can add nodes to this cluster (KubeRay, ``ray up``, a fake multi-node
    cluster), as opposed to a fixed one (``ray start`` by hand, a local Ray).

    Ray 2.60 has no public API for this. Autoscaler v2 says so in the GCS; autoscaler v1 runs on
    every head, but without a cluster config it runs read-only, naming each node's type
    ``node_<node id>`` (``autoscaler/_private/util.py: format_readonly_node_type``) in the status
    it publishes, whereas a real one uses the config's type names. No status yet (a head seconds
    old) counts as fixed."""
    from ray.autoscaler.v2.utils import is_autoscaler_v2

    if is_autoscaler_v2(fetch_from_server=True):
        return True
    report = _autoscaler_status().get("autoscaler_report") or {}
    types = report.get("node_type_mapping") or {}
    return any(kind != f"node_{node}" for node, kind in types.items())


def max_resources() -> dict[str, float] | None:
    """The most of each resource the cluster can grow to, where its autoscaler reports its node
    types to the GCS (``ClusterConfig``; Ray's own v1/v2 autoscalers in 2.60 do not: then None)."""
    return ray._private.state.state.get_max_resources_from_cluster_config()


def can_get(bundle: dict[str, float], wait_s: float = GPU_PROBE_S) -> bool:
    """Whether some node has, or the autoscaler will add a node with, the resources of ``bundle``.

    A node that fits now, or the autoscaler's reported maximum, answers at once. Otherwise, on an
    autoscaling cluster, the autoscaler is asked for the bundle (``request_resources``) and the
    answer is yes as soon as it launches a node or a fitting node joins, no after ``wait_s``. The
    request is left in place on yes (the job needs that node next; Ray Data replaces the request
    with its own) and withdrawn on no.
    """
    if _fits_a_node(bundle):
        return True
    limits = max_resources()
    if limits is not None:
        return all(limits.get(name, 0) >= amount for name, amount in bundle.items())
    if not autoscaling():
        return False
    from ray.autoscaler.sdk import request_resources

    request_resources(bundles=[bundle])
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if _fits_a_node(bundle) or _launching():
            return True
        time.sleep(1)
    request_resources(bundles=[])
    return False


@functools.lru_cache(maxsize=1)
def native_bf16() -> bool:
    """Whether this node's CPU computes bfloat16 natively (AVX512-BF16 or AMX). There, autocast
    to bfloat16 nearly doubles the speed of convolutions (measured on this project's 2-core AMD
    EPYC: 1.84x for airbench); elsewhere oneDNN emulates it, slower than float32."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            flags = next((line.split() for line in cpuinfo if line.startswith("flags")), [])
    except OSError:  # not Linux
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


# glibc constants for mallopt(3).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def keep_freed_memory(limit: int = 1 << 30) -> bool:
    """Make this process's allocator keep freed blocks of up to ``limit`` bytes for reuse instead
    of handing them back to the OS; whether glibc took the setting. A training step allocates and
    frees activations of tens of MB; glibc serves those over its 32 MB threshold with a fresh mmap,
    whose pages the kernel faults in one by one (10,240 faults per 40 MB) every step. Only partly
    spared where the step runs in a thread other than the main one, as Ray Train's loop does: a
    thread's arena grows in heaps of 64 MB at most, so blocks that size and up are still mapped
    afresh. Measured (BENCHMARKS.md, "The allocator"): a 3-epoch CIFAR-10 run trained ~10% faster;
    the price is resident memory that stays at the step's high-water mark between steps. Not used
    for inference: its batches run in a thread too, where it kept 300-650 MB more per actor
    decoding large photos and sped nothing up. False outside glibc, or where glibc refuses the
    threshold (older releases cap it at 32 MB): then nothing is changed, since a trim threshold
    alone turns off glibc's own adaptive threshold and made small allocations slower."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, limit)) and bool(mallopt(_M_TRIM_THRESHOLD, limit))


def require_cuda(what: str) -> str:
    """Inside a Ray actor or Train worker that was given GPUs: the torch device to use, or JobError
    naming this node when torch finds no usable CUDA device (never a silent CPU run)."""
    import torch

    if torch.cuda.is_available():
        return "cuda"
    context = ray.get_runtime_context()
    raise JobError(f"--gpu: {what} on node {ray.util.get_node_ip_address()} (node id {context.get_node_id()}) was "
                   f"given GPU {','.join(map(str, ray.get_gpu_ids())) or '?'} but torch finds no usable CUDA device "
                   f"(torch {torch.__version__}, CUDA build {torch.version.cuda or 'none'})")


def require_cuda_on_a_gpu_node(what: str) -> None:
    """``require_cuda`` in a task on a GPU node (waiting for the autoscaler to add one, if need
    be): JobError naming that node when torch there finds no usable CUDA device."""
    probe = ray.remote(num_gpus=1, num_cpus=0, max_retries=0)(require_cuda)
    try:
        ray.get(probe.remote(what))
    except ray.exceptions.RayTaskError as exc:
        reason = carried(exc)
        if reason is None:
            raise
        raise reason from None


def _fits_a_node(bundle: dict[str, float]) -> bool:
    return any(node["Alive"] and all(node["Resources"].get(name, 0) >= amount for name, amount in bundle.items())
               for node in ray.nodes())


def _launching() -> bool:
    """Whether the autoscaler is launching nodes now."""
    from ray.autoscaler.v2.utils import is_autoscaler_v2

    if is_autoscaler_v2():
        from ray.autoscaler.v2.sdk import get_cluster_status

        status = get_cluster_status(ray.get_runtime_context().gcs_address)
        return bool(status.pending_launches or status.pending_nodes)
    report = _autoscaler_status().get("autoscaler_report") or {}
    return bool(report.get("pending_launches") or report.get("pending_nodes"))


def _autoscaler_status() -> dict:
    """The status autoscaler v1 publishes each update (what ``ray status`` prints)."""
    from ray._private.ray_constants import DEBUG_AUTOSCALING_STATUS
    from ray.experimental.internal_kv import _internal_kv_get

    raw = _internal_kv_get(DEBUG_AUTOSCALING_STATUS)
    return json.loads(raw) if raw else {}
