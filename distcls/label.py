"""``distcls label``: every image of a lake (or manifest) -> one Parquet row, with Ray Data, streaming.

Pipeline: the listing (an Arrow table) goes to Ray in slices -> ``_Predictor`` actors (one per CPU)
that load the model once and run ``_read_and_decode`` on each batch themselves (threads overlap
object-store GETs and Pillow, both release the GIL), then the model; the driver streams the
output rows into Parquet files of ``rows_per_file`` rows in ``<output>/_staging/<run_id>/``.
With --gpu, decoding runs in CPU tasks ahead of the GPU actors.
A file that cannot be read or decoded becomes a row with ``error`` set: one bad file never fails the run.

Output columns: path, label, label_id, score, topk_labels, topk_scores, width, height (as displayed),
error, size, mtime (of the input file, the key of ``--incremental``), model_id, run_id, labeled_at.

The output dataset (lock, staging, the commit protocol, resume, the keys of ``--incremental``) is
``distcls.dataset``; this module decides what to label and runs the pipeline.
"""
from __future__ import annotations

import os
import re
import sys
import time
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
import torch
from ray.data.extensions import ArrowTensorArray

from distcls import artifact, images, lake, runtime, storage
from distcls.artifact import ModelInfo
from distcls.config import LabelConfig, StorageConfig, public_dict
from distcls.dataset import Dataset, Lock
from distcls.errors import JobError, UsageError

OUTPUT_SCHEMA = pa.schema([
    ("path", pa.string()),
    ("label", pa.string()),
    ("label_id", pa.int32()),
    ("score", pa.float32()),
    ("topk_labels", pa.list_(pa.string())),
    ("topk_scores", pa.list_(pa.float32())),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("error", pa.string()),
    ("size", pa.int64()),
    ("mtime", pa.timestamp("us", tz="UTC")),
    ("model_id", pa.string()),
    ("run_id", pa.string()),
    ("labeled_at", pa.timestamp("us", tz="UTC")),
])
# What the driver hands to Ray: one row per input; ``error`` is preset for inputs never to be read.
INPUT_SCHEMA = pa.schema([
    ("path", pa.string()), ("size", pa.int64()), ("mtime", pa.timestamp("us", tz="UTC")), ("error", pa.string()),
])
_MAX_SLICE_ROWS = 2000
_DECODE_THREADS = 8
# A decode worker holds Python, numpy, Pillow and torch (Ray measured ~450 MiB) plus its batches.
_DECODE_BASE_MEMORY = 2**30


def label(config: LabelConfig) -> dict[str, Any]:
    """Label every input image exactly once into ``config.output``.

    Returns the summary that is also written to ``_SUCCESS``: counts (images, labelled, errors),
    model_id, run_id, start/end times, images_per_s, the committed files and the resolved config.
    Raises UsageError for bad input (before any Ray work) and JobError when the run cannot finish.
    """
    started = time.time()
    storage_config = config.storage()
    _check_usage(config)
    info = artifact.read_info(config.model, storage_config)
    inputs = _inputs(config, storage_config)
    output = Dataset(config.output, storage_config)
    with output.lock() as lock:
        finished = output.roll_forward()
        if finished:
            # Another run's commit, not this one's: say so, then label this run's input as asked.
            _say(f"finished the interrupted commit of run {finished['run_id']} to {config.output}; "
                 f"now labelling {config.input or config.manifest}")
        output.check_existing(overwrite=config.overwrite, incremental=config.incremental)
        runtime.ensure_ray()
        _check_gpus(config)
        return _stage_and_commit(config, output, lock, info, inputs, started)


