"""``evaluate`` and ``compare`` end to end on the synthetic sample, and on another source (metric
arithmetic itself is specified in test_evaluation.py, calibration in test_calibration.py)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from posterfusion.jobs import slices as slicing
from posterfusion.jobs.compare import CompareConfig, run_compare
from posterfusion.jobs.evaluate import EvaluateConfig, run_evaluate
from posterfusion.models.metrics import HEADLINE

from support import QUICK

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(quick_bundles):
    """The session's sample with its catalogue, features and quick cnn and fused bundles, where ``compare``
    looks for them."""
    return quick_bundles


def bundle(trained, variant):
    return trained / "models" / "quick" / f"{variant}-s0"


@pytest.fixture(scope="module")
def fused_evaluation(trained):
    """The fused bundle on the test split, with the cached object features, beside both baselines: its report."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(slicing, "MIN_SUBSET", 4)  # a dozen test posters: judge slices of 4 (20: test_slices)
        return run_evaluate(EvaluateConfig(model=bundle(trained, "fused"), catalogue=trained / "catalogue",
                                           out=trained / "eval", features=trained / "features", n_boot=200))


def test_evaluate_reports_the_model_beside_both_baselines(trained, fused_evaluation):
    out, report = trained / "eval", fused_evaluation
    assert set(report["metrics"]) == {"model", "label_prior", "classic"} and report["same_source"]
    for name, intervals in report["intervals"].items():
        assert tuple(intervals) == HEADLINE
        for metric, (point, low, high) in intervals.items():
            # ECE is biased upward under resampling (binning noise only adds to each bin's |gap|), so its
            # percentile interval may sit above the point estimate; every other metric's must contain it
            assert low <= high and (metric == "ece" or low <= point <= high), (name, metric, point, low, high)
    assert report["intervals"]["label_prior"]["roc_auc_macro"][0] == pytest.approx(0.5)
    model, prior = report["intervals"]["model"], report["intervals"]["label_prior"]
    assert model["roc_auc_macro"][0] > 0.7  # the sample's cues are learnable
    assert model["top_n_ratio"][0] > prior["top_n_ratio"][0]
    assert 0 <= report["calibration"]["model"]["ece"] < 0.25 and len(report["calibration"]["model"]["per_genre"])
    slices = report["slices"]
    for kind in ("metadata", "objects"):  # each pair of slices covers the split once
        assert slices[f"with {kind}"]["posters"] + slices[f"without {kind}"]["posters"] == report["posters"]
    assert all((s["intervals"] is None) == (s["posters"] < 4) for s in slices.values())
    judged = [s for s in slices.values() if s["intervals"] is not None]  # what a judged slice holds: test_slices
    assert judged
    assert all(set(s["paired"]) == {"model - label_prior", "model - classic"} for s in judged)
    written = json.loads((out / "metrics.json").read_text())
    assert written["posters"] == report["posters"] == len(pd.read_parquet(out / "predictions.parquet"))
    text = (out / "report.md").read_text()
    assert "hit@3" in text and "f1_micro@tuned" in text and "without metadata" in text and "ece" in text
    assert (out / "reliability.png").stat().st_size > 0
    assert {"tuned", "at_0.5", "ranking", "per_genre"} <= set(report["metrics"]["model"])


def test_the_model_is_judged_with_its_own_calibration_and_thresholds(trained):
    from posterfusion.jobs.evaluate import load_split_frame
    from posterfusion.models.bundle import load_bundle
    from posterfusion.models.predictor import Predictor

    path = bundle(trained, "cnn")
    report = run_evaluate(EvaluateConfig(model=path, catalogue=trained / "catalogue", out=trained / "e0",
                                         baselines=False, n_boot=0))
    predictor = Predictor(path)
    thresholds = load_bundle(path).thresholds.tolist()
    assert report["thresholds"]["model"] == pytest.approx(dict(zip(predictor.genres, thresholds, strict=True)))
    from posterfusion.features.metadata import FIELDS

    frame = load_split_frame(trained / "catalogue", "test")
    stored = pd.read_parquet(trained / "e0" / "predictions.parquet").set_index("movie_id")
    for _, row in frame.head(3).iterrows():  # the Predictor a user calls gives the probabilities evaluated
        record = {field: row[field] for field in FIELDS}
        expected = predictor.predict([_poster(trained, row["movie_id"])], [record])[0].probabilities
        got = {g: stored.loc[row["movie_id"], f"model:{g}"] for g in predictor.genres}
        assert got == pytest.approx(expected, abs=1e-4)


