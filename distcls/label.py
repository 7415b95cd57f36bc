"""``distcls label``: every image of a lake (or manifest) -> one Parquet row, with Ray Data, streaming.

Pipeline: the listing (an Arrow table) goes through the inference stage of ``distcls.predict``
(a pool of actors that load the model once, decode and predict; ``_rows`` shapes their output);
the driver streams the output rows into Parquet files of ``rows_per_file`` rows in
``<output>/_staging/<run_id>/``.
A file that cannot be read or decoded becomes a row with ``error`` set: one bad file never fails the run.

Output columns: path, label, label_id, score, topk_labels, topk_scores, width, height (as displayed),
error, error_kind, size, mtime (of the input file, the key of ``--incremental``), model_id, run_id, labeled_at.

Commit protocol (the same on local disks and S3, which has no atomic rename):

1. A run writes only below ``<output>/_staging/<run_id>/``; names starting with ``_`` are invisible
   to pyarrow/pandas/DuckDB dataset readers, so nothing half-done is ever part of the dataset.
2. When every input has a staged row (checked: row count and distinct paths), the run writes
   ``<output>/_COMMITTING``: the whole plan (old files to delete on --overwrite, staged -> final
   names, the summary). Then it applies it: delete, move, write ``_SUCCESS`` last, drop the marker.
   Every step is idempotent (on S3 a move is a copy, then a delete), so any later run that finds
   the marker first finishes the commit ("rolls forward"): an interrupted commit is completed,
   never redone or duplicated. With --overwrite the old dataset stays readable until this step.
3. A rerun without ``--resume`` discards staged files and starts over; with ``--resume`` it keeps
   the staged files of the last run that are readable and made by the same model, and labels only
   the paths not in them. Either way every input ends up exactly once.
4. ``--incremental``: one ``run=<run_id>/`` partition per run with its own ``_SUCCESS``; a run labels
   only inputs whose (path, size, mtime) no committed partition holds for this model_id (manifest
   inputs carry no size/mtime, so for them the path alone decides). Partitions without
   ``_SUCCESS`` are leftovers and are deleted. When nothing is new the run commits nothing and
   says so, so that a scheduled job does not grow a partition per tick.

One run per output at a time. Why not ``ray.data.checkpoint.CheckpointConfig``: in Ray 2.60 it only
filters rows coming from ``read_*`` datasources (``Planner._CHECKPOINT_FILTER_OPS = (Read,
ReadFiles)``, not ``from_arrow``), keeps its own id files next to the data, and does not make the
final dataset appear atomically; the hand-built protocol above covers commit, resume and
incremental runs in one testable place.
"""
from __future__ import annotations

import functools
import itertools
import posixpath
import secrets
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray

from distcls import artifact, engines, lake, predict, runtime, storage
from distcls.artifact import ModelInfo
from distcls.config import LabelConfig, StorageConfig, public_dict
from distcls.errors import JobError, UsageError

SUCCESS = "_SUCCESS"
COMMITTING = "_COMMITTING"
STAGING = "_staging"

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
# Rows per Parquet row group of the output: large enough for readers to skip by statistics, small
# enough that the driver, which writes them, holds a few MB.
_ROW_GROUP_ROWS = 16_384


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
    dest = _Dest.of(config.output, storage_config)
    _require_writable(dest)
    finished = _roll_forward(dest)
    if finished and not config.incremental and not config.overwrite:
        _say(f"finished the interrupted commit of run {finished['run_id']} to {config.output}")
        return finished
    _refuse_existing(dest, config)
    runtime.ensure_ray()
    predict.check_gpus(config)
    engine = engines.prepare(config.engine, config.model, storage_config, config.gpu)
    return _stage_and_commit(config, dest, info, inputs, started, engine)


def _stage_and_commit(config: LabelConfig, dest: _Dest, info: ModelInfo, inputs: pa.Table,
                      started: float, engine: dict[str, Any]) -> dict[str, Any]:
    """Label what is pending into the staging folder, check it, commit it; returns the summary."""
    run_id, reused = _prepare_staging(dest, config.resume, info.model_id)
    todo = _pending(inputs, reused, _labelled_keys(dest, info.model_id) if config.incremental else None)
    if todo.num_rows == 0 and len(reused) == 0:
        return _nothing_new(config, dest, info, started)
    labelling = time.time()
    if todo.num_rows:
        _run_pipeline(todo, config, info, run_id, dest, engine)
    counts = _staged_counts(dest, run_id, expected=todo.num_rows + len(reused))
    # The pipeline's own rate: connecting to Ray and listing the lake are not labeling.
    counts.update(resumed=len(reused), images_per_s=round(todo.num_rows / max(time.time() - labelling, 1e-9), 2))
    plan = _plan(dest, config, run_id, _summary(config, dest, info, run_id, started, counts))
    _commit(dest, plan)
    summary = plan["summary"]
    _say(f"labelled {summary['images']} images ({summary['errors']} errors) at "
         f"{summary['images_per_s']:.1f} images/s -> {summary['output']}")
    return summary


