"""What ``distcls label`` labels: the lake's listing or the manifest's distinct paths, as blocks of
``INPUT_SCHEMA`` rows in the object store, read by a Ray actor so that the driver holds only refs
to the blocks, their metadata and counts, however many inputs there are.

Read in the driver, every block went into the object store through the driver's own ``ray.put``,
and each page of the store that the driver wrote stayed mapped in it: its RSS grew 1.55x from a
500,000-row to a 5,000,000-row manifest. ``InputReader`` does that work in a worker process
instead: it lists the lake page by page (or reads the manifest chunk by chunk), normalises,
marks paths outside --allowed-roots, de-duplicates (8 bytes per distinct input, ``dedup.Distinct``),
tells --resume which staged rows are of current inputs, and drops what --resume staged and
--incremental committed before (``fresh``). It puts the blocks itself, so it owns them: it lives
until the run ends (``reading``). --dry-run uses the same class in the driver, without Ray.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import ray
from ray.data.block import BlockMetadataWithSchema

from distcls import dedup, lake, storage
from distcls.config import LabelConfig
from distcls.dataset import Dataset, keys
from distcls.errors import JobError, UsageError, carried
from distcls.runtime import on_this_node
from distcls.storage import Store

# One row per input; ``error`` is preset for inputs never to be read.
INPUT_SCHEMA = pa.schema([
    ("path", pa.string()), ("size", pa.int64()), ("mtime", pa.timestamp("us", tz="UTC")), ("error", pa.string()),
])
_MAX_BLOCK_ROWS = 2000


@dataclass(frozen=True)
class Blocks:
    """Input rows already in the object store: refs to Arrow tables (their metadata beside them),
    and the number of rows in all. The driver holds refs, not rows."""

    refs: list[ray.ObjectRef]
    metadata: list[BlockMetadataWithSchema]
    rows: int


def nothing_to_label(config: LabelConfig) -> UsageError:
    return UsageError(f"{config.input or config.manifest}: no images to label "
                      f"(extensions {', '.join(config.extensions)})")


class InputReader:
    """The inputs of one label run. In a run it is a Ray actor (see ``reading``): ``read``, then
    ``contains`` while --resume checks its staged rows, then ``pending``; --dry-run calls
    ``tables`` and ``contains`` in the driver."""

    def __init__(self, config: LabelConfig, source: Store, chunk_rows: int = lake.MANIFEST_CHUNK_ROWS) -> None:
        self.config = config
        self.source = source  # the lake or the manifest
        self.chunk_rows = chunk_rows
        self._first = dedup.Distinct()
        self._blocks = Blocks([], [], 0)

    def tables(self) -> Iterator[pa.Table]:
        """INPUT_SCHEMA tables of every distinct input, ``chunk_rows`` rows read at a time: the
        lake's listing, or the manifest's paths (each at its first row) with those outside
        --allowed-roots marked as errors (never read)."""
        if self.config.input:
            return self._listing()
        return self._manifest()

    def contains(self, staged: pa.Table) -> pa.Array:
        """Whether staged rows are of inputs as they are now: a listed file by (path, size, mtime),
        so that one rewritten since its row was staged is labelled again; a manifest row by path
        (it carries no size or mtime). By 64-bit hash: a staged row that only shares its hash with
        an input (about 1 in 10^12 per row for 5 million inputs) would be kept."""
        values = keys(staged) if self.config.input else staged["path"].combine_chunks()
        return pa.array(self._first.contains(values))

    def read(self, workers: int) -> Blocks:
        """Every distinct input put into the object store, in blocks cut to spread over ``workers``.
        UsageError when there is none."""
        self._blocks = _put(_cut(self.tables(), workers))
        if self._blocks.rows == 0:
            raise nothing_to_label(self.config)
        return self._blocks

    def pending(self, staged_paths: pa.Array, output: Dataset | None, model_id: str, workers: int) -> Blocks:
        """The blocks of ``read`` less the rows of ``staged_paths`` (--resume) and, with ``output``
        (--incremental), less the keys committed there for ``model_id``. The last call: the hashes
        ``contains`` needed are dropped."""
        self._first = dedup.Distinct()
        if not len(staged_paths) and output is None:
            return self._blocks  # the usual case: no filtered copy of millions of inputs
        labelled = output.labelled_key_set(model_id) if output is not None else None
        todo = (fresh(ray.get(ref), staged_paths, labelled) for ref in self._blocks.refs)
        self._blocks = _put(_cut(todo, workers))
        return self._blocks

    def _listing(self) -> Iterator[pa.Table]:
        """No path twice in a listing: nothing to de-duplicate; each file's (path, size, mtime) key
        is remembered for --resume."""
        config = self.config
        for listing in lake.list_chunks(self.source, config.extensions, self.chunk_rows):
            table = _input_table(listing["path"], listing["size"], listing["mtime"],
                                 pa.nulls(listing.num_rows, pa.string()))
            self._first.remember(keys(table))
            yield table

    def _manifest(self) -> Iterator[pa.Table]:
        config = self.config

        def paths() -> Iterator[pa.Array]:
            return (t["path"] for t in lake.manifest_chunks(self.source, self.chunk_rows))

        for chunk in paths():
            yield _manifest_table(chunk.filter(pa.array(self._first.keep(chunk))), config.allowed_roots)
        yield _manifest_table(self._first.collided(paths), config.allowed_roots)


class Reading:
    """The driver's side of an ``InputReader`` actor: its methods, with errors raised as the actor
    raised them (a UsageError stays the one-line UsageError the CLI prints)."""

    def __init__(self, actor: ray.actor.ActorHandle) -> None:
        self._actor = actor

    def read(self, workers: int) -> Blocks:
        return _get(self._actor.read.remote(workers))

    def contains(self, staged: pa.Table) -> pa.Array:
        return _get(self._actor.contains.remote(staged))

    def pending(self, staged_paths: pa.Array, output: Dataset | None, model_id: str, workers: int) -> Blocks:
        return _get(self._actor.pending.remote(staged_paths, output, model_id, workers))


@contextlib.contextmanager
def reading(config: LabelConfig, source: Store) -> Iterator[Reading]:
    """An ``InputReader`` actor for ``config`` and ``source``, ended on leaving (its blocks with it). It starts
    at once and reads when asked: the worker process starts while the driver does other work.
    It reserves no CPU, so that it never waits for a node nor keeps one from the inference
    actors, and runs beside the driver (the head, on a cluster): its blocks then live in an object
    store the autoscaler never removes."""
    actor = ray.remote(InputReader).options(num_cpus=0, max_restarts=0,
                                            scheduling_strategy=on_this_node()).remote(config, source)
    try:
        yield Reading(actor)
    finally:
        ray.kill(actor)


def _get(ref: ray.ObjectRef) -> Any:
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        # Ray wraps what the actor raised, traceback and all: raise the original, one line.
        if (own := carried(exc)) is not None:
            raise own from None
        raise
    except ray.exceptions.RayActorError as exc:
        raise JobError(f"the process reading the inputs died ({str(exc).strip().splitlines()[0][:200]}); "
                       "nothing was committed") from None
    except ray.exceptions.ActorUnschedulableError as exc:
        # Its affinity is hard: the driver's node refused it (draining, say).
        raise JobError(f"the process reading the inputs could not start on the driver's node "
                       f"({str(exc).strip().splitlines()[0][:200]}); nothing was committed") from None


def fresh(todo: pa.Table, staged_paths: pa.Array, labelled: dedup.KeySet | None) -> pa.Table:
    """The rows of one table that are neither staged nor labelled (their (path, size, mtime) key)."""
    if len(staged_paths):
        todo = todo.filter(pc.invert(pc.is_in(todo["path"], value_set=staged_paths)))
    if labelled:
        todo = todo.filter(pa.array(~labelled.contains(keys(todo))))
    return todo


def _put(tables: Iterable[pa.Table]) -> Blocks:
    """The non-empty ``tables`` put into the object store one by one, owned by this process."""
    refs, metadata, rows = [], [], 0
    for block in tables:
        if block.num_rows:
            refs.append(ray.put(block))
            metadata.append(BlockMetadataWithSchema.from_block(block))
            rows += block.num_rows
    return Blocks(refs, metadata, rows)


def _cut(tables: Iterable[pa.Table], workers: int) -> Iterator[pa.Table]:
    """The rows of ``tables`` as blocks, passed on as they come so that about one table is held at a
    time. While the rows fit in ~4 blocks of ``_MAX_BLOCK_ROWS`` per worker they are held back and
    cut finer (``slices``): a small input still spreads over every worker; a large one is cut into
    blocks of ``_MAX_BLOCK_ROWS``."""
    rows, held = 0, []
    for table in tables:
        rows += table.num_rows
        held.append(table)
        if rows > 4 * max(1, workers) * _MAX_BLOCK_ROWS:
            for block in held:
                for start in range(0, block.num_rows, _MAX_BLOCK_ROWS):
                    yield block.slice(start, _MAX_BLOCK_ROWS)
            held = []
    if held:
        yield from slices(pa.concat_tables(held), workers)


def slices(table: pa.Table, workers: int) -> list[pa.Table]:
    """Blocks of at most ``_MAX_BLOCK_ROWS`` rows, but at least ~4 per worker (an actor of the
    pool or, with --gpu, a CPU of the decode tasks) so that a small lake still spreads over all of
    them."""
    rows = max(1, min(_MAX_BLOCK_ROWS, -(-table.num_rows // (4 * max(1, workers)))))
    return [table.slice(start, rows) for start in range(0, table.num_rows, rows)]


def _manifest_table(paths: pa.Array, allowed_roots: list[str]) -> pa.Table:
    nulls = pa.nulls(len(paths), pa.int64())
    return _input_table(paths, nulls, nulls, _outside_errors(paths, allowed_roots))


def _outside_errors(paths: pa.Array, allowed_roots: list[str]) -> pa.Array:
    """"outside allowed roots" for each path outside them, else null."""
    if not allowed_roots:
        return pa.nulls(len(paths), pa.string())
    inside = storage.inside_any(paths.to_pylist(), allowed_roots)
    return pa.array([None if i else "outside allowed roots" for i in inside], pa.string())


def _input_table(paths: pa.Array, sizes: pa.Array, mtime_ns: pa.Array, errors: pa.Array) -> pa.Table:
    # Microseconds, as in the output column, so that listing and output keys compare equal.
    mtime = pc.cast(pc.divide(mtime_ns, 1000), pa.timestamp("us", tz="UTC"))
    return pa.Table.from_arrays([paths, sizes, mtime, errors], schema=INPUT_SCHEMA)
