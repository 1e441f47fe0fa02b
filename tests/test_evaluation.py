"""The evaluation suite: every expected number below is worked out by hand in the comments."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, f1_score, roc_auc_score

from posterfusion.models.metrics import (
    HEADLINE,
    bootstrap_ci,
    bootstrap_distribution,
    classification_metrics,
    evaluate_all,
    headline_metrics,
    hit_at_k,
    label_prior_scores,
    macro_auc,
    make_f1_metric,
    paired_auc_per_genre,
    paired_bootstrap,
    per_genre_table,
    ranking_metrics,
    top_n_ratio,
)

approx = pytest.approx

# 4 posters × 3 genres; at THRESHOLDS the predictions are
#   p0 true {0,2}  pred {0}     p1 true {1}    pred {1,2}  (0.4 ≥ 0.4: a tie predicts)
#   p2 true {0,1}  pred {0}     p3 true {1,2}  pred {1,2}
LABELS = np.array([[1, 0, 1], [0, 1, 0], [1, 1, 0], [0, 1, 1]], dtype=np.float32)
SCORES = np.array([[0.9, 0.2, 0.55], [0.1, 0.4, 0.7], [0.8, 0.3, 0.1], [0.3, 0.6, 0.65]])
THRESHOLDS = np.array([0.5, 0.4, 0.6])


def test_thresholded_metrics_by_hand():
    m = classification_metrics(LABELS, SCORES, THRESHOLDS)
    # per genre: g0 tp2 fp0 fn0 → P1 R1 F1 1; g1 tp2 fp0 fn1 → P1 R2/3 F1 .8; g2 tp1 fp1 fn1 → P.5 R.5 F1 .5
    # micro: tp5 fp1 fn2 → P 5/6, R 5/7, F1 10/13
    assert (m["precision_micro"], m["recall_micro"], m["f1_micro"]) == approx((5 / 6, 5 / 7, 10 / 13))
    # macro: P (1+1+.5)/3, R (1+2/3+1/2)/3 = 13/18, F1 (1+.8+.5)/3 = 23/30
    assert (m["precision_macro"], m["recall_macro"], m["f1_macro"]) == approx((5 / 6, 13 / 18, 23 / 30))
    # weighted by support (2, 3, 2)/7: P (2+3+1)/7, R (2+2+1)/7, F1 (2+2.4+1)/7
    assert (m["precision_weighted"], m["recall_weighted"], m["f1_weighted"]) == approx((6 / 7, 5 / 7, 5.4 / 7))
    # per poster: P (1, .5, 1, 1), R (.5, 1, .5, 1), F1 (2/3, 2/3, 2/3, 1), Jaccard (.5, .5, .5, 1)
    assert (m["precision_samples"], m["recall_samples"], m["f1_samples"]) == approx((7 / 8, 3 / 4, 3 / 4))
    assert m["jaccard_samples"] == approx(5 / 8)
    assert m["subset_accuracy"] == approx(1 / 4)  # only p3 is exactly right
    assert m["hamming_loss"] == approx(3 / 12)  # p0 g2, p1 g2, p2 g1 wrong


def test_evaluate_all_and_the_per_genre_table():
    report = evaluate_all(LABELS, SCORES, THRESHOLDS, ["Drama", "Comedy", "Horror"])
    assert set(report) == {"n_posters", "tuned", "at_0.5", "ranking", "per_genre"}
    assert report["tuned"] == classification_metrics(LABELS, SCORES, THRESHOLDS)
    # at 0.5: p0 [1,0,1] ✓, p1 [0,0,1] ✗, p2 [1,0,0] ✗, p3 [0,1,1] ✓ → 2/4
    assert report["at_0.5"]["subset_accuracy"] == approx(0.5)
    rows = {row["genre"]: row for row in report["per_genre"]}
    assert rows["Comedy"]["support"] == 3 and rows["Comedy"]["prevalence"] == approx(0.75)
    assert [rows[g]["f1"] for g in ("Drama", "Comedy", "Horror")] == approx([1, 0.8, 0.5])
    assert rows["Horror"]["threshold"] == approx(0.6)
    # Comedy: positives .4 .3 .6 vs negative .2: all above → AUC 1; Horror: positives .55 .65 vs .7 .1 → 2/4
    assert rows["Comedy"]["roc_auc"] == approx(1.0) and rows["Horror"]["roc_auc"] == approx(0.5)


# 5 genres; descending score order and the true genres (*) of each poster:
#   p0 one genre   g0 g1 g2* g3 g4     top-1 miss, top-3 hit, top-n (n=1): 0/1
#   p1 three       g0* g1 g4* g3 g2*   top-1 hit,  top-3 hit, top-n (n=3): {g0,g4} → 2/3
#   p2 two         g4 g0 g2 g3* g1*    top-1 miss, top-3 miss, top-n (n=2): 0/2
#   p3 none        (excluded from every per-poster denominator)
RANK_LABELS = np.array([[0, 0, 1, 0, 0], [1, 0, 1, 0, 1], [0, 1, 0, 1, 0], [0, 0, 0, 0, 0]])
RANK_SCORES = np.array([
    [0.9, 0.8, 0.7, 0.1, 0.05],
    [0.9, 0.8, 0.1, 0.2, 0.7],
    [0.5, 0.1, 0.4, 0.3, 0.6],
    [0.2, 0.2, 0.2, 0.2, 0.2],
])


def test_hit_at_k_and_top_n_ratio_by_hand():
    m = ranking_metrics(RANK_LABELS, RANK_SCORES)
    assert m["posters_ranked"] == 3
    assert m["hit@1"] == approx(1 / 3) and m["hit@3"] == approx(2 / 3)
    assert m["top_n_ratio"] == approx((0 + 2 / 3 + 0) / 3)
    # LRAP, mean over true genres of (true genres ranked at or above it)/rank:
    #   p0 1/3; p1 (1/1 + 2/3 + 3/5)/3 = 34/45; p2 (1/4 + 2/5)/2 = 13/40 → (120 + 272 + 117)/360/3
    assert m["lrap"] == approx(509 / 1080)
    assert m["coverage_error"] == approx((3 + 5 + 5) / 3)  # rank of the lowest true genre


def test_a_poster_without_genres_leaves_the_denominators():
    ranked = RANK_LABELS[:3], RANK_SCORES[:3]
    assert hit_at_k(RANK_LABELS, RANK_SCORES, 3) == approx(2 / 3) == hit_at_k(*ranked, 3)  # not 2/4
    assert top_n_ratio(RANK_LABELS, RANK_SCORES) == approx(top_n_ratio(*ranked))
    assert math.isnan(hit_at_k(np.zeros((2, 3)), np.ones((2, 3))))


def test_ties_count_against_the_model():
    constant = np.full(RANK_SCORES.shape, 0.5)
    # false genres rank first among ties: p0 (4 false) and p2 (3 false) fill their top 3 with false
    # genres; p1 (2 false of 5) gets 1 true genre into its top 3 (= its n), so top-n is (0 + 1/3 + 0)/3
    assert hit_at_k(RANK_LABELS, constant, 1) == 0
    assert hit_at_k(RANK_LABELS, constant, 3) == approx(1 / 3)
    assert top_n_ratio(RANK_LABELS, constant) == approx(1 / 9)


# g2 has no positive in this split; p3 has no genre.
NOPOS_LABELS = np.array([[1, 0, 0], [0, 1, 0], [1, 1, 0], [0, 0, 0]])
NOPOS_SCORES = np.array([[0.8, 0.3, 0.2], [0.4, 0.6, 0.1], [0.7, 0.2, 0.3], [0.1, 0.5, 0.4]])


def test_a_genre_without_positives_is_left_out_not_scored():
    m = ranking_metrics(NOPOS_LABELS, NOPOS_SCORES)
    # g0: positives .8 .7 above negatives .4 .1 → 1; g1: positives .6 .2 vs .3 .5 → 2 of 4 pairs → .5
    assert m["auc_genres_scored"] == 2 and m["roc_auc_macro"] == approx(0.75)
    # AP g0: 1; g1 ranks p1+ p3- p0- p2+ → (1/1 + 2/4)/2 = .75
    assert m["map_genres_scored"] == 2 and m["map_macro"] == approx(0.875)
    # micro: 4 positives (.8 .7 .6 .2) × 8 negatives; .2 beats .1 .1 and ties .2 → (8+8+8+2.5)/32
    assert m["roc_auc_micro"] == approx(26.5 / 32)
    table = per_genre_table(NOPOS_LABELS, NOPOS_SCORES, 0.5, ["A", "B", "C"]).set_index("genre")
    assert table.loc["C", "support"] == 0 and table.loc["C", "prevalence"] == 0
    assert math.isnan(table.loc["C", "roc_auc"]) and math.isnan(table.loc["C", "average_precision"])
    assert table.loc["C", "f1"] == 0
    c = classification_metrics(NOPOS_LABELS, NOPOS_SCORES, 0.5)
    # g0 F1 1, g1 {1,2} vs {1,3} → .5, g2 none vs none → 0 (zero_division) → macro .5; micro tp3 fp1 fn1 → 6/8
    assert c["f1_macro"] == approx(0.5) and c["f1_micro"] == approx(0.75)
    assert c["f1_samples"] == approx((1 + 1 + 2 / 3 + 0) / 4)  # p3 predicts g1 and has nothing: 0


def test_a_genre_with_only_positives_has_ap_but_no_auc():
    labels = NOPOS_LABELS.copy()
    labels[:, 2] = 1
    m = ranking_metrics(labels, NOPOS_SCORES)
    assert m["auc_genres_scored"] == 2 and m["roc_auc_macro"] == approx(0.75)
    assert m["map_genres_scored"] == 3 and m["map_macro"] == approx((1 + 0.75 + 1) / 3)  # all-positive AP = 1


def test_label_prior_baseline():
    train = np.array([[1, 1, 1, 1]] + [[1, 1, 1, 0]] + [[1, 1, 0, 0]] * 2 + [[1, 0, 0, 0]] * 5 + [[0, 0, 0, 0]])
    test = np.array([[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 0, 0], [1, 0, 1, 0], [0, 1, 0, 0],
                     [1, 0, 0, 1], [1, 0, 0, 0], [0, 0, 1, 1], [0, 0, 0, 1]])
    prior = label_prior_scores(train, len(test))
    assert prior.shape == (9, 4) and prior[3] == approx([0.9, 0.4, 0.2, 0.1])
    m = ranking_metrics(test, prior)
    assert m["auc_genres_scored"] == 4 and m["roc_auc_macro"] == 0.5  # a constant per genre ranks no poster
    assert m["hit@1"] == approx(6 / 9)  # posters with g0
    assert m["hit@3"] == approx(8 / 9)  # all but the poster with only g3


def _sklearn_rank_metrics(labels: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    """scikit-learn's own numbers, on the genres where each is defined (the suite's convention)."""
    y = labels.astype(int)
    positives = y.sum(axis=0)
    auc_genres = np.flatnonzero((positives > 0) & (positives < len(y)))
    ap_genres = np.flatnonzero(positives > 0)
    nan = float("nan")
    return {"roc_auc_macro": roc_auc_score(y[:, auc_genres], scores[:, auc_genres]) if auc_genres.size else nan,
            "roc_auc_micro": roc_auc_score(y.ravel(), scores.ravel()) if 0 < y.sum() < y.size else nan,
            "map_macro": average_precision_score(y[:, ap_genres], scores[:, ap_genres]) if ap_genres.size else nan,
            "f1_micro@0.5": f1_score(y, scores >= 0.5, average="micro", zero_division=0)}


def test_the_metric_suite_counts_what_sklearn_counts_ties_included():
    rng = np.random.default_rng(7)
    for _ in range(20):
        n, g = rng.integers(3, 40), rng.integers(2, 6)
        labels = rng.random((n, g)) < rng.uniform(0, 0.6, g)
        scores = np.round(rng.random((n, g)), 1)  # coarse scores: many ties
        ours = headline_metrics([f"g{i}" for i in range(g)], 0.5)
        assert tuple(ours) == HEADLINE  # one list of headline metrics, in report order
        for name, value in _sklearn_rank_metrics(labels, scores).items():
            assert ours[name](labels, scores) == approx(value, rel=1e-12, nan_ok=True), name
        thresholds = rng.random(g)
        assert make_f1_metric(thresholds, "macro")(labels, scores) == approx(
            f1_score(labels, scores >= thresholds, average="macro", zero_division=0), rel=1e-12)


def test_ranks_are_scipys_average_ranks_ties_and_nans_included():
    """The AUC's ranks, computed without SciPy: a Ray Train worker imports the metrics but neither library."""
    import subprocess
    import sys

    from scipy.stats import rankdata

    from posterfusion.models.metrics import _average_ranks

    rng = np.random.default_rng(3)
    for _ in range(300):
        n, g = rng.integers(0, 30), rng.integers(1, 5)
        scores = rng.integers(0, rng.integers(1, 6), (n, g)).astype(float)  # small integers: runs of ties
        if n and rng.random() < 0.2:
            scores[rng.integers(0, n), 0] = np.nan
        np.testing.assert_array_equal(_average_ranks(scores), rankdata(scores, axis=0))
    imported = subprocess.run([sys.executable, "-c", "import sys, posterfusion.models.metrics; "
                               "print(sorted({m.split('.')[0] for m in sys.modules} & {'scipy', 'sklearn'}))"],
                              capture_output=True, text=True, check=True).stdout.strip()
    assert imported == "[]"


