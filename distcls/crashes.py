"""Files that kill the process decoding them (a decoder that segfaults, an allocation the OS kills
the worker for) become error rows instead of being retried forever.

Ray Data retries without bound: map_batches gives its actors ``max_restarts=-1`` and
``max_task_retries=-1`` and its tasks ``max_retries=-1`` (Ray 2.60:
``ActorPoolMapOperator._apply_default_remote_args``, ``ray/data/_internal/remote_fn.py``), so a
batch holding such a file kills a fresh actor again and again. Here one small actor per run (the
registry) remembers, per batch, whether its last attempt finished decoding. A batch started again
without having finished is decoded carefully: one file at a time, each noted in the registry
before it is read. When a careful attempt dies too, the next one finds the file that was in flight
and gives it the row ``crashed the decoder`` (kind ``corrupt``) without reading it, as every later
batch of the run does. A batch thus
costs at most two attempts more than it holds such files, and a batch that never crashes costs
two calls to the registry.
"""
from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import ray
from ray.actor import ActorHandle

from distcls import images
from distcls.errors import JobError
from distcls.runtime import on_this_node

# Careful attempts that died with no file in flight (between files: not a file's fault) before the
# batch is given up on, failing the run instead of being retried forever.
_BLIND_DEATHS = 2
# Unreadable files a registry counts per scope (CrashRegistry.left_out): 2-13 MB for paths of 60 B to 1 KiB.
MAX_NOTED = 10_000


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)
class CrashRegistry:
    """Per batch (a digest of its paths): whether an attempt is open and the file a careful attempt
    is reading; for the run, the files that were being read when an attempt died. Those are skipped
    by every later batch, not only their own: training cuts its batches differently from epoch to
    epoch (Ray Data joins a split's short last block to the next one, drawn anew each epoch)."""

    def __init__(self) -> None:
        self._batches: dict[str, dict[str, Any]] = {}
        self._crashed: list[str] = []
        self._unreadable: dict[str, dict[str, str]] = {}  # per scope: path -> its first error
        self._overflowed: set[str] = set()  # scopes that dropped more than MAX_NOTED files
        self._read: set[str] = set()  # scopes that decoded a batch: their counts are known

    def left_out(self, scope: str, failures: list[tuple[str, str]]) -> None:
        """Note files a decode stage dropped, as (path, error): training skips what does not decode,
        and only the workers' logs (--verbose) named them; the driver tells the total (``unreadable``).
        At most MAX_NOTED files a scope: this actor lives beside the driver, often on a small head node.
        A restarted registry has forgotten them (as it has the crashes): its counts are lower bounds."""
        noted = self._unreadable.setdefault(scope, {})
        for path, error in failures:
            if len(noted) < MAX_NOTED or path in noted:
                noted.setdefault(path, error)
            else:
                self._overflowed.add(scope)

    def unreadable(self, scopes: list[str]) -> tuple[int | None, bool, str | None]:
        """(distinct files noted under any of ``scopes``, None when none of them decoded a batch;
        whether more were left unnoted; the first by path with its error): a file counts once
        however many epochs, batches or scopes dropped it."""
        noted = {path: error for scope in scopes for path, error in self._unreadable.get(scope, {}).items()}
        first = min(noted, default=None)
        count = len(noted) if noted or self._read & set(scopes) else None
        return count, bool(self._overflowed & set(scopes)), (None if first is None else f"{first}: {noted[first]}")

    def begin(self, key: str, scope: str = "") -> dict[str, Any]:
        """Start an attempt: ``careful`` when the last attempt died, ``crashed`` the files not to read."""
        self._read.add(scope)
        batch = self._batches.setdefault(key, {"open": False, "careful": False, "in_flight": None, "blind": 0})
        died = batch["open"]
        if died and batch["in_flight"] is not None:
            self._crashed.append(batch["in_flight"])
        elif died and batch["careful"]:
            batch["blind"] += 1
        batch.update(open=True, careful=died, in_flight=None)
        return {"careful": died, "crashed": list(self._crashed), "give_up": batch["blind"] >= _BLIND_DEATHS}

    # .get and pop: an attempt overlapping another at the same batch (a restarted execution's, say)
    # may find it finished and forgotten.
    def note(self, key: str, path: str) -> None:
        if key in self._batches:
            self._batches[key]["in_flight"] = path

    def done(self, key: str) -> None:
        self._batches.pop(key, None)


def start_registry() -> ActorHandle:
    """A registry for one run, on the driver's node (``runtime.on_this_node``)."""
    return CrashRegistry.options(scheduling_strategy=on_this_node()).remote()


def read_batch(registry: ActorHandle, paths: list[str], sizes: list[int | None], threads: int, scope: str = "",
               **read_args: Any) -> dict[str, np.ndarray]:
    """``images.read_batch`` of ``paths``, as an attempt recorded in ``registry``: the same columns,
    with files that killed an earlier attempt as ``corrupt`` rows that were not read again. Attempts
    at the same paths must not overlap (a second one would take the first for dead): batches that
    two readers may decode at once are told apart by ``scope``."""
    key = hashlib.blake2b("\n".join([scope, *paths]).encode(), digest_size=16).hexdigest()
    plan = ray.get(registry.begin.remote(key, scope))
    if plan["give_up"]:
        raise JobError(f"a batch of {len(paths)} images from {paths[0]} keeps killing its worker outside any "
                       "one file's read; nothing was committed")
    crashed = set(plan["crashed"])
    keep = [i for i, path in enumerate(paths) if path not in crashed]
    note = (lambda path: ray.get(registry.note.remote(key, path))) if plan["careful"] else None
    got = images.read_batch([paths[i] for i in keep], sizes=[sizes[i] for i in keep],
                            threads=1 if plan["careful"] else threads, before_read=note, **read_args)
    ray.get(registry.done.remote(key))
    if not crashed:
        return got
    return _with_crashed_rows(got, keep, paths)


def _with_crashed_rows(got: dict[str, np.ndarray], keep: list[int], paths: list[str]) -> dict[str, np.ndarray]:
    """``got`` (rows ``keep`` of ``paths``) widened to every path, the others as crashed rows."""
    n = len(paths)
    full = {
        "image": np.zeros((n, *got["image"].shape[1:]), dtype=np.uint8),
        "width": np.full(n, -1, dtype=np.int32), "height": np.full(n, -1, dtype=np.int32),
        "error": np.array([f"{path}: crashed the decoder" for path in paths], dtype=object),
        "error_kind": np.array(["corrupt"] * n, dtype=object),
    }
    for name, column in full.items():
        column[keep] = got[name]
    return full
