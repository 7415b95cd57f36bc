"""``distcls train``: data-parallel training with Ray Train, ending in a model artifact.

The driver lists and splits the lake into (path, label) rows, decoded by ``images.read_batch``, the
same function labeling uses. With ``--cache memory`` each worker decodes its own rows once, in Ray
tasks on its node, and keeps them as uint8, so an epoch costs only the model's compute; with
``--cache none`` the TorchTrainer gets lazy Ray Datasets that Ray Data decodes on the CPUs set aside
for decoding, streaming into the workers every epoch, and nothing holds the lake decoded. Workers
augment per batch either way. Every epoch is reported with a checkpoint; Ray Train restarts failed
workers from the latest one, and rerunning the same command on the same output resumes.
"""
from __future__ import annotations

import collections
import contextlib
import functools
import json
import logging
import math
import statistics
import tempfile
import threading
import time
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import ray.train
import ray.train.torch
import safetensors.torch
import torch
from ray.actor import ActorHandle
from ray.train.v2._internal.constants import is_v2_enabled
from ray.train.v2.api.exceptions import ControllerError, WorkerGroupError
from ray.util.queue import Empty, Queue
from torch import nn

from distcls import console, crashes, lake, review, storage, tracking
from distcls.dataset import Dataset, Lock
from distcls.artifact import InitMatch, ModelInfo, load_state_dict, match_state_dict, save_model
from distcls.config import TrainConfig, public_dict
from distcls.errors import JobError, UsageError, carried
from distcls import decode_stage
from distcls.decode_stage import ROWS_PER_BLOCK, Decoder, PacedScheduling, decode_rows, decode_yielding
from distcls.transforms import crop, mirror, normalize
from distcls.models import create_model, schedule, tta_logits
from distcls.runtime import (autoscaling, on_this_node, can_get, cluster_cpus, cluster_gpus, ensure_ray,
                             keep_freed_memory, native_bf16, require_cuda_on_a_gpu_node)

STATE_FILE = "state.pt"
MIN_SHARE = 0.25  # of a CPU, per decode actor when decoding shares the workers' cores (decode_pool)
HELD_OUT_AHEAD = 2  # held-out batches decoded ahead of the driver's --tta evaluation (_held_out_batches)
# A batch of held-out images: at most 1,000, and at most 4M pixels (256 at 128 px, 4 at 1024 px).
# Its activations set a worker's peak memory: 1,000 photos at 128 px took resnet18's workers from
# ~1.7 GiB while training to 3.7 GiB while evaluating.
EVAL_BATCH, EVAL_PIXELS = 1000, 2**22
STATS_IMAGES = 2048  # sampled for the normalisation mean/std: image means vary ~30/255, so ~1/255 error
# Decoding needs some CPU to be scheduled on. When the workers take every CPU (2 workers on this
# 2-core machine), they reserve this much less between them and the decode actors ask for it: the
# cores are shared by the OS either way; the reservation only has to let Ray schedule the actors.
SHARED_DECODE_CPUS = 0.5
STREAM_WINDOW_BYTES = 256 * 2**20
MIN_STEPS = 4  # optimizer steps an epoch, at least (fit_batch)
# Pixels of the sample a model's layers are fitted to (airbench's whitening: the covariance of 2x2
# patches, 12 numbers to estimate): all STATS_IMAGES up to 64 px, fewer larger ones. The whole
# sample at --image-size 1024 was 25 GiB of float32 per worker.
FIT_PIXELS = STATS_IMAGES * 64 * 64

log = logging.getLogger(__name__)


def train(config: TrainConfig) -> dict[str, Any]:
    """Run (or resume) training; write ``<output>/model/``, ``metrics.jsonl``, ``curves.png`` and
    (without --val-input) ``val.parquet``, the held-out split.
    Returns the final metrics and where the artifact is."""
    # The workers read --init-weights and rank 0 writes metrics.jsonl into --output from a Ray
    # worker, whose working directory is not the driver's: a relative local path meant another folder.
    config = config.model_copy(update={name: storage.normalize(getattr(config, name)) for name in ("output", "init_weights")
                                       if getattr(config, name) and not storage.is_remote(getattr(config, name))})
    if config.freeze_epochs and not config.init_weights:
        raise UsageError("--freeze-epochs needs --init-weights: without them no layer is pretrained to freeze")
    if not is_v2_enabled():  # Ray Train v1 returns failures in the result, and lacks what the workers report through
        raise UsageError("RAY_TRAIN_V2_ENABLED is 0: distcls trains with Ray Train v2, Ray 2.60's default; unset it")
    _check_image_size(config)
    if config.init_weights:
        # Checked on the driver first: a refused or unreadable file is a usage error before
        # anything is written, not a worker failure that Ray Train retries --max-failures times.
        load_state_dict(storage.Store(config.init_weights, config.storage()))
    train_rows, val_rows, classes, human_labels = _split(config)
    _check_split(config, train_rows.num_rows, val_rows.num_rows)
    if config.init_weights:
        _check_init_weights(config, len(classes))
    _check_resumable(config, len(classes))
    tracker = tracking.tracker(config)  # UsageError before Ray starts when MLflow is asked for but missing
    ensure_ray()
    # GPUs on demand: an autoscaler that launches a GPU node for us will add the rest as the workers wait.
    if config.gpu and cluster_gpus() < config.workers and not (autoscaling() and can_get({"GPU": 1.0})):
        raise UsageError(f"--gpu needs {config.workers} GPUs, the Ray cluster has {cluster_gpus()} and cannot add GPU nodes")
    if config.gpu:
        # On a GPU node, before the workers: their NCCL setup would fail first, naming no node.
        require_cuda_on_a_gpu_node("a training worker")
    worker_cpus, decode_cpus = plan_cpus(config, cluster_cpus(), can_grow=autoscaling())
    # A file that kills its decoder is skipped like an unreadable one; without the registry Ray Data
    # retried its block for ever, and the run hung.
    registry = crashes.start_registry()
    _check_decodable(config, train_rows, val_rows, registry)
    cache = choose_cache(config, train_rows.num_rows + val_rows.num_rows, _smallest_node_memory())
    config = fit_batch(config, train_rows.num_rows)  # a warning, so after every check that can refuse the run
    with _output_lock(config) as lock:
        if not config.val_input:  # written only once the run is known to start: no output from a usage error
            _write_val_manifest(val_rows, classes, config)
        return _train_and_save(config, classes, train_rows, val_rows, human_labels, cache, worker_cpus, decode_cpus,
                               registry, tracker, lock)


def _output_lock(config: TrainConfig) -> contextlib.AbstractContextManager[Lock | None]:
    """One run at a time per --output: two at once would write the same checkpoints, metrics.jsonl
    and model/. Labeling's lock (dataset.py), whose holder is named to a second run (exit 2) and is
    taken over when its run was killed. None, with a warning, on an object store other than S3:
    the lock's conditional writes are S3's, and such outputs were written without one before."""
    if storage.is_remote(config.output) and storage.split_uri(config.output)[0] not in ("s3", "s3a"):
        log.warning(f"--output {config.output}: no lock against a second run into it (conditional writes are "
                    "implemented for s3:// only); run one training into it at a time")
        return contextlib.nullcontext()
    return Dataset(storage.Store(config.output, config.storage())).lock()


