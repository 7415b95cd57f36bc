"""``distcls label``: every image of a lake (or manifest) -> one Parquet row, with Ray Data, streaming.

Pipeline: the inputs (blocks of the listing or the manifest's paths, which ``distcls.inputs``
reads in a Ray actor: the driver holds only refs to them) go through the inference stage of ``distcls.predict``
(a pool of actors that load the model once, decode and predict; ``_rows`` shapes their output),
then a pool of writer actors (``dataset.StagedWriter``) writes Parquet files of about
``rows_per_file`` rows into ``<output>/_staging/<run_id>/`` and tells the driver only each file's
name and row count: no output row goes through the driver.
A file that cannot be read or decoded becomes a row with ``error`` set: one bad file never fails the run.

Output columns: path, label, label_id, score, topk_labels, topk_scores, width, height (as displayed),
error, error_kind, size, mtime (of the input file, the key of ``--incremental``), model_id, run_id, labeled_at.

The output dataset (lock, staging, the commit protocol, resume, the keys of ``--incremental``) is
``distcls.dataset``; this module decides what to label and runs the pipeline. With
``--review-below``/``--review-sample`` the run's least confident rows are also committed as its
review queue (``distcls.review``).
"""
from __future__ import annotations

import functools
import logging
import time
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from distcls import artifact, console, engines, inputs, lake, metrics, predict, quality, review, runtime, storage
from distcls.artifact import ModelInfo
from distcls.config import LabelConfig, public_dict
from distcls.dataset import REVIEW, Dataset, Lock, Run, StagedWriter
from distcls.errors import JobError, UsageError
from distcls.storage import Store

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


def label(config: LabelConfig) -> dict[str, Any]:
    """Label every input image exactly once into ``config.output``.

    Returns the summary that is also written to ``_SUCCESS``: counts (images, labelled, errors),
    model_id, run_id, start/end times, images_per_s, the committed files and the resolved config.
    Raises UsageError for bad input (before any Ray work) and JobError when the run cannot finish.
    """
    started = time.time()
    _check_usage(config)
    settings = config.storage()
    model, source = Store(config.model, settings), Store(config.input or config.manifest, settings)
    info = artifact.read_info(model)
    _check_inputs(config, source)
    output = Dataset(Store(config.output, settings))
    if config.dry_run:
        return _dry_run(config, output, info, source)
    with output.lock() as lock:
        finished = output.roll_forward()
        if finished:
            # Another run's commit, not this one's: say so, then label this run's input as asked.
            log.info(f"finished the interrupted commit of run {finished['run_id']} to {config.output}; "
                     f"now labelling {config.input or config.manifest}")
        output.check_existing(overwrite=config.overwrite, incremental=config.incremental)
        runtime.ensure_ray()
        predict.check_gpus(config)
        # The reader owns the input blocks: it lives until the run ends.
        with inputs.reading(config, source) as reader:
            engine = engines.prepare(config.engine, model, config.gpu)
            workers = _workers(config, info)
            found = reader.read(workers)
            run = output.start_run(resume=config.resume, model_id=info.model_id, inputs=reader.contains,
                                   settings=_row_settings(config))
            lock.name_run(run.run_id)
            todo = reader.pending(run.staged, output if config.incremental else None, info.model_id, workers)
            del found  # blocks that pending replaced leave the object store
            return _stage_and_commit(config, output, lock, info, run, todo, started, engine)


def _stage_and_commit(config: LabelConfig, output: Dataset, lock: Lock, info: ModelInfo, run: Run,
                      todo: inputs.Blocks, started: float, engine: dict[str, Any]) -> dict[str, Any]:
    """Label what is pending into the staging folder, check it, commit it; returns the summary."""
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
    from distcls.plots import quality_report  # here, not at the top: the inference actors import this module

    checked = _quality(config, output, info, run.run_id, files)
    queue = _stage_review(config, output, run.run_id, files, counts)
    summary = output.commit(run.run_id, {**_summary(config, output, info, run.run_id, started, counts), "quality": checked},
                            incremental=config.incremental, overwrite=config.overwrite, lock=lock, files=files,
                            report=quality_report(checked, run.run_id), review=queue)
    metrics.record_run(output.uri, summary)
    log.info(f"labelled {summary['images']} images ({summary['errors']} errors) at "
             f"{summary['images_per_s']:.1f} images/s -> {summary['output']}")
    if checked["drift"]:
        log.warning(f"drift: the label distribution moved more than {config.drift_threshold:g} (total variation) from "
                    f"{' and '.join(checked['drifted_from'])}; see {output.uri_of(summary['report'])}")
    return summary


