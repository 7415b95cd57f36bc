"""The output dataset of ``distcls label``: one run at a time, a staging area, and a commit protocol
that checks everything it reads back from the store before acting on it. ``distcls train`` takes
the same lock on its --output.

An output holds, besides the dataset itself, a few names starting with ``_``, which pyarrow, pandas
and DuckDB dataset readers skip::

    _LOCK                           which run works on this output, and until when (its lease)
    _staging/<run_id>/*.parquet     a run's rows before its commit
    _COMMITTING                     the plan of a commit in progress
    part-<run_id>-00000.parquet ... _report.png _SUCCESS            a whole dataset, or with --incremental
    run=<run_id>/part-00000.parquet ... run=<run_id>/_report.png run=<run_id>/_SUCCESS   one partition per run
    _review/run=<run_id>/part-00000.parquet   the run's review queue (label --review-below/--review-sample),
                                    committed with the run and listed by its _SUCCESS under review.files

``_report.png`` is the run's quality report (``distcls.quality``), named with ``_`` so that dataset
readers skip it (they would try to read ``report.png`` as Parquet); it is committed like the data:
staged, moved by the plan, listed in ``_SUCCESS`` (``report``), deleted with it by --overwrite.

The protocol, in the order a run meets it; each step is one method of ``Dataset``:

1. ``lock()``: ``_LOCK`` is created exclusively (O_CREAT|O_EXCL semantics locally, a PUT with
   ``If-None-Match: *`` on S3) and holds the owner (host, pid, run id) and a lease that a daemon
   thread renews. A second run refuses (exit 2) naming the holder; a lease that ran out, or a holder
   process on this host that is gone, is taken over and said so. It is also the write check: an
   output that cannot be written fails here, before any Ray work.
2. ``roll_forward()``: a ``_COMMITTING`` plan left by an interrupted commit is validated (below) and
   finished, so that an interrupted commit is completed, never redone or half-visible.
3. ``check_existing()``: anything in the output that no committed ``_SUCCESS`` lists refuses the
   run (exit 2 naming it): distcls neither deletes files it did not write nor mixes them into its
   dataset (readers would try to read them as Parquet); names starting with ``_`` or ``.`` are left
   alone. Without --overwrite a committed dataset refuses a plain run; --incremental adds to one
   made of partitions.
4. ``start_run()``: a new run id and an empty staging folder; with --resume the newest staged run,
   keeping only readable files of the same model and only rows whose paths are inputs of this run.
   A ``run=<run_id>/`` folder of only ``part-NNNNN.parquet`` files and no ``_SUCCESS`` (left when a plan was
   lost) is deleted.
5. ``write_staged()``: output rows -> Parquet files in the run's staging folder. The handle is
   picklable (its ``storage.Store``): ``StagedWriter``, the last stage of the label pipeline, writes
   through it on the workers and returns only (file, rows), so no output row reaches the driver.
6. ``staged_counts()``: the files the run was told about (those its writers reported, plus those a
   resumed run kept) hold one row per input (row count and distinct paths, checked file by file
   with 64-bit hashes of the paths), or no commit. A file in staging that nobody reported (written by
   a task attempt that died before it reported, then retried) is neither counted nor committed.
7. ``commit()``: the plan (old files to delete on --overwrite, staged -> final names, the summary)
   is written to ``_COMMITTING`` and applied: retire the old ``_SUCCESS`` files into staging (readers
   stop trusting the old data first; each one's report is deleted just before it, while it is surely
   the old one), delete the files they list, move the staged files (the report too), write
   ``_SUCCESS`` once every file it lists exists, drop staging and the plan. Every step is
   idempotent (on S3 a move is a copy, then a delete), so a later run that finds the plan applies it
   again from the start.
8. The lock is removed when the run ends, also when it fails.

A plan is validated before any step is applied, whether this run wrote it or found it: every name
is a plain relative name inside the output; moves go only from this output's ``_staging/<run_id>/``
to dataset names of that run (its Parquet files and at most one report, which the summary names;
and from ``_staging/<run_id>/_review/`` to the same name in ``_review/run=<run_id>/``);
deletes name only ``_SUCCESS`` files and files that a committed ``_SUCCESS`` lists (or that are
already gone), a report only with its ``_SUCCESS``; ``success`` is ``_SUCCESS`` or ``run=<id>/_SUCCESS``.
A plan that fails is refused with JobError naming the entry, and nothing is touched.

``successes()`` and ``labelled_keys()`` read what is committed (``--incremental`` skips inputs whose
(path, size, mtime) a committed partition holds for the model, except rows whose ``error_kind`` says
the failure was passing: ``not_found`` and ``transient`` rows are read again).

Why not ``ray.data.checkpoint.CheckpointConfig``: in Ray 2.60 it only filters rows coming from
``read_*`` datasources (``Planner._CHECKPOINT_FILTER_OPS = (Read, ReadFiles)``, not ``from_blocks``),
keeps its own id files next to the data, and does not make the final dataset appear atomically.

Every request goes through the output's ``storage.Store`` (pyarrow, one retry policy), except the
lock's conditional writes on object stores (``Store.conditional``, s3fs; why: storage.py's
docstring): ``pipe_file(mode="create")`` sends ``If-None-Match: *``, and ``IfMatch`` passes
through to PutObject.
"""
from __future__ import annotations

import collections
import contextlib
import errno
import itertools
import json
import logging
import math
import os
import re
import secrets
import socket
import stat
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, NoReturn

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from botocore.exceptions import BotoCoreError

from distcls import dedup, storage
from distcls.errors import JobError, UsageError

log = logging.getLogger(__name__)

SUCCESS = "_SUCCESS"
REPORT = "_report.png"
COMMITTING = "_COMMITTING"
STAGING = "_staging"
REVIEW = "_review"
LOCK = "_LOCK"
# A few minutes: a crashed run on another host blocks the output this long at most; the holder
# renews every third of it, so two missed renewals (a store hiccup) do not lose the lock.
LEASE_S = 180.0
_MAX_LEASE_S = 3600.0
# Rows per Parquet row group of the output: large enough for readers to skip by statistics, small
# enough that the writer holds a few MB.
ROW_GROUP_ROWS = 16_384
# Errors that say nothing about the file itself (contracts.md point 1): --incremental reads it again.
PASSING_ERROR_KINDS = ("not_found", "transient")

