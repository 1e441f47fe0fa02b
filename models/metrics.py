"""The few metrics training needs, shared with evaluation: macro ROC-AUC and F1 thresholds."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_auc_score


def scorable_genres(labels: np.ndarray) -> np.ndarray:
    """Genres with both a positive and a negative: ROC-AUC is undefined for the others."""
    positives = labels.sum(axis=0)
    return np.flatnonzero((positives > 0) & (positives < len(labels)))


def macro_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Mean ROC-AUC over the genres where it is defined (NaN if none is)."""
    keep = scorable_genres(labels)
    if keep.size == 0:
        return float("nan")
    return float(roc_auc_score(labels[:, keep], scores[:, keep], average="macro"))


def micro_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC-AUC of all (poster, genre) pairs pooled: rewards ranking frequent genres higher."""
    flat = labels.ravel()
    if flat.min() == flat.max():
        return float("nan")
    return float(roc_auc_score(flat, scores.ravel()))


def tune_thresholds(labels: np.ndarray, scores: np.ndarray, grid: np.ndarray | None = None) -> np.ndarray:
    """Per-genre threshold maximising F1 on these (validation) predictions.

    A genre without positives keeps 0.5: nothing can be learnt about it here.
    """
    grid = np.linspace(0.05, 0.95, 19) if grid is None else grid
    thresholds = np.full(labels.shape[1], 0.5, dtype=np.float32)
    for g in range(labels.shape[1]):
        y = labels[:, g] > 0.5
        if not y.any():
            continue
        predicted = scores[:, g][None, :] >= grid[:, None]
        tp = (predicted & y).sum(axis=1)
        f1 = 2 * tp / (predicted.sum(axis=1) + y.sum())
        thresholds[g] = grid[int(np.argmax(f1))]
    return thresholds