def _stage_and_commit(config: LabelConfig, output: Dataset, lock: Lock, info: ModelInfo, inputs: pa.Table,
                      started: float) -> dict[str, Any]:
    """Label what is pending into the staging folder, check it, commit it; returns the summary."""
    run = output.start_run(resume=config.resume, model_id=info.model_id, inputs=inputs["path"])
    lock.name_run(run.run_id)
    todo = _pending(inputs, run.staged, output.labelled_keys(info.model_id) if config.incremental else None)
    if todo.num_rows == 0 and len(run.staged) == 0:
        return _nothing_new(config, output, info, started)
    labelling = time.time()
    if todo.num_rows:
        _run_pipeline(todo, config, info, run.run_id, output)
    counts = output.staged_counts(run.run_id, expected=todo.num_rows + len(run.staged))
    # The pipeline's own rate: connecting to Ray and listing the lake are not labeling.
    counts.update(resumed=len(run.staged),
                  images_per_s=round(todo.num_rows / max(time.time() - labelling, 1e-9), 2))
    summary = output.commit(run.run_id, _summary(config, output, info, run.run_id, started, counts),
                            incremental=config.incremental, overwrite=config.overwrite, lock=lock)
    _say(f"labelled {summary['images']} images ({summary['errors']} errors) at "
         f"{summary['images_per_s']:.1f} images/s -> {summary['output']}")
    return summary


# ---------------------------------------------------------------------------------------------
# Inputs


def _check_usage(config: LabelConfig) -> None:
    if (config.input is None) == (config.manifest is None):
        raise UsageError("give exactly one of --input (a lake to list) or --manifest (a file of paths)")
    if config.input and _inside(config.output, config.input):
        raise UsageError(f"output {config.output} is inside the input {config.input}; choose an output elsewhere")
    if config.input and _inside(config.input, config.output):
        raise UsageError(f"input {config.input} is inside the output {config.output}; choose an output elsewhere")


def _inside(uri: str, parent: str) -> bool:
    """Whether ``uri`` is ``parent`` or below it. Remote paths with ``.``/``..`` segments count as
    outside: the store may resolve them differently than a prefix comparison does."""
    scheme, path = storage.split_uri(uri)
    parent_scheme, parent_path = storage.split_uri(parent)
    if storage.is_remote(uri) and any(part in (".", "..") for part in path.split("/")):
        return False
    if scheme == parent_scheme == "file":  # a symlink below the root may lead anywhere: compare targets
        path, parent_path = os.path.realpath(path), os.path.realpath(parent_path)
    return scheme == parent_scheme and (path == parent_path or path.startswith(parent_path.rstrip("/") + "/"))


def _inputs(config: LabelConfig, storage_config: StorageConfig) -> pa.Table:
    """The INPUT_SCHEMA table of everything to label: the lake's listing, or the manifest's
    distinct paths with those outside ``allowed_roots`` marked as errors (never read)."""
    if config.input:
        listing = lake.list_files(config.input, storage_config, config.extensions)
        no_errors = pa.nulls(listing.num_rows, pa.string())
        table = _input_table(listing["path"], listing["size"], listing["mtime"], no_errors)
    else:
        paths = pc.unique(lake.read_manifest(config.manifest, storage_config)["path"])
        errors = _outside_errors(paths, config.allowed_roots)
        table = _input_table(paths, pa.nulls(len(paths), pa.int64()), pa.nulls(len(paths), pa.int64()), errors)
    if table.num_rows == 0:
        raise UsageError(f"{config.input or config.manifest}: no images to label "
                         f"(extensions {', '.join(config.extensions)})")
    return table


def _outside_errors(paths: pa.Array, allowed_roots: list[str]) -> pa.Array:
    """"outside allowed roots" for each path outside them, else null. Without roots, no Python
    string per path: a million-row manifest stays in Arrow."""
    if not allowed_roots:
        return pa.nulls(len(paths), pa.string())
    outside = [not any(_inside(p, r) for r in allowed_roots) for p in paths.to_pylist()]
    return pa.array(["outside allowed roots" if o else None for o in outside], pa.string())


