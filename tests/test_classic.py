"""The classic baseline: a fixed, finite poster descriptor and a linear model that learns from it.

The evaluation report puts this baseline beside every deep-model number, so it must be
honest both ways: it learns a learnable task, and it scores ≈ chance on shuffled labels.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score

from posterfusion.features.classic import (
    ClassicBaseline,
    ClassicConfig,
    featurize_posters,
    poster_statistics,
    statistic_names,
)

from support import jpeg_bytes, noisy_jpeg_bytes

NAMES = statistic_names()


def _entry(values: np.ndarray, name: str) -> float:
    return float(values[NAMES.index(name)])


def _posters() -> dict[str, Image.Image]:
    rng = np.random.default_rng(0)
    return {
        "black": Image.new("RGB", (60, 90), (0, 0, 0)),
        "white": Image.new("RGB", (60, 90), (255, 255, 255)),
        "grayscale": Image.fromarray(rng.integers(0, 256, (90, 60), dtype=np.uint8), mode="L"),
        "random": Image.fromarray(rng.integers(0, 256, (90, 60, 3), dtype=np.uint8)),
    }


def test_statistic_names_are_unique_and_in_the_documented_layout():
    assert len(NAMES) == len(set(NAMES)) == 135
    assert NAMES[:3] == ["rgb_mean_r", "rgb_mean_g", "rgb_mean_b"] and NAMES[-1] == "aspect_ratio"
    assert sum(n.startswith("hsv_hist_") for n in NAMES) == 72
    assert sum(n.startswith("lbp_") for n in NAMES) == 10 and sum(n.startswith("grid_") for n in NAMES) == 18


@pytest.mark.parametrize("kind", ["black", "white", "grayscale", "random"])
def test_descriptor_has_the_documented_length_and_is_finite(kind):
    values = poster_statistics(_posters()[kind])
    assert values.dtype == np.float32 and values.shape == (len(NAMES),)
    assert np.isfinite(values).all()
    for block in ("hsv_hist_", "grad_hist_", "lbp_"):
        assert sum(v for n, v in zip(NAMES, values, strict=True) if n.startswith(block)) == pytest.approx(1.0)


def test_descriptor_reads_the_expected_extremes():
    posters = _posters()
    black, white = poster_statistics(posters["black"]), poster_statistics(posters["white"])
    gray, noisy = poster_statistics(posters["grayscale"]), poster_statistics(posters["random"])
    assert _entry(black, "share_dark") == 1 and _entry(white, "share_bright") == 1
    assert _entry(black, "edge_density") == 0 and _entry(noisy, "edge_density") > 0.05
    assert _entry(gray, "colourfulness") == pytest.approx(0, abs=1e-6)
    assert _entry(noisy, "colourfulness") > 0.1
    assert _entry(black, "lbp_riu2_8") == 1  # a flat poster: every neighbour ties with the centre


def test_red_and_blue_posters_differ_in_the_colour_entries():
    red = poster_statistics(Image.new("RGB", (60, 90), (220, 20, 20)))
    blue = poster_statistics(Image.new("RGB", (60, 90), (20, 20, 220)))
    assert _entry(red, "rgb_mean_r") > 0.8 > 0.1 > _entry(red, "rgb_mean_b")
    assert _entry(blue, "rgb_mean_b") > 0.8 > 0.1 > _entry(blue, "rgb_mean_r")
    assert _entry(red, "hsv_hist_h0_s2_v2") == 1 and _entry(blue, "hsv_hist_h5_s2_v2") == 1  # hue 0° vs 240°
    assert _entry(red, "share_saturated") == _entry(blue, "share_saturated") == 1
    texture = [i for i, n in enumerate(NAMES) if n.startswith(("grad_", "edge_", "lbp_"))]
    np.testing.assert_allclose(red[texture], blue[texture])  # colour alone must not move texture


def test_aspect_ratio_is_that_of_the_original_poster():
    values = poster_statistics(Image.new("RGB", (200, 300), (90, 90, 90)))
    assert _entry(values, "aspect_ratio") == pytest.approx(2 / 3)


def test_a_bad_poster_gives_a_zero_row_and_its_reason():
    good = jpeg_bytes()
    truncated = noisy_jpeg_bytes(1)[:400]
    features, errors = featurize_posters([good, b"not an image", b"", truncated, None])
    assert features.shape == (5, len(NAMES)) and np.isfinite(features).all()
    assert errors[0] is None and features[0].any()
    assert errors[1] == "not_an_image" and errors[2] == errors[4] == "empty_file"
    assert errors[3].startswith("truncated_image")
    assert not features[1:].any()


def _macro_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Macro ROC-AUC over genres that have both classes in the held-out set."""
    usable = [g for g in range(labels.shape[1]) if 0 < labels[:, g].sum() < len(labels)]
    return float(np.mean([roc_auc_score(labels[:, g], scores[:, g]) for g in usable]))


