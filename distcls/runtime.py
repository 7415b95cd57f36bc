"""Connecting to Ray: the cluster at $RAY_ADDRESS when set (``ray job submit`` sets it; ``auto``
joins a ``ray start`` cluster on this machine), else a local Ray started in-process with this
machine's CPUs."""
from __future__ import annotations

import logging
import os
import socket

import ray

from distcls.errors import UsageError


def ensure_ray() -> None:
    """Connect once per process. Raises UsageError naming RAY_ADDRESS when that cluster is unreachable."""
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        _probe(address)
    try:
        if address:
            ray.init(address=address, logging_level=logging.WARNING)
        else:
            # "local", not Ray's default: a Ray someone left running here must not be joined silently.
            ray.init(address="local", include_dashboard=False, logging_level=logging.WARNING)
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


def cluster_cpus() -> int:
    return int(ray.cluster_resources().get("CPU", 0))


def cluster_gpus() -> int:
    return int(ray.cluster_resources().get("GPU", 0))
