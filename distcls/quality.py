"""The quality report of a labeling run: what the model said about this run's images, and how far
that is from what it said on its validation split and in the earlier runs of the same output.

Read on the driver from the run's staged files, one file and three columns (label, score,
error_kind) at a time, so it costs a few bytes per class, not per image. The report goes into the
run's ``_SUCCESS`` under ``quality``; ``plots.quality_report`` draws it as ``_report.png``.

Distances are between label distributions (shares of the images that got a label):

- total variation, ``TV = 1/2 sum |p - q|``: the share of images that would have to change class
  to turn one distribution into the other, in [0, 1]. ``drift`` compares it with the threshold.
- population stability index, ``PSI = sum (p - q) ln(p / q)``, with shares below ``PSI_EPSILON``
  raised to it (a class that one side never predicts would make it infinite). Reported only; the
  usual reading (Siddiqi, *Credit Risk Scorecards*, 2006): < 0.1 stable, 0.1-0.25 some shift, > 0.25 a shift.
"""
from __future__ import annotations

import collections
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

# The output columns the report reads (a staged file's other columns are never read).
COLUMNS = pa.schema([("label", pa.string()), ("score", pa.float32()), ("error_kind", pa.string())])
PSI_EPSILON = 1e-4
SCORE_BINS = 20  # histogram of top-1 scores over [0, 1], kept in the report so the PNG can be redrawn from it


@dataclass
class Tally:
    """What a run's rows add up to: labels, top-1 scores (sum, histogram, how many below the
    threshold) and errors by kind."""

    low_confidence: float
    labels: collections.Counter = field(default_factory=collections.Counter)
    score_sum: float = 0.0
    below: int = 0
    histogram: np.ndarray = field(default_factory=lambda: np.zeros(SCORE_BINS, dtype=np.int64))
    errors_by_kind: collections.Counter = field(default_factory=collections.Counter)

    def add(self, table: pa.Table) -> None:
        """Count one table of output rows (label, score, error_kind); rows without a label are errors."""
        labelled = table.filter(pc.is_valid(table["label"]))
        self.labels.update({row["values"]: row["counts"] for row in pc.value_counts(labelled["label"]).to_pylist()})
        scores = labelled["score"].to_numpy().astype(np.float64)
        self.score_sum += float(scores.sum())
        self.below += int((scores < self.low_confidence).sum())
        self.histogram += np.histogram(np.clip(scores, 0, 1), bins=SCORE_BINS, range=(0, 1))[0]
        failed = table.filter(pc.is_null(table["label"]))["error_kind"]
        self.errors_by_kind.update({row["values"] or "unknown": row["counts"]
                                    for row in pc.value_counts(failed).to_pylist()})

    @property
    def images(self) -> int:
        return sum(self.labels.values())


def tally(tables: Iterable[pa.Table], low_confidence: float) -> Tally:
    """The Tally of ``tables`` (each with the COLUMNS), read one at a time."""
    found = Tally(low_confidence)
    for table in tables:
        found.add(table)
    return found


def shares(counts: Mapping[str, float]) -> dict[str, float]:
    """Counts as shares of their total (empty for no counts)."""
    total = sum(counts.values())
    return {name: count / total for name, count in counts.items()} if total else {}


def total_variation(p: Mapping[str, float], q: Mapping[str, float]) -> float:
    """Half the L1 distance between two share distributions; a class missing on one side has share 0."""
    return 0.5 * sum(abs(p.get(name, 0.0) - q.get(name, 0.0)) for name in set(p) | set(q))


def psi(p: Mapping[str, float], q: Mapping[str, float], epsilon: float = PSI_EPSILON) -> float:
    """Population stability index of ``p`` against ``q``, shares below ``epsilon`` raised to it."""
    total = 0.0
    for name in set(p) | set(q):
        a, b = max(p.get(name, 0.0), epsilon), max(q.get(name, 0.0), epsilon)
        total += (a - b) * math.log(a / b)
    return total


def previous_counts(summaries: Iterable[Mapping[str, Any]], model_id: str, run_id: str) -> tuple[dict[str, int], int]:
    """Label counts pooled over the committed runs of ``model_id`` other than ``run_id`` whose
    summary has a quality block, and how many runs that is. Runs of another model are left out:
    a new model changes the distribution by itself."""
    pooled: collections.Counter = collections.Counter()
    runs = 0
    for summary in summaries:
        # A _SUCCESS is a file anyone can edit: a block or count of the wrong type is left out.
        block = summary.get("quality")
        labels = block.get("labels") if isinstance(block, dict) else None
        if summary.get("model_id") != model_id or summary.get("run_id") == run_id or not isinstance(labels, dict):
            continue
        pooled.update({str(k): v for k, v in labels.items() if type(v) is int and v >= 0})
        runs += 1
    return dict(pooled), runs


def report(found: Tally, *, validation: Mapping[str, Any] | None, previous: tuple[dict[str, int], int],
           drift_threshold: float) -> dict[str, Any]:
    """The ``quality`` block of a run's summary: label counts and shares, mean top-1 score, images
    below the confidence threshold, errors by kind, the distances to the model's validation
    distribution (``validation``: model.json's, or None) and to the ``previous`` runs (pooled counts,
    number of runs), and ``drift``: whether any of those total variations exceeds ``drift_threshold``."""
    images = found.images
    run_shares = shares(found.labels)
    notes = []
    references: dict[str, Any] = {"validation": None, "previous_runs": None}
    if validation is None:
        notes.append("the model's model.json has no validation distribution (trained before distcls recorded it): "
                     "compared with previous runs only")
    else:
        references["validation"] = {"images": validation["images"], "mean_top1": validation["mean_top1"],
                                    "shares": dict(validation["predicted"])}
    pooled, runs = previous
    if runs and sum(pooled.values()):
        references["previous_runs"] = {"runs": runs, "images": sum(pooled.values()), "shares": shares(pooled)}
    else:
        # Earlier runs whose images all failed have no distribution: against an empty one every
        # run would be at total variation 1/2, drift at the default threshold.
        notes.append("no earlier committed run of this model in this output with labelled images to compare with")
    for reference in filter(None, references.values()):
        reference["total_variation"] = round(total_variation(run_shares, reference["shares"]), 6) if images else None
        reference["psi"] = round(psi(run_shares, reference["shares"]), 6) if images else None
    if not images:
        notes.append("no image got a label: no distance to compare")
    drifted = [name for name, ref in references.items()
               if ref and ref["total_variation"] is not None and ref["total_variation"] > drift_threshold]
    return {
        "images": images, "labels": dict(sorted(found.labels.items())),
        "shares": {name: round(share, 6) for name, share in sorted(run_shares.items())},
        "mean_top1": round(found.score_sum / images, 6) if images else None,
        "low_confidence": {"threshold": found.low_confidence, "images": found.below,
                           "share": round(found.below / images, 6) if images else None},
        "score_histogram": found.histogram.tolist(),
        "errors_by_kind": dict(sorted(found.errors_by_kind.items())),
        "references": references, "distance": "total_variation", "psi_epsilon": PSI_EPSILON,
        "drift_threshold": drift_threshold, "drift": bool(drifted), "drifted_from": drifted, "notes": notes,
    }
