"""``posterfusion score``: every catalogue row scored exactly once per model version, incrementally.

A run writes only what is missing; a rerun adds nothing; a run stopped half-way or a Ray
worker killed mid-run still ends, after a rerun, with each row present once. Cached object
features are reused and the posters they lack are detected in the same actor.
"""

from __future__ import annotations

import json
from datetime import date

import numpy as np
import pandas as pd
import pyarrow.dataset as pads
import pytest

from posterfusion.features.catalogue import catalogue_files
from posterfusion.jobs.batch_predict import PREDICT_COLUMNS
from posterfusion.jobs.score import RunStopped, ScoreConfig, object_summary, read_predictions, run_score
from posterfusion.jobs.train import TrainConfig, run_train
from posterfusion.models.bundle import model_version
from posterfusion.models.predictor import Predictor
from tests.conftest import detector, sample_catalogue

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def scored_setup(ray_session, tmp_path_factory):
    """A 66-poster catalogue (60 labelled + 6 unlabelled), its object features, a small fused bundle."""
    root = sample_catalogue(tmp_path_factory.mktemp("score"), n=60, unlabelled=6, seed=3, features=True)
    run_train(TrainConfig(catalogue=root / "catalogue", features=root / "features", detector=detector(),
                          out=root / "bundle", storage_path=root / "ray_results", variant="fused",
                          backbone="keras_cnn", image_size=48, epochs=1, batch_size=16))
    return root


def _catalogue(root) -> pd.DataFrame:
    return pads.dataset(catalogue_files(root / "catalogue"), format="parquet").to_table(
        columns=PREDICT_COLUMNS).to_pandas()


def _config(root, out, **kwargs) -> ScoreConfig:
    return ScoreConfig(model=root / "bundle", catalogue=root / "catalogue", out=out, features=root / "features",
                       batch_size=8, rows_per_file=16, **kwargs)


def _assert_each_row_once(root, out) -> pd.DataFrame:
    stored = read_predictions(out)
    catalogue = _catalogue(root)
    assert not stored.duplicated(["movie_id", "poster_sha256", "model_version"]).any()
    assert sorted(stored["movie_id"]) == sorted(catalogue["movie_id"])
    return stored


def test_a_rerun_scores_nothing_and_adds_no_rows(scored_setup, tmp_path):
    out = tmp_path / "predictions"
    first = run_score(_config(scored_setup, out, run_date=date(2026, 11, 21)))
    assert first["scored"] == first["catalogue_rows"] == 66 and first["reconciles"]
    second = run_score(_config(scored_setup, out, run_date=date(2026, 11, 22)))
    assert (second["to_score"], second["scored"], second["already_scored"]) == (0, 0, 66)
    stored = _assert_each_row_once(scored_setup, out)
    assert set(stored["run_date"]) == {"2026-11-21"}  # partitioned by run date; the rerun wrote nothing
    assert len(list((out / "_runs").glob("*.json"))) == 2


def test_rows_carry_probabilities_top3_thresholded_set_and_objects(scored_setup, tmp_path):
    out = tmp_path / "predictions"
    run_score(_config(scored_setup, out))
    stored = read_predictions(out).set_index("movie_id")
    predictor = Predictor(scored_setup / "bundle")
    assert (stored["model_version"] == model_version(scored_setup / "bundle")).all()
    probability_columns = [f"p_{g}" for g in predictor.genres]
    assert stored[probability_columns].notna().all().all()
    row = stored.iloc[0]
    top3 = list(row["top3"])
    assert top3 == [predictor.genres[i] for i in np.argsort(-row[probability_columns].to_numpy(float))[:3]]
    assert np.all(np.diff(row["top3_probabilities"]) <= 0)
    # Same probabilities as the Predictor called directly on the poster (cached objects are the same detections).
    catalogue = _catalogue(scored_setup).set_index("movie_id")
    direct = predictor.probabilities(predictor.decode([catalogue.loc[row.name, "poster"]]),
                                     catalogue.loc[[row.name]].reset_index())[0][0]
    np.testing.assert_allclose(row[probability_columns].to_numpy(float), direct, atol=1e-5)
    assert set(stored["objects_source"]) == {"cache"}
    people = [o for objects in stored["objects"] for o in objects if o["name"] == "person"]
    assert all(o["count"] >= 1 and 0 < o["max_confidence"] <= 1 for o in people)


