"""``distcls runs OUTPUT``: what each committed labeling run did, newest first, read from the
``_SUCCESS`` summaries of the output dataset (one per run with --incremental)."""
from __future__ import annotations

from typing import Any

from distcls import storage
from distcls.config import RunsConfig
from distcls.dataset import Dataset
from distcls.errors import UsageError

_COLUMNS = ("run_id", "started_at", "images", "errors", "images_per_s", "mean_top1", "drift", "model_id")


def runs(config: RunsConfig) -> dict[str, Any] | str:
    """One row per committed run (run id, start, images, errors by kind, images/s, mean top-1 score,
    drift, model id; with --json also its quality block), newest first: a table, or with --json
    the data of the CLI's JSON line. UsageError when ``config.output`` is not a distcls output."""
    output = storage.Store(config.output, config.storage())
    output.require_exists()
    summaries = Dataset(output).successes()
    if not summaries:
        raise UsageError(f"{config.output}: not a distcls output (no _SUCCESS); runs lists what `distcls label` committed")
    rows = sorted((_row(summary) for summary in summaries.values()), key=lambda r: r["started_at"], reverse=True)
    if config.as_json:
        return {"output": config.output, "runs": rows}
    return format_table(rows)


def _row(summary: dict[str, Any]) -> dict[str, Any]:
    # Runs committed before the quality report existed have none: null, shown as "-". A field of
    # the wrong type (a _SUCCESS is a file anyone can edit) is shown as missing, never a crash.
    quality = summary.get("quality") if isinstance(summary.get("quality"), dict) else {}
    kinds = summary.get("errors_by_kind")
    mean, drift = quality.get("mean_top1"), quality.get("drift")
    return {
        "run_id": summary.get("run_id"), "started_at": str(summary.get("started_at", "")),
        "images": summary.get("images"), "errors": summary.get("errors"),
        "errors_by_kind": kinds if isinstance(kinds, dict) else {}, "images_per_s": summary.get("images_per_s"),
        "model_id": summary.get("model_id"), "output": summary.get("output"),
        "mean_top1": mean if isinstance(mean, (int, float)) and not isinstance(mean, bool) else None,
        "drift": drift if isinstance(drift, bool) else None, "quality": summary.get("quality"),
    }


def format_table(rows: list[dict[str, Any]]) -> str:
    """The rows as aligned text for people; errors with their kinds, model ids shortened."""
    def cells(row: dict[str, Any]) -> list[str]:
        kinds = ", ".join(f"{kind} {count}" for kind, count in sorted(row["errors_by_kind"].items()))
        return [str(row["run_id"]), row["started_at"], str(row["images"]),
                f"{row['errors']}" + (f" ({kinds})" if kinds else ""), f"{row['images_per_s']}",
                "-" if row["mean_top1"] is None else f"{row['mean_top1']:.3f}",
                "-" if row["drift"] is None else ("yes" if row["drift"] else "no"), str(row["model_id"])[:12]]

    table = [list(_COLUMNS)] + [cells(row) for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(_COLUMNS))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in table)
