"""Per-slice evaluation: the slices of a test set that decide a fusion question, each judged on its own.

A fused model can win overall and still lose where its side inputs are missing — the normal case
on a catalogue from another source. So ``evaluate`` and ``compare`` report every headline metric
again on each slice: posters with and without joined metadata, with and without any detected
object (when a features directory says which), and per source when the catalogue holds several —
each with bootstrap intervals, the same paired differences as the whole split, and ECE.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from posterfusion.features.objects import detector_id, object_store, recorded_detector
from posterfusion.models.calibration import expected_calibration_error
from posterfusion.models.metrics import bootstrap_ci, headline_metrics, paired_bootstrap

MIN_SUBSET = 20  # posters a slice needs before its metrics are reported
SLICE_BOOT = 200  # resamples per slice metric: a slice's intervals are wide anyway


def slice_masks(frame: pd.DataFrame, has_objects: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The slices of ``frame`` (rows of a split): metadata, objects (when known), source (when several)."""
    metadata = frame["has_metadata"].to_numpy(dtype=bool)
    masks = {"with metadata": metadata, "without metadata": ~metadata}
    if has_objects is not None:
        masks |= {"with objects": has_objects, "without objects": ~has_objects}
    sources = sorted(frame["source"].unique()) if "source" in frame else []
    if len(sources) > 1:
        masks |= {f"source {s}": (frame["source"] == s).to_numpy() for s in sources}
    return masks


def detected_objects(features, frame: pd.DataFrame) -> np.ndarray | None:
    """Per row of ``frame``: whether the features directory's detector found any object (None: no directory).

    A row the directory has no good detection for counts as without objects: the model saw none.
    """
    if features is None:
        return None
    store = object_store(features, detector_id(recorded_detector(features)))
    stored = store.latest(["movie_id", "poster_sha256", "detections"])
    counts = stored["detections"].map(len)
    keys = pd.MultiIndex.from_frame(frame[["movie_id", "poster_sha256"]])
    return counts.reindex(keys).fillna(0).to_numpy() > 0


def slice_report(scorers: dict, labels: np.ndarray, genres: list[str], pairs: list[tuple[str, str]],
                 masks: dict[str, np.ndarray], seed: int) -> dict:
    """Per slice: its size, and (with enough posters) every scorer's intervals and ECE and every pair's
    paired difference."""
    out = {}
    for name, mask in masks.items():
        out[name] = {"posters": int(mask.sum()), "intervals": None, "paired": None, "ece": None}
        if mask.sum() >= MIN_SUBSET:  # fewer: counted, but no metrics worth printing
            out[name] |= _judged(scorers, labels[mask], genres, pairs, mask, seed)
    return out


def _judged(scorers: dict, labels: np.ndarray, genres: list[str], pairs, mask: np.ndarray, seed: int) -> dict:
    scores = {name: scorer.scores[mask] for name, scorer in scorers.items()}
    intervals = {name: {m: list(bootstrap_ci(labels, scores[name], fn, n_boot=SLICE_BOOT, seed=seed))
                        for m, fn in headline_metrics(genres, scorer.thresholds).items()}
                 for name, scorer in scorers.items()}
    paired = {}
    for a, b in pairs:
        fns = headline_metrics(genres, scorers[a].thresholds)
        fns.pop("f1_micro@tuned")  # two scorers' own thresholds: not one metric applied to both
        paired[f"{a} - {b}"] = {m: paired_bootstrap(labels, scores[a], scores[b], fn, n_boot=SLICE_BOOT, seed=seed)
                                for m, fn in fns.items()}
    ece = {name: expected_calibration_error(labels, s)[0] for name, s in scores.items()}
    return {"intervals": intervals, "paired": paired, "ece": ece}


def slice_tables(report: dict, summary_table) -> list[str]:
    """Markdown lines: per slice, the headline table and the paired differences on macro and 6-main ROC-AUC."""
    parts = []
    for name, block in report.get("slices", {}).items():
        title = f"{name}: {block['posters']} posters"
        if block["intervals"] is None:
            parts += ["", f"{title} (under {MIN_SUBSET}: no metrics)"]
            continue
        parts += ["", summary_table(report, block["intervals"], title), "",
                  "ECE: " + ", ".join(f"{k} {v:.4f}" for k, v in block["ece"].items())]
        for pair, by_metric in block["paired"].items():
            cells = [f"{m} {r['diff']:+.4f} [{r['low']:+.4f}, {r['high']:+.4f}]"
                     for m, r in by_metric.items() if m in ("roc_auc_macro", "roc_auc_main6")]
            parts.append(f"- {pair}: " + "; ".join(cells))
    return parts
