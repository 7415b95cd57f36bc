"""The inference stage of ``evaluate`` and ``label``: a table of paths -> Ray Data -> decode -> model
-> rows that the calling command shapes.

On CPUs each inference actor reads and decodes its own batches (threads overlap object-store GETs
and Pillow, both release the GIL) and runs the model with one torch thread per CPU it reserves:
decoding and inference then both use every core whichever is slower, and decoded pixels never cross
the object store. With --gpu, CPU tasks decode ahead of the GPU actors, which only run the model.

The actors form a pool of --min-actors to --max-actors (``ActorPoolStrategy(min_size, max_size)``):
Ray Data starts the minimum (actors that cannot be placed are resource demands the Ray autoscaler
launches nodes for), and grows the pool while blocks wait, but only within the resources the
cluster has now. It asks for more nodes itself (Ray 2.60's default ``RateBasedClusterAutoscaler``)
once the CPUs it has were over half busy on average over 10 s, at most every 10 s. So growth past
the minimum needs work that outlasts that, a node launch and an actor start: a large lake, not a
small one. A cluster that starts with no worker nodes gets them; a fixed one is filled from the start.

A file that cannot be read or decoded is a row with ``error`` set and never fails its batch; a store
unreachable after retries, or an actor given a GPU that torch cannot use, fails the run: JobError.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
import torch
from ray.actor import ActorHandle
from ray.data._internal.logical.interfaces import LogicalPlan
from ray.data._internal.logical.operators import FromBlocks
from ray.data._internal.stats import DatasetStats
from ray.data.extensions import ArrowTensorArray

from distcls import crashes, engines, images, runtime
from distcls.artifact import ModelInfo
from distcls.config import MAX_FILE_BYTES, InferenceConfig, StorageConfig
from distcls.errors import JobError, UsageError, carried
from distcls.inputs import Blocks, slices

log = logging.getLogger(__name__)

# (decoded batch, ok mask, probabilities of the ok rows, model info) -> the command's output rows.
# Runs in the actors, so it must pickle: a module-level function, or a functools.partial of one.
RowMaker = Callable[[pa.Table, np.ndarray, np.ndarray, ModelInfo], pa.Table]

_DECODE_THREADS = 8
# A decode worker holds Python, numpy, Pillow and torch (Ray measured ~450 MiB) plus its batches.
_DECODE_BASE_MEMORY = 2**30
# Default --max-actors on an autoscaling cluster whose autoscaler does not report how far it can
# grow (Ray's own in 2.60): enough to keep 64 CPUs or GPUs busy; the autoscaler's node limits
# (max_workers, maxReplicas) still bound what it launches.
_AUTOSCALE_MAX_ACTORS = 64
# Ray Data restarts a dead inference actor for ever by default (max_restarts=-1), re-running the
# batch that killed it each time. A file whose decoding kills the actor is marked after two
# attempts (crashes.py); anything else that keeps killing one actor fails the run after this many
# restarts of it, rather than looping. Lost nodes and killed workers restart far fewer times.
_ACTOR_RESTARTS = 8


@dataclass(frozen=True)
class Pool:
    """The inference actors: how many and what each reserves (bytes of memory, 0 = none)."""

    min_actors: int
    max_actors: int
    cpus: float
    gpus: float
    memory: int
    decode_memory: int

    def __str__(self) -> str:
        each = f"{self.cpus:g} CPU" + (f", {self.gpus:g} GPU" if self.gpus else "")
        each += f", {self.memory / 2**30:.1f} GiB" if self.memory else ""
        count = f"{self.min_actors}" if self.min_actors == self.max_actors else f"{self.min_actors}-{self.max_actors}"
        return f"{count} inference actors ({each} each)"


def check_usage(config: InferenceConfig) -> None:
    """UsageError, naming the flag, for sizing flags that cannot work; before any Ray work."""
    concurrency = getattr(config, "concurrency", None)
    if concurrency is not None and (config.min_actors is not None or config.max_actors is not None):
        raise UsageError("--concurrency (deprecated) and --min-actors/--max-actors cannot be combined; "
                         "use --min-actors N --max-actors N")
    for flag, value in (("--min-actors", config.min_actors), ("--max-actors", config.max_actors)):
        if value is not None and value < 1:
            raise UsageError(f"{flag} must be at least 1, got {value}")
    if config.min_actors and config.max_actors and config.min_actors > config.max_actors:
        raise UsageError(f"--min-actors {config.min_actors} is above --max-actors {config.max_actors}")
    if config.gpus_per_actor is not None and not config.gpu:
        raise UsageError("--gpus-per-actor needs --gpu")
    if config.gpus_per_actor is not None and config.gpus_per_actor <= 0:
        raise UsageError(f"--gpus-per-actor must be above 0, got {config.gpus_per_actor:g}")
    if config.cpus_per_actor is not None and (config.cpus_per_actor < 0 or (config.cpus_per_actor == 0 and not config.gpu)):
        raise UsageError(f"--cpus-per-actor must be above 0 (0 only with --gpu), got {config.cpus_per_actor:g}")
    if config.engine == "onnx" and config.gpu:
        raise UsageError("--engine onnx runs on CPUs only; drop --gpu, or use --engine torch for GPUs")
    if config.memory_per_actor is not None and config.memory_per_actor < 0:
        raise UsageError(f"--memory-per-actor must be a number of bytes, or 0 for no reservation, "
                         f"got {config.memory_per_actor}")


def check_gpus(config: InferenceConfig) -> None:
    """With --gpu, UsageError when the cluster has no GPU and cannot get one (see runtime.can_get)."""
    if not config.gpu:
        return
    bundle = {"GPU": config.gpus_per_actor or 1.0}
    if not runtime.can_get(bundle):
        raise UsageError("--gpu was given but the Ray cluster has no GPUs and its autoscaler launched no node with "
                         f"{bundle['GPU']:g} GPU within {runtime.GPU_PROBE_S:.0f} s; drop --gpu to run on CPUs")


def pool(config: InferenceConfig, info: ModelInfo, rows: int) -> Pool:
    """The actor pool for ``rows`` inputs: the flags where given, else defaults from the cluster.

    A fixed cluster gets a fixed pool of as many actors as fit its nodes. An autoscaling one gets
    at least what fits now (1 when it has no worker nodes yet: its pending demand makes the
    autoscaler add the first node) and at most what its autoscaler can reach, where it says,
    else ``_AUTOSCALE_MAX_ACTORS``. Never more actors by default than there are batches.
    """
    gpus = (config.gpus_per_actor or 1.0) if config.gpu else 0.0
    if config.cpus_per_actor is not None:
        cpus = config.cpus_per_actor
    else:  # a GPU actor on a one-CPU cluster would starve the decode tasks if it held the CPU
        cpus = 0.0 if config.gpu and runtime.cluster_cpus() < 2 else 1.0
    estimate = _DECODE_BASE_MEMORY + 4 * config.batch_size * 3 * info.image_size**2
    memory = config.memory_per_actor if config.memory_per_actor is not None else (0 if config.gpu else estimate)
    decode_memory = config.memory_per_actor if config.memory_per_actor is not None else estimate
    need = {"CPU": cpus, "GPU": gpus, "memory": memory}
    fit = sum(_fits(node["Resources"], need) for node in ray.nodes() if node["Alive"])
    if getattr(config, "concurrency", None):
        low = high = config.concurrency
    elif runtime.autoscaling():
        limits = runtime.max_resources()
        high = _fits(limits, need) if limits else max(fit, _AUTOSCALE_MAX_ACTORS)
        high = max(1, min(high, math.ceil(rows / config.batch_size)))
        low = max(1, min(fit, high))
    else:
        low = high = max(1, min(fit, math.ceil(rows / config.batch_size)))
    high = config.max_actors or max(high, config.min_actors or 1)
    low = config.min_actors or min(low, high)
    return Pool(low, high, cpus, gpus, memory, decode_memory)


def _fits(resources: dict[str, float], need: dict[str, float]) -> int:
    """How many actors of ``need`` fit in ``resources`` (one node, or the cluster's maximum)."""
    counts = [int(resources.get(name, 0) // amount) for name, amount in need.items() if amount > 0]
    return min(counts) if counts else 0


def _dataset(blocks: Blocks) -> ray.data.Dataset:
    """``ray.data.from_blocks`` for blocks already put: what it does after its own ``ray.put``
    (Ray's internal classes, as from_blocks uses them in Ray 2.60).
    Not ``from_arrow_refs``: that runs a Ray task per block just to read its metadata, which costs
    a fresh worker process (~1 s) before the pipeline starts and a task per 2,000 inputs."""
    context = ray.data.DataContext.get_current().copy()
    stats = DatasetStats(metadata={"FromBlocks": blocks.metadata}, parent=None)
    plan = LogicalPlan(FromBlocks(blocks.refs, blocks.metadata), context)
    return ray.data.dataset.MaterializedDataset(plan, context, stats)


@dataclass(frozen=True)
class Stage:
    """A last stage after the inference actors, on a pool of actors that reserve no CPU (so that
    it fits beside them): ``fn`` (a callable class, built with ``kwargs``) gets batches of
    ``batch_size`` rows, and what it returns is what ``predict`` yields."""

    fn: type
    kwargs: dict[str, Any]
    batch_size: int


def predict(inputs: pa.Table | Blocks, config: InferenceConfig, info: ModelInfo, to_rows: RowMaker,
            engine: dict[str, Any], max_pixels: int = 89_478_485, then: Stage | None = None) -> Iterator[pa.Table]:
    """``to_rows``' output for every row of ``inputs`` (a table, or blocks, with a ``path`` column,
    an optional ``error`` column preset for rows never to be read, and any columns ``to_rows``
    wants back), batch by batch as they finish, in no particular order, predicted by ``engine``
    (``engines.prepare``'s result, made on the driver before any Ray work); with ``then``, that
    stage's output instead. Raises JobError when the run cannot finish."""
    rows = inputs.rows if isinstance(inputs, Blocks) else inputs.num_rows
    sizing = pool(config, info, rows)
    log.info(f"{rows} images on {sizing}")
    storage_config = config.storage()
    registry = crashes.start_registry()
    decode_args = {"storage_config": storage_config, "size": info.image_size, "max_pixels": max_pixels,
                   "max_file_bytes": config.max_file_bytes, "crash_registry": registry}
    predictor_args = {"engine": engine, "to_rows": to_rows,
                      "threads": max(1, round(sizing.cpus)), "gpu": config.gpu,
                      "decode_args": None if config.gpu else decode_args}
    if isinstance(inputs, Blocks):
        dataset = _dataset(inputs)
    else:
        # from_blocks, not from_arrow: that runs a Ray task per slice just to read its schema, which
        # costs the first worker process ~1 s before the pipeline starts.
        dataset = ray.data.from_blocks(slices(inputs, max(sizing.max_actors, runtime.cluster_cpus())))
    if config.gpu:
        dataset = dataset.map_batches(
            read_and_decode, batch_format="pyarrow", batch_size=config.batch_size, fn_kwargs=decode_args,
            num_cpus=1, **_memory(sizing.decode_memory))
    dataset = dataset.map_batches(
        Predictor, batch_format="pyarrow", batch_size=config.batch_size, fn_constructor_kwargs=predictor_args,
        compute=ray.data.ActorPoolStrategy(min_size=sizing.min_actors, max_size=sizing.max_actors),
        num_cpus=sizing.cpus, num_gpus=sizing.gpus, max_restarts=_ACTOR_RESTARTS, **_memory(sizing.memory))
    if then is not None:
        # Actors, not tasks: Ray Data starts them with the pipeline, beside the inference actors,
        # whereas a task stage's first worker process would start only when its first batch is
        # ready, at the end of a small run. One writes far faster than an inference actor labels.
        dataset = dataset.map_batches(
            then.fn, batch_format="pyarrow", batch_size=then.batch_size, fn_constructor_kwargs=then.kwargs,
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, math.ceil(sizing.max_actors / 8))),
            num_cpus=0)
    try:
        yield from dataset.iter_batches(batch_size=None, batch_format="pyarrow")
    except Exception as exc:
        if isinstance(exc, ray.exceptions.ObjectLostError) or isinstance(getattr(exc, "cause", None),
                                                                      ray.exceptions.ObjectLostError):
            # The input blocks' owner (label's InputReader, or the driver) or their node died.
            raise JobError(f"the input blocks were lost ({type(getattr(exc, 'cause', None) or exc).__name__}): "
                           "the process that read the inputs, or its node, died") from None
        # A JobError raised in a task or an actor's constructor reaches the driver only as text
        # inside Ray's own exceptions; say it in one line.
        reason = carried(exc)
        if reason is None:
            raise
        raise reason from None
    finally:
        ray.kill(registry)


def _memory(memory: int) -> dict[str, Any]:
    return {"memory": memory} if memory else {}


def read_and_decode(batch: pa.Table, storage_config: StorageConfig, size: int, max_pixels: int,
                    max_file_bytes: int = MAX_FILE_BYTES, crash_registry: ActorHandle | None = None) -> pa.Table:
    """Input rows -> the same columns plus width, height, error, error_kind and image (fixed-shape
    uint8 tensor). Rows with a preset ``error`` are refused, never read; any failure to read or
    decode is that row's error. A listed ``size`` column spares reading files known to be too large.
    With a ``crash_registry`` (crashes.py), a file that killed this batch's worker is not read again."""
    n = batch.num_rows
    errors = batch["error"].to_pylist() if "error" in batch.column_names else [None] * n
    kinds = [None if error is None else "refused" for error in errors]
    wanted = [i for i, error in enumerate(errors) if error is None]
    pixels = np.zeros((n, size, size, 3), dtype=np.uint8)
    width = np.full(n, -1, dtype=np.int32)
    height = np.full(n, -1, dtype=np.int32)
    if wanted:
        paths = batch["path"].take(wanted).to_pylist()
        sizes = batch["size"].take(wanted).to_pylist() if "size" in batch.column_names else [None] * len(wanted)
        read_args = {"storage_config": storage_config, "size": size, "max_pixels": max_pixels,
                     "max_file_bytes": max_file_bytes}
        got = images.read_batch(paths, threads=_DECODE_THREADS, sizes=sizes, **read_args) if crash_registry is None \
            else crashes.read_batch(crash_registry, paths, sizes, threads=_DECODE_THREADS, **read_args)
        pixels[wanted], width[wanted], height[wanted] = got["image"], got["width"], got["height"]
        for i, error, kind in zip(wanted, got["error"], got["error_kind"]):
            errors[i], kinds[i] = error, kind
    decoded = batch.drop_columns([name for name in ("width", "height", "error", "error_kind")
                                  if name in batch.column_names])
    for name, values in (("width", pa.array(width, mask=width < 0)), ("height", pa.array(height, mask=height < 0)),
                         ("error", pa.array(errors, pa.string())), ("error_kind", pa.array(kinds, pa.string()))):
        decoded = decoded.append_column(name, values)
    return decoded.append_column("image", ArrowTensorArray.from_numpy(pixels))


class Predictor:
    """An inference actor: loads the model once, turns batches into the command's rows. Input
    batches are decoded ones (``read_and_decode``'s columns), or with ``decode_args`` input rows it
    decodes itself."""

    def __init__(self, engine: dict[str, Any], to_rows: RowMaker, threads: int, gpu: bool,
                 decode_args: dict[str, Any] | None = None) -> None:
        # One thread per reserved CPU: the other actors or the decode tasks have the other cores.
        torch.set_num_threads(threads)
        device = runtime.require_cuda("an inference actor") if gpu else "cpu"
        self.engine, self.info = engines.create_engine(**engine, device=device, threads=threads)
        self.to_rows = to_rows
        self.decode_args = decode_args

    def __call__(self, batch: pa.Table) -> pa.Table:
        if self.decode_args is not None:
            batch = read_and_decode(batch, **self.decode_args)
        ok = pc.is_null(batch["error"]).to_numpy(zero_copy_only=False)
        probs = np.zeros((0, len(self.info.classes)), dtype=np.float32)
        if ok.any():
            pixels = batch["image"].combine_chunks().to_numpy()[ok]
            probs = self.engine(pixels).numpy()
        return self.to_rows(batch, ok, probs, self.info)