@pytest.fixture(scope="module")
def sample_task(tmp_path_factory):
    """Features and multi-hot genres of 200 synthetic sample posters (tinted per genre)."""
    from posterfusion.features.sources import read_multilabel
    from posterfusion.jobs.sample import SampleConfig, write_sample

    root = tmp_path_factory.mktemp("sample")
    write_sample(SampleConfig(out=root, n=200, unlabelled=0))
    rows = [row for row in read_multilabel(root) if row.labelled]
    genres = sorted({g for row in rows for g in row.genres})
    labels = np.array([[g in row.genres for g in genres] for row in rows], dtype=np.float32)
    features, errors = featurize_posters([Path(row.poster_path).read_bytes() for row in rows])
    assert errors == [None] * len(rows)
    return features, labels


def test_baseline_learns_the_sample_and_not_shuffled_labels(sample_task):
    features, labels = sample_task
    train, test = slice(0, 140), slice(140, None)
    model = ClassicBaseline(ClassicConfig(C=0.1)).fit(features[train], labels[train])
    scores = model.predict_proba(features[test])
    assert scores.shape == labels[test].shape and ((scores >= 0) & (scores <= 1)).all()
    assert _macro_auc(labels[test], scores) > 0.75

    shuffled = labels[np.random.default_rng(0).permutation(len(labels))]
    chance = ClassicBaseline(ClassicConfig(C=0.1)).fit(features[train], shuffled[train])
    assert _macro_auc(shuffled[test], chance.predict_proba(features[test])) < 0.65


def test_a_refit_gives_identical_scores_and_the_regularisation_is_used(sample_task):
    """lbfgs has no randomness: the baseline is a function of its data and C (which tuning relies on)."""
    features, labels = sample_task
    first = ClassicBaseline(ClassicConfig(C=0.1)).fit(features, labels).predict_proba(features)
    second = ClassicBaseline(ClassicConfig(C=0.1)).fit(features, labels).predict_proba(features)
    np.testing.assert_array_equal(first, second)
    looser = ClassicBaseline(ClassicConfig(C=10.0)).fit(features, labels).predict_proba(features)
    assert np.abs(looser - first).max() > 1e-3


def test_a_genre_with_one_class_in_training_gets_a_constant_score():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(40, len(NAMES))).astype(np.float32)
    labels = np.stack([features[:, 0] > 0, np.zeros(40), np.ones(40)], axis=1).astype(np.float32)
    scores = ClassicBaseline().fit(features, labels).predict_proba(rng.normal(size=(7, len(NAMES))))
    assert scores.shape == (7, 3)
    assert (scores[:, 1] == 0).all() and (scores[:, 2] == 1).all()
    assert scores[:, 0].std() > 0


def test_predict_before_fit_is_an_error():
    with pytest.raises(RuntimeError, match="fit"):
        ClassicBaseline().predict_proba(np.zeros((1, len(NAMES))))