def _train_and_save(config: TrainConfig, classes: list[str], train_rows: pa.Table, val_rows: pa.Table,
                    human_labels: dict[str, Any], cache: str, worker_cpus: float, decode_cpus: float,
                    registry: ActorHandle, tracker: Any, lock: Lock | None) -> dict[str, Any]:
    """The run itself, its checks passed and ``lock`` held: Ray Train's fit, then the artifact of the best epoch."""
    if lock:
        lock.name_run(config.name)
    log.info(f"training {config.arch} on {train_rows.num_rows} images ({val_rows.num_rows} held out), "
             f"{len(classes)} classes, {config.workers} workers x {worker_cpus:g} CPUs, "
             f"{'each decoding its images once' if cache == 'memory' else f'decoding on {decode_cpus:g} CPUs'}")
    # Rank 0 sends each epoch's metrics here and the driver logs them (and hands them to MLflow): the
    # workers' own output reaches the driver only with --verbose (Ray's log_to_driver), and then
    # prefixed per process. No CPU: on a full cluster a default actor (1 CPU to be placed) would
    # wait for the workers.
    progress = Queue(actor_options={"num_cpus": 0, "scheduling_strategy": on_this_node()})
    with tracking.run(tracker, config) as epochs:
        trainer = _trainer(config, classes, train_rows, val_rows, cache, worker_cpus, decode_cpus, progress, registry,
                           lock.owner["token"] if lock else None)
        result = _fit(trainer, progress, config, epochs)
        if lock:  # rank 0 stops at the epoch after another run took --output over
            lock.require_held("training stopped and saved no artifact")
        _refuse_unfinished(result.metrics, config)
        # On a tie the later epoch: trained longer, and the last one was evaluated as the artifact
        # predicts (--tta). Ray lists tied checkpoints oldest first, so max() took the oldest.
        best_checkpoint, best_metrics = max(result.best_checkpoints,
                                            key=lambda pair: (pair[1]["val_accuracy"], pair[1]["epoch"]))
        # After _check_decodable, only files that broke during the run (or fewer decoded images than a
        # batch per worker) leave a split empty. .get: the rows an older distcls checkpointed have no counts.
        for key, what in (("train_images", "trained on"), ("val_images", "evaluated")):
            if best_metrics.get(key) == 0:
                _tell_unreadable(registry, train_rows.num_rows, val_rows.num_rows)
                raise JobError(f"no image was {what}: the run's decode tasks could read too few of them (see the "
                               f"warning above); no artifact was saved, and a rerun into --output "
                               f"{config.output} resumes this run: give another --output or --name")
        _refuse_divergence(best_metrics, best_checkpoint)
        info = _save_artifact(config, classes, best_checkpoint, best_metrics, val_rows, registry, human_labels)
        unreadable = _tell_unreadable(registry, train_rows.num_rows, val_rows.num_rows)
        _write_curves(config)
        epochs.log_artifact(_output(config).child("model"))
    return {"model": _output(config).uri_of("model"), "model_id": info.model_id, **info.metrics,
            "unreadable_images": unreadable}


def _tell_unreadable(registry: ActorHandle, train_images: int, val_images: int) -> dict[str, int | None]:
    """Warn of the images this attempt left out of at least one epoch because they did not decode
    (the decode stages note them in ``registry``), naming the first; their counts, for the run's
    summary: None for a split it did not decode (a rerun of a finished run). Skipping them is what
    a lake of millions of files needs, but not silently: the decode workers' logs name each."""
    counts = {}
    for split, scopes, images, what in (("train", ["train", "stats"], train_images, "training"),
                                        ("val", ["val"], val_images, "held-out")):
        counts[split], more, first = ray.get(registry.unreadable.remote(scopes))
        if counts[split]:
            log.warning(f"{'at least ' if more else ''}{counts[split]} of the {images} {what} images failed to "
                        f"decode at least once and were left out (first: {_printable(first)}; the decode workers' logs name each)")
    return counts


def _printable(text: str, limit: int = 300) -> str:
    """``text`` on one line of at most ``limit`` characters: a path may hold a newline."""
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _check_split(config: TrainConfig, train_images: int, val_images: int) -> None:
    """UsageError when a split has fewer images than workers: some worker would get none of its
    rows (cached) or Ray Data's equal split none of the images (streamed)."""
    held = f"--val-input {config.val_input} has" if config.val_input else f"--val-fraction {config.val_fraction} holds out"
    if val_images < config.workers:
        raise UsageError(f"{held} {val_images} images, fewer than --workers {config.workers}: the held-out "
                         "images are split equally, so no worker would evaluate any")
    if train_images < config.workers:
        raise UsageError(f"{_images_of(config)} has {train_images} images to train on ({held} {val_images}), fewer than "
                         f"--workers {config.workers}: they are split equally, so no worker would train on any")


def _check_decodable(config: TrainConfig, train_rows: pa.Table, val_rows: pa.Table, crash_registry: ActorHandle) -> None:
    """UsageError when fewer held-out images decode than workers, or fewer training images than a
    batch per worker (workers train whole batches only), before anything is written: the run found
    out after its last epoch, and a rerun resumed into the same end. JobError when the store cannot
    be read. Decoded in Ray tasks, through ``crash_registry``: a file that kills its decoder would
    kill the driver."""
    local_batch = max(1, _batch_size(config, train_rows.num_rows) // config.workers)
    held = f"--val-input {config.val_input}" if config.val_input else _images_of(config)
    checks = ((val_rows, config.workers, f"{held}: {{}} of its {val_rows.num_rows} held-out images decode, "
                                         f"fewer than --workers {config.workers}"),
              (train_rows, config.workers * local_batch,
               f"{_images_of(config)}: {{}} of its {train_rows.num_rows} training images decode, fewer than a "
               f"batch for each worker needs ({config.workers} x {local_batch})"))
    decodable = ray.remote(num_cpus=0, max_retries=-1)(decode_stage.count_decodable)
    counts = _task_results([decodable.remote(rows["path"], config, crash_registry, enough) for rows, enough, _ in checks])
    for (rows, enough, message), (decoded, failure, store_failure) in zip(checks, counts):
        if store_failure:
            raise JobError(f"{held if rows is val_rows else _images_of(config)}: the store could not be "
                           f"read ({store_failure})")
        if decoded < enough:
            raise UsageError(f"{message.format(decoded)} (first failure: {failure})")


def _check_resumable(config: TrainConfig, num_classes: int) -> None:
    """UsageError when --output holds checkpoints of this run (--name) whose weights do not fit
    --arch: Ray Train resumes from the latest, and every worker failed to load it, restart after
    restart, for a run started with another --arch (an older default's, say) or class count."""
    store = _output(config).child(config.name)
    checkpoints = [entry.base_name for entry in store.entries() if entry.base_name.startswith("checkpoint_")]
    if not checkpoints:
        return
    try:  # the safetensors header alone: 8 bytes of length, then JSON of each tensor's shape
        with store.open_input(checkpoints[-1], "model.safetensors") as file:
            header = json.loads(file.read(int.from_bytes(file.read(8), "little")))
    except (OSError, ValueError, UsageError):
        return  # not a checkpoint of ours to judge: Ray Train's restore says what it finds
    with torch.device("meta"):
        expected = {key: list(value.shape) for key, value in create_model(config.arch, num_classes).state_dict().items()}
    found = {key: value.get("shape") for key, value in header.items() if key != "__metadata__"}
    differs = [key for key in sorted(found.keys() | expected.keys()) if found.get(key) != expected.get(key)]
    if differs:
        raise UsageError(f"--output {config.output} holds checkpoints of run {config.name!r} that do not fit --arch "
                         f"{config.arch} with {num_classes} classes ({differs[0]}: {found.get(differs[0])} in "
                         f"{checkpoints[-1]}, {expected.get(differs[0])} for --arch {config.arch}); rerunning resumes "
                         "from them: pass the --arch (and settings) that run was started with, or give another "
                         "--output or --name")


def _images_of(config: TrainConfig) -> str:
    """The options the training images come from: --labels adds its images to --input's."""
    return f"--input {config.input}" + (f" (with --labels {config.labels})" if config.labels else "")


def _task_results(refs: list[ray.ObjectRef]) -> list[Any]:
    """ray.get of tasks, what one raised as one line (Ray's error is the task's whole traceback)."""
    try:
        return ray.get(refs)
    except ray.exceptions.RayTaskError as exc:
        if (own := carried(exc)) is not None:
            raise own from None
        raise JobError(f"a decode task failed: {(str(exc.cause or exc).strip().splitlines() or ['?'])[0][:300]}") from None


def _check_image_size(config: TrainConfig) -> None:
    """UsageError when --arch cannot take --image-size images (its pooling leaves less than a pixel:
    airbench at 8 px). A forward pass on the meta device, shapes only, on the driver: in the workers
    it failed at the first step, again on every restart."""
    with torch.device("meta"):
        model = create_model(config.arch, num_classes=2).eval()
        try:
            model(torch.empty(1, 3, config.image_size, config.image_size))
        except RuntimeError as exc:
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:120]
            raise UsageError(f"--image-size {config.image_size} is too small for --arch {config.arch} ({reason}); "
                             "give a larger --image-size or another --arch") from None