def _synthetic(n: int, seed: int, signal: float = 0.35) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = (rng.random((n, 4)) < 0.3).astype(np.float32)
    return labels, signal * labels + (1 - signal) * rng.random((n, 4))


def test_bootstrap_interval_contains_the_point_is_seeded_and_narrows_with_data():
    auc = macro_auc
    point, low, high = bootstrap_ci(*_synthetic(60, 0), auc, n_boot=200, seed=1)
    assert low <= point <= high and low < high
    assert bootstrap_ci(*_synthetic(60, 0), auc, n_boot=200, seed=1) == (point, low, high)
    _, big_low, big_high = bootstrap_ci(*_synthetic(960, 0), auc, n_boot=200, seed=1)
    assert big_high - big_low < (high - low) / 2  # 16× the posters: about ¼ the width


def test_bootstrap_skips_resamples_where_the_metric_is_undefined():
    labels = np.array([[1, 0], [0, 1], [0, 0], [0, 0], [0, 0], [0, 0]])  # one positive per genre
    scores = np.linspace(0.9, 0.1, 12).reshape(6, 2)
    values = bootstrap_distribution(labels, scores, macro_auc, n_boot=200, seed=0)
    assert 0 < len(values) < 200 and np.isfinite(values).all()  # (4/6)^6 ≈ 9 % of resamples miss both
    assert all(np.isfinite(bootstrap_ci(labels, scores, macro_auc, n_boot=200)))