_RUN_ID = r"\d{8}T\d{6}Z-[0-9a-f]{6}"
# The names distcls gives committed files: the only files a commit may ever delete.
_DATASET_FILE = r"part-[^/]+\.parquet|run=[^/]+/part-[^/]+\.parquet"
_REVIEW_FILE = rf"{REVIEW}/run=[^/]+/part-[^/]+\.parquet"
_REPORT_FILE = r"_report\.png|run=[^/]+/_report\.png"
_SETTINGS = "_settings.json"  # below _staging/<run_id>/: what shaped its rows, checked by --resume
_RETIRED = "_retired"  # below _staging/<run_id>/: the _SUCCESS files an --overwrite commit replaces
_KEY_SCHEMA = pa.schema([("path", pa.string()), ("size", pa.int64()), ("mtime", pa.timestamp("us", tz="UTC")),
                         ("model_id", pa.string()), ("error_kind", pa.string())])


@dataclass(frozen=True)
class Run:
    """A run's staging: its id, the paths whose rows are already staged (kept by --resume) and the
    staged files that hold them."""

    run_id: str
    staged: pa.Array
    files: tuple[str, ...] = ()


@dataclass(frozen=True)
class Dataset:
    """The output dataset in ``store``: every read and write of the protocol goes through it.
    Picklable: only the store's URI and settings travel to a Ray worker."""

    store: storage.Store

    @property
    def uri(self) -> str:
        return self.store.root.rstrip("/")

    # -- 1. The lock ------------------------------------------------------------------------------

    def lock(self, lease_s: float = LEASE_S) -> Lock:
        """Take ``_LOCK`` for this process; use as a context manager, which removes it at the end.

        UsageError (exit 2) when another live run holds it, naming that run and when its lease
        ends, and when the output cannot be written at all."""
        store = _LocalLock(self) if not self.store.remote else _ObjectLock(self)
        owner = {"host": socket.gethostname(), "pid": os.getpid(), "run_id": None, "token": secrets.token_hex(8)}
        lock = Lock(self, store, owner, lease_s)
        try:
            lock.take()
        except (OSError, BotoCoreError) as exc:
            raise UsageError(f"cannot write {storage.describe_error(self.uri_of(LOCK), exc)}") from None
        return lock

    def lock_holder(self) -> dict[str, Any] | None:
        """What ``_LOCK`` says now, None when there is none: how a Ray worker of the run holding it
        (training's rank 0, each epoch) finds out that another run took it over."""
        return (_LocalLock(self) if not self.store.remote else _ObjectLock(self)).read()

    # -- 2. Roll forward --------------------------------------------------------------------------

    def roll_forward(self) -> dict[str, Any] | None:
        """Finish a commit that an earlier run began; returns its summary, or None if there was none.
        JobError, with nothing touched, when the plan found is not one distcls could have written."""
        self._refuse_links()
        if not self.store.exists(COMMITTING):
            return None
        try:
            plan = json.loads(self.store.get(COMMITTING))
        except ValueError as exc:
            raise JobError(f"{self.uri_of(COMMITTING)}: not a commit plan ({exc}); nothing was changed") from None
        self._validate(plan)
        self._apply(plan)
        return plan["summary"]

    # -- 3. What is there -------------------------------------------------------------------------

    def successes(self) -> dict[str, dict[str, Any]]:
        """The committed summaries by name (``_SUCCESS``, ``run=<id>/_SUCCESS``)."""
        names = [SUCCESS] if self.store.exists(SUCCESS) else []
        names += [f"{e.base_name}/{SUCCESS}" for e in self.store.entries() if _is_partition(e)
                  and self.store.exists(e.base_name, SUCCESS)]
        return {name: self._summary_at(name) for name in names}

    def check_existing(self, *, overwrite: bool, incremental: bool) -> None:
        """UsageError when this run may not write here: an entry no committed ``_SUCCESS`` lists
        (named), a committed dataset without --overwrite, or a non-partitioned one with --incremental."""
        committed, foreign, _ = self._survey()
        if self.store.info(REVIEW).type == pafs.FileType.File:  # found at the commit: half committed
            raise UsageError(f"output {self.uri} holds a file {REVIEW!r} where distcls keeps review queues (a folder): "
                             "move it or choose another output")
        if foreign:
            raise UsageError(f"output {self.uri} holds {foreign[0]!r}, which no distcls {SUCCESS} lists; distcls "
                             "neither deletes nor mixes in files it did not write: move it or choose another output")
        if overwrite or not committed:
            return
        if not incremental:
            raise UsageError(f"output {self.uri} already holds a dataset; pass --overwrite to replace it")
        if any(not name.startswith("run=") for name in committed):
            raise UsageError(f"output {self.uri} holds a dataset that is not incremental (run=<id>/ partitions); "
                             "choose another output or pass --overwrite")

    def labelled_keys(self, model_id: str) -> pa.Table:
        """(path, size, mtime) of the rows committed partitions hold for ``model_id``, without rows
        whose ``error_kind`` is passing (not_found, transient). Files written before that column
        existed count every row as labelled."""
        tables = list(self._labelled_tables(model_id))
        return pa.concat_tables(tables) if tables else _KEY_SCHEMA.empty_table().select(["path", "size", "mtime"])

    def labelled_key_set(self, model_id: str) -> dedup.KeySet:
        """The keys of ``labelled_keys`` as a set of 128-bit hashes (see ``keys``), read one file at a
        time: 16 bytes per committed row, however many there are."""
        found = dedup.KeySet()
        for table in self._labelled_tables(model_id):
            found.add(keys(table))
        return found

    def _labelled_tables(self, model_id: str) -> Iterator[pa.Table]:
        files = [e.path for name in self.successes() if name != SUCCESS
                 for e in self.store.entries(name.split("/")[0]) if e.base_name.endswith(".parquet")]
        final = pc.field("error_kind").is_null() | ~pc.field("error_kind").isin(PASSING_ERROR_KINDS)
        for file in files:
            # An explicit schema: files without error_kind read it as null.
            found = pads.dataset(file, schema=_KEY_SCHEMA, filesystem=self.store.fs, format="parquet")
            yield found.to_table(columns=["path", "size", "mtime"], filter=(pc.field("model_id") == model_id) & final)

    # -- 4. Start or resume a run -----------------------------------------------------------------

    def start_run(self, *, resume: bool, model_id: str, inputs: Callable[[pa.Table], pa.Array],
                  settings: dict[str, Any]) -> Run:
        """A new run with empty staging, or with ``resume`` the newest staged run, keeping its rows
        that are readable, made by ``model_id`` and of an input as it is now: ``inputs`` maps staged
        rows (path, size, mtime) to a mask of those that are. ``settings`` (flag -> value) are what
        shapes a row; a staged run is resumed only under the same ones (UsageError naming the flag).
        Also deletes partitions an unfinished run left without ``_SUCCESS``."""
        self._refuse_links()
        for leftover in self._survey()[2]:
            log.info(f"deleting partition {leftover} (no {SUCCESS}: left by an unfinished run)")
            self.store.delete(leftover)
        runs = self._staged_runs()
        if resume and runs:
            self._require_settings(runs[-1], settings)
            for stale in runs[:-1]:
                self.store.delete(STAGING, stale)
            staged, files = self._usable_staged(runs[-1], model_id, inputs)
            log.info(f"resuming run {runs[-1]}: {len(staged)} rows already staged")
            return Run(runs[-1], staged, tuple(files))
        if runs:
            log.info(f"discarding staged files of unfinished run(s) {', '.join(runs)} (--resume reuses them)")
        self.store.delete(STAGING)
        run_id = _new_run_id()
        # Written in place, not through _write's rename: a record cut off by a kill is unreadable,
        # and --resume then refuses that run, which is the safe answer.
        self.store.make_dir(STAGING, run_id)
        with self.store.open_output(STAGING, run_id, _SETTINGS) as stream:
            stream.write(_json(settings))
        return Run(run_id, pa.array([], pa.string()))

    def resumable(self, model_id: str, inputs: Callable[[pa.Table], pa.Array], settings: dict[str, Any]) -> pa.Array:
        """The paths ``start_run(resume=True)`` would keep, changing nothing (for --dry-run)."""
        runs = self._staged_runs()
        if not runs:
            return pa.array([], pa.string())
        self._require_settings(runs[-1], settings)
        return self._usable_staged(runs[-1], model_id, inputs, apply=False)[0]

    def _require_settings(self, run_id: str, settings: dict[str, Any]) -> None:
        """UsageError unless the staged run was made under ``settings``: rows staged under another
        --top-k or --allowed-roots (say) must not be committed as this run's."""
        name = f"{STAGING}/{run_id}/{_SETTINGS}"
        try:
            staged = json.loads(self.store.get(name)) if self.store.exists(STAGING, run_id, _SETTINGS) else None
        except ValueError:
            staged = None
        if not isinstance(staged, dict):
            raise UsageError(f"--resume: run {run_id} in {self.uri} has no readable record of its settings; "
                             "rerun without --resume (its staged rows are discarded)")
        current = json.loads(_json(settings))  # as stored: tuples become lists
        changed = [key for key in current if staged.get(key) != current[key]]
        if changed:
            flag = "--" + changed[0].replace("_", "-")
            raise UsageError(f"--resume: run {run_id} was staged with {flag} {staged.get(changed[0])!r}, this run has "
                             f"{current[changed[0]]!r}; rerun with the same flags, or without --resume "
                             "(its staged rows are discarded)")

    def discard_staging(self) -> None:
        """Drop every staged file: for a run that ends with nothing to commit."""
        self.store.delete(STAGING)

    # -- 5. Write staged files --------------------------------------------------------------------

    def write_staged(self, run_id: str, tables: Iterable[pa.Table], rows_per_file: int,
                     row_group_rows: int = ROW_GROUP_ROWS) -> list[tuple[str, int]]:
        """Stream rows into Parquet files of ``rows_per_file`` rows (the last one fewer) in the run's
        staging folder; returns (file name, rows) per file. Holds one row group at a time. A file
        cut off by a kill is unreadable, so ``--resume`` relabels its rows."""
        # Also on object stores (an empty marker object there): the run's folder shows from its start.
        self.store.make_dir(STAGING, run_id)
        prefix = secrets.token_hex(4)  # a resumed run keeps the files of the one before: no name may repeat
        names = (f"{prefix}-{i:05d}.parquet" for i in itertools.count())
        written: list[tuple[str, int]] = []
        writer, room = None, 0
        try:
            for group in _regroup(tables, row_group_rows):
                while group.num_rows:
                    if writer is None:
                        written.append((next(names), 0))
                        writer = pq.ParquetWriter(self.store.path(STAGING, run_id, written[-1][0]), group.schema,
                                                  filesystem=self.store.fs)
                        room = rows_per_file
                    rows = min(room, group.num_rows)
                    writer.write_table(group.slice(0, rows))
                    written[-1] = (written[-1][0], written[-1][1] + rows)
                    room, group = room - rows, group.slice(rows)
                    if room == 0:
                        writer.close()
                        writer = None
        finally:
            if writer is not None:
                writer.close()
        return written

    # -- 6. Check what is staged ------------------------------------------------------------------

    def staged_counts(self, run_id: str, expected: int, files: Iterable[str] | None = None) -> dict[str, Any]:
        """images, labelled, errors and errors_by_kind in the run's staged ``files`` (default: every
        staged file), after checking that they hold ``expected`` rows of distinct paths: a run that
        lost or doubled rows is never committed. Reads one file's paths at a time and keeps 8 bytes per row."""
        names = self._staged_files(run_id) if files is None else list(files)
        first, rows, distinct, errors, kinds = dedup.Distinct(), 0, 0, 0, collections.Counter()
        for staged in self._staged_columns(run_id, names):
            rows += staged.num_rows
            errors += staged.num_rows - pc.count(staged["error"], mode="only_null").as_py()
            kinds.update({kind["values"]: kind["counts"]
                          for kind in pc.value_counts(staged["error_kind"].drop_null()).to_pylist()})
            distinct += int(first.keep(staged["path"]).sum())
        distinct += len(first.collided(lambda: (t["path"] for t in self._staged_columns(run_id, names))))
        if rows != expected or distinct != expected:
            raise JobError(f"staged output of run {run_id} has {rows} rows ({distinct} distinct paths), "
                           f"expected {expected}; not committed")
        return {"images": rows, "labelled": rows - errors, "errors": errors, "errors_by_kind": dict(kinds)}

    def stage_review(self, run_id: str, tables: Iterable[pa.Table]) -> tuple[list[str], int]:
        """The run's review queue: ``tables`` -> one Parquet file in ``_staging/<run_id>/_review/``
        (none when they hold no row), which ``commit(review=...)`` moves to ``_review/run=<run_id>/``.
        Replaces the queue a resumed run staged before. Returns (staged names, rows)."""
        self.store.delete(STAGING, run_id, REVIEW)
        name, rows, writer = "part-00000.parquet", 0, None
        try:
            for table in tables:
                if not table.num_rows:
                    continue
                if writer is None:
                    self.store.make_dir(STAGING, run_id, REVIEW)
                    writer = pq.ParquetWriter(self.store.path(STAGING, run_id, REVIEW, name), table.schema,
                                              filesystem=self.store.fs)
                writer.write_table(table, row_group_size=ROW_GROUP_ROWS)
                rows += table.num_rows
        finally:
            if writer is not None:
                writer.close()
        return ([name] if rows else []), rows

    # -- 7. Commit --------------------------------------------------------------------------------

    def commit(self, run_id: str, summary: dict[str, Any], *, incremental: bool, overwrite: bool,
               lock: Lock, files: Iterable[str] | None = None, report: bytes | None = None,
               review: Iterable[str] = ()) -> dict[str, Any]:
        """Make the run's staged ``files`` (default: every staged file) the dataset (a ``run=<id>/``
        partition with ``incremental``; replacing what distcls committed before with ``overwrite``),
        with ``report`` (PNG bytes) as its ``_report.png`` and its staged ``review`` files
        (``stage_review``) as its review queue, which ``summary["review"]`` describes. Returns the
        summary written to ``_SUCCESS``: ``summary`` plus the committed ``files``, ``report`` (its
        name, if any) and ``review.files``."""
        lock.require_held()
        prefix = f"run={run_id}/part-" if incremental else f"part-{run_id}-"
        names = self._staged_files(run_id) if files is None else sorted(files)
        moves = [[f"{STAGING}/{run_id}/{name}", f"{prefix}{i:05d}.parquet"] for i, name in enumerate(names)]
        extra: dict[str, Any] = {}
        if report is not None:
            # In place, as the staged Parquet files: only the plan, written after it, makes it count.
            with self.store.open_output(STAGING, run_id, REPORT) as stream:
                stream.write(report)
            extra["report"] = f"run={run_id}/{REPORT}" if incremental else REPORT
            moves.append([f"{STAGING}/{run_id}/{REPORT}", extra["report"]])
        queue = [[f"{STAGING}/{run_id}/{REVIEW}/{name}", f"{REVIEW}/run={run_id}/{name}"] for name in review]
        if "review" in summary:
            summary = {**summary, "review": {**summary["review"], "files": [final for _, final in queue]}}
        old = self.successes() if overwrite else {}
        delete = [name for success, committed in sorted(old.items()) for name in (success, *_files(committed))]
        plan = {"run_id": run_id, "delete": delete, "moves": moves + queue,
                "success": f"run={run_id}/{SUCCESS}" if incremental else SUCCESS,
                "summary": {**summary, "files": [final for _, final in moves if final != extra.get("report")], **extra}}
        self._validate(plan)  # the check a found plan gets: an old _SUCCESS may list anything
        self.store.put(_json(plan), COMMITTING)
        self._apply(plan)
        return plan["summary"]

    def _validate(self, plan: Any) -> None:
        def refuse(what: str) -> NoReturn:
            raise JobError(f"refusing the commit plan {self.uri_of(COMMITTING)}: {what}; nothing was changed "
                           f"(remove {COMMITTING} if no distcls run wrote it)")

        if not isinstance(plan, dict) or set(plan) != {"run_id", "delete", "moves", "success", "summary"}:
            refuse("not a distcls commit plan")
        run_id = plan["run_id"]
        if not isinstance(run_id, str) or not re.fullmatch(_RUN_ID, run_id):
            refuse(f"run_id {run_id!r} is not a run id")
        moves, delete, success, summary = plan["moves"], plan["delete"], plan["success"], plan["summary"]
        if not (isinstance(moves, list) and all(isinstance(m, list) and len(m) == 2 for m in moves)
                and isinstance(delete, list) and isinstance(summary, dict)):
            refuse("moves, delete or summary malformed")
        for key, name in [("success", success), *(("delete", n) for n in delete), *(("moves", n) for m in moves for n in m)]:
            if reason := _not_plain(name):
                refuse(f"{key} entry {name!r} {reason}")
        if success not in (SUCCESS, f"run={run_id}/{SUCCESS}"):
            refuse(f"success entry {success!r} is neither {SUCCESS} nor run={run_id}/{SUCCESS}")
        final = rf"run={run_id}/part-\d{{5}}\.parquet" if success != SUCCESS else rf"part-{run_id}-\d{{5}}\.parquet"
        staged_report, report = f"{STAGING}/{run_id}/{REPORT}", _report_beside(success)
        queue = [m for m in moves if m[0].startswith(f"{STAGING}/{run_id}/{REVIEW}/")]  # the review queue
        for source, target in queue:
            name = source.rsplit("/", 1)[-1]
            if not re.fullmatch(r"part-\d{5}\.parquet", name) or target != f"{REVIEW}/run={run_id}/{name}":
                refuse(f"moves entry {source!r} -> {target!r} is not the review queue of run {run_id}")
        for source, target in (m for m in moves if m not in queue):
            if source == staged_report:
                if target != report:
                    refuse(f"moves entry {target!r} is not the report of run {run_id} ({report})")
                continue
            if not re.fullmatch(rf"{STAGING}/{run_id}/[^/]+\.parquet", source):
                refuse(f"moves entry {source!r} is not a staged file of run {run_id}")
            if not re.fullmatch(final, target):
                refuse(f"moves entry {target!r} is not a dataset file of run {run_id}")
        targets = [target for source, target in moves if [source, target] not in queue]
        if (summary.get("files") != [t for t in targets if t != report] or summary.get("run_id") != run_id
                or len(set(targets)) < len(targets)):
            refuse("the summary's files or run_id differ from the moves")
        if summary.get("report") != (report if report in targets else None):
            refuse("the summary's report differs from the moves")
        if _review_files(summary) != [target for _, target in queue]:
            refuse("the summary's review files differ from the moves")
        listed = self._listed(run_id)
        for name in delete:
            if not (_is_success_name(name) or re.fullmatch(_DATASET_FILE, name) or re.fullmatch(_REPORT_FILE, name)
                    or re.fullmatch(_REVIEW_FILE, name)):
                refuse(f"delete entry {name!r} is not a file of a distcls dataset")
            if not (_is_success_name(name) or name in listed or not self.store.exists(name)):
                refuse(f"delete entry {name!r} is not listed by a committed {SUCCESS}")
            if re.fullmatch(_REPORT_FILE, name) and _success_beside(name) not in delete:
                refuse(f"delete entry {name!r} is a report whose {SUCCESS} the plan does not delete")
            # A folder planted where a committed file was: deleting it would delete what is below it.
            if self.store.info(name).type == pafs.FileType.Directory:
                refuse(f"delete entry {name!r} is a folder, not a file distcls wrote")

    def _apply(self, plan: dict[str, Any]) -> None:
        """Carry out a validated plan. Idempotent: a step already done is skipped."""
        run_id, success = plan["run_id"], plan["success"]
        if not self._committed_by(success, run_id):
            self._require_sources(plan["moves"], plan["delete"])
            for name in filter(_is_success_name, plan["delete"]):
                if self.store.exists(name):  # readers stop trusting the old data first
                    # Its report only while it is there: once it is retired, a report of the same
                    # name (_report.png of a plain --overwrite) may already be this run's.
                    if _report_beside(name) in plan["delete"] and self.store.exists(_report_beside(name)):
                        self.store.delete(_report_beside(name))
                    self.store.move(name, f"{STAGING}/{run_id}/{_RETIRED}/{name}")
            for name in plan["delete"]:
                if not (_is_success_name(name) or re.fullmatch(_REPORT_FILE, name)) and self.store.exists(name):
                    self.store.delete(name)
            self._drop_empty_partitions(plan["delete"])
            for staged, final in plan["moves"]:
                if self.store.exists(staged):
                    self.store.move(staged, final)
            missing = [name for name in _files(plan["summary"]) if not self.store.exists(name)]
            if missing:
                raise JobError(f"not writing {self.uri_of(success)}: {len(missing)} of the files it lists are gone "
                               f"({missing[0]}, ...); the commit of run {run_id} cannot be finished")
            self.store.put(_json(plan["summary"]), success)
        self.store.delete(STAGING)  # one run at a time (the lock): nothing else is staged there
        self.store.delete(COMMITTING)

    def _require_sources(self, moves: list[list[str]], delete: list[str]) -> None:
        """Every file the commit will list is staged or already moved: checked before the first
        step, so that a commit that cannot finish leaves the old dataset as it was. A report the
        plan deletes beside a ``_SUCCESS`` still there is the old run's, not a moved one."""
        old = {name for name in delete if re.fullmatch(_REPORT_FILE, name) and self.store.exists(_success_beside(name))}
        gone = [staged for staged, final in moves
                if not self.store.exists(staged) and (final in old or not self.store.exists(final))]
        if gone:
            raise JobError(f"{len(gone)} staged files of the commit in {self.uri_of(COMMITTING)} are gone "
                           f"({gone[0]}, ...); nothing was changed")

    def _committed_by(self, success: str, run_id: str) -> bool:
        """Whether ``success`` is already written by this run (the commit reached its last steps)."""
        return self.store.exists(success) and self._summary_at(success).get("run_id") == run_id

    def _listed(self, run_id: str) -> set[str]:
        """Names the committed ``_SUCCESS`` files list, including those this commit retired."""
        retired = [f"{STAGING}/{run_id}/{_RETIRED}/{name}" for name in
                   [SUCCESS, *(f"{e.base_name}/{SUCCESS}" for e in self.store.entries(STAGING, run_id, _RETIRED)
                               if _is_partition(e))]]
        summaries = [*self.successes().values(), *(self._summary_at(n) for n in retired if self.store.exists(n))]
        return {name for s in summaries for name in _files(s)}

    def _drop_empty_partitions(self, deleted: list[str]) -> None:
        for partition in sorted({name.rsplit("/", 1)[0] for name in deleted if "/" in name}):
            if self.store.info(partition).type == pafs.FileType.Directory and not self.store.entries(partition):
                self.store.delete(partition)

    # -- Staging, inside --------------------------------------------------------------------------

    def _refuse_links(self) -> None:
        """UsageError naming the first symlink inside a local output. distcls never makes one, and
        the steps that move and delete would follow it out of the output: a ``_staging/<run>``
        link to someone's folder would have its files moved into the dataset or deleted."""
        if self.store.remote:
            return
        for folder, folders, files in os.walk(self.store.path()):  # followlinks=False: a link is seen, not entered
            for name in sorted([*folders, *files]):
                if os.path.islink(os.path.join(folder, name)):
                    link = os.path.relpath(os.path.join(folder, name), self.store.path())
                    raise UsageError(f"output {self.uri} holds the symlink {link!r}; distcls never makes one and "
                                     "will not follow it out of the output: remove it or choose another output")

    def _usable_staged(self, run_id: str, model_id: str, inputs: Callable[[pa.Table], pa.Array], *,
                       apply: bool = True) -> tuple[pa.Array, list[str]]:
        """Paths in the run's staged files that can be kept, and the files that hold them. Files that
        are unreadable (cut off by a kill), made by another model, or repeating rows of a kept file (a
        write of the killed run that landed late) are deleted, so that their inputs get labelled
        again; rows that are not of an input as it is now (another path, or a file rewritten since:
        size or mtime differ) are dropped (the file is rewritten without them). ``apply=False``
        only says what would be kept."""
        kept, files = pa.array([], pa.string()), []
        for name in self._staged_files(run_id):
            path = self.store.path(STAGING, run_id, name)
            staged = self._staged_keys(path, model_id)
            if staged is None or pc.any(pc.is_in(staged["path"], value_set=kept)).as_py():
                if apply:
                    self.store.delete(STAGING, run_id, name)
                continue
            paths = staged["path"].combine_chunks()
            wanted = inputs(staged)
            wanted = wanted.combine_chunks() if isinstance(wanted, pa.ChunkedArray) else wanted
            if not pc.all(wanted).as_py() and apply:
                log.warning(f"resume: dropping {len(paths) - pc.sum(wanted).as_py()} staged rows of {name} "
                            "whose files are not inputs of this run or changed since they were staged")
                rows = pq.read_table(path, filesystem=self.store.fs).filter(wanted)
                if rows.num_rows:  # written before the old file goes: a kill in between loses nothing
                    files += [written for written, _ in self.write_staged(run_id, [rows], rows.num_rows)]
                self.store.delete(STAGING, run_id, name)
            else:
                files.append(name)
            kept = pa.concat_arrays([kept, paths.filter(wanted)])
        return kept, files

    def _staged_columns(self, run_id: str, names: list[str]) -> Iterator[pa.Table]:
        """path, error and error_kind of each staged file in turn (error_kind null in files staged
        before it existed); JobError naming a file that cannot be read."""
        schema = pa.schema([("path", pa.string()), ("error", pa.string()), ("error_kind", pa.string())])
        return self.read_staged(run_id, names, schema)

    def read_staged(self, run_id: str, names: Iterable[str], schema: pa.Schema,
                    where: pc.Expression | None = None) -> Iterator[pa.Table]:
        """Only the columns of ``schema`` of the rows that pass ``where`` in each of the run's staged
        files ``names`` in turn (a column a file lacks reads as null); JobError naming a file that
        cannot be read."""
        for name in names:
            try:
                file = pads.dataset(self.store.path(STAGING, run_id, name), schema=schema, filesystem=self.store.fs,
                                    format="parquet")
                yield file.to_table(filter=where)
            except (OSError, pa.ArrowException) as exc:
                raise JobError(f"staged file {name} of run {run_id} cannot be read "
                               f"({str(exc).splitlines()[0][:160]}); not committed") from None

    def _staged_keys(self, path: str, model_id: str) -> pa.Table | None:
        """path, size and mtime of one staged file's rows; None when it is unreadable or was made by
        another model."""
        try:
            table = pq.read_table(path, columns=["path", "size", "mtime", "model_id"], filesystem=self.store.fs)
        except (OSError, pa.ArrowException):
            return None
        if not pc.all(pc.equal(table["model_id"], model_id)).as_py():
            return None
        return table

    def _staged_runs(self) -> list[str]:
        """Run ids with a staging folder, oldest first (run ids sort by start time)."""
        return [e.base_name for e in self.store.entries(STAGING) if e.type == pafs.FileType.Directory
                and re.fullmatch(_RUN_ID, e.base_name)]

    def _staged_files(self, run_id: str) -> list[str]:
        return [e.base_name for e in self.store.entries(STAGING, run_id)
                if e.type == pafs.FileType.File and e.base_name.endswith(".parquet")]

    def _survey(self) -> tuple[list[str], list[str], list[str]]:
        """(committed entries, foreign entries, leftover partitions) of the output. Committed: a
        ``_SUCCESS`` and what it lists. Leftover: a ``run=<run_id>`` folder of only ``part-NNNNN.parquet``
        files and a ``_report.png`` (the names a commit gives them) and no ``_SUCCESS``. Foreign: anything else not
        starting with ``_`` or ``.``, and a ``_report.png`` that no ``_SUCCESS`` lists."""
        listed = {name for s in self.successes().values() for name in _files(s)}
        committed, foreign, leftovers = [SUCCESS] * self.store.exists(SUCCESS), [], []
        for entry in self.store.entries():
            name = entry.base_name
            # _report.png is a dataset name, not an internal one: one no _SUCCESS lists is not
            # distcls's (a folder there would fail the commit's last move, run after run).
            if name.startswith(("_", ".")) and name != REPORT:
                continue
            if not _is_partition(entry):
                (committed if name in listed else foreign).append(name)
                continue
            inside = [f"{name}/{e.base_name}" for e in self.store.entries(name)]
            if f"{name}/{SUCCESS}" in inside:
                committed.append(name)
                foreign += [n for n in inside if n not in listed and n != f"{name}/{SUCCESS}"]
            elif re.fullmatch(rf"run={_RUN_ID}", name) and all(
                    re.fullmatch(rf"{re.escape(name)}/(part-\d{{5}}\.parquet|{re.escape(REPORT)})", n) for n in inside):
                leftovers.append(name)
            else:  # not named as distcls names a partition's files: another tool's, never deleted
                foreign += inside
        return committed, foreign, leftovers

    # -- Storage: names inside the output ----------------------------------------------------------

    def uri_of(self, *parts: str) -> str:
        return storage.join(self.uri, *parts)

    def _summary_at(self, name: str) -> dict[str, Any]:
        try:
            summary = json.loads(self.store.get(name))
        except ValueError:
            summary = None
        if not isinstance(summary, dict):
            raise UsageError(f"{self.uri_of(name)} is not a distcls summary; remove it or choose another output")
        return summary


