"""``distcls label``: every image of a lake (or manifest) -> one Parquet row, with Ray Data, streaming.

Pipeline: the listing (an Arrow table) goes through the inference stage of ``distcls.predict``
(a pool of actors that load the model once, decode and predict; ``_rows`` shapes their output),
then a pool of writer actors (``dataset.StagedWriter``) writes Parquet files of about
``rows_per_file`` rows into ``<output>/_staging/<run_id>/`` and tells the driver only each file's
name and row count: no output row goes through the driver.
A file that cannot be read or decoded becomes a row with ``error`` set: one bad file never fails the run.

Output columns: path, label, label_id, score, topk_labels, topk_scores, width, height (as displayed),
error, error_kind, size, mtime (of the input file, the key of ``--incremental``), model_id, run_id, labeled_at.

The output dataset (lock, staging, the commit protocol, resume, the keys of ``--incremental``) is
``distcls.dataset``; this module decides what to label and runs the pipeline.
"""
from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from distcls import artifact, dedup, engines, lake, predict, runtime, storage
from distcls import console
from distcls.artifact import ModelInfo
from distcls.config import LabelConfig, StorageConfig, public_dict
from distcls.dataset import Dataset, Lock, StagedWriter, keys
from distcls.errors import JobError, UsageError

log = logging.getLogger(__name__)

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
    ("error_kind", pa.string()),  # images.ERROR_KINDS; not_found and transient rows are not final
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
    _check_inputs(config, storage_config)
    output = Dataset(config.output, storage_config)
    if config.dry_run:
        return _dry_run(config, output, info, storage_config)
    with output.lock() as lock:
        finished = output.roll_forward()
        if finished:
            # Another run's commit, not this one's: say so, then label this run's input as asked.
            log.info(f"finished the interrupted commit of run {finished['run_id']} to {config.output}; "
                     f"now labelling {config.input or config.manifest}")
        output.check_existing(overwrite=config.overwrite, incremental=config.incremental)
        runtime.ensure_ray()
        predict.check_gpus(config)
        engine = engines.prepare(config.engine, config.model, storage_config, config.gpu)
        # After ensure_ray: the inputs go into the object store chunk by chunk as they are read.
        inputs = _inputs(config, storage_config, _workers(config, info))
        return _stage_and_commit(config, output, lock, info, inputs, started, engine)


def _stage_and_commit(config: LabelConfig, output: Dataset, lock: Lock, info: ModelInfo, inputs: Inputs,
                      started: float, engine: dict[str, Any]) -> dict[str, Any]:
    """Label what is pending into the staging folder, check it, commit it; returns the summary."""
    run = output.start_run(resume=config.resume, model_id=info.model_id, inputs=inputs.contains,
                           settings=_row_settings(config))
    lock.name_run(run.run_id)
    labelled = output.labelled_key_set(info.model_id) if config.incremental else None
    todo = _pending(inputs.blocks, run.staged, labelled, _workers(config, info))
    del inputs  # the last reference: blocks that _pending replaced leave the object store
    if todo.rows == 0 and len(run.staged) == 0:
        return _nothing_new(config, output, info, started)
    labelling = time.time()
    files = list(run.files)
    if todo.rows:
        files += _run_pipeline(todo, config, info, run.run_id, output, engine)
    counts = output.staged_counts(run.run_id, expected=todo.rows + len(run.staged), files=files)
    # The pipeline's own rate: connecting to Ray and listing the lake are not labeling.
    counts.update(resumed=len(run.staged),
                  images_per_s=round(todo.rows / max(time.time() - labelling, 1e-9), 2))
    summary = output.commit(run.run_id, _summary(config, output, info, run.run_id, started, counts),
                            incremental=config.incremental, overwrite=config.overwrite, lock=lock, files=files)
    log.info(f"labelled {summary['images']} images ({summary['errors']} errors) at "
             f"{summary['images_per_s']:.1f} images/s -> {summary['output']}")
    return summary


def _row_settings(config: LabelConfig) -> dict[str, Any]:
    """The flags that shape an output row: a staged run is resumed only under the same ones."""
    return {name: getattr(config, name) for name in
            ("top_k", "allowed_roots", "max_image_pixels", "max_file_bytes", "engine")}


