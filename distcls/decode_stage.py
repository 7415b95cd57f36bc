"""Ray Data's decode stage of training: rows of (path, label) in, the images that decode out,
with their labels; a file that does not decode is logged and dropped. A streamed split decodes in
a pool of Decoder actors, its stats sample in tasks; a cached split is decode_rows in each training
worker's own tasks (train._fill_cache).

Nothing here imports torch (nor the training module): a decoder process starts with each
execution, twice an epoch when streaming, and in distcls.train it imported torch and Ray Train
first: 4.8 s and 1.05 GB resident here, against 0.9 s and 0.14 GB for this module
(`/usr/bin/time -f "%e s %M KB" python -c "import distcls.train"`)."""
from __future__ import annotations

import logging
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa
import ray
from ray.actor import ActorHandle
from ray.data._internal.execution.execution_callback import ExecutionCallback

from distcls import crashes
from distcls.config import StorageConfig, TrainConfig
from distcls.images import read_batch

ROWS_PER_BLOCK = 256  # one decode call; small blocks reshuffle well and keep a block's pixels small
READ_THREADS = 8  # files a decode call reads at once, overlapping object-store latency
CHECK_IMAGES = 16  # images of a split decoded at a time, at least, before the run (count_decodable)
STEP_S, IDLE_STEP_S = 0.02, 0.1  # PacedScheduling: the shortest steps of Ray Data's executor loop

log = logging.getLogger(__name__)


class Decoder:
    """Ray Data's decode stage, run by a fixed pool of actors that live for an execution. Run as
    tasks, a decode worker idle for a second (whenever the stream window is full) was ended by Ray,
    which kills idle task workers beyond one per CPU, and the next block started a new one (then
    importing torch with distcls.train, 3.4 CPU-s): 10 worker starts in a 150 s streamed epoch here. A pool that
    may shrink did the same when Ray Data removed its idle actors (BENCHMARKS.md, "Training on
    photos")."""

    def __init__(self, **settings: Any) -> None:
        self.settings = settings

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return decode_yielding(batch, **self.settings)


def decode_yielding(batch: dict[str, np.ndarray], storage_config: StorageConfig, size: int,
                     crash_registry: ActorHandle | None = None, scope: str = "") -> dict[str, np.ndarray]:
    """decode_rows in a thread at nice 19, below the nice 15 Ray gives its workers, so that
    decoding leans on the cores the training workers leave idle (waiting on each other's
    gradients) rather than on one worker's core: the data-parallel steps run in lock step, so a
    decode that preempts one worker stalls all of them at the next all-reduce. On a core it
    shares with a worker it gets ~30% (the kernel's weights for nice 19 and 15) instead of half;
    against nice-0 work outside Ray, ~1.4% instead of ~3.4%, so a node busy with other programs
    decodes more slowly. If decoding falls behind, the workers wait for batches and it gets the
    CPU. The thread (and the read threads it starts) is new for every block: a nice value can be
    raised but not lowered back. Linux only: elsewhere a thread id is not a ``setpriority``
    target; there, or where the call is refused, decoding runs at the worker's priority."""
    if not sys.platform.startswith("linux"):
        return decode_rows(batch, storage_config, size, crash_registry, scope)
    with ThreadPoolExecutor(1, thread_name_prefix="distcls-decode", initializer=_lowest_priority) as thread:
        return thread.submit(decode_rows, batch, storage_config, size, crash_registry, scope).result()


def _lowest_priority() -> None:
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except OSError:  # a sandbox that refuses it: decode at the worker's priority
        pass


