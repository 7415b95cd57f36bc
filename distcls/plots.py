"""Pictures for people: training curves, confusion matrix, label-score histogram. Each returns PNG bytes."""
from __future__ import annotations

import io
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")  # no display on cluster nodes and CI
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
import numpy as np  # noqa: E402

MAX_CLASSES_DRAWN = 40


def _png(figure: plt.Figure) -> bytes:
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    return buffer.getvalue()


def training_curves(history: Sequence[dict[str, Any]]) -> bytes:
    """Loss (train and validation) and validation accuracy per epoch."""
    epochs = [row["epoch"] for row in history]
    figure, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 4))
    loss_ax.plot(epochs, [r["train_loss"] for r in history], marker="o", label="train")
    loss_ax.plot(epochs, [r["val_loss"] for r in history], marker="o", label="validation")
    loss_ax.set(xlabel="epoch", ylabel="cross-entropy loss (log scale)", title="Loss", yscale="log")
    loss_ax.legend()
    acc_ax.plot(epochs, [100 * r["val_accuracy"] for r in history], marker="o", color="tab:green")
    # Training evaluates with --tta after its last epoch only: say which points include it.
    with_tta = [r for r in history if r.get("val_tta", "none") != "none"]
    if with_tta:
        acc_ax.plot([r["epoch"] for r in with_tta], [100 * r["val_accuracy"] for r in with_tta], linestyle="none",
                    marker="*", markersize=14, color="tab:red", label=f"with --tta {with_tta[-1]['val_tta']}")
        acc_ax.legend(loc="lower right")
    acc_ax.set(xlabel="epoch", ylabel="validation accuracy (%)", title="Validation accuracy", ylim=(0, 100))
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return _png(figure)


def confusion_matrix(matrix: np.ndarray, classes: Sequence[str]) -> bytes:
    """Row-normalised confusion matrix (true class down, predicted across) with counts in the cells."""
    rates = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    size = max(5.0, 0.6 * len(classes) + 2)
    figure, ax = plt.subplots(figsize=(size, size))
    ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set(xlabel="predicted class", ylabel="true class", title="Confusion matrix (counts; colour = row share)")
    for (i, j), count in np.ndenumerate(matrix):
        ax.text(j, i, str(count), ha="center", va="center", fontsize=8,
                color="white" if rates[i, j] > 0.5 else "black")
    return _png(figure)


def label_summary(scores: np.ndarray, counts: dict[str, int]) -> bytes:
    """Histogram of top-1 scores and images per predicted class, for a labeling run."""
    figure, (hist_ax, bar_ax) = plt.subplots(1, 2, figsize=(11, 4))
    hist_ax.hist(scores, bins=20, range=(0, 1), color="tab:blue")
    hist_ax.set(xlabel="top-1 score", ylabel="images", title="Confidence of predictions")
    names = sorted(counts, key=counts.get, reverse=True)
    bar_ax.bar(names, [counts[n] for n in names], color="tab:orange")
    bar_ax.set(xlabel="predicted class", ylabel="images", title="Images per predicted class")
    bar_ax.tick_params(axis="x", rotation=45)
    return _png(figure)


def quality_report(quality: dict[str, Any], run_id: str) -> bytes:
    """A labeling run's quality block (``distcls.quality.report``) for people: label shares beside
    those of the references, the top-1 score histogram with the confidence threshold, errors by kind."""
    references = {name: ref for name, ref in quality["references"].items() if ref}
    figure, (share_ax, score_ax, error_ax) = plt.subplots(1, 3, figsize=(16, 4.5), width_ratios=(3, 2, 1.2))
    series = {"this run": quality["shares"], **{name.replace("_", " "): ref["shares"] for name, ref in references.items()}}
    every = set().union(*series.values())
    # Drawing one bar and tick per class takes about 10 ms per class (a minute for 5,000), on the
    # driver, holding the output's lock: only the classes with the largest shares are drawn.
    largest = sorted(every, key=lambda name: -max(shares.get(name, 0.0) for shares in series.values()))
    names = sorted(largest[:MAX_CLASSES_DRAWN])
    width = 0.8 / len(series)
    for i, (label, shares) in enumerate(series.items()):
        share_ax.bar(np.arange(len(names)) + i * width, [shares.get(n, 0.0) for n in names], width, label=label)
    share_ax.set_xticks(np.arange(len(names)) + 0.4 - width / 2, names, rotation=45, ha="right")
    share_ax.set(ylabel="share of labelled images", title="Predicted classes" + (
        f" ({len(names)} with the largest shares of {len(every)})" if len(names) < len(every) else ""))
    share_ax.legend()
    histogram = quality["score_histogram"]
    edges = np.linspace(0, 1, len(histogram) + 1)
    score_ax.bar(edges[:-1], histogram, width=np.diff(edges), align="edge", color="tab:blue")
    low = quality["low_confidence"]
    score_ax.axvline(low["threshold"], color="tab:red", linestyle="--",
                     label=f"below {low['threshold']:g}: {low['images']} images")
    mean = quality["mean_top1"]
    score_ax.set(xlabel="top-1 score", ylabel="images",
                 title="Confidence" + (f" (mean {mean:.3f})" if mean is not None else ""))
    score_ax.legend()
    kinds = quality["errors_by_kind"]
    error_ax.bar(list(kinds), list(kinds.values()), color="tab:gray")
    error_ax.set(ylabel="images", title=f"Errors by kind ({sum(kinds.values())})")
    error_ax.tick_params(axis="x", rotation=45)
    error_ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    distances = ", ".join(f"TV to {name.replace('_', ' ')} {ref['total_variation']:.3f}"
                          for name, ref in references.items() if ref["total_variation"] is not None)
    figure.suptitle(f"run {run_id}: {quality['images']} labelled images; drift "
                    f"{'YES' if quality['drift'] else 'no'} (threshold {quality['drift_threshold']:g})"
                    + (f"; {distances}" if distances else ""))
    return _png(figure)
