"""Ray Train on the synthetic sample: distributed training, resume, variants, the bundle.

A module fixture builds sample → catalogue → object features once (real YOLO TFLite
detections); each test then trains a small network for a few epochs on CPU.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from posterfusion.jobs.train import TrainConfig, run_train
from tests.conftest import detector, sample_catalogue

DETECTOR = detector()


@pytest.fixture(scope="module")
def prepared(ray_session, tmp_path_factory):
    return sample_catalogue(tmp_path_factory.mktemp("train"), n=160, unlabelled=8, features=True)


def small(prepared, name: str, **overrides) -> TrainConfig:
    settings = dict(catalogue=prepared / "catalogue", features=prepared / "features", detector=DETECTOR,
                    out=prepared / name / "bundle", storage_path=prepared / name / "ray_results",
                    backbone="keras_cnn", image_size=48, epochs=3, batch_size=16, lr=3e-3, patience=10)
    return TrainConfig(**(settings | overrides))


def test_two_workers_train_and_beat_the_label_prior(prepared):
    summary = run_train(small(prepared, "two", workers=2, epochs=6, variant="fused"))
    history = summary["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3, 4, 5, 6]
    assert summary["workers"] == 2
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert summary["best"]["val_macro_auc"] > summary["label_prior"]["val_macro_auc"] + 0.1
    assert summary["label_prior"]["val_macro_auc"] == pytest.approx(0.5)


def test_a_worker_failure_resumes_from_the_last_checkpoint(prepared, capfd):
    summary = run_train(small(prepared, "resume", workers=2, epochs=4, fail_after_epoch=2, max_failures=1))
    epochs = [h["epoch"] for h in summary["history"]]
    assert epochs == [1, 2, 3, 4]  # continued, not restarted: each epoch exactly once
    marker = next((prepared / "resume" / "ray_results").glob("*/injected_failure"))
    assert marker.read_text().startswith("failed after epoch 2")
    assert "resumed from the epoch-2 checkpoint" in capfd.readouterr().out


@pytest.mark.parametrize("variant", ["cnn", "cnn+objects", "cnn+metadata", "fused"])
def test_every_variant_trains(prepared, variant):
    summary = run_train(small(prepared, f"v-{variant.replace('+', '_')}", variant=variant, epochs=2))
    config = json.loads((prepared / f"v-{variant.replace('+', '_')}" / "bundle" / "config.json").read_text())
    assert config["model"]["variant"] == variant
    assert np.isfinite(summary["best"]["val_macro_auc"])
    assert (config["detector_id"] is not None) == (variant in ("cnn+objects", "fused"))


def test_bundle_round_trip_gives_the_same_outputs(prepared):
    from posterfusion.models.predictor import Predictor

    run_train(small(prepared, "bundle", epochs=2, fusion="gated"))
    bundle = prepared / "bundle" / "bundle"
    posters = [p.read_bytes() for p in sorted((prepared / "sample" / "Images").glob("*.jpg"))[:5]]
    metadata = [{"runtime": 95, "budget": 1e7, "language": "English"}, None, None, {"year": 1999}, None]
    first = Predictor(bundle).predict(posters, metadata)
    again = Predictor(bundle).predict(posters, metadata)
    assert [p.probabilities for p in first] == [p.probabilities for p in again]
    assert all(len(p.top3) == 3 and set(p.probabilities) == set(Predictor(bundle).genres) for p in first)
    assert not (bundle / "model.pt").exists() and (bundle / "model.safetensors").is_file()


def test_training_a_variant_with_objects_requires_features(prepared):
    with pytest.raises(ValueError, match="needs --features"):
        run_train(small(prepared, "nofeat", features=None, variant="fused"))