def _dry_run(config: LabelConfig, output: Dataset, info: ModelInfo, storage_config: StorageConfig) -> dict[str, Any]:
    """What this run would label, changing nothing (no lock, no Ray, no write): pending, already
    labelled (--incremental) and already staged (--resume) images, and the time the pending ones
    would take at the rate of the last committed run. Reads the inputs chunk by chunk, as a run does."""
    output.check_existing(overwrite=config.overwrite, incremental=config.incremental)
    first = dedup.Distinct()
    tables = list(_input_tables(config, storage_config, first))
    contains = _contains(config, first)
    staged = (output.resumable(info.model_id, contains, _row_settings(config)) if config.resume
              else pa.array([], pa.string()))
    labelled = output.labelled_key_set(info.model_id) if config.incremental else None
    inputs = sum(t.num_rows for t in tables)
    if inputs == 0:
        raise _nothing_to_label(config)
    pending = sum(_fresh(t, staged, labelled).num_rows for t in tables)
    last = max((s for s in output.successes().values() if s.get("images_per_s")),
               key=lambda s: str(s.get("started_at")), default=None)
    rate = last["images_per_s"] if last else None
    plan = {"dry_run": True, "inputs": inputs, "pending": pending, "already_staged": len(staged),
            "already_labelled": inputs - pending - len(staged), "model_id": info.model_id,
            "estimated_seconds": round(pending / rate, 1) if rate else None,
            "rate_images_per_s": rate, "rate_of_run": last["run_id"] if last else None}
    estimate = (f"~{plan['estimated_seconds']:.0f} s at the {rate:g} images/s of run {plan['rate_of_run']}"
                if rate else "no committed run to estimate the time from")
    log.info(f"dry run: {pending} of {inputs} images to label ({plan['already_labelled']} already labelled, "
             f"{len(staged)} already staged); {estimate}; nothing was started or written")
    return plan


# ---------------------------------------------------------------------------------------------
# Inputs


def _check_usage(config: LabelConfig) -> None:
    predict.check_usage(config)
    if (config.input is None) == (config.manifest is None):
        raise UsageError("give exactly one of --input (a lake to list) or --manifest (a file of paths)")
    if config.input and storage.inside(config.output, config.input):
        raise UsageError(f"output {config.output} is inside the input {config.input}; choose an output elsewhere")
    if config.input and storage.inside(config.input, config.output):
        raise UsageError(f"input {config.input} is inside the output {config.output}; choose an output elsewhere")


def _check_inputs(config: LabelConfig, storage_config: StorageConfig) -> None:
    """UsageError before any Ray work for an input that is missing or not a folder, or a manifest
    that cannot be read, has no path column or no row (read up to its first chunk with rows). An
    empty lake is found only when it is listed, after Ray starts: listing an object store twice
    would cost what the run's own listing costs."""
    if config.input:
        lake.check_lake(config.input, storage_config)
    elif not any(chunk.num_rows for chunk in lake.manifest_chunks(config.manifest, storage_config)):
        raise _nothing_to_label(config)


def _nothing_to_label(config: LabelConfig) -> UsageError:
    return UsageError(f"{config.input or config.manifest}: no images to label "
                      f"(extensions {', '.join(config.extensions)})")


@dataclass(frozen=True)
class Inputs:
    """What to label, in the object store, and a test of whether staged rows (path, size, mtime)
    are of current inputs as they are now, for --resume: by 64-bit hash, so a staged row of an
    earlier run's inputs that only shares its hash with an input of this one (about 1 in 10^12 per
    row for 5 million inputs) would be kept."""

    blocks: predict.Blocks
    contains: Callable[[pa.Table], pa.Array]


def _inputs(config: LabelConfig, storage_config: StorageConfig, workers: int,
            chunk_rows: int = lake.MANIFEST_CHUNK_ROWS) -> Inputs:
    """Everything to label as INPUT_SCHEMA blocks: the lake's listing, or the manifest's distinct
    paths with those outside ``allowed_roots`` marked as errors (never read). Read, normalised,
    de-duplicated and put into the object store ``chunk_rows`` at a time: the driver keeps 8 bytes
    per distinct input (dedup.Distinct), not the paths."""
    first = dedup.Distinct()
    blocks = predict.put_blocks(_input_tables(config, storage_config, first, chunk_rows), workers)
    if blocks.rows == 0:
        raise _nothing_to_label(config)
    return Inputs(blocks, _contains(config, first))


def _input_tables(config: LabelConfig, storage_config: StorageConfig, first: dedup.Distinct,
                  chunk_rows: int = lake.MANIFEST_CHUNK_ROWS) -> Iterator[pa.Table]:
    if config.input:
        return _listing_inputs(config, storage_config, first, chunk_rows)
    return _manifest_inputs(config, storage_config, first, chunk_rows)


def _contains(config: LabelConfig, first: dedup.Distinct) -> Callable[[pa.Table], pa.Array]:
    """Whether staged rows are of inputs as they are now: a listed file by (path, size, mtime), so
    that one rewritten since its row was staged is labelled again; a manifest row by path (it
    carries no size or mtime)."""
    if config.input:
        return lambda staged: pa.array(first.contains(keys(staged)))
    return lambda staged: pa.array(first.contains(staged["path"].combine_chunks()))


def _listing_inputs(config: LabelConfig, storage_config: StorageConfig, first: dedup.Distinct,
                    chunk_rows: int) -> Iterator[pa.Table]:
    """INPUT_SCHEMA tables of the lake's listing (no path twice: nothing to de-duplicate); ``first``
    remembers each file's (path, size, mtime) key for --resume."""
    for listing in lake.list_chunks(config.input, storage_config, config.extensions, chunk_rows):
        table = _input_table(listing["path"], listing["size"], listing["mtime"], pa.nulls(listing.num_rows, pa.string()))
        first.remember(keys(table))
        yield table