WRITTEN_SCHEMA = pa.schema([("file", pa.string()), ("rows", pa.int64())])


class StagedWriter:
    """The last stage of the label pipeline, a Ray actor: each batch of output rows -> Parquet files
    in the run's staging folder (``Dataset.write_staged``); returns one (file, rows) row per file.
    The driver gets these back, never the output rows themselves."""

    def __init__(self, dataset: Dataset, run_id: str, rows_per_file: int) -> None:
        self.dataset, self.run_id, self.rows_per_file = dataset, run_id, rows_per_file

    def __call__(self, batch: pa.Table) -> pa.Table:
        written = self.dataset.write_staged(self.run_id, [batch], self.rows_per_file) if batch.num_rows else []
        return pa.Table.from_pylist([{"file": name, "rows": rows} for name, rows in written], schema=WRITTEN_SCHEMA)


# ---------------------------------------------------------------------------------------------
# The lock


class Lock:
    """``_LOCK`` of one output, held by this process: a daemon thread renews its lease; leaving the
    ``with`` block (also by an exception) stops it and removes the lock."""

    def __init__(self, dataset: Dataset, store: _LocalLock | _ObjectLock, owner: dict[str, Any],
                 lease_s: float) -> None:
        self.dataset, self.store, self.owner, self.lease_s = dataset, store, owner, lease_s
        self.lost: dict[str, Any] | None = None  # the holder that took the lock from us, if one did
        self._stop = threading.Event()
        self._renewer = threading.Thread(target=self._renew_until_stopped, daemon=True, name="distcls-lock")
        self._guard = threading.Lock()  # renewals from the thread and from require_held, one at a time

    def __enter__(self) -> Lock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def take(self) -> None:
        """Create the lock, or take over one whose holder is gone; UsageError naming a live holder."""
        try:
            self.store.create(self._body())
        except FileExistsError:
            held = self.store.read()
            gone = _why_gone(held)
            if gone is None:
                raise UsageError(_in_use(self.dataset.uri, held)) from None
            log.warning(f"taking over the lock of {self.dataset.uri} from {_holder(held)}: {gone}")
            self.store.take_over(self._body())
        held = self.store.read()  # a store that ignored the condition, or a takeover race, shows here
        if held is None or held.get("token") != self.owner["token"]:
            raise UsageError(_in_use(self.dataset.uri, held or {}))
        self._renewer.start()

    def name_run(self, run_id: str) -> None:
        """Record the run id in the lock once the run has one (a resumed run takes the old id)."""
        self.owner["run_id"] = run_id
        self.require_held()

    def require_held(self, outcome: str = "nothing was committed") -> None:
        """Renew now; JobError, saying ``outcome``, when another run took the lock over (this one's
        lease had run out)."""
        with self._guard:
            if self.lost is None:
                self._renew()
        if self.lost is not None and self.lost.get("removed"):
            raise JobError(f"the lock of {self.dataset.uri} was removed while this run held it; {outcome}")
        if self.lost is not None:
            raise JobError(f"lost the lock of {self.dataset.uri} to {_holder(self.lost)} while running (this "
                           f"run's lease ran out); {outcome}")

    def release(self) -> None:
        self._stop.set()
        if self._renewer.is_alive():
            self._renewer.join()
        with self._guard:
            try:
                held = self.store.read()
                if held is not None and held.get("token") == self.owner["token"]:
                    self.store.delete()
            except (OSError, BotoCoreError) as exc:  # the lease ends on its own: say so, do not mask the run's outcome
                log.warning(f"could not remove {self.dataset.uri_of(LOCK)} ({exc}); it expires in {self.lease_s:.0f} s")

    def _renew_until_stopped(self) -> None:
        while not self._stop.wait(self.lease_s / 3):
            with self._guard:
                if self.lost is not None:
                    return
                # Any failure is a passing one here (the next tick tries again): the renewer must not
                # die, and the commit renews once more itself and reports what is wrong then.
                with contextlib.suppress(Exception):
                    self._renew()

    def _renew(self) -> None:
        held = self.store.read()
        if held is None or held.get("token") != self.owner["token"]:
            self.lost = held or {"removed": True}
            return
        self.store.replace(self._body())

    def _body(self) -> dict[str, Any]:
        expires = time.time() + self.lease_s
        return {**self.owner, "expires": expires, "expires_at": _iso(expires)}


