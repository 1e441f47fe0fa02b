"""The one metric suite: training's validation, evaluate and compare all count with these functions.

Threshold, ranking and per-genre metrics, the headline list with bootstrap intervals, and the
per-genre F1 thresholds training tunes on validation.

Researchers decide from these numbers whether object fusion helps, so the thresholded metrics
come from scikit-learn, and the three rank metrics the bootstrap calls thousands of times (macro
and micro ROC-AUC, mean average precision) are computed here once, vectorised over genres, and
tested equal to scikit-learn's, ties included (sklearn's per-call checks cost ~10 ms a call);
hit@k and the top-n ratio of the DenseNet poster paper are written here and pinned by hand.
Conventions, the same in every function:

* ``labels`` (n, G) 0/1, ``scores`` (n, G) probabilities, ``thresholds`` (G,) or one number;
  a score equal to its threshold predicts the genre (as in :func:`tune_thresholds`).
* A genre without positives in the split has no ROC-AUC or average precision (nor one without
  negatives an ROC-AUC): it is left out of the macro means and shown as NaN per genre, never
  scored 0 or 1. Thresholded metrics keep sklearn's ``zero_division=0`` instead.
* A poster without a true genre has nothing to rank: it is left out of hit@k, the top-n ratio,
  LRAP and coverage error (sklearn would score it 1 and 0 and flatter both).
* Tied scores are broken against the model (a false genre ranks before a true one), as sklearn's
  LRAP and coverage error do: a constant model must not score by the vocabulary's genre order.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np
import pandas as pd

from posterfusion.models.calibration import expected_calibration_error

# scikit-learn (and the SciPy it loads) is imported inside the functions that call it: every Ray Train
# worker imports this module for its validation AUCs, which need neither, and the two imports cost a fresh
# worker process ~1 s of CPU (measured: 0.67 s scipy.stats, 0.32 s sklearn.metrics).

MetricFn = Callable[[np.ndarray, np.ndarray], float]
# The six most common genres of the posters' sources: every vocabulary has them, so a macro ROC-AUC over
# them compares models trained on different genre sets (and other sources) on one footing.
MAIN_GENRES = ("Drama", "Comedy", "Romance", "Thriller", "Horror", "Action")
AVERAGES = ("micro", "macro", "weighted", "samples")


def _as_arrays(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """0/1 integer labels and float scores of one (n, G ≥ 2) shape.

    Labels are binarised at 0.5 like :func:`tune_thresholds`: float32 multi-hot rows (or smoothed
    targets) must reach sklearn as a multilabel indicator, not as a continuous target.
    """
    y = np.asarray(labels)
    s = np.asarray(scores, dtype=np.float64)
    if y.ndim != 2 or y.shape != s.shape:
        raise ValueError(f"labels {y.shape} and scores {s.shape} must be the same (n, G) shape")
    if y.shape[1] < 2:  # sklearn reads one column as a binary target and averages over both classes
        raise ValueError("multi-label metrics need at least two genres")
    return (y > 0.5).astype(np.int8), s


def predict(scores: np.ndarray, thresholds: np.ndarray | float) -> np.ndarray:
    """0/1 predictions: a genre is predicted when its score reaches its threshold."""
    return (np.asarray(scores, dtype=np.float64) >= np.asarray(thresholds, dtype=np.float64)).astype(np.int8)


# --- thresholded metrics ------------------------------------------------------------------------


def classification_metrics(labels: np.ndarray, scores: np.ndarray, thresholds: np.ndarray | float) -> dict[str, float]:
    """F1, precision and recall under the four sklearn averages, Jaccard, subset accuracy, Hamming loss.

    Keys: ``f1_<avg>``, ``precision_<avg>``, ``recall_<avg>`` for avg in micro/macro/weighted/samples,
    ``jaccard_samples``, ``subset_accuracy``, ``hamming_loss``. Macro means include every genre, so a
    genre without positives in the split counts as F1 0 (``zero_division=0``), as sklearn reports it.
    """
    from sklearn.metrics import accuracy_score, hamming_loss, jaccard_score, precision_recall_fscore_support

    y, s = _as_arrays(labels, scores)
    predicted = predict(s, thresholds)
    out: dict[str, float] = {}
    for average in AVERAGES:  # one sklearn call gives f1_score, precision_score and recall_score alike
        p, r, f, _ = precision_recall_fscore_support(y, predicted, average=average, zero_division=0)
        out |= {f"f1_{average}": float(f), f"precision_{average}": float(p), f"recall_{average}": float(r)}
    out["jaccard_samples"] = float(jaccard_score(y, predicted, average="samples", zero_division=0))
    out["subset_accuracy"] = float(accuracy_score(y, predicted))
    out["hamming_loss"] = float(hamming_loss(y, predicted))
    return out


def make_f1_metric(thresholds: np.ndarray | float, average: str = "micro") -> MetricFn:
    """A ``metric(labels, scores)`` for F1 at fixed thresholds, so tuned-threshold F1 can be bootstrapped.

    The thresholds stay fixed across resamples: they were tuned on validation, not on this split.
    Micro and macro F1 are counted in numpy (equal to sklearn's, see the tests) because the
    bootstrap calls this thousands of times; the other averages go through sklearn.
    """

    def f1(labels: np.ndarray, scores: np.ndarray) -> float:
        y, s = _as_arrays(labels, scores)
        predicted = predict(s, thresholds)
        if average in ("micro", "macro"):
            return _counted_f1(y.astype(bool), predicted.astype(bool), average)
        from sklearn.metrics import precision_recall_fscore_support

        _, _, value, _ = precision_recall_fscore_support(y, predicted, average=average, zero_division=0)
        return float(value)

    f1.__name__ = f"f1_{average}"
    return f1


def _counted_f1(y: np.ndarray, predicted: np.ndarray, average: str) -> float:
    """F1 = 2·tp / (2·tp + fp + fn), 0 where nothing is true or predicted (sklearn's ``zero_division=0``)."""
    axis = None if average == "micro" else 0
    tp = (y & predicted).sum(axis=axis)
    denominator = y.sum(axis=axis) + predicted.sum(axis=axis)
    f1 = np.divide(2 * tp, denominator, out=np.zeros(np.shape(tp)), where=denominator > 0)
    return float(np.mean(f1))


# --- ranking metrics ----------------------------------------------------------------------------


def _ranks(labels: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Rank of every genre within its poster, 0 = highest score; ties put false genres first."""
    order = np.lexsort((labels, -scores), axis=-1)
    return np.argsort(order, axis=-1)


def _ranked_posters(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Labels and scores of the posters with at least one true genre: the others have nothing to rank."""
    y, s = _as_arrays(labels, scores)
    keep = y.sum(axis=1) > 0
    return y[keep], s[keep]


def hit_at_k(labels: np.ndarray, scores: np.ndarray, k: int = 3) -> float:
    """Share of posters (with a true genre) that have a true genre among their k highest-scored ones."""
    y, s = _ranked_posters(labels, scores)
    if len(y) == 0:
        return float("nan")
    in_top = _ranks(y, s) < k
    return float((in_top & (y > 0)).any(axis=1).mean())


def top_n_ratio(labels: np.ndarray, scores: np.ndarray) -> float:
    """The DenseNet poster paper's metric: with n true genres, the share of them in the n highest-scored.

    Averaged over posters with n ≥ 1. Unlike hit@k it needs no k and punishes a missed second genre.
    """
    y, s = _ranked_posters(labels, scores)
    if len(y) == 0:
        return float("nan")
    n_true = y.sum(axis=1)
    in_top = _ranks(y, s) < n_true[:, None]
    return float(((in_top & (y > 0)).sum(axis=1) / n_true).mean())


def hit_at_3(labels: np.ndarray, scores: np.ndarray) -> float:
    return hit_at_k(labels, scores, 3)


def ranking_metrics(labels: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    """Threshold-free metrics: how well each poster's genres and each genre's posters are ranked.

    Keys: ``roc_auc_macro``, ``roc_auc_micro``, ``auc_genres_scored``, ``map_macro``,
    ``map_genres_scored``, ``hit@1``, ``hit@3``, ``top_n_ratio``, ``lrap``, ``coverage_error``,
    ``posters_ranked`` (posters with a true genre: the denominator of the last five).
    """
    from sklearn.metrics import coverage_error, label_ranking_average_precision_score

    y, s = _as_arrays(labels, scores)
    ranked_y, ranked_s = _ranked_posters(y, s)
    has_posters = len(ranked_y) > 0
    return {
        "roc_auc_macro": macro_auc(y, s),
        "roc_auc_micro": micro_auc(y, s),
        "auc_genres_scored": int(scorable_genres(y).size),
        "map_macro": mean_average_precision(y, s),
        "map_genres_scored": int((y.sum(axis=0) > 0).sum()),
        "hit@1": hit_at_k(y, s, 1),
        "hit@3": hit_at_k(y, s, 3),
        "top_n_ratio": top_n_ratio(y, s),
        "lrap": float(label_ranking_average_precision_score(ranked_y, ranked_s)) if has_posters else float("nan"),
        "coverage_error": float(coverage_error(ranked_y, ranked_s)) if has_posters else float("nan"),
        "posters_ranked": len(ranked_y),
    }


# --- per genre and all together -----------------------------------------------------------------


def per_genre_table(
    labels: np.ndarray, scores: np.ndarray, thresholds: np.ndarray | float, genres: Sequence[str]
) -> pd.DataFrame:
    """One row per genre: support, prevalence, ROC-AUC and AP (NaN where undefined), P/R/F1 at its threshold."""
    from sklearn.metrics import precision_recall_fscore_support

    y, s = _as_arrays(labels, scores)
    if len(genres) != y.shape[1]:
        raise ValueError(f"{len(genres)} genre names for {y.shape[1]} score columns")
    n = len(y)
    support = y.sum(axis=0).astype(int)
    auc, ap = _auc_per_genre(y, s), _ap_per_genre(y, s)
    p, r, f, _ = precision_recall_fscore_support(y, predict(s, thresholds), average=None, zero_division=0)
    return pd.DataFrame({
        "genre": list(genres),
        "support": support,
        "prevalence": support / n if n else np.full(len(genres), np.nan),
        "roc_auc": np.asarray(auc, dtype=float),
        "average_precision": np.asarray(ap, dtype=float),
        "precision": p,
        "recall": r,
        "f1": f,
        "threshold": np.broadcast_to(np.asarray(thresholds, dtype=float), (len(genres),)),
    })


def evaluate_all(
    labels: np.ndarray, scores: np.ndarray, thresholds: np.ndarray | float, genres: Sequence[str]
) -> dict:
    """Every metric of one split: ``n_posters``, ``tuned`` and ``at_0.5`` (classification metrics at the
    tuned thresholds and at 0.5), ``ranking``, and ``per_genre`` (the table as a list of records)."""
    y, s = _as_arrays(labels, scores)
    return {
        "n_posters": len(y),
        "tuned": classification_metrics(y, s, thresholds),
        "at_0.5": classification_metrics(y, s, 0.5),
        "ranking": ranking_metrics(y, s),
        "per_genre": per_genre_table(y, s, thresholds, genres).to_dict(orient="records"),
    }


def label_prior_scores(train_labels: np.ndarray, n: int) -> np.ndarray:
    """The label-prior baseline: every poster scores each genre at its training frequency.

    It ranks genres by popularity and posters not at all (macro ROC-AUC 0.5): a model must beat it
    on hit@k and the top-n ratio to have learnt anything from the poster.
    """
    prior = (np.asarray(train_labels) > 0.5).mean(axis=0)
    return np.tile(prior, (n, 1))


# --- rank metrics, vectorised over genres ---------------------------------------------------------


def _average_ranks(s: np.ndarray) -> np.ndarray:
    """Each column's ranks from 1, a run of tied scores sharing its average rank; a column holding a NaN is
    all NaN (``scipy.stats.rankdata(s, axis=0)``, equal to it in the tests, without importing SciPy)."""
    n = s.shape[0]
    order = np.argsort(s, axis=0, kind="stable")
    ordered = np.take_along_axis(s, order, 0)
    starts = np.ones(s.shape, dtype=bool)  # where a run of equal scores begins, in sorted order
    starts[1:] = ordered[1:] != ordered[:-1]
    ends = np.ones(s.shape, dtype=bool)
    ends[:-1] = starts[1:]
    position = np.broadcast_to(np.arange(n)[:, None], s.shape)
    first = np.maximum.accumulate(np.where(starts, position, 0), axis=0)
    last = np.minimum.accumulate(np.where(ends, position, n - 1)[::-1], axis=0)[::-1]
    ranks = np.empty(s.shape, dtype=np.float64)
    np.put_along_axis(ranks, order, (first + last) / 2 + 1, axis=0)
    ranks[:, np.isnan(s).any(axis=0)] = np.nan
    return ranks


def _auc_per_genre(y: np.ndarray, s: np.ndarray) -> np.ndarray:
    """ROC-AUC of every column as the Mann–Whitney rank sum, NaN where a class is missing.

    Average ranks give a tied (positive, negative) pair half credit, exactly as sklearn's trapezoids do.
    """
    ranks = _average_ranks(s)
    positives = y.sum(axis=0, dtype=np.float64)
    negatives = len(y) - positives
    pairs = positives * negatives
    rank_sum = (ranks * y).sum(axis=0) - positives * (positives + 1) / 2
    return np.divide(rank_sum, pairs, out=np.full(pairs.shape, np.nan), where=pairs > 0)


def _ap_per_genre(y: np.ndarray, s: np.ndarray) -> np.ndarray:
    """sklearn's average precision of every column, NaN where there are no positives.

    AP = Σ over score thresholds of Δrecall · precision; a run of tied scores is one threshold,
    so each positive earns the precision at the end of its tie run.
    """
    n = len(y)
    order = np.argsort(-s, axis=0, kind="stable")
    sorted_s, sorted_y = np.take_along_axis(s, order, 0), np.take_along_axis(y, order, 0).astype(np.float64)
    precision = np.cumsum(sorted_y, axis=0) / np.arange(1, n + 1)[:, None]
    run_ends = np.ones(s.shape, dtype=bool)
    run_ends[:-1] = sorted_s[:-1] != sorted_s[1:]
    end = np.where(run_ends, np.arange(n)[:, None], n)
    end = np.minimum.accumulate(end[::-1], axis=0)[::-1]
    positives = sorted_y.sum(axis=0)
    earned = (sorted_y * np.take_along_axis(precision, end, 0)).sum(axis=0)
    return np.divide(earned, positives, out=np.full(positives.shape, np.nan), where=positives > 0)


def _nanmean(values: np.ndarray) -> float:
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else float("nan")


def scorable_genres(labels: np.ndarray) -> np.ndarray:
    """Genres with both a positive and a negative: ROC-AUC is undefined for the others."""
    positives = (np.asarray(labels) > 0.5).sum(axis=0)
    return np.flatnonzero((positives > 0) & (positives < len(labels)))


def auc_per_genre(labels: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Each genre's ROC-AUC (NaN where a genre has no positive or no negative)."""
    return _auc_per_genre(*_as_arrays(labels, scores))


def macro_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Mean ROC-AUC over the genres where it is defined (NaN if none is)."""
    return _nanmean(_auc_per_genre(*_as_arrays(labels, scores)))


def micro_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC-AUC of all (poster, genre) pairs pooled: rewards ranking frequent genres higher."""
    y, s = _as_arrays(labels, scores)
    return float(_auc_per_genre(y.reshape(-1, 1), s.reshape(-1, 1))[0])


def mean_average_precision(labels: np.ndarray, scores: np.ndarray) -> float:
    """Macro average precision over the genres with positives (AP is undefined without them)."""
    return _nanmean(_ap_per_genre(*_as_arrays(labels, scores)))


def main_genre_auc(genres: Sequence[str]) -> MetricFn:
    """Macro ROC-AUC over the :data:`MAIN_GENRES` a vocabulary has (``genres`` names the score columns)."""
    columns = [genres.index(g) for g in MAIN_GENRES if g in genres]

    def roc_auc_main6(labels: np.ndarray, scores: np.ndarray) -> float:
        if not columns:
            return float("nan")
        # per-genre AUCs averaged: one main genre in a vocabulary is a valid (if narrow) average
        y = (np.asarray(labels)[:, columns] > 0.5).astype(np.int8)
        return _nanmean(_auc_per_genre(y, np.asarray(scores)[:, columns]))

    return roc_auc_main6


def headline_metrics(genres: Sequence[str], thresholds: np.ndarray | float) -> dict[str, MetricFn]:
    """The headline metrics of one scorer, in report order: what every table, interval and paired
    difference is computed for (tuned F1 at the scorer's own thresholds)."""
    return {"roc_auc_macro": macro_auc, "roc_auc_main6": main_genre_auc(genres), "roc_auc_micro": micro_auc,
            "map_macro": mean_average_precision, "hit@3": hit_at_3, "top_n_ratio": top_n_ratio,
            "f1_micro@tuned": make_f1_metric(thresholds), "f1_micro@0.5": make_f1_metric(0.5),
            "ece": lambda y, s: expected_calibration_error(y, s)[0]}


HEADLINE = tuple(headline_metrics(MAIN_GENRES, 0.5))  # the names alone


# --- uncertainty --------------------------------------------------------------------------------


def _resamples(n: int, n_boot: int, seed: int) -> Iterator[np.ndarray]:
    """Row indices of each bootstrap resample, drawn one at a time so memory stays O(n)."""
    rng = np.random.default_rng(seed)
    for _ in range(n_boot):
        yield rng.integers(0, n, size=n)


def _interval(values: np.ndarray, alpha: float) -> tuple[float, float]:
    if values.size == 0:
        return float("nan"), float("nan")
    low, high = np.percentile(values, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(low), float(high)


def bootstrap_distribution(
    labels: np.ndarray, scores: np.ndarray, metric_fn: MetricFn, n_boot: int = 1000, seed: int = 0
) -> np.ndarray:
    """The metric on ``n_boot`` resamples of the posters, NaN resamples (e.g. AUC undefined) dropped.

    Its length says how many resamples an interval rests on.
    """
    y, s = _as_arrays(labels, scores)
    values = np.array([metric_fn(y[idx], s[idx]) for idx in _resamples(len(y), n_boot, seed)], dtype=float)
    return values[np.isfinite(values)]


def bootstrap_ci(
    labels: np.ndarray,
    scores: np.ndarray,
    metric_fn: MetricFn,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> tuple[float, float, float]:
    """(point, low, high): the metric on all posters and its percentile bootstrap interval over posters."""
    y, s = _as_arrays(labels, scores)
    point = float(metric_fn(y, s))
    return (point, *_interval(bootstrap_distribution(y, s, metric_fn, n_boot, seed), alpha))


def paired_bootstrap(
    labels: np.ndarray,
    scores_a: np.ndarray,
    scores_b: np.ndarray,
    metric_fn: MetricFn,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> dict[str, float | bool | int]:
    """Is model a better than model b on this split? Both are scored on the same resampled posters.

    Pairing cancels the poster-sampling noise the two models share, so the interval of the
    difference is far narrower than two separate intervals suggest. Returns ``diff`` (a − b),
    ``low``/``high`` (its percentile interval), ``p_value`` (two-sided: twice the share of resampled
    differences on the other side of 0, at most 1), ``significant`` (the interval excludes 0),
    ``metric_a``, ``metric_b`` and ``n_used`` (resamples where both metrics were defined).
    """
    y, a = _as_arrays(labels, scores_a)
    _, b = _as_arrays(labels, scores_b)
    metric_a, metric_b = float(metric_fn(y, a)), float(metric_fn(y, b))
    diff = metric_a - metric_b
    diffs = np.array([metric_fn(y[i], a[i]) - metric_fn(y[i], b[i]) for i in _resamples(len(y), n_boot, seed)])
    diffs = diffs[np.isfinite(diffs)]
    low, high = _interval(diffs, alpha)
    if diffs.size == 0 or not np.isfinite(diff):
        p_value = float("nan")
    elif diff == 0:
        p_value = 1.0
    else:
        other_side = (diffs <= 0) if diff > 0 else (diffs >= 0)
        p_value = min(1.0, 2 * float(other_side.mean()))
    return {
        "diff": diff,
        "low": low,
        "high": high,
        "p_value": p_value,
        "significant": bool(low > 0 or high < 0),
        "metric_a": metric_a,
        "metric_b": metric_b,
        "n_used": int(diffs.size),
    }


# --- decision thresholds ----------------------------------------------------------------------


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


def paired_auc_per_genre(labels: np.ndarray, scores_a: np.ndarray, scores_b: np.ndarray, n_boot: int = 1000,
                         seed: int = 0, alpha: float = 0.05) -> dict[str, np.ndarray]:
    """Per genre: ROC-AUC of a − b on these posters and its paired-bootstrap interval (NaN where undefined).

    Where a side input helps and where it hurts is a per-genre question; all genres are resampled
    together (one draw of posters per resample), so the intervals are those of the same test.
    """
    y, a = _as_arrays(labels, scores_a)
    _, b = _as_arrays(labels, scores_b)
    diff = _auc_per_genre(y, a) - _auc_per_genre(y, b)
    draws = np.array([_auc_per_genre(y[i], a[i]) - _auc_per_genre(y[i], b[i])
                      for i in _resamples(len(y), n_boot, seed)])
    with np.errstate(all="ignore"):
        low, high = (np.nanpercentile(draws, q, axis=0) if len(draws) else np.full(diff.shape, np.nan)
                     for q in (100 * alpha / 2, 100 * (1 - alpha / 2)))
    return {"diff": diff, "low": low, "high": high}
