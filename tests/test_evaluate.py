"""``evaluate`` and ``compare`` end to end on the synthetic sample (metric arithmetic itself is
specified in test_evaluation.py)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from posterfusion.jobs.compare import CompareConfig, bundle_dir, run_compare
from posterfusion.jobs.evaluate import EvaluateConfig, run_evaluate
from posterfusion.jobs.train import TrainConfig, run_train
from tests.conftest import detector, sample_catalogue

pytestmark = pytest.mark.slow
DETECTOR = detector()


@pytest.fixture(scope="module")
def trained(ray_session, tmp_path_factory):
    """sample → catalogue → features → cnn and fused bundles (models/model-<variant>)."""
    root = sample_catalogue(tmp_path_factory.mktemp("evaluate"), n=200, seed=1, features=True)
    for variant in ("cnn", "fused"):
        run_train(TrainConfig(catalogue=root / "catalogue", features=root / "features", detector=DETECTOR,
                              out=bundle_dir(root / "models", variant), storage_path=root / "ray_results",
                              variant=variant, backbone="keras_cnn", image_size=48, epochs=4, batch_size=16, lr=3e-3))
    return root


def test_evaluate_reports_the_model_beside_both_baselines(trained):
    out = trained / "eval"
    report = run_evaluate(EvaluateConfig(model=bundle_dir(trained / "models", "fused"), catalogue=trained / "catalogue",
                                         out=out, features=trained / "features", n_boot=200))
    assert set(report["metrics"]) == {"model", "label_prior", "classic"}
    for name, intervals in report["intervals"].items():
        for metric, (point, low, high) in intervals.items():
            assert low <= point <= high, (name, metric)
    assert report["intervals"]["label_prior"]["roc_auc_macro"][0] == pytest.approx(0.5)
    assert report["intervals"]["model"]["roc_auc_macro"][0] > 0.7  # the sample's cues are learnable
    written = json.loads((out / "metrics.json").read_text())
    assert written["posters"] == report["posters"] == len(pd.read_parquet(out / "predictions.parquet"))
    assert "hit@3" in (out / "report.md").read_text()
    assert {"tuned", "at_0.5", "ranking", "per_genre"} <= set(report["metrics"]["model"])


def test_cached_object_features_and_fresh_detection_score_alike(trained):
    bundle = bundle_dir(trained / "models", "fused")
    cached = run_evaluate(EvaluateConfig(model=bundle, catalogue=trained / "catalogue", out=trained / "e1",
                                         features=trained / "features", baselines=False, n_boot=0))
    fresh = run_evaluate(EvaluateConfig(model=bundle, catalogue=trained / "catalogue", out=trained / "e2",
                                        baselines=False, n_boot=0))
    a = pd.read_parquet(trained / "e1" / "predictions.parquet").drop(columns="movie_id").to_numpy()
    b = pd.read_parquet(trained / "e2" / "predictions.parquet").drop(columns="movie_id").to_numpy()
    np.testing.assert_allclose(a, b, atol=1e-4)
    assert cached["posters"] == fresh["posters"]


def test_compare_writes_the_report_and_says_whether_fused_beats_cnn(trained):
    out = trained / "compare"
    report = run_compare(CompareConfig(catalogue=trained / "catalogue", out=out, models=trained / "models",
                                       variants=["cnn", "fused"], features=trained / "features", n_boot=200))
    assert {"cnn", "fused", "label_prior", "classic"} == set(report["intervals"])
    paired = report["paired"]["fused - cnn"]["roc_auc_macro"]
    assert paired["low"] <= paired["diff"] <= paired["high"]
    text = (out / "report.md").read_text()
    assert "fused - cnn, roc_auc_macro" in text and ("NOT significant" in text or "significant" in text)
    for name in ("report.html", "metrics.json", "per_genre_auc.png", "pr_curves.png", "calibration.png",
                 "contact_sheet_fused.png"):
        assert (out / name).stat().st_size > 0, name
