"""Human review, both ways: the least confident images of a labeling run out to people
(``distcls label --review-below/--review-sample``), their labels back into training
(``distcls train --labels``).

The review queue is chosen on the driver from the run's staged files, one file at a time, before
the commit: the rows below the threshold stream through, or with ``--review-sample N`` the N
lowest scores are kept (N rows plus one file's rows in memory). It is staged and committed with
the run (``dataset.Dataset.stage_review``), as ``_review/run=<run_id>/part-00000.parquet``.

Its columns are REVIEW_SCHEMA: what the model said (``predicted``, ``score``, the top-k), where the
file is (path, size, mtime), and an empty ``label`` for people to fill in, so that the file, once
filled in, is a labels manifest for ``train --labels`` as it is.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from distcls import lake, storage
from distcls.errors import UsageError

REVIEW_SCHEMA = pa.schema([
    ("path", pa.string()),
    ("size", pa.int64()),
    ("mtime", pa.timestamp("us", tz="UTC")),
    ("predicted", pa.string()),
    ("score", pa.float32()),
    ("topk_labels", pa.list_(pa.string())),
    ("topk_scores", pa.list_(pa.float32())),
    ("label", pa.string()),  # empty: the human label, for train --labels
    ("model_id", pa.string()),
    ("run_id", pa.string()),
])
# What the queue reads of an output row (label.OUTPUT_SCHEMA); label is renamed to predicted.
OUTPUT_COLUMNS = ["path", "size", "mtime", "label", "score", "topk_labels", "topk_scores", "model_id", "run_id"]


def candidates(below: float | None) -> pc.Expression:
    """The output rows that may be reviewed: scored (error rows have no score), below ``below``."""
    scored = pc.field("score").is_valid()
    return scored if below is None else scored & (pc.field("score") < below)


def queue(tables: Iterator[pa.Table], sample: int | None) -> Iterator[pa.Table]:
    """REVIEW_SCHEMA tables of the candidate rows in ``tables`` (OUTPUT_COLUMNS): all of them, in
    the order they come, or with ``sample`` the ``sample`` lowest scores, lowest first (ties by path).
    Holds at most ``sample`` rows besides the table being read."""
    if sample is None:
        yield from (_review_rows(table) for table in tables)
        return
    kept = REVIEW_SCHEMA.empty_table()
    for table in tables:
        both = pa.concat_tables([kept, _review_rows(table)])
        kept = both.sort_by([("score", "ascending"), ("path", "ascending")]).slice(0, sample)
    yield kept


def _review_rows(table: pa.Table) -> pa.Table:
    columns = {name: table[name] for name in OUTPUT_COLUMNS if name != "label"}
    columns.update(predicted=table["label"], label=pa.nulls(table.num_rows, pa.string()))
    return pa.table({field.name: columns[field.name] for field in REVIEW_SCHEMA}, schema=REVIEW_SCHEMA)


# ---------------------------------------------------------------------------------------------
# Human labels back into training


def human_labels(manifest: storage.Store, classes: list[str]) -> pa.Table:
    """(path, label) of the manifest of human labels ``manifest`` (a file), one row per path, labels as indices into
    ``classes``: read as any manifest is (``lake.manifest_chunks``: paths normalised, relative ones
    taken from the manifest's folder, credentials refused). Rows with an empty label (not reviewed)
    are skipped. UsageError naming the manifest, the row and the value for a missing column, a
    label that is not one of ``classes``, a path given two labels, or no labelled row at all. Rows
    are counted among those with a path (manifest_chunks drops rows without one)."""
    uri, chunks, first = manifest.root, [], 1
    for chunk in lake.manifest_chunks(manifest):
        if "label" not in chunk.column_names:
            raise UsageError(f"--labels {uri}: no 'label' column (columns: {', '.join(chunk.column_names)})")
        rows = pa.array(range(first, first + chunk.num_rows), pa.int64())
        try:
            labels = pc.cast(chunk["label"], pa.string())
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):  # a list, struct, ... column: no label text
            raise UsageError(f"--labels {uri}: the 'label' column is {chunk.schema.field('label').type}, "
                             "not class names") from None
        chunks.append(pa.table({"path": chunk["path"], "label": labels, "row": rows}))
        first += chunk.num_rows
    table = pa.concat_tables(chunks) if chunks else None
    if table is not None:
        table = table.filter(pc.and_(pc.is_valid(table["label"]), pc.greater(pc.utf8_length(table["label"]), 0)))
    if table is None or table.num_rows == 0:
        raise UsageError(f"--labels {uri}: no row with a label (fill in the label column of the rows reviewed)")
    unknown = table.filter(pc.invert(pc.is_in(table["label"], value_set=pa.array(classes))))
    if unknown.num_rows:
        row = unknown.slice(0, 1).to_pylist()[0]
        raise UsageError(f"--labels {uri}: row {row['row']}: label {row['label']!r} (of {row['path']}) is not one of "
                         f"the lake's classes ({', '.join(classes)})")
    pairs = table.group_by(["path", "label"], use_threads=False).aggregate([("row", "min")])
    _refuse_two_labels(uri, pairs)
    index = pc.cast(pc.index_in(pairs["label"], value_set=pa.array(classes)), pa.int32())
    return pa.table({"path": pairs["path"], "label": index})


def _refuse_two_labels(uri: str, pairs: pa.Table) -> None:
    """UsageError when a path has more than one label: the later row is named, with the earlier one."""
    counts = pairs.group_by("path", use_threads=False).aggregate([("label", "count")])
    repeated = counts.filter(pc.greater(counts["label_count"], 1))["path"]
    if not len(repeated):
        return
    conflicts = pairs.filter(pc.is_in(pairs["path"], value_set=repeated)).sort_by("row_min").to_pylist()
    first = conflicts[0]
    later = next(row for row in conflicts[1:] if row["path"] == first["path"])
    raise UsageError(f"--labels {uri}: row {later['row_min']}: label {later['label']!r} of {first['path']} "
                     f"contradicts row {first['row_min']}, which gives it {first['label']!r}")


def relabel(rows: pa.Table, labels: pa.Table, uri: str) -> tuple[pa.Table, dict[str, Any]]:
    """The training rows (path, label index) with ``labels`` applied: a labelled path of the lake
    takes the human label, a labelled path the lake lacks is added. Paths compare as spelled:
    both sides are normalised (a listing yields normalised URIs, manifests are normalised when
    read). Returns the rows and what changed, for model.json: manifest, rows, changed, confirmed
    (the same label as before), added."""
    at = pc.index_in(rows["path"], value_set=labels["path"])
    human = pc.take(labels["label"], at)  # null where the lake's path has no human label
    reviewed = pc.is_valid(at)
    changed = pc.sum(pc.and_(reviewed, pc.not_equal(human, rows["label"]))).as_py() or 0
    added = labels.filter(pc.invert(pc.is_in(labels["path"], value_set=rows["path"])))
    relabelled = rows.set_column(rows.column_names.index("label"), "label", pc.coalesce(human, rows["label"]))
    counts = {"manifest": uri, "rows": labels.num_rows, "changed": changed,
              "confirmed": (pc.sum(reviewed).as_py() or 0) - changed, "added": added.num_rows}
    return pa.concat_tables([relabelled, added.cast(relabelled.schema)]), counts