def decode_rows(batch: dict[str, np.ndarray], storage_config: StorageConfig, size: int,
                 crash_registry: ActorHandle | None = None, scope: str = "") -> dict[str, np.ndarray]:
    """The images that decode, with their labels; the others are logged and dropped. With a
    ``crash_registry`` (crashes.py), a file that killed an attempt at this batch is dropped unread."""
    paths = batch["path"].tolist()
    decoded = (read_batch(paths, storage_config, size, threads=READ_THREADS) if crash_registry is None else
               crashes.read_batch(crash_registry, paths, [None] * len(paths), threads=READ_THREADS, scope=scope,
                                  storage_config=storage_config, size=size))
    ok = np.array([e is None for e in decoded["error"]], dtype=bool)
    failures = [(str(path), error.removeprefix(f"{path}: ")) for path, error in zip(batch["path"][~ok], decoded["error"][~ok])]
    for path, error in failures:
        log.warning(f"skipping unreadable {'held-out' if scope == 'val' else 'training'} image {path}: {error}")
    if failures and crash_registry is not None:
        ray.get(crash_registry.left_out.remote(scope, failures))
    return {"image": decoded["image"][ok], "label": batch["label"][ok].astype(np.int64)}


def count_decodable(paths: pa.ChunkedArray, config: TrainConfig, crash_registry: ActorHandle,
                    enough: int) -> tuple[int, str | None, str | None]:
    """(how many of ``paths`` decode, up to ``enough``; the first failure; the first failure of a
    block that failed for passing reasons only, where the check stops: a store that cannot be read).
    Read in blocks: one when the lake is sound. The check train runs before anything is written."""
    decoded, failure = 0, None
    size = min(ROWS_PER_BLOCK, max(CHECK_IMAGES, enough))
    for start in range(0, len(paths), size):
        chunk = paths.slice(start, size).to_pylist()
        got = crashes.read_batch(crash_registry, chunk, [None] * len(chunk), threads=READ_THREADS, scope="check",
                                 storage_config=config.storage(), size=config.image_size)
        decoded += sum(error is None for error in got["error"])
        failed = [error if error.startswith(path) else f"{path}: {error}"
                  for path, error in zip(chunk, got["error"]) if error is not None]
        failure = failure or (failed[0] if failed else None)
        if decoded >= enough:
            break
        if len(failed) == len(chunk) and set(got["error_kind"]) == {"transient"}:
            return decoded, failure, failed[0]
    return decoded, failure, None


class PacedScheduling(ExecutionCallback):
    """Lets a step of Ray Data's executor loop start at most every STEP_S, or every IDLE_STEP_S while
    there is nothing to wait for: no task running, or an operator that may not read its finished
    tasks' output.

    Ray Data 2.60 spins once the stream window is full: with every block decoded and the budget
    used, no task runs and the loop has nothing to block on; with a finished decode task whose
    block the budget does not let it read, ``ray.wait`` returns at once. Step after step until the
    workers consume: in Ray Train's SplitCoordinator ~half a core taken from two training workers
    for every streamed epoch (BENCHMARKS.md, "Training on photos"). Turning the budgets off stops
    the spin but also every bound on decoding ahead (2.1 GB held for a 50,000-photo run). In a full
    window only the workers taking a block end the wait, and they hold seconds of batches, so
    noticing it 0.1 s later costs nothing. ``ray.wait`` itself blocks up to 0.1 s for the running
    tasks, so other steps are seldom slowed: those that find their tasks all finished (20 ms at
    most), and the idle steps of an execution's start and end (the block order shuffled before any
    decode task is sent, the last blocks handed out): ~0.2-0.4 s per execution, an epoch's train
    and val each being one.

    It reads the executor's topology and each operator's output-backpressure flag, which Ray Data
    sets every step (``process_completed_tasks``): private names, checked by a test against the
    installed Ray. Without them it paces every step at STEP_S."""

    def __init__(self) -> None:
        self._last_step = time.perf_counter()

    def on_execution_step(self, executor: Any) -> None:
        wait = self._last_step + (IDLE_STEP_S if self.idle(executor) else STEP_S) - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        self._last_step = time.perf_counter()

    @staticmethod
    def idle(executor: Any) -> bool:
        """Whether the executor has nothing to wait for (see the class)."""
        operators = list(getattr(executor, "_topology", None) or ())
        running = [getattr(op, "get_active_tasks", lambda: ["unknown"])() for op in operators]
        return bool(operators) and (not any(running) or any(
            getattr(op, "_in_task_output_backpressure", False) for op in operators))
