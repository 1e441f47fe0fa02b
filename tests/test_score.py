"""``posterfusion score``: every catalogue row scored exactly once per model version, incrementally.

A run writes only what is missing; a rerun adds nothing; a run stopped half-way or a Ray
worker killed mid-run still ends, after a rerun, with each row present once; two runs started
at once never both write; a poster the detector chokes on is one error row, not a failed run.
Cached object features are reused and the posters they lack are detected in the same actor.
Failure injection comes from ``tests/faults.py``, installed with monkeypatch.
"""

from __future__ import annotations

import json
import os
import threading
from datetime import date

import numpy as np
import pandas as pd
import pytest

from posterfusion.features.catalogue import catalogue_files
from posterfusion.jobs import score
from posterfusion.jobs.score import ScoreConfig, run_score
from posterfusion.models.bundle import model_version
from posterfusion.models.inference import PREDICT_COLUMNS
from posterfusion.models.predictions import read_predictions
from posterfusion.models.predictor import Predictor, object_summary

import faults

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def scored_setup(small_fused):
    """The session's 66-poster catalogue (60 labelled + 6 unlabelled), its object features, a small fused bundle."""
    faults.by_value()
    return small_fused


def _catalogue(root) -> pd.DataFrame:
    return catalogue_files(root / "catalogue").dataset().to_table(
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
    assert not (out / "_lease").exists()  # released


def test_rows_carry_calibrated_probabilities_top3_thresholded_set_and_objects(scored_setup, tmp_path):
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
    direct = predictor.score([catalogue.loc[row.name, "poster"]], catalogue.loc[[row.name]].reset_index())
    np.testing.assert_allclose(row[probability_columns].to_numpy(float), direct.probabilities[0], atol=1e-5)
    assert set(stored["objects_source"]) == {"cache"}
    people = [o for objects in stored["objects"] for o in objects if o["name"] == "person"]
    assert all(o["count"] >= 1 and 0 < o["max_confidence"] <= 1 for o in people)


def test_posters_without_cached_features_are_detected_in_the_same_pass(scored_setup, tmp_path):
    import shutil

    features = tmp_path / "features"
    shutil.copytree(scored_setup / "features", features)  # keep the cached features of only half the posters
    files = sorted(features.rglob("*.parquet"))
    table = pd.concat([pd.read_parquet(f) for f in files])
    for f in files:
        f.unlink()
    half = sorted(_catalogue(scored_setup)["movie_id"])[:33]  # the cache covers more posters than the catalogue
    table[table["movie_id"].isin(half)].to_parquet(files[0])
    out = tmp_path / "predictions"
    summary = run_score(_config(scored_setup, out).model_copy(update={"features": features}))
    assert summary["objects_source"] == {"cache": 33, "detected": 33}
    _assert_each_row_once(scored_setup, out)


def test_a_stopped_run_finishes_on_rerun_with_every_row_once(scored_setup, tmp_path, monkeypatch):
    out = tmp_path / "predictions"
    with monkeypatch.context() as patch:
        patch.setattr(score.Committer, "commit", faults.stopping_commit(files=2))
        with pytest.raises(faults.StopAfter):
            run_score(_config(scored_setup, out))
    assert not (out / "_lease").exists()  # a run that raises releases its lease
    # a killed driver would not have: leave its lease behind, held by a process that no longer exists
    (out / "_lease").write_text(json.dumps({"run_id": "killed", "pid": 2**22 + 11, "host": os.uname().nodename}))
    (out / "run_date=2026-01-01").mkdir(parents=True)
    (out / "run_date=2026-01-01" / ".part-dead-00000.parquet.1a2b3c4d").write_bytes(b"half a file")
    partial = read_predictions(out)
    assert len(partial) == 32
    summary = run_score(_config(scored_setup, out))
    assert summary["already_scored"] == 32 and summary["scored"] == 34
    assert summary["dead_staging_files_removed"] == 1
    _assert_each_row_once(scored_setup, out)
    assert not list(out.rglob(".part-*"))


def test_a_worker_killed_mid_run_still_yields_every_row_once(scored_setup, tmp_path, monkeypatch):
    out, marker = tmp_path / "predictions", tmp_path / "killed"
    monkeypatch.setattr(score, "ScoreBatch", faults.dying_score_batch(after_calls=3, marker=marker))
    summary = run_score(_config(scored_setup, out))
    assert marker.is_file()  # the injected exit really happened
    assert summary["scored"] == 66 and summary["reconciles"]
    _assert_each_row_once(scored_setup, out)


def test_a_poster_that_makes_the_detector_raise_is_one_error_row(scored_setup, tmp_path, monkeypatch):
    """Without cached features every poster meets the detector; one of them makes it raise."""
    from posterfusion.features.catalogue import decode_rgb

    catalogue = _catalogue(scored_setup)
    target = catalogue.iloc[5]
    out = tmp_path / "predictions"
    monkeypatch.setattr(score, "ScoreBatch", faults.detector_failing_on(faults.pixels_id(decode_rgb(target["poster"]))))
    summary = run_score(_config(scored_setup, out).model_copy(update={"features": None}))
    assert summary["reconciles"] and summary["scored"] == 66
    assert summary["errors"] == {"count": 1, "reasons": {"detect_failed": 1}}
    stored = _assert_each_row_once(scored_setup, out)
    failed = stored[stored["error"].notna()]
    assert list(failed["movie_id"]) == [target["movie_id"]] and "injected detector failure" in failed["error"].iloc[0]
    assert failed["top3"].isna().all() and stored[stored["error"].isna()]["top3"].notna().all()


def test_two_runs_started_at_once_write_every_row_exactly_once(scored_setup, tmp_path):
    out, results, failures = tmp_path / "predictions", [], []

    def run():
        try:
            results.append(run_score(_config(scored_setup, out, wait_s=300)))
        except Exception as exc:  # surfaced below, with the test's own assertion
            failures.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures
    assert sorted(r["scored"] for r in results) == [0, 66]  # the second waited for the lease, then had no work
    assert all(r["reconciles"] for r in results)
    _assert_each_row_once(scored_setup, out)


def test_a_held_lease_stops_a_second_run_and_a_dead_runs_lease_is_taken_over(tmp_path):
    import time

    from posterfusion.features.lease import Lease, LeaseHeld

    second = Lease(tmp_path, "second", wait_s=0.5)
    with Lease(tmp_path, "first", heartbeat_s=0.2), pytest.raises(LeaseHeld, match="being written by run first"):
        second.__enter__()
    (tmp_path / "_lease").write_text(json.dumps({"run_id": "dead", "pid": 2**22 + 7, "host": os.uname().nodename}))
    with Lease(tmp_path, "third") as lease:  # its pid does not exist: a dead run's lease
        assert json.loads(lease.path.read_text())["run_id"] == "third"
    (tmp_path / "_lease").write_text(json.dumps({"run_id": "elsewhere", "pid": 1, "host": "another-host"}))
    old = time.time() - 120
    os.utime(tmp_path / "_lease", (old, old))
    with Lease(tmp_path, "fourth", stale_s=30) as lease:  # no heartbeat for two minutes: stale
        assert json.loads(lease.path.read_text())["run_id"] == "fourth"


def test_a_run_whose_lease_was_taken_over_is_fenced_and_a_late_taker_restores_the_fresh_lease(tmp_path):
    import time

    from posterfusion.features.lease import Lease, LeaseLost

    slow = Lease(tmp_path, "slow", heartbeat_s=0.05, stale_s=0.3).__enter__()
    slow._stop.set()  # its process stalls: no heartbeat
    stale = slow._holder()
    time.sleep(0.4)
    with Lease(tmp_path, "new", stale_s=0.3, heartbeat_s=0.05) as new:
        # a second taker that saw the same stale holder moves the fresh lease aside, then puts it back
        Lease(tmp_path, "late")._take_over(stale)
        assert json.loads(new.path.read_text())["run_id"] == "new"
        time.sleep(0.15)
        new.check()  # still the holder: its heartbeat kept running
        with pytest.raises(LeaseLost, match="run slow lost its lease"):
            slow.check()  # the stalled run may not commit beside the new holder
        assert not list(tmp_path.glob("_lease.stale-*"))
    assert not (tmp_path / "_lease").exists()


def test_drift_compares_runs_of_one_model_version_and_says_whether_it_exceeds_noise(scored_setup, tmp_path):
    out = tmp_path / "predictions"
    first = run_score(_config(scored_setup, out))
    assert first["drift"] is None  # nothing earlier of this model version
    retrained = other_model_version(scored_setup / "bundle", tmp_path / "bundle2")
    other = run_score(_config(scored_setup, out).model_copy(update={"model": retrained}))
    assert other["scored"] == 66 and other["drift"] is None  # a new model version is not drift
    # The first version again over the same posters: identical means, zero shift against the first run.
    first_version = model_version(scored_setup / "bundle")
    for path in list(out.glob("run_date=*/*.parquet")):
        if set(pd.read_parquet(path, columns=["model_version"])["model_version"]) == {first_version}:
            path.unlink()  # forget the first run's rows (not its summary): the next run rescores them
    second = run_score(_config(scored_setup, out))
    drift = second["drift"]
    assert drift["n"] == drift["previous_n"] == 66
    for genre, values in drift["genres"].items():
        assert values["shift"] == pytest.approx(0.0, abs=1e-5) and values["se"] > 0, genre
    assert drift["beyond_noise"] == []
    mean = second["genre_distribution"]["mean_probability"]
    sd = second["genre_distribution"]["sd_probability"]
    genre = next(iter(mean))
    assert drift["genres"][genre]["se"] == pytest.approx(np.sqrt(2 * sd[genre] ** 2 / 66), rel=1e-3)


def other_model_version(bundle, out):
    """A copy of ``bundle`` with one weight changed: another model version, with no training run."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(bundle, out)
    weights = load_file(str(out / "model.safetensors"))
    name = next(k for k, v in weights.items() if v.is_floating_point())
    weights[name] = weights[name] + 0.01
    save_file(weights, str(out / "model.safetensors"))
    assert model_version(out) != model_version(bundle)
    return out


def test_object_summary_counts_each_class_once_with_its_best_confidence():
    detections = [{"name": "person", "confidence": 0.4}, {"name": "car", "confidence": 0.9},
                  {"name": "person", "confidence": 0.8}]
    assert object_summary(detections) == [{"name": "person", "count": 2, "max_confidence": 0.8},
                                          {"name": "car", "count": 1, "max_confidence": 0.9}]