def _split(config: TrainConfig) -> tuple[pa.Table, pa.Table, list[str], dict[str, Any]]:
    """(training rows in a seeded random order, held-out rows, class names, what --labels changed).
    The human labels of --labels apply before the split, to held-out rows too. Writes nothing: the
    held-out manifest is written once the run's settings have been checked against the cluster."""
    rows, classes = lake.labelled_images(storage.Store(config.input, config.storage()))
    human_labels: dict[str, Any] = {}
    if config.labels:
        labels = review.human_labels(storage.Store(config.labels, config.storage()), classes)
        rows, human_labels = review.relabel(rows, labels, config.labels)
        log.info(f"--labels {config.labels}: {human_labels['changed']} labels changed, {human_labels['confirmed']} "
                 f"confirmed, {human_labels['added']} images added")
    rng = np.random.default_rng(config.seed)
    if config.val_input:
        val_rows, _ = lake.labelled_images(storage.Store(config.val_input, config.storage()), classes)
        return rows.take(rng.permutation(rows.num_rows)), val_rows, classes, human_labels
    train_idx, val_idx = lake.stratified_split(rows["label"].to_numpy(), config.val_fraction, config.seed)
    if len(val_idx) == 0:
        raise UsageError(f"--val-fraction {config.val_fraction} holds out no images of {_images_of(config)}; raise it or give --val-input")
    val_rows = rows.take(val_idx)
    # Shuffled before Ray Data splits them: each worker gets whole blocks of consecutive rows, and a
    # listing is sorted by class, so with 2 workers each trained on half the classes. Its BatchNorm
    # then normalised every batch with the statistics of its classes, which the model learned to
    # rely on, and the running statistics kept in the artifact (rank 0's) did not fit the other
    # half: 68% held-out accuracy on the demo lake with 2 workers against 100% with 1.
    return rows.take(rng.permutation(train_idx)), val_rows, classes, human_labels


def fit_batch(config: TrainConfig, images: int) -> TrainConfig:
    """``config`` with a batch size that ``images`` training images fill MIN_STEPS times an epoch.
    Workers take whole batches only, so a batch larger than a worker's shard (the default 1024 on a
    lake of a few hundred images) would train on nothing at all."""
    batch = _batch_size(config, images)
    if batch == config.batch_size:
        return config
    log.warning(f"--batch-size {config.batch_size} is more than {images} training images fill {MIN_STEPS} times "
                f"an epoch: using {batch}")
    return config.model_copy(update={"batch_size": batch})


def _batch_size(config: TrainConfig, images: int) -> int:
    fits = images // MIN_STEPS // config.workers * config.workers
    return config.batch_size if config.batch_size <= max(fits, config.workers) else max(fits, config.workers)


def _write_val_manifest(val_rows: pa.Table, classes: list[str], config: TrainConfig) -> None:
    """The held-out split as a manifest, so ``distcls evaluate --input <output>/val.parquet`` scores
    the model on exactly the images it never trained on."""
    names = pa.array(classes).take(val_rows["label"])
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table({"path": val_rows["path"], "label": names}), sink)
    _output(config).write(sink.getvalue().to_pybytes(), "val.parquet")


def plan_cpus(config: TrainConfig, total_cpus: float, can_grow: bool = False) -> tuple[float, float]:
    """(CPUs each training worker reserves, CPUs Ray Data may decode on) on a cluster of ``total_cpus``
    now; ``can_grow``: an autoscaler may add more, so no --decode-cpus is too many for it.

    Decoding takes the CPUs the workers leave free. When they leave less than one (a full fixed
    cluster), the workers give up SHARED_DECODE_CPUS between them. A cluster smaller than the
    workers need (an autoscaling one still at its minimum) gets one CPU's worth of decode actors,
    which the autoscaler can add, and nothing is taken from the workers. A fixed cluster smaller
    than the workers need is a UsageError: Ray Train would wait for their CPUs for ever."""
    spare = total_cpus - config.workers * config.cpus_per_worker
    if spare < 0 and not can_grow:
        raise UsageError(f"--workers {config.workers} x --cpus-per-worker {config.cpus_per_worker} need "
                         f"{config.workers * config.cpus_per_worker} CPUs; the Ray cluster has {total_cpus:g} "
                         "and no autoscaler to add more")
    if config.decode_cpus is not None and config.decode_cpus > total_cpus and not can_grow:
        raise UsageError(f"--decode-cpus {config.decode_cpus:g} is more than the {total_cpus:g} CPUs of the Ray cluster")
    decode = config.decode_cpus or (spare if spare >= 1 else SHARED_DECODE_CPUS if spare >= 0 else 1.0)
    if spare < 0 or decode <= spare:
        return float(config.cpus_per_worker), decode
    per_worker = config.cpus_per_worker - (decode - spare) / config.workers
    if per_worker < 0.1:
        raise UsageError(f"--decode-cpus {decode:g} leaves the {config.workers} training workers no CPUs "
                         f"on a cluster of {total_cpus:g} CPUs")
    return per_worker, decode


def choose_cache(config: TrainConfig, images: int, node_memory: float) -> str:
    """``memory`` or ``none``. auto keeps images in memory when the decoded lake (train + held out,
    uint8) takes at most a quarter of the smallest CPU node's Ray memory: all workers may share that
    node, each worker also holds the lake's path table, and the rest is for the model, activations
    and decoded blocks in flight."""
    if config.cache != "auto":
        return config.cache
    decoded = images * config.image_size ** 2 * 3
    cache = "memory" if decoded <= node_memory / 4 else "none"
    log.info(f"cache: {cache} (decoded lake {decoded / 2**30:.2f} GiB {'<=' if cache == 'memory' else '>'} a quarter "
             f"of {node_memory / 2**30:.1f} GiB, the smallest CPU node's Ray memory)")
    return cache


def _smallest_node_memory() -> float:
    """Bytes of Ray's ``memory`` resource on the smallest alive node with CPUs; 0 when there is none
    yet (an autoscaling cluster at zero workers), which makes auto stream."""
    sizes = [node["Resources"].get("memory", 0.0) for node in ray.nodes()
             if node["Alive"] and node["Resources"].get("CPU", 0) > 0]
    return min(sizes, default=0.0)


def _dataset(rows: pa.Table, config: TrainConfig, decode_cpus: float, name: str, crash_registry: ActorHandle | None,
             streamed: bool = False) -> ray.data.Dataset:
    """Decoded images as a lazy Ray Dataset: fixed-shape uint8 tensors + int labels (Arrow-native).
    Each execution (each epoch, when streaming) visits the blocks in a new seeded order, so the
    blocks a worker gets change from epoch to epoch; the rows within them were shuffled by _split.
    A ``streamed`` one decodes in a pool of actors (see Decoder); one read in a single pass (the
    stats sample) in tasks, whose workers Ray keeps while they are busy and which
    start no pool: a pool per execution made the test suite ~5 minutes slower. ``name`` tells its
    batches apart in ``crash_registry`` from another dataset's over the same files (the stats sample's
    are the first training blocks)."""
    slices = [rows.slice(start, ROWS_PER_BLOCK) for start in range(0, rows.num_rows, ROWS_PER_BLOCK)]
    actor_cpus, actors = decode_pool(config, decode_cpus, len(slices))
    ordered = ray.data.from_arrow(slices).randomize_block_order(
        seed=ray.data.RandomSeedConfig(seed=config.seed, reseed_after_execution=True))
    settings = {"storage_config": config.storage(), "size": config.image_size, "crash_registry": crash_registry,
                "scope": name}
    how = ({"fn": Decoder, "fn_constructor_kwargs": settings, "compute": ray.data.ActorPoolStrategy(size=actors)}
           if streamed else {"fn": decode_yielding, "fn_kwargs": settings})
    dataset = ordered.map_batches(**how, batch_format="numpy", batch_size=ROWS_PER_BLOCK, num_cpus=actor_cpus)
    # Added to, not replacing, the callbacks the driver's DataContext gave every new dataset.
    dataset.context.custom_execution_callback_classes = [*dataset.context.custom_execution_callback_classes,
                                                          PacedScheduling]
    return dataset


def decode_pool(config: TrainConfig, decode_cpus: float, blocks: int) -> tuple[float, int]:
    """(CPUs of each decoder, actors of a streamed pool) for a dataset of ``blocks`` blocks: one per
    decode CPU, or, when decoding shares the workers' cores (less than a CPU of its own), one per
    MIN_SHARE of it: each actor reads with READ_THREADS threads, so a few keep up, and every actor
    of the pool starts with each execution (train and val, every epoch), in ~1.5-2 s here (its
    process, Ray Data, decode_stage), used or not; for the same reason never more actors than blocks. A share is rounded down
    to Ray's 1/10,000 of a CPU, so that the actors fit in ``decode_cpus`` after Ray rounds them."""
    share = 1.0 if decode_cpus >= 1 else MIN_SHARE
    actors = max(1, min(blocks, int(decode_cpus / share + 1e-9)))
    return (1.0 if decode_cpus >= 1 else max(1e-4, math.floor(decode_cpus / actors * 1e4) / 1e4)), actors


