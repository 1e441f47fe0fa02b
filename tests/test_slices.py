"""Per-slice evaluation: each slice that decides a fusion question is judged on its own posters."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from posterfusion.jobs.evaluate import Scorer, build_report, report_markdown
from posterfusion.jobs.slices import MIN_SUBSET, slice_masks


def _frame(n: int) -> pd.DataFrame:
    return pd.DataFrame({"has_metadata": np.arange(n) % 2 == 0,
                         "source": np.where(np.arange(n) < n - 10, "multilabel", "moviegenre")})


def test_the_slices_are_metadata_objects_and_each_source():
    frame = _frame(60)
    masks = slice_masks(frame, has_objects=np.arange(60) % 3 == 0)
    assert list(masks) == ["with metadata", "without metadata", "with objects", "without objects",
                           "source moviegenre", "source multilabel"]
    assert masks["with metadata"].sum() == 30 and masks["source moviegenre"].sum() == 10
    assert list(slice_masks(frame.assign(source="multilabel"))) == ["with metadata", "without metadata"]


def test_a_model_that_loses_only_without_metadata_is_seen_losing_there():
    """Overall the fused scorer looks fine; the slice without metadata shows it losing to cnn."""
    rng = np.random.default_rng(0)
    n, genres = 400, ["Drama", "Comedy", "Horror"]
    labels = (rng.random((n, 3)) < 0.35).astype(np.float32)
    frame = _frame(n)
    meta = frame["has_metadata"].to_numpy()
    cnn = 0.4 * labels + 0.6 * rng.random((n, 3))
    fused = np.where(meta[:, None], 0.8 * labels + 0.2 * rng.random((n, 3)), rng.random((n, 3)))
    scorers = {"fused": Scorer(scores=fused, thresholds=np.full(3, 0.5)),
               "cnn": Scorer(scores=cnn, thresholds=np.full(3, 0.5))}
    masks = slice_masks(frame)
    report = build_report(scorers, labels, genres, [("fused", "cnn")], n_boot=50, seed=0, masks=masks)
    with_meta = report["slices"]["with metadata"]["paired"]["fused - cnn"]["roc_auc_macro"]
    without = report["slices"]["without metadata"]["paired"]["fused - cnn"]["roc_auc_macro"]
    assert with_meta["low"] > 0 and without["high"] < 0  # better where it has metadata, worse where not
    few = report["slices"]["source moviegenre"]
    assert few["posters"] == 10 < MIN_SUBSET and few["intervals"] is None
    for name in ("with metadata", "without metadata"):
        assert set(report["slices"][name]["ece"]) == {"fused", "cnn"}
    text = report_markdown(report)
    assert "without metadata: 200 posters" in text and "fused - cnn: roc_auc_macro" in text
    assert without["diff"] == pytest.approx(without["metric_a"] - without["metric_b"])
    per_genre = report["paired_per_genre"]["fused - cnn"]
    assert all(low <= diff <= high for diff, low, high in zip(*per_genre.values(), strict=True))