# ---------------------------------------------------------------------------------------------
# Inputs


def _check_usage(config: LabelConfig) -> None:
    predict.check_usage(config)
    if (config.input is None) == (config.manifest is None):
        raise UsageError("give exactly one of --input (a lake to list) or --manifest (a file of paths)")
    if config.input and storage.inside(config.output, config.input):
        raise UsageError(f"output {config.output} is inside the input {config.input}; choose an output elsewhere")


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
    outside = [not any(storage.inside(p, r) for r in allowed_roots) for p in paths.to_pylist()]
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


def _run_pipeline(todo: pa.Table, config: LabelConfig, info: ModelInfo, run_id: str, dest: _Dest,
                  engine: dict[str, Any]) -> None:
    """Read, decode and predict (the shared inference stage), then write Parquet into the run's
    staging folder."""
    ray.data.DataContext.get_current().enable_progress_bars = True
    rows = predict.predict(todo, config, info, functools.partial(_rows, top_k=config.top_k, run_id=run_id), engine,
                           max_pixels=config.max_image_pixels)
    dest.fs.create_dir(dest.path(STAGING, run_id))
    try:
        _write_staged(rows, dest, run_id, config.rows_per_file)
    except JobError as exc:
        raise JobError(f"{exc}; nothing was committed") from None


def _write_staged(batches: Iterable[pa.Table], dest: _Dest, run_id: str, rows_per_file: int) -> None:
    """Stream output rows into Parquet files of ``rows_per_file`` rows (the last one fewer) in the
    run's staging folder. The driver writes them: an output row is a few hundred bytes, far less
    than its image, whereas Ray Data's write task waited seconds at the end of a run for a fresh
    worker process. The driver holds one row group at a time, whatever ``rows_per_file`` is. A
    file cut off by a kill is unreadable, so ``--resume`` relabels its rows."""
    prefix = secrets.token_hex(4)  # a resumed run keeps the files of the one before: no name may repeat
    names = (dest.path(STAGING, run_id, f"{prefix}-{i:05d}.parquet") for i in itertools.count())
    writer, room = None, 0
    try:
        for group in _regroup(batches, _ROW_GROUP_ROWS):
            while group.num_rows:
                if writer is None:
                    writer, room = pq.ParquetWriter(next(names), group.schema, filesystem=dest.fs), rows_per_file
                writer.write_table(group.slice(0, room))
                room, group = room - min(room, group.num_rows), group.slice(room)
                if room == 0:
                    writer.close()
                    writer = None
    finally:
        if writer is not None:
            writer.close()


def _regroup(batches: Iterable[pa.Table], rows: int) -> Iterator[pa.Table]:
    """The rows of ``batches`` as tables of ``rows`` rows each (the last one fewer)."""
    chunks: list[pa.Table] = []
    buffered = 0
    for batch in batches:
        chunks.append(batch)
        buffered += batch.num_rows
        while buffered >= rows:
            table = pa.concat_tables(chunks)
            yield table.slice(0, rows)
            chunks, buffered = [table.slice(rows)], buffered - rows
    if buffered:
        yield pa.concat_tables(chunks)


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
# Output folder, staging and commit


@dataclass(frozen=True)
class _Dest:
    """The output dataset: its URI and the pyarrow filesystem + root path that hold it."""

    uri: str
    fs: pafs.FileSystem
    root: str
    storage: StorageConfig

    @classmethod
    def of(cls, uri: str, storage_config: StorageConfig) -> _Dest:
        fs, root = storage.arrow_filesystem(uri, storage_config)
        return cls(uri.rstrip("/"), fs, root, storage_config)

    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def uri_of(self, *parts: str) -> str:
        return storage.join(self.uri, *parts)

    def exists(self, *parts: str) -> bool:
        return self.fs.get_file_info(self.path(*parts)).type != pafs.FileType.NotFound

    def entries(self, *parts: str) -> list[pafs.FileInfo]:
        """What is directly inside ``parts`` (none when it does not exist), sorted by name."""
        selector = pafs.FileSelector(self.path(*parts), allow_not_found=True)
        return sorted(self.fs.get_file_info(selector), key=lambda e: e.path)

    def delete(self, *parts: str) -> None:
        info = self.fs.get_file_info(self.path(*parts))
        if info.type == pafs.FileType.Directory:
            self.fs.delete_dir(info.path)
        elif info.type == pafs.FileType.File:
            self.fs.delete_file(info.path)