def test_posters_without_cached_features_are_detected_in_the_same_pass(scored_setup, tmp_path):
    features = tmp_path / "features"
    # Keep the cached features of only half of the posters.
    import shutil

    shutil.copytree(scored_setup / "features", features)
    files = sorted(features.rglob("*.parquet"))
    table = pd.concat([pd.read_parquet(f) for f in files])
    for f in files:
        f.unlink()
    table.iloc[: len(table) // 2].to_parquet(files[0])
    out = tmp_path / "predictions"
    summary = run_score(_config(scored_setup, out).model_copy(update={"features": features}))
    assert summary["objects_source"] == {"cache": 33, "detected": 33}
    _assert_each_row_once(scored_setup, out)


def test_a_stopped_run_finishes_on_rerun_with_every_row_once(scored_setup, tmp_path):
    out = tmp_path / "predictions"
    with pytest.raises(RunStopped):
        run_score(_config(scored_setup, out, stop_after_files=2))
    (out / "run_date=2026-01-01").mkdir(parents=True)
    (out / "run_date=2026-01-01" / ".part-dead-00000.parquet").write_bytes(b"half a file")  # a killed writer
    partial = read_predictions(out)
    assert 32 <= len(partial) < 66
    summary = run_score(_config(scored_setup, out))
    assert summary["already_scored"] == len(partial) and summary["scored"] == 66 - len(partial)
    _assert_each_row_once(scored_setup, out)
    assert not list(out.rglob(".part-*"))


def test_a_worker_killed_mid_run_still_yields_every_row_once(scored_setup, tmp_path):
    out = tmp_path / "predictions"
    summary = run_score(_config(scored_setup, out, kill_worker_after=3))
    assert len(list((out / "_chaos").glob("killed-*"))) == 1  # the injected exit really happened
    assert summary["scored"] == 66 and summary["reconciles"]
    _assert_each_row_once(scored_setup, out)


def test_a_new_model_version_rescores_and_reports_drift(scored_setup, tmp_path):
    out = tmp_path / "predictions"
    run_score(_config(scored_setup, out))
    retrained = tmp_path / "bundle2"
    run_train(TrainConfig(catalogue=scored_setup / "catalogue", features=scored_setup / "features",
                          detector=detector(), out=retrained, storage_path=tmp_path / "ray_results", variant="fused",
                          backbone="keras_cnn", image_size=48, epochs=1, batch_size=16, seed=7))
    summary = run_score(_config(scored_setup, out).model_copy(update={"model": retrained}))
    assert summary["scored"] == 66
    stored = read_predictions(out)
    assert stored.groupby("model_version").size().to_dict() == {model_version(scored_setup / "bundle"): 66,
                                                                model_version(retrained): 66}
    shift = summary["drift"]["mean_probability_shift"]
    first = json.loads(next(iter(sorted((out / "_runs").glob("*.json")))).read_text())
    for genre, value in shift.items():
        expected = (summary["genre_distribution"]["mean_probability"][genre]
                    - first["genre_distribution"]["mean_probability"][genre])
        assert value == pytest.approx(expected, abs=1e-4)


def test_object_summary_counts_each_class_once_with_its_best_confidence():
    detections = [{"name": "person", "confidence": 0.4}, {"name": "car", "confidence": 0.9},
                  {"name": "person", "confidence": 0.8}]
    assert object_summary(detections) == [{"name": "person", "count": 2, "max_confidence": 0.8},
                                          {"name": "car", "count": 1, "max_confidence": 0.9}]