class _LocalLock:
    """The lock file on a local (or mounted) filesystem. Create is ``link(2)`` of a complete
    temporary file, which fails when the name exists (O_CREAT|O_EXCL semantics, without a moment
    where the file exists but is empty). Renewals and takeovers replace it by rename: they have no
    compare-and-swap, and the read after each write is what detects a lost race."""

    def __init__(self, dataset: Dataset) -> None:
        self.path = dataset.store.path(LOCK)

    def create(self, body: dict[str, Any]) -> None:
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
        except FileExistsError:  # the output is a regular file: not the FileExistsError of a held lock
            raise NotADirectoryError(errno.ENOTDIR, "Not a directory", os.path.dirname(self.path)) from None
        temporary = self._temporary(body)
        try:
            os.link(temporary, self.path)
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            # A filesystem without link(2) (FUSE mounts of buckets, some SMB shares): created
            # exclusively, then written. A run that reads it empty in between takes it over, and the
            # read after every write (Lock.take) lets only one of the two go on.
            with open(self.path, "xb") as file:
                file.write(_json(body))
        finally:
            os.remove(temporary)

    def take_over(self, body: dict[str, Any]) -> None:
        self.replace(body)

    def replace(self, body: dict[str, Any]) -> None:
        os.replace(self._temporary(body), self.path)

    def read(self) -> dict[str, Any] | None:
        try:
            # Opened without following a link or blocking on a FIFO, then checked: a planted special
            # file is refused instead of hanging the run or reading /dev/zero.
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise UsageError(f"{self.path}: cannot read the lock ({exc.strerror}); remove it") from None
        with os.fdopen(fd, "rb") as file:
            if not stat.S_ISREG(os.fstat(file.fileno()).st_mode):
                raise UsageError(f"{self.path}: not a regular file; remove it")
            return _parse_lock(file.read(1 << 16))

    def delete(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.remove(self.path)

    def _temporary(self, body: dict[str, Any]) -> str:
        temporary = f"{self.path}.tmp-{secrets.token_hex(4)}"
        with open(temporary, "wb") as file:
            file.write(_json(body))
        return temporary


class _ObjectLock:
    """The lock object on an object store, through s3fs: create is a PUT with ``If-None-Match: *``
    (AWS S3, MinIO and the moto server of the tests answer 412 when the key exists); renewals and
    takeovers are PUTs with ``If-Match: <etag read>``, so two runs taking over one expired lock
    cannot both win. A store that ignores the headers is caught by the read after each write."""

    def __init__(self, dataset: Dataset) -> None:
        self.fs, self.path = dataset.store.conditional(LOCK)
        self.etag: str | None = None

    def create(self, body: dict[str, Any]) -> None:
        self.fs.pipe_file(self.path, _json(body), mode="create")

    def take_over(self, body: dict[str, Any]) -> None:
        # 412 (FileExistsError, or OSError for If-Match): another run was first; the read after names it.
        with contextlib.suppress(OSError):
            if self.etag is None:  # released between our create and our read
                self.create(body)
            else:
                self.replace(body)

    def replace(self, body: dict[str, Any]) -> None:
        # Conditional on the ETag of the last read: what is replaced is the lock that was checked.
        self.fs.pipe_file(self.path, _json(body), **({"IfMatch": self.etag} if self.etag else {}))

    def read(self) -> dict[str, Any] | None:
        self.fs.invalidate_cache(self.path)
        try:
            # The ETag first: if the object changes before its body is read, a write conditional on
            # this ETag fails instead of replacing a lock nobody has read.
            self.etag = self.fs.info(self.path)["ETag"]
            return _parse_lock(self.fs.cat_file(self.path))
        except FileNotFoundError:
            self.etag = None
            return None

    def delete(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self.path)


def _parse_lock(data: bytes) -> dict[str, Any]:
    """A lock's content; one that is not a distcls lock counts as long expired (taken over, said so)."""
    try:
        held = json.loads(data)
    except ValueError:
        held = None
    return held if isinstance(held, dict) else {"run_id": None, "host": "?", "pid": "?", "expires": 0}


def _why_gone(held: dict[str, Any] | None) -> str | None:
    """Why the lock ``held`` may be taken over, or None while its holder may still be running."""
    if held is None:
        return "it was just released"
    expires = held.get("expires")
    if not isinstance(expires, (int, float)) or expires < time.time():
        return f"its lease ended at {held.get('expires_at', 'an unknown time')}"
    if not math.isfinite(expires) or expires > time.time() + _MAX_LEASE_S:
        # A run renews a lease of LEASE_S; one running for ever or for centuries is planted or broken.
        return f"its lease (to {held.get('expires_at', expires)}) is longer than any run holds"
    if held.get("host") == socket.gethostname() and _process_gone(held.get("pid")):
        return f"process {held.get('pid')} on this host is gone"
    return None


def _process_gone(pid: Any) -> bool:
    """Only for a holder on this host: pids elsewhere mean nothing here."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # exists, owned by another user
        return False
    return False


def _holder(held: dict[str, Any]) -> str:
    return f"run {held.get('run_id') or '(starting)'} on host {held.get('host')} (pid {held.get('pid')})"


def _in_use(uri: str, held: dict[str, Any]) -> str:
    return (f"output {uri} is in use by {_holder(held)}, lease until {held.get('expires_at', '?')}; "
            "wait for that run to end (a dead run's lease runs out by then)")


# ---------------------------------------------------------------------------------------------
# Small helpers


def _not_plain(name: Any) -> str | None:
    """Why ``name`` is not a plain relative name inside the output, or None if it is one."""
    if not isinstance(name, str) or not name:
        return "is not a name"
    if "://" in name or name.startswith("/") or "\\" in name:
        return "is not a relative name inside the output"
    if any(part in ("", ".", "..") for part in name.split("/")):
        return "has an empty, '.' or '..' segment"
    return None


def _files(summary: dict[str, Any]) -> list[str]:
    """The dataset files a committed summary lists, its report and its review queue; anything else
    in its lists is ignored (and so, being in the output, refuses the run as foreign)."""
    files = summary.get("files")
    listed = [f for f in files if isinstance(f, str) and re.fullmatch(_DATASET_FILE, f)] if isinstance(files, list) else []
    report = summary.get("report")
    queue = [f for f in _review_files(summary) if isinstance(f, str) and re.fullmatch(_REVIEW_FILE, f)]
    return listed + ([report] if isinstance(report, str) and re.fullmatch(_REPORT_FILE, report) else []) + queue


def _review_files(summary: dict[str, Any]) -> list[Any]:
    """``review.files`` of a summary, [] when it has none."""
    review = summary.get("review")
    files = review.get("files") if isinstance(review, dict) else None
    return files if isinstance(files, list) else []


def _report_beside(success: str) -> str:
    """``_report.png`` in the folder of the ``_SUCCESS`` named ``success``."""
    return success[:-len(SUCCESS)] + REPORT


def _success_beside(report: str) -> str:
    return report[:-len(REPORT)] + SUCCESS


def _is_success_name(name: str) -> bool:
    return name == SUCCESS or bool(re.fullmatch(rf"run=[^/]+/{SUCCESS}", name))


def _is_partition(entry: pafs.FileInfo) -> bool:
    return entry.type == pafs.FileType.Directory and entry.base_name.startswith("run=")


def keys(table: pa.Table) -> pa.Array:
    """The key of ``--incremental`` for each row of a table with path, size and mtime, as one string
    ``path NUL size NUL mtime-in-us``; a null size or mtime (a manifest row) is ``-1``."""
    size = pc.cast(pc.fill_null(table["size"], -1), pa.string())
    mtime = pc.cast(pc.fill_null(pc.cast(table["mtime"], pa.int64()), -1), pa.string())
    joined = pc.binary_join_element_wise(table["path"], size, mtime, "\x00")
    return joined.combine_chunks() if isinstance(joined, pa.ChunkedArray) else joined


def _regroup(tables: Iterable[pa.Table], rows: int) -> Iterator[pa.Table]:
    """The rows of ``tables`` as tables of ``rows`` rows each (the last one fewer)."""
    chunks: list[pa.Table] = []
    buffered = 0
    for table in tables:
        chunks.append(table)
        buffered += table.num_rows
        while buffered >= rows:
            joined = pa.concat_tables(chunks)
            yield joined.slice(0, rows)
            chunks, buffered = [joined.slice(rows)], buffered - rows
    if buffered:
        yield pa.concat_tables(chunks)


def _new_run_id() -> str:
    """UTC time + a random suffix, e.g. 20261125T093000Z-ab12cd: sorts by start time, never collides."""
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(3)


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat(timespec="seconds")


def _json(value: Any) -> bytes:
    return json.dumps(value, indent=2, sort_keys=True).encode()