def _require_writable(dest: _Dest) -> None:
    """UsageError before any Ray work when the output cannot be written (a missing bucket, no
    permission, a path below a regular file): a probe object in the staging folder, then deleted."""
    storage.write_bytes(dest.uri_of(STAGING, "_write_check"), b"", dest.storage)
    dest.delete(STAGING, "_write_check")
    if not dest.entries(STAGING):  # a local folder made only for the probe
        dest.delete(STAGING)


def _committed(dest: _Dest) -> list[str]:
    """Names of the committed dataset's entries at the root: data files, partitions, _SUCCESS."""
    names = [e.base_name for e in dest.entries() if not e.base_name.startswith(("_", "."))]
    return names + [SUCCESS] * dest.exists(SUCCESS)


def _refuse_existing(dest: _Dest, config: LabelConfig) -> None:
    committed = _committed(dest)
    if config.overwrite or not committed:
        return
    if not config.incremental:
        raise UsageError(f"output {config.output} already holds a dataset; pass --overwrite to replace it")
    if any(not name.startswith("run=") for name in committed):
        raise UsageError(f"output {config.output} holds a dataset that is not incremental (run=<id>/ partitions); "
                         "choose another output or pass --overwrite")


def _prepare_staging(dest: _Dest, resume: bool, model_id: str) -> tuple[str, pa.Array]:
    """(run_id, paths already staged). With ``resume``, continue the newest staged run, keeping
    its readable files made by ``model_id``; otherwise discard all staging and start a new run."""
    runs = [e.base_name for e in dest.entries(STAGING) if e.type == pafs.FileType.Directory]
    if resume and runs:
        for stale in runs[:-1]:
            dest.delete(STAGING, stale)
        staged = _usable_staged(dest, runs[-1], model_id)
        _say(f"resuming run {runs[-1]}: {len(staged)} rows already staged")
        return runs[-1], staged
    if runs:
        _say(f"discarding staged files of unfinished run(s) {', '.join(runs)} (--resume reuses them)")
    dest.delete(STAGING)
    return _new_run_id(), pa.array([], pa.string())


def _usable_staged(dest: _Dest, run_id: str, model_id: str) -> pa.Array:
    """Paths in the run's staged files that can be kept. Files that are unreadable (cut off by a
    kill), made by another model, or repeating rows of a kept file (a write of the killed run that
    landed late) are deleted, so that their inputs get labelled again."""
    kept = pa.array([], pa.string())
    for entry in dest.entries(STAGING, run_id):
        paths = _staged_paths(dest, entry.path, model_id)
        if paths is None or pc.any(pc.is_in(paths, value_set=kept)).as_py():
            dest.fs.delete_file(entry.path)
        else:
            kept = pa.concat_arrays([kept, paths])
    return kept


def _staged_paths(dest: _Dest, path: str, model_id: str) -> pa.Array | None:
    """The paths in one staged file; None when it is unreadable or was made by another model."""
    try:
        table = pq.read_table(path, columns=["path", "model_id"], filesystem=dest.fs)
    except (OSError, pa.ArrowException):
        return None
    if not pc.all(pc.equal(table["model_id"], model_id)).as_py():
        return None
    return table["path"].combine_chunks()


def _labelled_keys(dest: _Dest, model_id: str) -> pa.Table:
    """(path, size, mtime) of every row that committed partitions hold for ``model_id``.
    Partitions without _SUCCESS are leftovers of failed runs and are deleted."""
    files = []
    for entry in dest.entries():
        if not entry.base_name.startswith("run=") or entry.type != pafs.FileType.Directory:
            continue
        if not dest.exists(entry.base_name, SUCCESS):
            _say(f"deleting partition {entry.base_name} (no {SUCCESS}: left by an unfinished run)")
            dest.delete(entry.base_name)
            continue
        files += [e.path for e in dest.entries(entry.base_name) if e.base_name.endswith(".parquet")]
    if not files:
        return pa.schema([OUTPUT_SCHEMA.field(name) for name in ("path", "size", "mtime")]).empty_table()
    found = pads.dataset(files, filesystem=dest.fs, format="parquet")
    return found.to_table(columns=["path", "size", "mtime"], filter=pc.field("model_id") == model_id)


def _staged_files(dest: _Dest, run_id: str) -> list[str]:
    return [e.base_name for e in dest.entries(STAGING, run_id) if e.base_name.endswith(".parquet")]