def _manifest_inputs(config: LabelConfig, storage_config: StorageConfig, first: dedup.Distinct,
                     chunk_rows: int) -> Iterator[pa.Table]:
    """INPUT_SCHEMA tables of the manifest's paths, each once (its first row)."""
    def manifest() -> Iterator[pa.Array]:
        return (t["path"] for t in lake.manifest_chunks(config.manifest, storage_config, chunk_rows))

    for paths in manifest():
        yield _manifest_table(paths.filter(pa.array(first.keep(paths))), config.allowed_roots)
    yield _manifest_table(first.collided(manifest), config.allowed_roots)


def _manifest_table(paths: pa.Array, allowed_roots: list[str]) -> pa.Table:
    nulls = pa.nulls(len(paths), pa.int64())
    return _input_table(paths, nulls, nulls, _outside_errors(paths, allowed_roots))


def _outside_errors(paths: pa.Array, allowed_roots: list[str]) -> pa.Array:
    """"outside allowed roots" for each path outside them, else null."""
    if not allowed_roots:
        return pa.nulls(len(paths), pa.string())
    inside = storage.inside_any(paths.to_pylist(), allowed_roots)
    return pa.array([None if i else "outside allowed roots" for i in inside], pa.string())


def _workers(config: LabelConfig, info: ModelInfo) -> int:
    """The most workers the inference stage may get, so that blocks are cut to spread over them."""
    return max(predict.pool(config, info, 2**62).max_actors, runtime.cluster_cpus())


def _input_table(paths: pa.Array, sizes: pa.Array, mtime_ns: pa.Array, errors: pa.Array) -> pa.Table:
    # Microseconds, as in the output column, so that listing and output keys compare equal.
    mtime = pc.cast(pc.divide(mtime_ns, 1000), pa.timestamp("us", tz="UTC"))
    return pa.Table.from_arrays([paths, sizes, mtime, errors], schema=INPUT_SCHEMA)


def _pending(blocks: predict.Blocks, staged_paths: pa.Array, labelled: dedup.KeySet | None,
             workers: int) -> predict.Blocks:
    """Inputs minus paths already staged (resume) minus keys already committed (incremental),
    block by block."""
    if not len(staged_paths) and not labelled:
        return blocks  # the usual case: no filtered copy of millions of inputs
    return predict.put_blocks((_fresh(ray.get(ref), staged_paths, labelled) for ref in blocks.refs), workers)


def _fresh(todo: pa.Table, staged_paths: pa.Array, labelled: dedup.KeySet | None) -> pa.Table:
    """The rows of one block that are neither staged nor labelled (their (path, size, mtime) key)."""
    if len(staged_paths):
        todo = todo.filter(pc.invert(pc.is_in(todo["path"], value_set=staged_paths)))
    if labelled:
        todo = todo.filter(pa.array(~labelled.contains(keys(todo))))
    return todo


# ---------------------------------------------------------------------------------------------
# The Ray Data pipeline


def _run_pipeline(todo: predict.Blocks, config: LabelConfig, info: ModelInfo, run_id: str, output: Dataset,
                  engine: dict[str, Any]) -> list[str]:
    """Read, decode and predict (the shared inference stage), then write Parquet into the run's
    staging folder from the workers (``StagedWriter``); returns the names of the files written."""
    # Batches of rows_per_file rows: each writer call writes one file of that many rows, except
    # the last of a bundle (Ray Data bundles whole blocks, so a bundle overshoots by under a block).
    writer = predict.Stage(StagedWriter, {"dataset": output, "run_id": run_id, "rows_per_file": config.rows_per_file},
                           batch_size=config.rows_per_file)
    written = predict.predict(todo, config, info, functools.partial(_rows, top_k=config.top_k, run_id=run_id), engine,
                              max_pixels=config.max_image_pixels, then=writer)
    # Progress as the writers report files: every --rows-per-file rows (and at the end of a bundle).
    progress, files = console.Progress(log, todo.rows), []
    try:
        for table in written:
            files += table["file"].to_pylist()
            progress.add(sum(table["rows"].to_pylist()))
    except JobError as exc:
        raise JobError(f"{exc}; nothing was committed") from None
    finally:
        progress.close()
    return files


def _rows(batch: pa.Table, ok: np.ndarray, probs: np.ndarray, info: ModelInfo, top_k: int, run_id: str) -> pa.Table:
    """The inference stage's row maker for labeling (runs in the actors)."""
    return _output_table(batch, ok, probs, info, top_k, run_id, datetime.now(timezone.utc))


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
        "error_kind": batch["error_kind"], "size": batch["size"], "mtime": batch["mtime"],
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
    log.info(f"nothing new to label in {config.input or config.manifest} for model {info.model_id[:12]}; "
             f"{config.output} is unchanged")
    return {"output": output.uri, "images": 0, "labelled": 0, "errors": 0, "resumed": 0, "images_per_s": 0.0,
            "model_id": info.model_id,
            "run_id": None, "started_at": _iso(started), "finished_at": _iso(time.time()), "skipped": "nothing new",
            "config": public_dict(config)}


# ---------------------------------------------------------------------------------------------
# Small helpers


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat(timespec="seconds")