def stream_window(config: TrainConfig) -> int:
    """Bytes of decoded images Ray Data may hold ahead of the workers, per dataset: 256 MiB, or two
    blocks per worker when those are larger. What a streamed epoch holds whatever the lake's size."""
    block = ROWS_PER_BLOCK * config.image_size ** 2 * 3
    return max(STREAM_WINDOW_BYTES, 2 * config.workers * block)


def _trainer(config: TrainConfig, classes: list[str], train_rows: pa.Table, val_rows: pa.Table, cache: str,
             worker_cpus: float, decode_cpus: float, progress: Queue,
             crash_registry: ActorHandle, lock_token: str | None) -> ray.train.torch.TorchTrainer:
    output = _output(config)
    loop_config = {"config": config.model_dump(), "classes": classes, "cache": cache, "train_images": train_rows.num_rows,
                   "progress": progress, "verbose": console.verbose(), "lock_token": lock_token,
                   "crash_registry": crash_registry}
    datasets = {}
    if cache == "memory":
        # Each worker decodes its own rows (_fill_cache). In the object store, not in loop_config:
        # Ray Train pickles that into every worker's call (~65 bytes a row, 130 MB for 2M images).
        loop_config["rows"] = {"train": ray.put(train_rows), "val": ray.put(val_rows)}
    else:
        stats_rows = train_rows.slice(0, STATS_IMAGES)  # already in a seeded random order
        datasets = {name: _dataset(rows, config, decode_cpus, name, crash_registry, streamed=name != "stats")
                    for name, rows in (("train", train_rows), ("val", val_rows), ("stats", stats_rows))}
    # Ray Data's limit is what keeps decoding off the workers' reserved CPUs: without it, it sizes
    # itself by the whole cluster, CPUs the workers hold included.
    limits = ray.data.ExecutionOptions(resource_limits=ray.data.ExecutionResources(
        cpu=decode_cpus, object_store_memory=stream_window(config)))
    return ray.train.torch.TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        datasets=datasets or None,
        # "stats" is not split: rank 0 reads all of it (_fresh_state).
        dataset_config=ray.train.DataConfig(datasets_to_split=["train", "val"], execution_options=limits),
        scaling_config=ray.train.ScalingConfig(
            num_workers=config.workers, use_gpu=config.gpu, resources_per_worker={"CPU": worker_cpus}),
        run_config=ray.train.RunConfig(
            name=config.name, storage_path=output.path(), storage_filesystem=output.fs,
            failure_config=ray.train.FailureConfig(max_failures=config.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=2, checkpoint_score_attribute="val_accuracy", checkpoint_score_order="max")),
    )


def _refuse_divergence(metrics: dict[str, Any], checkpoint: ray.train.Checkpoint) -> None:
    """JobError when the losses of the best epoch (``checkpoint``'s) are not finite: its weights
    are NaN, a model that says one class for every image (and model.json cannot hold NaN:
    ModelInfo refused it with a bare ValidationError)."""
    bad = {key: value for key, value in metrics.items()
           if key in ("train_loss", "val_loss") and not math.isfinite(value)}
    if not bad:
        return
    with checkpoint.as_directory() as folder:
        std = torch.load(Path(folder) / STATE_FILE, map_location="cpu", weights_only=True)["std"]
    # Images of one colour: every activation is constant, BatchNorm divides by its epsilon alone
    # (airbench's is 1e-12) and the first step's gradients are ~1e24 at any --lr.
    hint = ("the sampled training images are all one colour (pixel std under 1/255 in every channel): "
            "there is nothing to learn" if max(std) < 1 / 255 else "lower --lr")
    raise JobError(f"training diverged: {', '.join(f'{k} {v}' for k, v in bad.items())} at epoch "
                   f"{metrics.get('epoch')}; no model saved: {hint}")


def _refuse_unfinished(metrics: dict[str, Any] | None, config: TrainConfig) -> None:
    """JobError when the last checkpoint (``metrics``, Ray's Result.metrics, restored on a resumed
    run) is of an epoch before --epochs: the workers stopped early, which they do only when rank 0
    finds --output's lock held by another run or removed. Decided from the checkpoints, not from
    rank 0's message, whose queue may be lost, while the driver's own read of the lock still
    showed its token (a renewal racing the takeover, a non-atomic rename)."""
    reached = (metrics or {}).get("epoch", 0)
    if reached < config.epochs:
        raise JobError(f"training stopped after epoch {reached} of {config.epochs}: rank 0 found the lock of --output "
                       f"{config.output} held by another run or removed; no artifact was saved; once that run is "
                       "done, a rerun into --output resumes this one")


def _fit(trainer: ray.train.torch.TorchTrainer, progress: Queue, config: TrainConfig,
         epochs: tracking.Epochs) -> ray.train.Result:
    """``trainer.fit()``, logging what rank 0 sends on ``progress`` as it comes (from a thread)."""
    done = threading.Event()
    printer = threading.Thread(target=_log_progress, args=(progress, config, done, epochs), daemon=True,
                               name="distcls-epochs")
    printer.start()
    try:
        return trainer.fit()
    except WorkerGroupError as exc:
        raise _worker_failure(exc, config) from exc
    except ControllerError as exc:  # e.g. its checkpoint bookkeeping failed to write
        raise JobError(f"training failed: {_line(str(exc.controller_failure))}{_rerun(config)}") from exc
    finally:
        done.set()
        printer.join()
        ray.kill(progress.actor)


def _worker_failure(exc: WorkerGroupError, config: TrainConfig) -> JobError:
    """One line for a run whose workers failed (Ray's message holds every worker's traceback): the
    rank to blame and what it raised (a distcls error as it is, another as its type and a line),
    and what a rerun does. A rank that died or raised a distcls error is blamed before one whose
    collective call failed because the other went away."""
    if not exc.worker_failures:
        return JobError(f"training failed: {_line(str(exc), last=True)}{_rerun(config)}")
    causes = {rank: _cause(error) for rank, error in exc.worker_failures.items()}
    rank, error = min(causes.items(), key=lambda item: (_blame(item[1]), item[0]))
    if isinstance(error, (JobError, UsageError)):
        return JobError(f"training worker {rank}: {_line(str(error))}{_rerun(config)}")
    # Ray's own errors (a worker's process died) end with the cause, after lines of actor details,
    # and then Ray's list of what may cause any death.
    reason = _line(str(error).split(" Some common causes include")[0], last=_from_ray(error))
    return JobError(f"training worker {rank} failed: {type(error).__name__}: {reason}{_rerun(config)}")


def _cause(error: BaseException) -> BaseException:
    """The exception of interest inside ``error``, which Ray Train wraps around what the loop raised:
    a distcls error it carries (errors.carried), else the innermost of Ray's task errors."""
    base = getattr(error, "_base_exc", error)
    own = carried(base) or carried(error)
    if own is not None:
        return own
    while isinstance(base, ray.exceptions.RayTaskError) and base.cause is not None and base.cause is not base:
        base = base.cause
    return base


def _blame(error: BaseException) -> int:
    return 0 if isinstance(error, (JobError, UsageError)) else 1 if _from_ray(error) else 2


def _from_ray(error: BaseException) -> bool:
    return type(error).__module__.startswith("ray.")


def _rerun(config: TrainConfig) -> str:
    # Not "from its last checkpoint": Ray Train records an epoch's checkpoint only once it has polled
    # every rank's report, so a worker that died right after an epoch can leave it written, not recorded.
    return (f"; rerunning it with the same --output ({config.output}) and --name ({config.name}) resumes after the "
            "last epoch Ray Train recorded (it then says which), or starts over")