def test_paired_bootstrap():
    labels, scores = _synthetic(200, 3)
    auc = macro_auc
    same = paired_bootstrap(labels, scores, scores.copy(), auc, n_boot=200)
    assert same["diff"] == same["low"] == same["high"] == 0
    assert same["p_value"] == 1 and not same["significant"]
    random = np.random.default_rng(4).random(labels.shape)
    better = paired_bootstrap(labels, scores, random, auc, n_boot=200)
    assert better["diff"] > 0.2 and better["low"] > 0 and better["significant"] and better["p_value"] < 0.05
    assert better["diff"] == approx(better["metric_a"] - better["metric_b"]) and better["n_used"] == 200
    worse = paired_bootstrap(labels, random, scores, auc, n_boot=200)
    assert worse["diff"] == approx(-better["diff"]) and worse["high"] < 0 and worse["significant"]


def test_shapes_are_checked():
    with pytest.raises(ValueError, match="shape"):
        classification_metrics(LABELS, SCORES[:, :2], 0.5)
    with pytest.raises(ValueError, match="two genres"):
        ranking_metrics(LABELS[:, :1], SCORES[:, :1])


def test_per_genre_paired_differences_say_where_a_model_helps_and_where_it_hurts():
    from posterfusion.jobs.compare import per_genre_table

    labels, good = _synthetic(300, 5, signal=0.6)
    noise = np.random.default_rng(6).random(labels.shape)
    a = np.column_stack([good[:, 0], noise[:, 1], good[:, 2], good[:, 3]])  # better on g0, worse on g1
    b = np.column_stack([noise[:, 0], good[:, 1], good[:, 2], good[:, 3]])
    result = paired_auc_per_genre(labels, a, b, n_boot=200)
    assert result["low"][0] > 0 and result["high"][1] < 0 and result["diff"][2] == result["diff"][3] == 0
    table = per_genre_table({"genres": ["g0", "g1", "g2", "g3"], "paired_per_genre": {"a - b": {
        k: v.tolist() for k, v in result.items()}}}, "a - b")
    assert "| g0 | +" in "\n".join(table) and "helps" in table[5] and "hurts" in table[6]
    assert table[7].endswith("not significant |")