def _poster(trained, movie_id):

    from posterfusion.features.catalogue import catalogue_files

    table = catalogue_files(trained / "catalogue").dataset().to_table(
        columns=["movie_id", "poster"]).to_pandas().set_index("movie_id")
    return table.loc[movie_id, "poster"]


def test_cached_object_features_and_fresh_detection_score_alike(trained, fused_evaluation, monkeypatch):
    """The cached run scored its dozen posters in the driver; this one detects afresh in Ray Data actors,
    as a split over one actor's share is scored: both give the same probabilities."""
    from posterfusion.jobs import evaluate
    from posterfusion.models import inference

    monkeypatch.setattr(evaluate, "ROWS_PER_MODEL_ACTOR", 0)
    through_actors = []
    monkeypatch.setattr(inference, "predict_dataset", lambda *a, _real=inference.predict_dataset, **k: (
        through_actors.append(k["rows"]) or _real(*a, **k)))
    fresh = run_evaluate(EvaluateConfig(model=bundle(trained, "fused"), catalogue=trained / "catalogue",
                                        out=trained / "e2", baselines=False, n_boot=0))  # no features: detected
    cached, detected = (pd.read_parquet(trained / run / "predictions.parquet") for run in ("eval", "e2"))
    model = [c for c in cached.columns if c.startswith("model:")]
    assert model and list(cached["movie_id"]) == list(detected["movie_id"])
    np.testing.assert_allclose(cached[model].to_numpy(), detected[model].to_numpy(), atol=1e-4)
    assert fused_evaluation["posters"] == fresh["posters"] == through_actors[0] and len(through_actors) == 1


def test_another_labelled_source_is_evaluated_on_the_genres_both_sides_know(trained, shared_data, tmp_path):
    """The MovieGenre slice: never seen in training, 15 genre columns of its own."""
    from posterfusion.features.vocab import GenreVocabulary
    from posterfusion.jobs.ingest import IngestConfig, run_ingest

    run_ingest(IngestConfig(sources=[f"moviegenre:{shared_data / 'moviegenre-posters'}"], out=tmp_path / "other"))
    path = bundle(trained, "cnn")
    report = run_evaluate(EvaluateConfig(model=path, catalogue=tmp_path / "other", out=tmp_path / "report",
                                         split="all", n_boot=100))
    vocabulary = GenreVocabulary.load(path / "genres.json").genres
    space = report["label_space"]
    assert not report["same_source"] and report["posters"] == 300
    assert report["training_catalogue"] == str((trained / "catalogue").resolve())
    # MovieGenre.csv has no Documentary column: the genre Documentary trains into (its own, or
    # Other in this small sample) is not evaluated, or its posters would be false positives
    documentary = GenreVocabulary.load(path / "genres.json").mapping["Documentary"]
    assert documentary in space["vocabulary_only"] and documentary not in space["genres"]
    assert set(space["genres"]) | set(space["vocabulary_only"]) == set(vocabulary)
    assert "Thriller" in space["source_only"] and all(g not in vocabulary for g in space["source_only"])
    assert report["genres"] == space["genres"]
    prior = report["intervals"]["label_prior"]
    assert prior["roc_auc_macro"][0] == pytest.approx(0.5)
    assert "never labelled by this source" in (tmp_path / "report" / "report.md").read_text()


def test_compare_writes_the_report_and_says_whether_fused_beats_cnn(trained):
    out = trained / "compare"
    result = run_compare(CompareConfig(catalogue=trained / "catalogue", out=out, models=trained / "models",
                                       recipes=["quick"], variants=["cnn", "fused"], features=trained / "features",
                                       n_boot=200, train=QUICK, from_scratch=True))
    group = result["groups"][0]
    assert {"cnn", "fused", "label_prior", "classic"} == set(group["intervals"])
    paired = group["paired"]["fused - cnn"]["roc_auc_macro"]
    assert paired["low"] <= paired["diff"] <= paired["high"]
    assert paired["significant"] == (paired["low"] > 0 or paired["high"] < 0)
    text = (out / "report.md").read_text()
    expected = "NOT significant" if not paired["significant"] else "— significant"
    assert f"fused - cnn, roc_auc_macro: {paired['diff']:+.4f}" in text and expected in text
    for name in ("report.html", "metrics.json", "per_genre_auc.png", "pr_curves.png", "reliability.png",
                 "contact_sheet.png"):
        assert (out / name).stat().st_size > 0, name
