"""Report plots (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


def per_genre_auc_plot(path: Path, metrics: dict[str, dict], genres: list[str]) -> Path:
    """Grouped bars: ROC-AUC per genre, one bar per scorer (NaN where the split has no positive)."""
    plt = _pyplot()
    names = list(metrics)
    width = 0.8 / len(names)
    fig, ax = plt.subplots(figsize=(max(8, len(genres) * 0.6), 4.5))
    for k, name in enumerate(names):
        table = {row["genre"]: row["roc_auc"] for row in metrics[name]["per_genre"]}
        values = [table.get(g, np.nan) for g in genres]
        ax.bar(np.arange(len(genres)) + k * width, values, width, label=name)
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax.set_xticks(np.arange(len(genres)) + 0.4 - width / 2, genres, rotation=60, ha="right")
    ax.set_ylim(0.3, 1.0)
    ax.set_ylabel("ROC-AUC")
    ax.legend(fontsize=8, ncols=min(len(names), 6))
    return _save(fig, path)


def pr_curves_plot(path: Path, labels: np.ndarray, scores: dict[str, np.ndarray]) -> Path:
    """Micro-averaged precision–recall curve per scorer (all poster × genre pairs pooled)."""
    from sklearn.metrics import average_precision_score, precision_recall_curve

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 5))
    for name, s in scores.items():
        precision, recall, _ = precision_recall_curve(labels.ravel(), s.ravel())
        ap = average_precision_score(labels.ravel(), s.ravel())
        ax.plot(recall, precision, label=f"{name} (AP {ap:.3f})")
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_title("micro-averaged precision–recall")
    ax.legend(fontsize=8)
    return _save(fig, path)


def reliability_plot(path: Path, labels: np.ndarray, scores: dict[str, np.ndarray]) -> Path:
    """Reliability diagram (equal-width bins, all poster × genre pairs) with each scorer's ECE, and bin counts.

    The same bins as :func:`posterfusion.models.calibration.expected_calibration_error`, so the
    picture and the number agree.
    """
    from posterfusion.models.calibration import expected_calibration_error, reliability_table

    plt = _pyplot()
    fig, (ax, counts) = plt.subplots(2, 1, figsize=(6, 6.5), height_ratios=(3, 1), sharex=True)
    ax.plot([0, 1], [0, 1], color="grey", ls="--", lw=0.8)
    for name, s in scores.items():
        table = reliability_table(labels, s)
        used = table["count"] > 0
        ece = expected_calibration_error(labels, s)[0]
        ax.plot(table["mean_probability"][used], table["frequency"][used], marker="o", ms=3,
                label=f"{name} (ECE {ece:.3f})")
        centres = (table["edges"][:-1] + table["edges"][1:]) / 2
        counts.plot(centres, table["count"], marker=".", lw=0.8, label=name)
    ax.set_ylabel("observed frequency")
    ax.set_title("reliability (all poster × genre pairs)")
    ax.legend(fontsize=8)
    counts.set_yscale("log")
    counts.set_xlabel("predicted probability")
    counts.set_ylabel("pairs per bin")
    return _save(fig, path)
