"""Evaluation metrics against hand-worked examples and independent references (scikit-learn,
SciPy, the Kaggle reference Gini), plus the properties a ranking metric must have."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats
from sklearn.calibration import calibration_curve
from sklearn.metrics import (
    average_precision_score,
    brier_score_loss,
    log_loss,
    mean_absolute_error,
    mean_squared_error,
    roc_auc_score,
)

from clvray import metrics


@pytest.fixture(scope="module")
def value_data() -> tuple[np.ndarray, np.ndarray]:
    """Skewed spend with many zeros (as CLV is) and a noisy prediction of it."""
    rng = np.random.default_rng(0)
    n = 1003  # not a multiple of 10
    spend = np.where(rng.random(n) < 0.4, 0.0, rng.lognormal(3.0, 1.0, n))
    pred = spend * rng.lognormal(0.0, 0.8, n) + rng.exponential(5.0, n)
    return spend, pred


@pytest.fixture(scope="module")
def churn_data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    n = 997
    churned = (rng.random(n) < 0.3).astype(int)
    prob = np.clip(0.3 + 0.25 * (churned - 0.3) + rng.normal(0, 0.2, n), 0.01, 0.99)
    return churned, np.round(prob, 2)  # rounding makes ties, which the AUCs must handle


def kaggle_gini(actual: np.ndarray, pred: np.ndarray) -> float:
    """The Kaggle reference implementation (Porto Seguro / Allstate): ties broken by row order."""
    table = np.c_[actual, pred, np.arange(len(actual))].astype(float)
    table = table[np.lexsort((table[:, 2], -table[:, 1]))]
    gini_sum = table[:, 0].cumsum().sum() / table[:, 0].sum() - (len(actual) + 1) / 2.0
    return gini_sum / len(actual)


# --- normalized Gini ---------------------------------------------------------------------------


def test_normalized_gini_by_hand():
    # Sorted by prediction, highest first: predictions 0.5, 0.4, 0.3, 0.2, 0.1 hold actual values
    # 2, 3, 4, 1, 0. Cumulative sums 2, 5, 9, 10, 10 add to 36; a random order averages
    # (n + 1) / 2 * total = 3 * 10 = 30, so the model's Gini numerator is 6. The perfect order
    # 4, 3, 2, 1, 0 has cumulative sums 4, 7, 9, 10, 10 = 40, numerator 10. Normalized: 0.6.
    y_true = [1, 0, 4, 2, 3]
    y_pred = [0.2, 0.1, 0.3, 0.5, 0.4]
    assert metrics.normalized_gini(y_true, y_pred) == pytest.approx(0.6)


def test_normalized_gini_ties_count_as_random_order():
    # Customers 0 and 1 tie at the top with actual 1 and 0. Ordered (1, 0, 0): cumulative sums
    # 1, 1, 1 = 3, numerator 3 - 2 * 1 = 1 (perfect); ordered (0, 1, 0): 0, 1, 1 = 2, numerator 0.
    # A random order of the tie gives their mean, 0.5; so does either row order of the input.
    assert metrics.normalized_gini([1, 0, 0], [1, 1, 0]) == pytest.approx(0.5)
    assert metrics.normalized_gini([0, 1, 0], [1, 1, 0]) == pytest.approx(0.5)
    kaggle = [kaggle_gini(np.array(a), np.array([1, 1, 0])) for a in ([1, 0, 0], [0, 1, 0])]
    perfect = kaggle_gini(np.array([1, 0, 0]), np.array([1, 0, 0]))
    assert np.mean(kaggle) / perfect == pytest.approx(0.5)


def test_normalized_gini_matches_kaggle_reference_without_ties(value_data):
    spend, pred = value_data
    expected = kaggle_gini(spend, pred) / kaggle_gini(spend, spend)
    assert metrics.normalized_gini(spend, pred) == pytest.approx(expected, rel=1e-12)


def test_normalized_gini_properties(value_data):
    spend, pred = value_data
    gini = metrics.normalized_gini(spend, pred)
    assert 0.3 < gini < 1.0
    assert metrics.normalized_gini(spend, spend) == pytest.approx(1.0)
    # Reversed order: exactly the negative of the perfect ordering for distinct values.
    distinct = np.arange(1.0, 50.0) ** 1.5
    assert metrics.normalized_gini(distinct, -distinct) == pytest.approx(-1.0)
    assert metrics.normalized_gini(spend, -pred) < 0
    # Only the order of the prediction matters.
    for transform in (np.log1p, np.sqrt, lambda p: 3.0 * p - 7.0, lambda p: p**3):
        assert metrics.normalized_gini(spend, transform(pred)) == pytest.approx(gini, rel=1e-12)
    # Row order does not matter, even with ties in the prediction.
    coarse = np.round(pred, -1)
    perm = np.random.default_rng(2).permutation(spend.size)
    assert metrics.normalized_gini(spend[perm], coarse[perm]) == pytest.approx(
        metrics.normalized_gini(spend, coarse), rel=1e-12
    )
    # A constant prediction carries no ranking; constant actual values leave nothing to rank.
    assert metrics.normalized_gini(spend, np.ones_like(spend)) == pytest.approx(0.0, abs=1e-12)
    assert math.isnan(metrics.normalized_gini(np.full(5, 2.0), [1, 2, 3, 4, 5]))


def test_normalized_gini_with_refunds_summing_to_zero():
    # Totals of zero or below are fine: the total is not divided by. Perfect still scores 1.
    y_true = np.array([5.0, -5.0, 2.0, -2.0])
    assert metrics.normalized_gini(y_true, y_true) == pytest.approx(1.0)
    assert metrics.normalized_gini(y_true, -y_true) == pytest.approx(-1.0)


# --- value metrics -----------------------------------------------------------------------------


def test_spearman_by_hand_and_against_scipy(value_data):
    # Ranks of [5, 6, 7, 8, 7] with ties averaged: [1, 2, 3.5, 5, 3.5]. Centred: [-2, -1, 0.5, 2,
    # 0.5] against [-2, -1, 0, 1, 2]: dot 8, norms^2 9.5 and 10, rho = 8 / sqrt(95).
    assert metrics.spearman([1, 2, 3, 4, 5], [5, 6, 7, 8, 7]) == pytest.approx(8 / math.sqrt(95))
    spend, pred = value_data
    # Many tied zeros in the actual values, ties in the rounded prediction.
    rounded = np.round(pred, -1)
    assert metrics.spearman(spend, rounded) == pytest.approx(
        stats.spearmanr(spend, rounded).statistic, rel=1e-12
    )
    np.testing.assert_allclose(metrics.rankdata_average(rounded), stats.rankdata(rounded))
    assert math.isnan(metrics.spearman([1, 2, 3], [4, 4, 4]))


def test_decile_mape_by_hand():
    # Ten customers, one per decile; predictions 1..10. Decile 1 has actual 0 and is left out;
    # deciles 2..9 are exact; decile 10 predicts 10 for an actual 20: |10 - 20| / 20 = 0.5.
    # Mean over the 9 deciles kept: 0.5 / 9.
    y_pred = np.arange(1.0, 11.0)
    y_true = np.r_[0.0, np.arange(2.0, 10.0), 20.0]
    assert metrics.decile_mape(y_true, y_pred) == pytest.approx(0.5 / 9)
    # Twenty customers, two per decile, every actual twice its prediction: 0.5 in each decile.
    y_pred = np.arange(1.0, 21.0)
    assert metrics.decile_mape(2 * y_pred, y_pred) == pytest.approx(0.5)
    assert math.isnan(metrics.decile_mape(np.zeros(20), y_pred))


def test_calibration_by_decile_by_hand():
    # 25 customers: deciles of 3, 3, 3, 3, 3, 2, 2, 2, 2, 2 (lowest predictions first).
    y_pred = np.arange(25.0)[::-1]  # row order is not prediction order
    y_true = 2 * y_pred
    rows = metrics.calibration_by_decile(y_true, y_pred)
    assert [r["n"] for r in rows] == [3, 3, 3, 3, 3, 2, 2, 2, 2, 2]
    assert [r["decile"] for r in rows] == list(range(1, 11))
    assert rows[0] == {"decile": 1, "mean_pred": 1.0, "mean_actual": 2.0, "n": 3}
    assert rows[-1] == {"decile": 10, "mean_pred": 23.5, "mean_actual": 47.0, "n": 2}
    # Fewer customers than deciles: empty deciles are left out.
    assert len(metrics.calibration_by_decile([1.0, 2.0, 3.0], [1.0, 2.0, 3.0])) == 3


def test_decile_means_share_ties_across_a_cut():
    # Four customers tie across the cut between deciles (20 customers, 2 per decile): the tie
    # group's mean actual is what each of its members contributes.
    y_pred = np.r_[np.arange(8.0), [8.0, 8.0, 8.0, 8.0], np.arange(12.0, 20.0)]
    y_true = y_pred.copy()
    y_true[8:12] = [0.0, 0.0, 40.0, 40.0]  # mean 20 for the tie group
    rows = metrics.calibration_by_decile(y_true, y_pred)
    assert rows[4]["mean_actual"] == pytest.approx(20.0)
    assert rows[5]["mean_actual"] == pytest.approx(20.0)
    perm = np.random.default_rng(3).permutation(20)
    assert metrics.calibration_by_decile(y_true[perm], y_pred[perm]) == rows


def test_top_decile_value_share_by_hand():
    # 20 customers: the top 10% by prediction is 2 customers, holding 50 + 30 of 100.
    y_true = np.r_[50.0, 30.0, np.full(18, 20.0 / 18)]
    y_pred = np.r_[2.0, 1.5, np.zeros(18) + np.linspace(0, 1, 18)]
    assert metrics.top_decile_value_share(y_true, y_pred) == pytest.approx(0.8)
    # 25 customers: the top 10% is 2.5 customers, so half of the third one counts.
    y_true = np.r_[50.0, 30.0, 10.0, np.full(22, 10.0 / 22)]
    y_pred = np.r_[3.0, 2.0, 1.5, np.linspace(0, 1, 22)]
    assert metrics.top_decile_value_share(y_true, y_pred) == pytest.approx(0.85)


def test_lorenz_curve_agrees_with_gini_and_top_decile(value_data):
    spend, pred = value_data
    share_customers, share_value = metrics.lorenz_curve(spend, pred)
    assert share_customers.shape == share_value.shape == (101,)
    assert share_value[0] == 0.0 and share_value[-1] == pytest.approx(1.0)
    assert np.all(np.diff(share_value) >= -1e-12)  # spend >= 0
    best = metrics.lorenz_curve(spend, spend)[1]
    assert np.all(best >= share_value - 1e-12)
    assert share_value[10] == pytest.approx(metrics.top_decile_value_share(spend, pred))
    # With one point per customer the curve is exact, and the normalized Gini is the area
    # between it and the diagonal over the same area for the perfect curve.
    n = spend.size
    x, model = metrics.lorenz_curve(spend, pred, points=n + 1)
    perfect = metrics.lorenz_curve(spend, spend, points=n + 1)[1]
    ratio = (np.trapezoid(model, x) - 0.5) / (np.trapezoid(perfect, x) - 0.5)
    assert ratio == pytest.approx(metrics.normalized_gini(spend, pred), rel=1e-9)


def test_value_metrics_keys_and_references(value_data):
    spend, pred = value_data
    out = metrics.value_metrics(spend, pred)
    assert set(out) == {
        "normalized_gini",
        "spearman",
        "decile_mape",
        "rmse",
        "mae",
        "top_decile_value_share",
        "n",
    }
    assert out["n"] == spend.size
    assert out["rmse"] == pytest.approx(math.sqrt(mean_squared_error(spend, pred)), rel=1e-12)
    assert out["mae"] == pytest.approx(mean_absolute_error(spend, pred), rel=1e-12)
    assert out["spearman"] == pytest.approx(stats.spearmanr(spend, pred).statistic, rel=1e-12)
    assert all(isinstance(v, float) for k, v in out.items() if k != "n")


# --- churn metrics -----------------------------------------------------------------------------


def test_churn_metrics_match_scikit_learn(churn_data):
    churned, prob = churn_data
    out = metrics.churn_metrics(churned, prob)
    assert set(out) == {"roc_auc", "pr_auc", "log_loss", "brier", "n"}
    assert out["roc_auc"] == pytest.approx(roc_auc_score(churned, prob), rel=1e-12)
    assert out["pr_auc"] == pytest.approx(average_precision_score(churned, prob), rel=1e-12)
    assert out["log_loss"] == pytest.approx(log_loss(churned, prob), rel=1e-12)
    assert out["brier"] == pytest.approx(brier_score_loss(churned, prob), rel=1e-12)
    assert out["n"] == churned.size
    assert 0.6 < out["roc_auc"] < 1.0


def test_auc_by_hand():
    # Positives score 0.8 and 0.4, negatives 0.6, 0.4, 0.1. Pairs: (0.8 > all 3) = 3,
    # (0.4 > 0.1) = 1, (0.4 = 0.4) = 1/2: AUC = 4.5 / 6 = 0.75.
    y = [1, 0, 1, 0, 0]
    p = [0.8, 0.6, 0.4, 0.4, 0.1]
    assert metrics.roc_auc(y, p) == pytest.approx(0.75)
    # Average precision: at 0.8 recall 1/2, precision 1; at 0.6 no new positive; at 0.4 (tie of
    # one positive and one negative) recall 1, precision 2/4. AP = 0.5 * 1 + 0.5 * 0.5 = 0.75.
    assert metrics.average_precision(y, p) == pytest.approx(0.75)


def test_churn_metrics_single_class_gives_nan_aucs():
    out = metrics.churn_metrics([0, 0, 0], [0.1, 0.2, 0.3])
    assert math.isnan(out["roc_auc"]) and math.isnan(out["pr_auc"])
    assert out["brier"] == pytest.approx((0.01 + 0.04 + 0.09) / 3)
    assert out["log_loss"] == pytest.approx(-np.mean(np.log([0.9, 0.8, 0.7])))
    assert math.isnan(metrics.churn_metrics([1, 1], [0.5, 0.9])["roc_auc"])


def test_log_loss_clips_certain_mistakes():
    # A churner given probability 0 costs -log(1e-15), not infinity.
    got = metrics.log_loss([1, 0], [0.0, 0.0])
    assert got == pytest.approx(-math.log(1e-15) / 2, rel=1e-6)


def test_reliability_curve_matches_scikit_learn(churn_data):
    churned, prob = churn_data
    prob = np.clip(prob + 0.005, 0, 1)  # off the bin edges, where conventions differ
    rows = metrics.reliability_curve(churned, prob, bins=10)
    frac_pos, mean_pred = calibration_curve(churned, prob, n_bins=10, strategy="uniform")
    np.testing.assert_allclose([r["frac_positive"] for r in rows], frac_pos, rtol=1e-12)
    np.testing.assert_allclose([r["mean_prob"] for r in rows], mean_pred, rtol=1e-12)
    assert sum(r["n"] for r in rows) == churned.size
    # Bin edges: [0.1, 0.2) holds 0.1; 1.0 falls in the last bin.
    rows = metrics.reliability_curve([0, 1, 1], [0.1, 0.15, 1.0], bins=10)
    assert [(r["bin"], r["n"], r["frac_positive"]) for r in rows] == [(2, 2, 0.5), (10, 1, 1.0)]
    # Every edge k / bins opens bin k + 1, also where k / bins * bins rounds below k (0.29 * 100).
    edges = np.arange(100) / 100
    rows = metrics.reliability_curve(np.zeros(100), edges, bins=100)
    assert [r["bin"] for r in rows] == list(range(1, 101))


# --- intervals and input checks ----------------------------------------------------------------


def test_interval_coverage_by_hand():
    # Bounds are inclusive: 1 (on lo) and 3 (on hi) are covered, 0 and 5 are not.
    y = [1.0, 3.0, 0.0, 5.0, 2.0]
    lo = [1.0, 0.0, 0.5, 0.0, 2.0]
    hi = [2.0, 3.0, 1.0, 4.0, 2.0]
    assert metrics.interval_coverage(y, lo, hi) == pytest.approx(3 / 5)
    with pytest.raises(ValueError, match="lo > hi"):
        metrics.interval_coverage([1.0], [2.0], [1.0])


def test_inputs_are_checked_at_the_door():
    with pytest.raises(ValueError, match="y_true has 3 values but y_pred has 2"):
        metrics.value_metrics([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="y_pred has 1 non-finite"):
        metrics.value_metrics([1, 2], [1, np.nan])
    with pytest.raises(ValueError, match="y_true is empty"):
        metrics.normalized_gini([], [])
    with pytest.raises(ValueError, match="0/1"):
        metrics.churn_metrics([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match=r"prob must lie in \[0, 1\]"):
        metrics.churn_metrics([0, 1], [0.1, 1.2])


def test_paired_bootstrap_difference_brackets_the_difference_and_sees_a_real_gap() -> None:
    from clvray.metrics import paired_bootstrap_difference, spearman

    rng = np.random.default_rng(3)
    y = rng.gamma(1.0, 10.0, 2000)
    good = y + rng.normal(0, 5, y.size)
    bad = y + rng.normal(0, 40, y.size)
    r = paired_bootstrap_difference(y, good, bad, spearman, n_boot=300)
    assert r["delta"] == pytest.approx(spearman(y, good) - spearman(y, bad))
    assert 0 < r["lo"] <= r["delta"] <= r["hi"] and r["p_a_better"] == 1.0
    # A model against itself: exactly no difference in every resample.
    same = paired_bootstrap_difference(y, good, good, spearman, n_boot=50)
    assert same["delta"] == same["lo"] == same["hi"] == 0.0
    # Two equally noisy models: the interval straddles zero.
    other = y + rng.normal(0, 5, y.size)
    tie = paired_bootstrap_difference(y, good, other, spearman, n_boot=300)
    assert tie["lo"] < 0 < tie["hi"]