def _line(text: str, last: bool = False) -> str:
    """The first (or last) line of ``text`` with something on it, at most 300 characters."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    line = lines[-1 if last else 0] if lines else "no message"
    return line if len(line) <= 300 else line[:299] + "…"


def _log_progress(progress: Queue, config: TrainConfig, done: threading.Event, epochs: tracking.Epochs) -> None:
    """Log each epoch (with its time and the ETA of the rest, from this run's mean epoch time; and
    to MLflow through ``epochs``) and each message from rank 0, until ``done`` is set and nothing is left."""
    epoch_seconds: list[float] = []
    while True:
        try:
            item = progress.get(timeout=0.5)
        except Empty:
            if done.is_set():
                return
            continue
        except ray.exceptions.RayError as exc:  # the queue's node is gone: training goes on without lines
            log.warning(f"no more epoch lines: {type(exc).__name__}")
            return
        if "message" in item:
            # Warnings show without --verbose too: the lock and optimizer-state messages change the run.
            log.log(logging.WARNING if item.get("warning") else logging.INFO, item["message"])
            continue
        row = item["row"]
        epoch_seconds.append(item["epoch_s"])
        eta = console.duration(statistics.mean(epoch_seconds) * (config.epochs - row["epoch"]))
        log.info(f"epoch {row['epoch']:3d}/{config.epochs}  train_loss {row['train_loss']:.4f}  "
                 f"val_loss {row['val_loss']:.4f}  val_acc {row['val_accuracy']:.4f}"
                 f"{'' if row.get('val_tta', 'none') == 'none' else ' (tta ' + row['val_tta'] + ')'}  "
                 f"{row['images_per_s']:.0f} img/s  {item['epoch_s']:.1f}s  ETA {eta}")
        epochs.log(row)


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """The per-worker loop: restore, then per epoch train, evaluate, report + checkpoint."""
    if not loop_config["verbose"]:
        # The driver's epoch line is the report. Ray Train 2.60 logs every report (its metrics dict
        # per worker per epoch) at INFO from a logger named after its own file, outside "ray.train".
        from ray.train.v2._internal.execution import context as train_context

        for name in ("ray.train", train_context.__file__):
            logging.getLogger(name).setLevel(logging.WARNING)
    tell = functools.partial(_tell, loop_config["progress"])
    config = TrainConfig.model_validate(loop_config["config"])
    classes: list[str] = loop_config["classes"]
    torch.set_num_threads(config.cpus_per_worker)
    keep_freed_memory()
    device = ray.train.torch.get_device()
    local_batch = max(1, config.batch_size // config.workers)
    state = _restore(ray.train.get_checkpoint())
    if state and state["epoch"] >= config.epochs:
        # A rerun of a finished run: the driver saves the artifact from the checkpoints. Returning
        # before the shards are read spares decoding the whole lake for no step.
        tell({"message": f"nothing to train: the checkpoint is of epoch {state['epoch']}, --epochs is {config.epochs}"})
        return
    train_data, val_data = _shards(loop_config, config, local_batch, tell)
    tell({"message": f"training steps in {'bfloat16 autocast' if use_bf16(config, device) else 'float32'} "
                     f"on {device.type} (--precision {config.precision})"})
    if state:
        tell({"message": f"resuming from checkpoint after epoch {state['epoch']}"})
    state = state or _fresh_state(config, classes, train_data)
    plain = create_model(config.arch, num_classes=len(classes)).to(memory_format=torch.channels_last)
    plain.load_state_dict(state["model"])
    # Every parameter is in the optimizer from the start, frozen or not: its state_dict then has the
    # same layout in every checkpoint, and SGD skips parameters without gradients while frozen.
    optimizer = torch.optim.SGD(param_groups(plain, config), lr=config.lr, momentum=config.momentum, nesterov=True)
    first_epoch = state["epoch"]
    frozen = _frozen(plain, state, config, first_epoch)
    model = _prepare(plain, frozen)
    if "optimizer" in state:
        try:
            optimizer.load_state_dict(state["optimizer"])
        except ValueError:  # a checkpoint of a distcls whose parameter groups differ (their number or sizes)
            tell({"message": "the checkpoint's optimizer state does not fit this version's parameter groups: "
                             "the momentum starts again from zero", "warning": True})
    # For the schedule: a cached shard's (_shards), else from the listing; streamed shards are equal
    # (Ray Train splits them with equal=True), so every worker takes the same number of steps.
    steps_per_epoch = getattr(train_data, "steps", None) or max(1, loop_config["train_images"] // config.workers // local_batch)
    generator = torch.Generator().manual_seed(config.seed * 1000 + ray.train.get_context().get_world_rank())
    lookahead = Lookahead(plain) if config.lookahead else None
    for epoch in range(first_epoch, config.epochs):
        now_frozen = _frozen(plain, state, config, epoch)
        if now_frozen != frozen:
            if epoch == config.freeze_epochs:
                tell({"message": f"epoch {epoch + 1}: unfreezing the pretrained layers"})
            frozen = now_frozen
            model = _prepare(plain, frozen)
        started = time.time()
        train_loss, images = train_epoch(model, optimizer, train_data.batches(local_batch, generator, epoch), state,
                                         config, epoch, steps_per_epoch, generator, device, lookahead)
        # The last epoch predicts as inference will (--tta, float32); the ones before plainly and in
        # the training steps' precision: flip_translate costs six forward passes, 20 s an epoch on
        # CIFAR-10's 5,000 held-out images here, and float32 3.4x bfloat16 (airbench94 on one
        # thread: 2.35 against 0.69 ms an image, 5.9 s against 1.7 s of a ~44 s epoch). The best
        # checkpoint is still chosen by val_accuracy, so the last epoch's gets the tta's gain; an
        # earlier one is evaluated again as inference predicts (_save_artifact).
        last = epoch == config.epochs - 1
        tta, precision = (config.tta, "fp32") if last else ("none", "bf16" if use_bf16(config, device) else "fp32")
        # On the module DDP wraps, rank 0's BatchNorm statistics sent to every worker first: DDP's
        # forward would broadcast them, a collective per batch, and cached held-out shards may differ
        # in size (files that failed to decode); eval_epoch sums the workers' totals once.
        _from_rank_zero_buffers(plain)
        evaluation = eval_epoch(plain, val_data.batches(eval_batch_size(config.image_size)), state, device,
                                len(classes), tta, bf16=precision == "bf16")
        row = {"epoch": epoch + 1, "train_loss": train_loss, "train_images": images, "val_loss": evaluation.loss,
               "val_accuracy": evaluation.accuracy, "val_images": evaluation.images, "val_tta": tta,
               "val_precision": precision,
               "images_per_s": images / (time.time() - started),
               "elapsed_s": state["elapsed_s"] + time.time() - started, "restores": state["restores"]}
        if _lost_output(config, loop_config["lock_token"], tell):
            tell({"message": f"epoch {epoch + 1}: another run holds --output {config.output} now, or its lock was "
                             "removed; stopping", "warning": True})
            return
        # In the checkpoint's state, not the reported row: the artifact takes it from the best checkpoint.
        state.update(epoch=epoch + 1, elapsed_s=row["elapsed_s"], history=state["history"] + [row],
                     validation=evaluation.distribution(classes))
        _report(row, model, optimizer, state, config)
        tell({"row": row, "epoch_s": time.time() - started})


# (uint8 NHWC images, int64 labels); training batches come mirrored already (the shards' batches()).
Batches = Iterator[tuple[torch.Tensor, torch.Tensor]]


def train_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, batches: Batches, state: dict[str, Any],
                config: TrainConfig, epoch: int, steps: int, generator: torch.Generator,
                device: torch.device, lookahead: Lookahead | None = None) -> tuple[float, int]:
    """One pass over ``batches`` (``steps`` of them planned, for the schedule); returns the mean loss
    and the number of images, both over all workers."""
    model.train()
    bf16 = use_bf16(config, device)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    points = schedule(config.arch)
    total = torch.zeros(2, device=device)
    for step, (images, labels) in enumerate(batches):
        progress = min(1.0, (epoch * steps + step) / (config.epochs * steps))
        for group in optimizer.param_groups:
            group["lr"] = config.lr * group["lr_scale"] * one_cycle(progress, *points)
        if lookahead and step % Lookahead.EVERY == 0 and step:
            lookahead.update(progress)
        x = normalize(crop(images, generator).to(device), state["mean"], state["std"])
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = loss_fn(model(x), labels.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += torch.stack([loss.detach().float() * len(labels), torch.tensor(float(len(labels)), device=device)])
    if lookahead:  # at every epoch's end too: the checkpoint's weights are then the average itself
        lookahead.update((epoch + 1) / config.epochs)
    loss_sum, count = _sum_across_workers(total).tolist()
    return loss_sum / max(1.0, count), int(count)


class Lookahead:
    """airbench's lookahead: every EVERY steps the weights (and BatchNorm statistics) move to a
    slow average of themselves, which follows them less as training goes on (it keeps
    ``decay = 0.95^5 x progress^3`` of itself), and the run ends on the average. Updated at each
    epoch's end too, so the weights checkpointed are the average, and a resumed run, which starts
    the average again from them, goes on exactly as it would have. The last update takes in the
    steps since the one before, at the schedule's last decay (airbench's end when its steps are a
    multiple of 5); returning to the average without them (airbench's decay 1) threw away a whole
    epoch when epochs are under EVERY steps, as fit_batch makes them on small lakes."""

    EVERY = 5

    def __init__(self, model: nn.Module) -> None:
        self.live = {name: value for name, value in model.state_dict(keep_vars=True).items() if value.is_floating_point()}
        self.slow = {name: value.detach().clone() for name, value in self.live.items()}

    @torch.no_grad()
    def update(self, progress: float) -> None:
        decay = 0.95 ** 5 * min(progress, 1.0) ** 3
        for name, value in self.live.items():
            self.slow[name].lerp_(value.detach(), 1 - decay)
            value.data.copy_(self.slow[name])


@dataclass(frozen=True)
class Evaluation:
    """One pass over the validation split, summed over every worker."""

    loss: float
    accuracy: float
    images: int
    mean_top1: float
    predicted: list[int]  # images predicted as each class, in class order

    def distribution(self, classes: list[str]) -> dict[str, Any] | None:
        """The ``validation`` field of model.json (artifact.Validation); None for an empty split."""
        if not self.images:
            return None
        return {"predicted": {name: count / self.images for name, count in zip(classes, self.predicted)},
                "mean_top1": self.mean_top1, "images": self.images}


@torch.no_grad()
def eval_epoch(model: nn.Module, batches: Batches, state: dict[str, Any], device: torch.device,
               num_classes: int, tta: str = "none", bf16: bool = False) -> Evaluation:
    """Mean loss, accuracy, mean top-1 probability and predicted classes over every worker's
    validation shard, predicted as inference will (``tta``; float32 unless ``bf16``, autocast as
    the training steps are)."""
    model.eval()
    total = torch.zeros(4 + num_classes, device=device)  # loss, correct, images, top-1 sum, per-class predictions
    for images, labels in batches:
        x = normalize(images.to(device), state["mean"], state["std"])
        y = labels.to(device)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = tta_logits(model, x, tta).float()
        top1, predicted = torch.softmax(logits, dim=1).max(dim=1)
        total += torch.cat([torch.stack([nn.functional.cross_entropy(logits, y, reduction="sum"),
                                         (predicted == y).sum().float(), torch.tensor(float(len(y)), device=device),
                                         top1.sum()]),
                            torch.bincount(predicted, minlength=num_classes).float()])
    loss_sum, correct, count, top1_sum, *predicted = _sum_across_workers(total).tolist()
    return Evaluation(loss_sum / max(1.0, count), correct / max(1.0, count), int(count), top1_sum / max(1.0, count),
                      [int(n) for n in predicted])


def use_bf16(config: TrainConfig, device: torch.device) -> bool:
    """Whether training steps autocast to bfloat16 (--precision)."""
    return config.precision == "bf16" or (config.precision == "auto" and (device.type == "cuda" or native_bf16()))


def param_groups(model: nn.Module, config: TrainConfig) -> list[dict[str, Any]]:
    """SGD parameter groups: weight decay on weights only, not on biases and BatchNorm (decaying
    those only fights the normalisation), except in airbench's layers: a module may ask for a larger
    learning rate for its bias with a ``bias_lr_scale`` attribute (airbench's BatchNorm shifts learn
    64x faster), and its bias then decays by as much per step as the weights do (airbench's
    decoupled decay, which takes in every parameter), as does a bias with ``bias_epochs``."""
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    for module in model.modules():
        for name, parameter in module.named_parameters(recurse=False):
            scale = getattr(module, "bias_lr_scale", 1.0) if name == "bias" else 1.0
            airbench = hasattr(module, "bias_lr_scale") or hasattr(module, "bias_epochs")
            decay = config.weight_decay / scale if parameter.ndim > 1 or airbench else 0.0
            groups.setdefault((scale, decay), []).append(parameter)
    return [{"params": params, "lr_scale": scale, "weight_decay": decay} for (scale, decay), params in groups.items()]


def one_cycle(progress: float, start: float, peak: float, end: float) -> float:
    """Learning-rate multiplier: linear warm-up from ``start`` to 1 at ``peak`` of training, then
    linear decay to ``end`` (the triangular schedule of Smith's one-cycle policy; each architecture's
    points are in its Recipe.schedule, airbench's are (0.2, 0.23, 0.07))."""
    if progress < peak:
        return start + (1 - start) * progress / peak
    return end + (1 - end) * max(0.0, 1.0 - progress) / (1.0 - peak)


def _shards(loop_config: dict[str, Any], config: TrainConfig, batch: int, tell: Callable[[dict[str, Any]], None]
            ) -> tuple[CachedShard, CachedShard] | tuple[StreamedShard, StreamedShard]:
    """This worker's (train, val) shards: streamed from Ray Data's split, or decoded once into memory."""
    if loop_config["cache"] != "memory":
        train, val = ray.train.get_dataset_shard("train"), ray.train.get_dataset_shard("val")
        return StreamedShard(train, shuffle_buffer=4 * batch), StreamedShard(val, shuffle_buffer=4 * batch)
    started = time.time()
    context = ray.train.get_context()
    rank, workers = context.get_world_rank(), context.get_world_size()
    mine = {name: rows.take(np.arange(rank, rows.num_rows, workers))
            for name, rows in zip(loop_config["rows"], ray.get(list(loop_config["rows"].values())))}
    shards = _fill_cache(mine, config, loop_config["crash_registry"])
    train, val = shards["train"], shards["val"]
    # DDP steps in lock step: every worker takes as many batches an epoch, the whole batches of the
    # smallest shard (files that failed to decode make the shards differ), each from a new random
    # order of all its images. Evaluation needs no such cut (train_loop_per_worker).
    decoded = torch.zeros(workers, dtype=torch.int64)
    decoded[rank] = len(train.labels)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(decoded)
    train.steps = int(decoded.min()) // batch
    if not train.steps:
        short = int(decoded.argmin())
        raise JobError(f"training worker {short} decoded {int(decoded[short])} of its "
                       f"{len(range(short, loop_config['train_images'], workers))} training images, fewer than a "
                       f"batch ({batch}); every worker takes as many steps, so none would train (images decoded "
                       f"by each worker: {decoded.tolist()})")
    tell({"message": f"cache filled in {time.time() - started:.1f} s: training images by worker {decoded.tolist()}, "
                     f"{train.steps} steps of {batch} an epoch; {len(val.labels)} held-out images on rank 0"})
    return train, val


def _fill_cache(splits: dict[str, pa.Table], config: TrainConfig, crash_registry: ActorHandle) -> dict[str, CachedShard]:
    """Each split of this worker's ``splits`` decoded, unreadable images left out, as a CachedShard.

    Decoded by this worker's own Ray tasks on its node, on the CPUs it holds and would only wait
    with, as many blocks ahead of the one it takes as it holds CPUs (each task reads READ_THREADS
    files at once; on CIFAR-10 here, 1 ahead filled in 9-10 s, 2 in 11-14 s, 4 in 21 s: more
    processes starting), and through ``crash_registry`` (a file that kills its decoder would kill
    the worker). Ray Data's split of a decoded dataset did this before: its budgets ran one
    0.25-CPU decode task at a time for the whole cluster while the workers waited, 51 s for
    CIFAR-10 here (BENCHMARKS.md, "The cache fill on CIFAR-10").

    Each block is copied into the shard as it comes, which releases it from the object store: the
    shard is held once, not also as blocks or while they are joined."""
    shards, ahead = {}, max(1, math.ceil(config.cpus_per_worker))
    for name, rows in splits.items():
        images = np.empty((rows.num_rows, config.image_size, config.image_size, 3), dtype=np.uint8)
        labels = np.empty(rows.num_rows, dtype=np.int64)
        filled = 0
        blocks = ((name, rows.slice(start, ROWS_PER_BLOCK)) for start in range(0, rows.num_rows, ROWS_PER_BLOCK))
        for decoded in _decoded(blocks, config, crash_registry, ahead, scheduling_strategy=on_this_node()):
            count = len(decoded["label"])
            images[filled:filled + count], labels[filled:filled + count] = decoded["image"], decoded["label"]
            filled += count
        shards[name] = CachedShard(torch.from_numpy(images[:filled]), torch.from_numpy(labels[:filled]))
    return shards


@dataclass
class CachedShard:
    """This worker's shard, decoded once, as uint8 NHWC + int64 labels."""

    images: torch.Tensor
    labels: torch.Tensor
    mirrored: torch.Tensor | None = None  # per image: mirrored in even epochs (drawn at the first)
    steps: int | None = None  # training batches an epoch, at most (every worker takes as many)

    def batches(self, size: int, generator: torch.Generator | None = None, epoch: int = 0) -> Batches:
        """Training (with ``generator``): whole batches in a new random order, each image mirrored
        in every other epoch (airbench's alternating flip: over two epochs the model sees both
        sides of every image, where random flips show some one side twice). Else every image in
        order, as it is."""
        if generator is None:
            for start in range(0, len(self.labels), size):
                yield self.images[start:start + size], self.labels[start:start + size]
            return
        if self.mirrored is None:
            self.mirrored = torch.rand(len(self.labels), generator=generator) < 0.5
        order = torch.randperm(len(self.labels), generator=generator)
        for start in range(0, min(len(order) - size + 1, size * (self.steps or len(order))), size):
            idx = order[start:start + size]
            yield mirror(self.images[idx], self.mirrored[idx] ^ bool(epoch % 2)), self.labels[idx]


@dataclass
class StreamedShard:
    """This worker's shard streamed from Ray Data on every pass; decoding runs ahead of training
    on the decode CPUs. Training batches come through a local shuffle buffer (mixing the blocks,
    whose order changes every epoch) and are whole: the split is equal, so every worker gets the
    same number of them."""

    shard: ray.data.DataIterator
    shuffle_buffer: int

    def batches(self, size: int, generator: torch.Generator | None = None, epoch: int = 0) -> Batches:
        """Training (with ``generator``): each image mirrored at random (a stream has no fixed
        images to alternate). Else every image, as it is."""
        training = generator is not None
        for batch in self.shard.iter_torch_batches(
                batch_size=size, device="cpu", drop_last=training, prefetch_batches=2,
                local_shuffle_buffer_size=self.shuffle_buffer if training else None,
                local_shuffle_seed=int(torch.randint(2**31, (1,), generator=generator)) if training else None):
            images = batch["image"]
            if training:
                images = mirror(images, torch.rand(len(images), generator=generator) < 0.5)
            yield images, batch["label"]


def _frozen(plain: nn.Module, state: dict[str, Any], config: TrainConfig, epoch: int) -> set[str]:
    """The parameters that do not train in ``epoch``: those loaded by --init-weights for the first
    --freeze-epochs, and a bias whose module trains it only for its first ``bias_epochs``
    (airbench's whitening bias: 3 epochs, then frozen, which also spares the backward pass the
    gradient of the whitened images)."""
    frozen = set(state["pretrained"]) if epoch < config.freeze_epochs else set()
    for prefix, module in plain.named_modules():
        if epoch >= getattr(module, "bias_epochs", math.inf):
            frozen.add(f"{prefix}.bias" if prefix else "bias")
    return frozen


def _prepare(plain: nn.Module, frozen: set[str]) -> nn.Module:
    """The model for this epoch on the device, DDP-wrapped when there are several workers, its
    ``frozen`` parameters not training. DDP only reduces the gradients of parameters that require
    them when it is built, so a change of the frozen set builds a new wrapper (which replaces the
    old one's gradient hooks) rather than using find_unused_parameters, whose per-step search of
    the graph costs every step of the run."""
    for name, parameter in plain.named_parameters():
        parameter.requires_grad_(name not in frozen)
    # BatchNorm layers stay in train mode while frozen: their running statistics adapt to this
    # lake's images, whose normalisation is not the one the checkpoint was trained with.
    return ray.train.torch.prepare_model(plain)


def _init_match(config: TrainConfig, model: nn.Module) -> InitMatch:
    """How --init-weights fits ``model``; UsageError when it does not (see match_state_dict)."""
    state = load_state_dict(storage.Store(config.init_weights, config.storage()))
    return match_state_dict(model, state, config.init_weights, config.init_weights_partial)


def _check_init_weights(config: TrainConfig, num_classes: int) -> None:
    """On the driver, before Ray starts: the file fits, and a frozen phase leaves something to train.
    Prints which tensors load."""
    model = create_model(config.arch, num_classes=num_classes)
    match = _init_match(config, model)
    log.info(match.describe(config.init_weights))
    if config.freeze_epochs and all(name in match.loaded for name, _ in model.named_parameters()):
        raise UsageError(f"--freeze-epochs {config.freeze_epochs}: every layer of {config.arch} comes from "
                         f"{config.init_weights}, so nothing would train while they are frozen")


def _fresh_state(config: TrainConfig, classes: list[str], train_data: CachedShard | StreamedShard) -> dict[str, Any]:
    """A new run's state. Rank 0 alone reads the stats sample and fits the layers set from data
    (airbench's whitening): DDP copies its weights to the others when it wraps the model, and the
    normalisation is sent to them here. The others would only decode the same images again, and two
    decodes of a batch at once each take the other's attempt for a crash (crashes.py)."""
    torch.manual_seed(config.seed)
    model = create_model(config.arch, num_classes=len(classes))
    pretrained: list[str] = []
    normalisation = None
    if ray.train.get_context().get_world_rank() == 0:
        sample = _stats_sample(train_data)
        normalisation = _pixel_statistics(sample())
        if hasattr(model, "fit_to_data"):  # --init-weights may then replace what it set
            fitting = _fitting_sample(sample(), *normalisation)
            if fitting is not None:
                model.fit_to_data(fitting)
    mean, std = _from_rank_zero(normalisation)
    if config.init_weights:
        match = _init_match(config, model)
        model.load_state_dict(match.loaded, strict=False)
        pretrained = sorted(match.loaded)
    return {"model": model.state_dict(), "epoch": 0, "elapsed_s": 0.0, "history": [], "restores": 0,
            "mean": mean, "std": std, "pretrained": pretrained}


def _stats_sample(train_data: CachedShard | StreamedShard) -> Callable[[], Iterator[np.ndarray]]:
    """A new pass, each time it is called, over batches of the uint8 NHWC training images that the
    normalisation and the layers fitted to data are computed from: the first STATS_IMAGES of this
    worker's cached shard (a random sample: _split shuffled the rows), or the "stats" dataset, the
    first STATS_IMAGES of the training rows, decoded for it when the shard is streamed. Reading it
    from the cache spares each run two executions of that dataset, 2,048 images decoded again."""
    if isinstance(train_data, CachedShard):
        images = train_data.images[:STATS_IMAGES].numpy()
        return lambda: (images[start:start + 64] for start in range(0, len(images), 64))
    stats = ray.train.get_dataset_shard("stats")
    return lambda: (batch["image"] for batch in stats.iter_batches(batch_size=64, batch_format="numpy"))


def _fitting_sample(sample: Iterable[np.ndarray], mean: tuple[float, ...],
                    std: tuple[float, ...]) -> torch.Tensor | None:
    """The normalised images of ``sample`` for a model's ``fit_to_data``, up to FIT_PIXELS pixels;
    None when it has none."""
    images, pixels = [], 0
    for batch in sample:
        images.append(normalize(torch.from_numpy(batch), mean, std))
        pixels += images[-1].shape[0] * images[-1].shape[2] * images[-1].shape[3]
        if pixels >= FIT_PIXELS:
            break
    return torch.cat(images) if images else None


def _lost_output(config: TrainConfig, token: str | None, tell: Callable[[dict[str, Any]], None]) -> bool:
    """Whether another run took --output's lock over since this one took it (``token``): rank 0
    reads ``_LOCK`` before each epoch's checkpoint and metrics are written, and every worker learns
    its answer. The driver's renewals notice too, but only every minute, and they cannot stop the
    workers; a read that fails counts as not lost (the next epoch reads again, the driver decides)."""
    lost = False
    if token and ray.train.get_context().get_world_rank() == 0:
        try:
            held = Dataset(storage.Store(config.output, config.storage())).lock_holder()
            lost = held is None or held.get("token") != token
        except Exception as exc:  # any failure: a store hiccup must not fail the run
            tell({"message": f"could not read the lock of --output {config.output}: {exc}", "warning": True})
    return bool(_from_rank_zero(lost))


def _from_rank_zero_buffers(model: nn.Module) -> None:
    """``model``'s buffers (BatchNorm statistics) set to rank 0's on every worker."""
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        for buffer in model.buffers():
            torch.distributed.broadcast(buffer, src=0)


def _from_rank_zero(value: Any) -> Any:
    """Rank 0's ``value``, on every worker."""
    if not (torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1):
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def _pixel_statistics(sample: Iterable[np.ndarray]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std (in [0, 1] units) of the sampled training images."""
    sums, count = np.zeros(6), 0
    for batch in sample:
        pixels = batch.reshape(-1, 3).astype(np.float64)
        sums += np.concatenate([pixels.sum(0), (pixels ** 2).sum(0)])
        count += len(pixels)
    mean = sums[:3] / max(1, count)
    std = np.sqrt(np.maximum(sums[3:] / max(1, count) - mean ** 2, 1e-6))
    return tuple((mean / 255).tolist()), tuple((std / 255).tolist())


def _restore(checkpoint: ray.train.Checkpoint | None) -> dict[str, Any] | None:
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as folder:
        state = torch.load(Path(folder) / STATE_FILE, map_location="cpu", weights_only=True)
        state["model"] = safetensors.torch.load_file(str(Path(folder) / "model.safetensors"))
    state["mean"], state["std"] = tuple(state["mean"]), tuple(state["std"])
    state["restores"] = state.get("restores", 0) + 1
    state.setdefault("pretrained", [])  # checkpoints written before --freeze-epochs existed
    return state


def _report(row: dict[str, float], model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any],
            config: TrainConfig) -> None:
    """Report the epoch; rank 0 attaches the checkpoint and rewrites metrics.jsonl."""
    if ray.train.get_context().get_world_rank() != 0:
        ray.train.report(row)
        return
    lines = "".join(json.dumps(r) + "\n" for r in state["history"])
    _output(config).write(lines.encode(), "metrics.jsonl")
    with tempfile.TemporaryDirectory() as folder:
        plain = model.module if hasattr(model, "module") else model
        safetensors.torch.save_file({k: v.detach().cpu().contiguous() for k, v in plain.state_dict().items()},
                                    str(Path(folder) / "model.safetensors"))
        torch.save({k: v for k, v in state.items() if k != "model"} | {"optimizer": optimizer.state_dict()},
                   Path(folder) / STATE_FILE)
        ray.train.report(row, checkpoint=ray.train.Checkpoint.from_directory(folder))


def _tell(progress: Queue, item: dict[str, Any]) -> None:
    """Send ``item`` (an epoch's row and time, or a message) to the driver from rank 0 only, so
    that a line per epoch means one line, not one per worker."""
    if ray.train.get_context().get_world_rank() == 0:
        try:
            progress.put(item)
        except ray.exceptions.RayError:
            pass  # progress lines are for people: losing them (the queue's node died) must not fail training


def _sum_across_workers(tensor: torch.Tensor) -> torch.Tensor:
    tensor = tensor.clone()
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(tensor)
    return tensor


def _save_artifact(config: TrainConfig, classes: list[str], checkpoint: ray.train.Checkpoint, metrics: dict[str, Any],
                   val_rows: pa.Table, crash_registry: ActorHandle, human_labels: dict[str, Any] | None = None) -> ModelInfo:
    with checkpoint.as_directory() as folder:
        state = torch.load(Path(folder) / STATE_FILE, map_location="cpu", weights_only=True)
        weights = safetensors.torch.load_file(str(Path(folder) / "model.safetensors"))
    model = create_model(config.arch, num_classes=len(classes))
    model.load_state_dict(weights)
    # val_tta, val_precision: checkpoints of older versions did not say (they evaluated every epoch
    # with --tta, in float32).
    final = {k: metrics[k] for k in ("epoch", "train_loss", "val_loss", "val_accuracy", "elapsed_s")} | \
        {"val_tta": metrics.get("val_tta", config.tta)}
    precision = metrics.get("val_precision", "fp32")
    # A checkpoint written before the validation distribution was recorded has none: the artifact then neither.
    validation = state.get("validation")
    if final["val_tta"] != config.tta or precision != "fp32":
        # The best epoch was evaluated plainly or in bfloat16 (or a rerun changed --tta): model.json's accuracy and
        # validation distribution (label's drift reference) must be those of the artifact as it
        # predicts, which evaluate and label reproduce, not of other forward passes.
        evaluation = eval_epoch(model, _held_out_batches(val_rows, config, crash_registry), state, torch.device("cpu"),
                                len(classes), config.tta)
        if not evaluation.images:
            raise JobError(f"none of the held-out images decoded to evaluate epoch {final['epoch']}'s checkpoint with "
                           f"--tta {config.tta}; no artifact was saved, and a rerun into --output {config.output} "
                           "resumes this run: give another --output or --name")
        log.info(f"epoch {final['epoch']}'s checkpoint (val_acc {final['val_accuracy']:.4f} with tta "
                 f"{final['val_tta']}{', in bfloat16' if precision == 'bf16' else ''}) evaluated with --tta "
                 f"{config.tta}: val_acc {evaluation.accuracy:.4f}")
        final |= {"val_loss": evaluation.loss, "val_accuracy": evaluation.accuracy, "val_tta": config.tta}
        validation = evaluation.distribution(classes)
    info = ModelInfo(arch=config.arch, classes=classes, image_size=config.image_size, mean=state["mean"],
                     std=state["std"], tta=config.tta, config=public_dict(config), metrics=final,
                     validation=validation, human_labels=human_labels or {})
    artifact = _output(config).child("model")
    info = save_model(model, info, artifact)
    log.info(f"model {info.model_id[:12]} (epoch {final['epoch']}, val_accuracy {final['val_accuracy']:.4f}) "
             f"saved to {artifact.root}")
    return info


def _held_out_batches(val_rows: pa.Table, config: TrainConfig, crash_registry: ActorHandle) -> Batches:
    """The held-out images, unreadable ones skipped as training skips them, in eval_batch_size
    batches, decoded by Ray tasks (_decoded: a file that kills its decoder would kill the driver),
    a few batches ahead."""
    size = eval_batch_size(config.image_size)
    blocks = (("val", val_rows.slice(start, size)) for start in range(0, val_rows.num_rows, size))
    for decoded in _decoded(blocks, config, crash_registry, HELD_OUT_AHEAD):
        yield torch.from_numpy(decoded["image"].copy()), torch.from_numpy(decoded["label"].copy())  # writable


def _decoded(blocks: Iterable[tuple[str, pa.Table]], config: TrainConfig, crash_registry: ActorHandle, ahead: int,
             **options: Any) -> Iterator[dict[str, np.ndarray]]:
    """decode_rows of each (scope, rows) of ``blocks``, in order, each in a 0-CPU Ray task (with
    ``options``) sent ``ahead`` blocks before it is taken, through ``crash_registry``."""
    decode = ray.remote(num_cpus=0, max_retries=-1)(decode_rows).options(**options)
    pending: collections.deque = collections.deque()
    for scope, rows in blocks:
        pending.append(decode.remote({"path": rows["path"].to_numpy(zero_copy_only=False),
                                      "label": rows["label"].to_numpy()},
                                     config.storage(), config.image_size, crash_registry, scope))
        if len(pending) > ahead:
            yield _task_results([pending.popleft()])[0]
    while pending:
        yield _task_results([pending.popleft()])[0]


def eval_batch_size(image_size: int) -> int:
    """Held-out images evaluated at once (EVAL_BATCH, EVAL_PIXELS)."""
    return max(1, min(EVAL_BATCH, EVAL_PIXELS // image_size ** 2))


def _write_curves(config: TrainConfig) -> None:
    from distcls.plots import training_curves

    output = _output(config)
    history = [json.loads(line) for line in output.read("metrics.jsonl").decode().splitlines()]
    output.write(training_curves(history), "curves.png")


def _output(config: TrainConfig) -> storage.Store:
    """The run's output folder (workers rebuild it from the config they are given)."""
    return storage.Store(config.output, config.storage())