def _input_table(paths: pa.Array, sizes: pa.Array, mtime_ns: pa.Array, errors: pa.Array) -> pa.Table:
    # Microseconds, as in the output column, so that listing and output keys compare equal.
    mtime = pc.cast(pc.divide(mtime_ns, 1000), pa.timestamp("us", tz="UTC"))
    return pa.Table.from_arrays([paths, sizes, mtime, errors], schema=INPUT_SCHEMA)


def _pending(inputs: pa.Table, staged_paths: pa.Array, labelled: pa.Table | None) -> pa.Table:
    """Inputs minus paths already staged (resume) minus keys already committed (incremental)."""
    # Nothing staged is the usual case: no filtered copy of a listing of millions of paths.
    todo = inputs.filter(pc.invert(pc.is_in(inputs["path"], value_set=staged_paths))) if len(staged_paths) else inputs
    if labelled is None or labelled.num_rows == 0:
        return todo
    keys = _keys(todo).append_column("_row", pa.array(np.arange(todo.num_rows)))
    fresh = keys.join(_keys(labelled), ["path", "size", "mtime"], join_type="left anti")
    return todo.take(np.sort(fresh["_row"].to_numpy()))


def _keys(table: pa.Table) -> pa.Table:
    """(path, size, mtime) with nulls as -1, since join keys that are null never match."""
    mtime = pc.cast(table["mtime"], pa.int64())
    return pa.table({"path": table["path"], "size": pc.fill_null(table["size"], -1), "mtime": pc.fill_null(mtime, -1)})


# ---------------------------------------------------------------------------------------------
# The Ray Data pipeline


def _run_pipeline(todo: pa.Table, config: LabelConfig, info: ModelInfo, run_id: str, output: Dataset) -> None:
    """Read, decode and predict, then write Parquet into the run's staging folder.

    On CPUs every inference actor reads and decodes its own batches (one actor per CPU, one torch
    thread each): both stages then use every core whichever is the slower one, and decoded pixels
    never cross the object store. With --gpu, CPU tasks decode and the GPU actors only run the model.
    """
    ray.data.DataContext.get_current().enable_progress_bars = True
    storage_config = config.storage()
    decode_args = {"storage_config": storage_config, "size": info.image_size, "max_pixels": config.max_image_pixels}
    predictor_args = {"model_uri": config.model, "storage_config": storage_config, "run_id": run_id,
                      "top_k": config.top_k, "gpu": config.gpu, "decode_args": None if config.gpu else decode_args}
    cpus = runtime.cluster_cpus()
    memory = _DECODE_BASE_MEMORY + 4 * config.batch_size * 3 * info.image_size**2
    # from_blocks, not from_arrow: that runs a Ray task per slice just to read its schema, which
    # costs the first worker process ~1 s before the pipeline starts.
    dataset = ray.data.from_blocks(_slices(todo, cpus))
    if config.gpu:
        dataset = dataset.map_batches(
            _read_and_decode, batch_format="pyarrow", batch_size=config.batch_size, fn_kwargs=decode_args,
            num_cpus=1, memory=memory)
    dataset = dataset.map_batches(
        _Predictor, batch_format="pyarrow", batch_size=config.batch_size, fn_constructor_kwargs=predictor_args,
        compute=ray.data.ActorPoolStrategy(size=_concurrency(config)), num_gpus=1 if config.gpu else 0,
        # A GPU actor on a one-CPU cluster would starve the decode tasks if it held the CPU.
        num_cpus=1 if cpus >= 2 or not config.gpu else 0, memory=None if config.gpu else memory)
    try:
        # The driver writes: an output row is a few hundred bytes, far less than its image, whereas
        # Ray Data's write task waited seconds at the end of a run for a fresh worker process.
        output.write_staged(run_id, dataset.iter_batches(batch_size=None, batch_format="pyarrow"), config.rows_per_file)
    except ray.exceptions.RayTaskError as exc:
        # A task's JobError (images.read_batch: the store unreachable after retries) reaches the
        # driver only as text inside Ray Data's UserCodeException; say it in one line.
        reason = re.search(r"distcls\.errors\.JobError: (.+)", str(exc))
        if reason is None:
            raise
        raise JobError(f"{reason.group(1)}; nothing was committed") from None


