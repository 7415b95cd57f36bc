"""``distcls evaluate``: accuracy, per-class precision/recall/F1 and a confusion matrix of a model
artifact on a labelled lake: the inference stage of labeling (``distcls.predict``) + metrics."""
from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pyarrow as pa

from distcls import console, engines, lake, predict, storage
from distcls.artifact import ModelInfo, read_info
from distcls.config import EvaluateConfig
from distcls.runtime import ensure_ray

log = logging.getLogger(__name__)


def evaluate(config: EvaluateConfig) -> dict[str, Any]:
    """Predict every image of ``config.input`` and score it; logs a table, optionally writes a report.
    Returns ``accuracy``, ``images``, ``macro_f1``, ``errors`` and per-class metrics."""
    predict.check_usage(config)
    settings = config.storage()
    model = storage.Store(config.model, settings)
    info = read_info(model)
    rows, classes = lake.labelled_images(storage.Store(config.input, settings), info.classes)
    ensure_ray()
    predict.check_gpus(config)
    engine = engines.prepare(config.engine, model, config.gpu)
    progress, tables = console.Progress(log, rows.num_rows), []
    for scored in predict.predict(rows, config, info, _scored, engine):
        tables.append(scored)
        progress.add(scored.num_rows)
    progress.close()
    table = pa.concat_tables(tables)
    ok = table["error"].is_null().to_numpy(zero_copy_only=False)
    truth = table["label"].to_numpy()[ok]
    guess = table["predicted"].to_numpy(zero_copy_only=False)[ok].astype(np.int64)
    matrix = confusion_matrix(truth, guess, len(classes))
    metrics = scores(matrix, classes)
    metrics["errors"] = int((~ok).sum())
    log.info("\n" + format_table(metrics, classes, matrix))
    if config.report:
        _write_report(storage.Store(config.report, settings), metrics, matrix, classes, info)
    return {"accuracy": metrics["accuracy"], "images": metrics["images"], "macro_f1": metrics["macro_f1"],
            "errors": metrics["errors"], "model_id": info.model_id}


def _scored(batch: pa.Table, ok: np.ndarray, probs: np.ndarray, info: ModelInfo) -> pa.Table:
    """The inference stage's row maker for evaluation: true label, predicted class (null where
    the image could not be read) and error."""
    predicted = np.zeros(len(ok), dtype=np.int32)
    predicted[ok] = probs.argmax(axis=1)
    return pa.table({"label": batch["label"], "predicted": pa.array(predicted, mask=~ok), "error": batch["error"]})


def confusion_matrix(truth: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
    """counts[i, j] = images of true class i predicted as class j."""
    return np.bincount(truth * num_classes + predicted, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def scores(matrix: np.ndarray, classes: list[str]) -> dict[str, Any]:
    """Accuracy, macro F1 and per-class precision/recall/F1/support from a confusion matrix.
    A class never predicted (or never present) gets precision (or recall) 0, as scikit-learn does."""
    hits = np.diag(matrix).astype(float)
    predicted = matrix.sum(axis=0)
    actual = matrix.sum(axis=1)
    precision = np.divide(hits, predicted, out=np.zeros_like(hits), where=predicted > 0)
    recall = np.divide(hits, actual, out=np.zeros_like(hits), where=actual > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros_like(hits), where=precision + recall > 0)
    total = int(matrix.sum())
    return {
        "accuracy": float(hits.sum() / total) if total else 0.0,
        "images": total,
        "macro_f1": float(f1.mean()),
        "per_class": {name: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
                      for name, p, r, f, s in zip(classes, precision, recall, f1, actual)},
    }


def format_table(metrics: dict[str, Any], classes: list[str], matrix: np.ndarray) -> str:
    width = max(8, *(len(c) for c in classes))
    lines = [f"{'class':<{width}}  precision  recall     f1  support"]
    for name in classes:
        m = metrics["per_class"][name]
        lines.append(f"{name:<{width}}  {m['precision']:9.3f}  {m['recall']:6.3f}  {m['f1']:5.3f}  {m['support']:7d}")
    lines.append(f"{'accuracy':<{width}}  {metrics['accuracy']:.4f} on {metrics['images']} images"
                 f" (macro F1 {metrics['macro_f1']:.4f}, unreadable {metrics.get('errors', 0)})")
    lines.append("confusion matrix (rows: true, columns: predicted):")
    lines.append(" " * (width + 2) + " ".join(f"{c[:5]:>5}" for c in classes))
    for name, row in zip(classes, matrix):
        lines.append(f"{name:<{width}}  " + " ".join(f"{v:5d}" for v in row))
    return "\n".join(lines)


def _write_report(folder: storage.Store, metrics: dict[str, Any], matrix: np.ndarray, classes: list[str],
                  info: ModelInfo) -> None:
    from distcls.plots import confusion_matrix as plot_confusion

    report = {**metrics, "confusion_matrix": matrix.tolist(), "classes": classes, "model_id": info.model_id}
    folder.write_json(report, "metrics.json")
    folder.write(plot_confusion(matrix, classes), "confusion.png")
    log.info(f"report written to {folder.root} (metrics.json, confusion.png)")