def _stage_review(config: LabelConfig, output: Dataset, run_id: str, files: list[str],
                  counts: dict[str, Any]) -> list[str]:
    """With --review-below/--review-sample: stage the run's review queue from its staged files and
    add its description to ``counts`` (the summary's ``review``); returns the staged queue's files."""
    if config.review_below is None and config.review_sample is None:
        return []
    columns = pa.schema([OUTPUT_SCHEMA.field(name) for name in review.OUTPUT_COLUMNS])
    rows = output.read_staged(run_id, files, columns, review.candidates(config.review_below))
    staged, images = output.stage_review(run_id, review.queue(rows, config.review_sample))
    counts["review"] = {"images": images, "below": config.review_below, "sample": config.review_sample}
    log.info(f"{images} images to review -> {output.uri_of(REVIEW, f'run={run_id}')}" if images
             else "no image to review")
    return staged


def _quality(config: LabelConfig, output: Dataset, info: ModelInfo, run_id: str, files: list[str]) -> dict[str, Any]:
    """The run's quality block (distcls.quality), from its staged files, before they are committed:
    the previous runs are then those committed before this one."""
    found = quality.tally(output.read_staged(run_id, files, quality.COLUMNS), config.low_confidence)
    validation = info.validation.model_dump() if info.validation else None
    previous = quality.previous_counts(output.successes().values(), info.model_id, run_id)
    return quality.report(found, validation=validation, previous=previous, drift_threshold=config.drift_threshold)


def _row_settings(config: LabelConfig) -> dict[str, Any]:
    """The flags that shape an output row: a staged run is resumed only under the same ones."""
    return {name: getattr(config, name) for name in
            ("top_k", "allowed_roots", "max_image_pixels", "max_file_bytes", "engine")}


def _dry_run(config: LabelConfig, output: Dataset, info: ModelInfo, source: Store) -> dict[str, Any]:
    """What this run would label, changing nothing (no lock, no Ray, no write): pending, already
    labelled (--incremental) and already staged (--resume) images, and the time the pending ones
    would take at the rate of the last committed run. Reads the inputs chunk by chunk, as a run
    does, but in the driver (a run reads them in a Ray actor)."""
    output.check_existing(overwrite=config.overwrite, incremental=config.incremental)
    reader = inputs.InputReader(config, source)
    tables = list(reader.tables())
    staged = (output.resumable(info.model_id, reader.contains, _row_settings(config)) if config.resume
              else pa.array([], pa.string()))
    labelled = output.labelled_key_set(info.model_id) if config.incremental else None
    count = sum(t.num_rows for t in tables)
    if count == 0:
        raise inputs.nothing_to_label(config)
    pending = sum(inputs.fresh(t, staged, labelled).num_rows for t in tables)
    last = max((s for s in output.successes().values() if _rate(s.get("images_per_s"))),
               key=lambda s: str(s.get("started_at")), default=None)
    rate = last["images_per_s"] if last else None
    plan = {"dry_run": True, "inputs": count, "pending": pending, "already_staged": len(staged),
            "already_labelled": count - pending - len(staged), "model_id": info.model_id,
            "estimated_seconds": round(pending / rate, 1) if rate else None,
            "rate_images_per_s": rate, "rate_of_run": last["run_id"] if last else None}
    estimate = (f"~{plan['estimated_seconds']:.0f} s at the {rate:g} images/s of run {plan['rate_of_run']}"
                if rate else "no committed run to estimate the time from")
    log.info(f"dry run: {pending} of {count} images to label ({plan['already_labelled']} already labelled, "
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


def _check_inputs(config: LabelConfig, source: Store) -> None:
    """UsageError before any Ray work for an input that is missing or not a folder, or a manifest
    that cannot be read, has no path column or no row (read up to its first chunk with rows). An
    empty lake is found only when it is listed, after Ray starts: listing an object store twice
    would cost what the run's own listing costs."""
    if config.input:
        lake.check_lake(source)
    elif not any(chunk.num_rows for chunk in lake.manifest_chunks(source)):
        raise inputs.nothing_to_label(config)


def _workers(config: LabelConfig, info: ModelInfo) -> int:
    """The most workers the inference stage may get, so that blocks are cut to spread over them."""
    return max(predict.pool(config, info, 2**62).max_actors, runtime.cluster_cpus())


# ---------------------------------------------------------------------------------------------
# The Ray Data pipeline


def _run_pipeline(todo: inputs.Blocks, config: LabelConfig, info: ModelInfo, run_id: str, output: Dataset,
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
    """The inference stage's row maker for labeling (runs in the actors, which count the batch in
    the distcls metrics)."""
    rows = _output_table(batch, ok, probs, info, top_k, run_id, datetime.now(timezone.utc))
    failed = pc.value_counts(rows["error_kind"].filter(pc.is_null(rows["label"]))).to_pylist()
    metrics.count_batch(int(ok.sum()), {row["values"] or "unknown": row["counts"] for row in failed})
    return rows


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


def _rate(value: Any) -> bool:
    """Whether a summary's images_per_s is one to estimate from (a _SUCCESS is a file anyone can edit)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < float("inf")


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat(timespec="seconds")