def _slices(table: pa.Table, cpus: int) -> list[pa.Table]:
    """Blocks of at most 2000 rows, but at least ~4 per CPU so that a small lake still spreads
    over the cluster's decode tasks."""
    rows = max(1, min(_MAX_SLICE_ROWS, -(-table.num_rows // (4 * max(1, cpus)))))
    return [table.slice(start, rows) for start in range(0, table.num_rows, rows)]


def _concurrency(config: LabelConfig) -> int:
    """Inference actors: as configured, else one per GPU, else one per CPU (each decodes its own
    batches)."""
    if config.concurrency:
        return config.concurrency
    if config.gpu:
        return max(1, runtime.cluster_gpus())
    return max(1, runtime.cluster_cpus())


def _read_and_decode(batch: pa.Table, storage_config: StorageConfig, size: int, max_pixels: int) -> pa.Table:
    """Input rows -> path, size, mtime, width, height, error, image (fixed-shape uint8 tensor).
    Rows with a preset error are not read; any failure to read or decode is that row's error."""
    n = batch.num_rows
    errors = batch["error"].to_pylist()
    wanted = [i for i, error in enumerate(errors) if error is None]
    pixels = np.zeros((n, size, size, 3), dtype=np.uint8)
    width = np.full(n, -1, dtype=np.int32)
    height = np.full(n, -1, dtype=np.int32)
    if wanted:
        paths = batch["path"].take(wanted).to_pylist()
        got = images.read_batch(paths, storage_config, size, max_pixels, threads=_DECODE_THREADS)
        pixels[wanted], width[wanted], height[wanted] = got["image"], got["width"], got["height"]
        for i, error in zip(wanted, got["error"]):
            errors[i] = error
    return pa.table({
        "path": batch["path"], "size": batch["size"], "mtime": batch["mtime"],
        "width": pa.array(width, mask=width < 0), "height": pa.array(height, mask=height < 0),
        "error": pa.array(errors, pa.string()),
        "image": ArrowTensorArray.from_numpy(pixels),
    })


class _Predictor:
    """An inference actor: loads the model once, turns batches into output rows. Input batches are
    decoded ones (``_read_and_decode``'s columns), or with ``decode_args`` input rows it decodes itself."""

    def __init__(self, model_uri: str, storage_config: StorageConfig, run_id: str, top_k: int, gpu: bool,
                 decode_args: dict[str, Any] | None = None) -> None:
        # One thread per reserved CPU: the other actors or the decode tasks have the other cores.
        torch.set_num_threads(1)
        self.device = "cuda" if gpu and torch.cuda.is_available() else "cpu"
        model, self.info = artifact.load_model(model_uri, storage_config)
        self.model = model.to(self.device, memory_format=torch.channels_last)
        self.run_id = run_id
        self.top_k = top_k
        self.decode_args = decode_args

    def __call__(self, batch: pa.Table) -> pa.Table:
        if self.decode_args is not None:
            batch = _read_and_decode(batch, **self.decode_args)
        ok = pc.is_null(batch["error"]).to_numpy(zero_copy_only=False)
        probs = np.zeros((0, len(self.info.classes)), dtype=np.float32)
        if ok.any():
            pixels = batch["image"].combine_chunks().to_numpy()[ok]
            amp = self.device == "cuda"
            probs = artifact.predict_proba(self.model, self.info, pixels, self.device, amp=amp).numpy()
        return _output_table(batch, ok, probs, self.info, self.top_k, self.run_id, datetime.now(timezone.utc))


def _output_table(batch: pa.Table, ok: np.ndarray, probs: np.ndarray, info: ModelInfo, top_k: int,
                  run_id: str, labeled_at: datetime) -> pa.Table:
    """OUTPUT_SCHEMA rows for a decoded batch; ``probs`` holds one row per ``ok`` row only.
    Failed rows keep path, size, mtime and error, with null predictions."""
    n = batch.num_rows
    classes = pa.array(info.classes, pa.string())
    # A stable sort puts the first of equal scores first, as argmax does.
    top = np.argsort(-probs, axis=1, kind="stable")[:, :min(top_k, len(info.classes))]
    ids = _scatter(top[:, 0].astype(np.int32), ok)
    columns = {
        "path": batch["path"], "label": pc.take(classes, ids), "label_id": ids,
        "score": _scatter(np.take_along_axis(probs, top[:, :1], axis=1)[:, 0], ok),
        **_topk_lists(top, probs, ok, classes),
        "width": batch["width"], "height": batch["height"], "error": batch["error"],
        "size": batch["size"], "mtime": batch["mtime"],
        "model_id": pa.repeat(pa.scalar(info.model_id, pa.string()), n),
        "run_id": pa.repeat(pa.scalar(run_id, pa.string()), n),
        "labeled_at": pa.repeat(pa.scalar(labeled_at, pa.timestamp("us", tz="UTC")), n),
    }
    return pa.Table.from_pydict(columns, schema=OUTPUT_SCHEMA)


def _scatter(values: np.ndarray, ok: np.ndarray) -> pa.Array:
    """``values`` (one per ok row) placed at the ok rows of a column that is null elsewhere."""
    full = np.zeros(len(ok), dtype=values.dtype)
    full[ok] = values
    return pa.array(full, mask=~ok)


def _topk_lists(top: np.ndarray, probs: np.ndarray, ok: np.ndarray, classes: pa.Array) -> dict[str, pa.Array]:
    """topk_labels and topk_scores: k entries per ok row, null for failed rows."""
    offsets = pa.array(np.concatenate([[0], np.cumsum(np.where(ok, top.shape[1], 0))]).astype(np.int32))
    failed = pa.array(~ok)
    labels = pc.take(classes, pa.array(top.ravel()))
    scores = pa.array(np.take_along_axis(probs, top, axis=1).ravel(), pa.float32())
    return {"topk_labels": pa.ListArray.from_arrays(offsets, labels, mask=failed),
            "topk_scores": pa.ListArray.from_arrays(offsets, scores, mask=failed)}


def _check_gpus(config: LabelConfig) -> None:
    if config.gpu and runtime.cluster_gpus() == 0:
        raise UsageError("--gpu was given but the Ray cluster has no GPUs; drop --gpu to label on CPUs")


# ---------------------------------------------------------------------------------------------
# Summaries


def _summary(config: LabelConfig, output: Dataset, info: ModelInfo, run_id: str, started: float,
             counts: dict[str, Any]) -> dict[str, Any]:
    return {
        "output": output.uri_of(f"run={run_id}") if config.incremental else output.uri, **counts,
        "model_id": info.model_id, "run_id": run_id, "started_at": _iso(started), "finished_at": _iso(time.time()),
        "seconds": round(time.time() - started, 3), "config": public_dict(config),
    }


def _nothing_new(config: LabelConfig, output: Dataset, info: ModelInfo, started: float) -> dict[str, Any]:
    """An incremental run with nothing to label commits nothing: no empty partition per tick."""
    output.discard_staging()
    _say(f"nothing new to label in {config.input or config.manifest} for model {info.model_id[:12]}; "
         f"{config.output} is unchanged")
    return {"output": output.uri, "images": 0, "labelled": 0, "errors": 0, "resumed": 0, "images_per_s": 0.0,
            "model_id": info.model_id,
            "run_id": None, "started_at": _iso(started), "finished_at": _iso(time.time()), "skipped": "nothing new",
            "config": public_dict(config)}


# ---------------------------------------------------------------------------------------------
# Small helpers


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat(timespec="seconds")


def _say(message: str) -> None:
    """Progress for people on stderr; stdout stays the CLI's JSON summary."""
    print(f"distcls label: {message}", file=sys.stderr, flush=True)