def _staged_counts(dest: _Dest, run_id: str, expected: int) -> dict[str, int]:
    """images, labelled and errors in the run's staged files, after checking that they hold
    ``expected`` rows of distinct paths: a run that lost or doubled rows is never committed."""
    files = [dest.path(STAGING, run_id, name) for name in _staged_files(dest, run_id)]
    staged = pads.dataset(files, filesystem=dest.fs, format="parquet").to_table(columns=["path", "error"])
    distinct = pc.count_distinct(staged["path"]).as_py()
    if staged.num_rows != expected or distinct != expected:
        raise JobError(f"staged output of run {run_id} has {staged.num_rows} rows ({distinct} distinct paths), "
                       f"expected {expected}; not committed")
    errors = staged.num_rows - pc.count(staged["error"], mode="only_null").as_py()
    return {"images": staged.num_rows, "labelled": staged.num_rows - errors, "errors": errors}


def _summary(config: LabelConfig, dest: _Dest, info: ModelInfo, run_id: str, started: float,
             counts: dict[str, Any]) -> dict[str, Any]:
    return {
        "output": dest.uri_of(f"run={run_id}") if config.incremental else dest.uri, **counts,
        "model_id": info.model_id, "run_id": run_id, "started_at": _iso(started), "finished_at": _iso(time.time()),
        "seconds": round(time.time() - started, 3), "config": public_dict(config),
    }


def _plan(dest: _Dest, config: LabelConfig, run_id: str, summary: dict[str, Any]) -> dict[str, Any]:
    """Every step of the commit, written down before the first one is taken."""
    prefix = f"run={run_id}/part-" if config.incremental else f"part-{run_id}-"
    moves = [[posixpath.join(STAGING, run_id, name), f"{prefix}{i:05d}.parquet"]
             for i, name in enumerate(_staged_files(dest, run_id))]
    # _SUCCESS goes first, so that readers who check it stop trusting the old data first.
    old = sorted(_committed(dest), key=lambda name: name != SUCCESS) if config.overwrite else []
    success = f"run={run_id}/{SUCCESS}" if config.incremental else SUCCESS
    summary = {**summary, "files": [final for _, final in moves]}
    return {"run_id": run_id, "delete": old, "moves": moves, "success": success, "summary": summary}


def _commit(dest: _Dest, plan: dict[str, Any]) -> None:
    storage.write_json(dest.uri_of(COMMITTING), plan, dest.storage)
    _apply(dest, plan)


def _roll_forward(dest: _Dest) -> dict[str, Any] | None:
    """Finish a commit that an earlier run began; returns its summary, or None if there was none."""
    if not dest.exists(COMMITTING):
        return None
    plan = storage.read_json(dest.uri_of(COMMITTING), dest.storage)
    _apply(dest, plan)
    return plan["summary"]


def _apply(dest: _Dest, plan: dict[str, Any]) -> None:
    """Carry out a commit plan. Idempotent: a step already done is skipped, so an interrupted
    commit can be applied again from the start."""
    for name in plan["delete"]:
        dest.delete(name)
    for staged, final in plan["moves"]:
        if dest.exists(staged):
            if isinstance(dest.fs, pafs.LocalFileSystem):  # object stores have no folders to make
                dest.fs.create_dir(posixpath.dirname(dest.path(final)), recursive=True)
            dest.fs.move(dest.path(staged), dest.path(final))
    storage.write_json(dest.uri_of(plan["success"]), plan["summary"], dest.storage)
    dest.delete(STAGING)  # one run per output at a time: nothing else can be staged there
    dest.delete(COMMITTING)


def _nothing_new(config: LabelConfig, dest: _Dest, info: ModelInfo, started: float) -> dict[str, Any]:
    """An incremental run with nothing to label commits nothing: no empty partition per tick."""
    dest.delete(STAGING)
    _say(f"nothing new to label in {config.input or config.manifest} for model {info.model_id[:12]}; "
         f"{config.output} is unchanged")
    return {"output": dest.uri, "images": 0, "labelled": 0, "errors": 0, "resumed": 0, "images_per_s": 0.0,
            "model_id": info.model_id,
            "run_id": None, "started_at": _iso(started), "finished_at": _iso(time.time()), "skipped": "nothing new",
            "config": public_dict(config)}


# ---------------------------------------------------------------------------------------------
# Small helpers


def _new_run_id() -> str:
    """UTC time + a random suffix, e.g. 20261125T093000Z-ab12cd: sorts by start time, never collides."""
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(3)


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat(timespec="seconds")


def _say(message: str) -> None:
    """Progress for people on stderr; stdout stays the CLI's JSON summary."""
    print(f"distcls label: {message}", file=sys.stderr, flush=True)
