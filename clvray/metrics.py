"""Evaluation metrics for value regression and churn classification.

Standard metrics come from SciPy (`spearman`, ranks) and scikit-learn (`roc_auc`,
`average_precision`, `log_loss`, Brier score); this module adds their input checks and NaN
for undefined cases. What has no library equivalent is computed here in numpy: normalized
Gini, decile MAPE and calibration, top-decile share, the Lorenz curve, interval coverage, the
paired bootstrap.

Ties in the prediction. Every metric that orders customers by prediction (normalized Gini,
decile metrics, top-decile share, Lorenz curve) returns its expectation over a uniformly random
order of the customers that share a predicted value. It is computed exactly, not by sampling:
inside a group of tied predictions every customer is given the group's mean actual value before
cumulative sums or decile means are taken (the expected cumulative sum at each position of a
randomly ordered group is linear in the position). Results therefore depend neither on row
order nor on how a sort breaks ties, and a model that predicts a constant gets a Gini of 0.

All functions take 1-D array-likes of equal length, reject empty or non-finite input with a
`ValueError` naming the argument, run in O(n log n) time (one sort) and O(n) memory, and return
Python floats so the result can go to JSON as is. They run on the driver over one split's
predictions: at 10^8 customers evaluate on a sample or per partition.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

N_DECILES = 10
LOG_LOSS_EPS = 1e-15
"""Probabilities are clipped to [eps, 1 - eps] in `log_loss`, so a confident miss costs ~34.5."""


def _as_1d(name: str, values: object) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name} is empty")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} has {int(np.sum(~np.isfinite(arr)))} non-finite values")
    return arr


def _pair(
    y_true: object, y_pred: object, pred_name: str = "y_pred"
) -> tuple[np.ndarray, np.ndarray]:
    t = _as_1d("y_true", y_true)
    p = _as_1d(pred_name, y_pred)
    if t.shape != p.shape:
        raise ValueError(f"y_true has {t.size} values but {pred_name} has {p.size}")
    return t, p


def _binary(y_true: object, prob: object) -> tuple[np.ndarray, np.ndarray]:
    y, p = _pair(y_true, prob, "prob")
    if not np.all((y == 0) | (y == 1)):
        raise ValueError("y_true must hold only 0/1 (or False/True) labels")
    if np.any((p < 0) | (p > 1)):
        raise ValueError("prob must lie in [0, 1]")
    return y, p


def _sorted_tie_averaged(y_true: np.ndarray, y_pred: np.ndarray, descending: bool) -> np.ndarray:
    """`y_true` ordered by `y_pred`, each tie group of predictions replaced by its mean actual."""
    order = np.argsort(-y_pred if descending else y_pred, kind="stable")
    actual = y_true[order]
    pred = y_pred[order]
    starts = np.flatnonzero(np.r_[True, pred[1:] != pred[:-1]])
    if starts.size == actual.size:
        return actual
    sizes = np.diff(np.r_[starts, actual.size])
    means = np.add.reduceat(actual, starts) / sizes
    return np.repeat(means, sizes)


def _decile_slices(n: int) -> list[slice]:
    """Ten equal-count groups of positions 0..n-1 (sizes differ by at most one, larger first)."""
    bounds = np.r_[0, np.cumsum([len(c) for c in np.array_split(np.arange(n), N_DECILES)])]
    return [slice(int(bounds[i]), int(bounds[i + 1])) for i in range(N_DECILES)]


def rankdata_average(values: object) -> np.ndarray:
    """Ranks 1..n of `values`, tied values sharing the mean of the ranks they span."""
    from scipy.stats import rankdata

    return np.asarray(rankdata(_as_1d("values", values), method="average"), dtype=np.float64)


def spearman(y_true: object, y_pred: object) -> float:
    """Spearman rank correlation (SciPy); NaN if one side is constant."""
    from scipy.stats import spearmanr

    t, p = _pair(y_true, y_pred)
    if np.all(t == t[0]) or np.all(p == p[0]):
        return math.nan
    return float(spearmanr(t, p).statistic)


def normalized_gini(y_true: object, y_pred: object) -> float:
    """Gini of `y_true` ordered by `y_pred`, divided by the Gini of the perfect ordering.

    The Kaggle / insurance definition: sort customers by prediction, highest first, and compare
    the sum of the cumulative actual values with what a random order gives
    (`gini = sum_k C_k / S - (n + 1) / 2`, `C_k` the cumulative actual after k customers, `S` the
    total); divide by the same quantity for customers sorted by their actual value. The total `S`
    cancels in the ratio and is not divided by, so the metric stays defined when actual values
    (refunds) sum to zero or less. 1 means a perfect ranking, 0 a random one, negative a reversed
    one; only the order of `y_pred` matters. Ties in `y_pred` count as a random order among the
    tied customers (module docstring). NaN when all actual values are equal, as every order is
    then perfect.
    """
    t, p = _pair(y_true, y_pred)
    if np.all(t == t[0]):
        return math.nan
    # sum_k C_k - (n + 1) / 2 * S rewritten as sum_i w_i * v_i, w_i = (n + 1) / 2 - i: no
    # difference of two O(n^2 S) sums, so no cancellation at large n.
    weights = (t.size + 1) / 2.0 - np.arange(1, t.size + 1)
    model = float(np.dot(weights, _sorted_tie_averaged(t, p, descending=True)))
    best = float(np.dot(weights, np.sort(t)[::-1]))
    return float(model / best)


def lorenz_curve(
    y_true: object, y_pred: object, points: int = 101
) -> tuple[np.ndarray, np.ndarray]:
    """Cumulative share of actual value held by the top share of customers by prediction.

    Customers are ordered by `y_pred`, highest first (a gains curve, as used for targeting);
    returns `(customer_share, value_share)`, both of length `points`, with `customer_share`
    evenly spaced from 0 to 1. Between customers the curve is linear, so `value_share` at 0.1 is
    the top-decile share even when n is not a multiple of 10. The perfect curve is
    `lorenz_curve(y_true, y_true)`, a random model's the diagonal. NaN values when the total
    actual value is zero; with a negative total the shares are not in [0, 1].
    """
    t, p = _pair(y_true, y_pred)
    if points < 2:
        raise ValueError(f"points must be at least 2, got {points}")
    cum = np.r_[0.0, np.cumsum(_sorted_tie_averaged(t, p, descending=True))]
    total = cum[-1]
    customer_share = np.linspace(0.0, 1.0, points)
    at = np.interp(customer_share, np.linspace(0.0, 1.0, t.size + 1), cum)
    value_share = at / total if total != 0 else np.full(points, math.nan)
    return customer_share, value_share


def top_decile_value_share(y_true: object, y_pred: object) -> float:
    """Share of total actual value held by the 10% of customers with the highest prediction.

    Read from the Lorenz curve at 0.1, so a fractional customer at the boundary counts pro rata
    (n=25: the top 2.5 customers). NaN when the total actual value is zero.
    """
    _, share = lorenz_curve(y_true, y_pred, points=N_DECILES + 1)
    return float(share[1])


def calibration_by_decile(y_true: object, y_pred: object) -> list[dict[str, float | int]]:
    """Mean prediction and mean actual value per decile of prediction.

    Customers sorted by `y_pred`, lowest first, and cut into 10 equal-count groups (sizes differ
    by at most one); decile 1 holds the lowest predictions, decile 10 the highest. Ties in
    `y_pred` that straddle a cut are shared as a random order would (module docstring). Rows:
    `{"decile", "mean_pred", "mean_actual", "n"}`; deciles that would be empty (n < 10) are left
    out.
    """
    t, p = _pair(y_true, y_pred)
    actual = _sorted_tie_averaged(t, p, descending=False)
    pred = np.sort(p)
    rows: list[dict[str, float | int]] = []
    for i, sl in enumerate(_decile_slices(t.size), start=1):
        if sl.stop == sl.start:
            continue
        rows.append(
            {
                "decile": i,
                "mean_pred": float(pred[sl].mean()),
                "mean_actual": float(actual[sl].mean()),
                "n": sl.stop - sl.start,
            }
        )
    return rows


def decile_mape(y_true: object, y_pred: object) -> float:
    """Mean over deciles of prediction of |mean predicted - mean actual| / |mean actual|.

    Deciles as in `calibration_by_decile`. A decile whose mean actual value is exactly zero
    (say, ten customers who all churned) has no relative error and is left out of the average;
    NaN when every decile is. Measures calibration at the group level, where CLV is used
    (budgets per segment), and forgives per-customer noise that RMSE punishes.
    """
    errors = [
        abs(r["mean_pred"] - r["mean_actual"]) / abs(r["mean_actual"])
        for r in calibration_by_decile(y_true, y_pred)
        if r["mean_actual"] != 0
    ]
    return float(np.mean(errors)) if errors else math.nan


def value_metrics(y_true: object, y_pred: object) -> dict[str, float | int]:
    """Metrics of a value prediction (future spend or purchases) against the actual values.

    Keys: `normalized_gini`, `spearman`, `decile_mape`, `rmse`, `mae`, `top_decile_value_share`,
    `n`. See the function of each name for definitions, ties and NaN cases.
    """
    t, p = _pair(y_true, y_pred)
    err = p - t
    return {
        "normalized_gini": normalized_gini(t, p),
        "spearman": spearman(t, p),
        "decile_mape": decile_mape(t, p),
        "rmse": float(np.sqrt(np.mean(err * err))),
        "mae": float(np.mean(np.abs(err))),
        "top_decile_value_share": top_decile_value_share(t, p),
        "n": int(t.size),
    }


def _single_class(y: np.ndarray) -> bool:
    return bool(np.all(y == y[0]))


def roc_auc(y_true: object, prob: object) -> float:
    """Area under the ROC curve (scikit-learn); NaN when `y_true` holds a single class."""
    from sklearn.metrics import roc_auc_score

    y, p = _binary(y_true, prob)
    return math.nan if _single_class(y) else float(roc_auc_score(y, p))


def average_precision(y_true: object, prob: object) -> float:
    """Area under the precision-recall curve (scikit-learn's `average_precision_score`,
    positives = 1); NaN when `y_true` holds a single class."""
    from sklearn.metrics import average_precision_score

    y, p = _binary(y_true, prob)
    return math.nan if _single_class(y) else float(average_precision_score(y, p))


def log_loss(y_true: object, prob: object) -> float:
    """Mean negative log-likelihood of the labels, probabilities clipped to [1e-15, 1 - 1e-15]."""
    from sklearn.metrics import log_loss as sk_log_loss

    y, p = _binary(y_true, prob)
    p = np.clip(p, LOG_LOSS_EPS, 1.0 - LOG_LOSS_EPS)
    return float(sk_log_loss(y, p, labels=[0, 1]))


def churn_metrics(y_true: object, prob: object) -> dict[str, float | int]:
    """Metrics of a churn probability against 0/1 churn labels (1 = churned).

    Keys: `roc_auc`, `pr_auc` (average precision, positives = 1), `log_loss` (clipped), `brier`,
    `n`. When the split holds a single class, `roc_auc` and `pr_auc` are NaN (undefined, and a
    report should show that rather than crash or print a misleading 0 or 1); `log_loss` and
    `brier` are still defined.
    """
    from sklearn.metrics import brier_score_loss

    y, p = _binary(y_true, prob)
    return {
        "roc_auc": roc_auc(y, p),
        "pr_auc": average_precision(y, p),
        "log_loss": log_loss(y, p),
        "brier": float(brier_score_loss(y, p, pos_label=1)),
        "n": int(y.size),
    }


def interval_coverage(y_true: object, lo: object, hi: object) -> float:
    """Share of `y_true` inside the closed interval [lo, hi] (element-wise bounds)."""
    t, low = _pair(y_true, lo, "lo")
    _, high = _pair(t, hi, "hi")
    if np.any(low > high):
        raise ValueError(f"lo > hi for {int(np.sum(low > high))} values")
    return float(np.mean((t >= low) & (t <= high)))


def reliability_curve(y_true: object, prob: object, bins: int = 10) -> list[dict[str, float | int]]:
    """Mean predicted probability against observed frequency, in equal-width bins of `prob`.

    Bins `[k/bins, (k+1)/bins)`, the last one closed at 1. Rows:
    `{"bin", "lo", "hi", "mean_prob", "frac_positive", "n"}`, bin counted from 1; empty bins are
    left out.
    """
    y, p = _binary(y_true, prob)
    if bins < 1:
        raise ValueError(f"bins must be at least 1, got {bins}")
    edges = np.arange(bins + 1) / bins  # k / bins exactly rounded, so 0.29 opens bin 30 of 100
    idx = np.minimum(np.searchsorted(edges, p, side="right") - 1, bins - 1)
    counts = np.bincount(idx, minlength=bins)
    sum_p = np.bincount(idx, weights=p, minlength=bins)
    sum_y = np.bincount(idx, weights=y, minlength=bins)
    return [
        {
            "bin": k + 1,
            "lo": float(edges[k]),
            "hi": float(edges[k + 1]),
            "mean_prob": float(sum_p[k] / counts[k]),
            "frac_positive": float(sum_y[k] / counts[k]),
            "n": int(counts[k]),
        }
        for k in range(bins)
        if counts[k] > 0
    ]


BOOTSTRAP_MAX_ROWS = 50_000
"""Paired bootstrap on at most this many test customers (a fixed random subset): the interval
of a difference barely narrows beyond it, and the cost stays seconds."""


def paired_bootstrap_difference(
    y_true: object,
    pred_a: object,
    pred_b: object,
    metric: Callable[[np.ndarray, np.ndarray], float],
    n_boot: int = 500,
    level: float = 0.95,
    seed: int = 0,
) -> dict[str, float]:
    """`metric(y, a) - metric(y, b)` on the test customers, with a percentile interval from
    resampling customers (the same resample for both models, so their shared noise cancels).

    Returns `delta`, `lo`, `hi` and `p_a_better` (share of resamples where a beats b). An
    interval that straddles 0 means this test split cannot tell the two models apart.
    """
    t, a = _pair(y_true, pred_a)
    _, b = _pair(y_true, pred_b)
    rng = np.random.default_rng(seed)
    if t.size > BOOTSTRAP_MAX_ROWS:
        keep = rng.choice(t.size, BOOTSTRAP_MAX_ROWS, replace=False)
        t, a, b = t[keep], a[keep], b[keep]
    deltas = np.empty(n_boot)
    for i in range(n_boot):
        idx = rng.integers(0, t.size, t.size)
        deltas[i] = metric(t[idx], a[idx]) - metric(t[idx], b[idx])
    deltas = deltas[np.isfinite(deltas)]
    tail = (1 - level) / 2 * 100
    return {
        "delta": float(metric(t, a) - metric(t, b)),
        "lo": float(np.percentile(deltas, tail)) if deltas.size else math.nan,
        "hi": float(np.percentile(deltas, 100 - tail)) if deltas.size else math.nan,
        "p_a_better": float(np.mean(deltas > 0)) if deltas.size else math.nan,
        "n_boot": int(deltas.size),
    }


def coverage_by_segment(
    y_true: object, lo: object, hi: object, y_pred: object, n_segments: int = N_DECILES
) -> list[dict[str, float | int]]:
    """Interval coverage per segment of predicted value: customers sorted by `y_pred`, lowest
    first (ties by input order), cut into `n_segments` equal-count groups; segment 1 holds the
    lowest predictions. Rows `{"segment", "n", "coverage", "ci_lo", "ci_hi"}`, the last two a
    Wilson 95% interval of the coverage (how far a segment's number can move by chance alone);
    empty segments are left out."""
    t, p = _pair(y_true, y_pred)
    _, low = _pair(t, lo, "lo")
    _, high = _pair(t, hi, "hi")
    order = np.argsort(p, kind="stable")
    inside = ((t >= low) & (t <= high))[order]
    rows: list[dict[str, float | int]] = []
    for k, part in enumerate(np.array_split(inside, n_segments), start=1):
        n = part.size
        if n == 0:
            continue
        c = float(part.mean())
        z = 1.959963984540054
        centre = (c + z * z / (2 * n)) / (1 + z * z / n)
        half = z * math.sqrt(c * (1 - c) / n + z * z / (4 * n * n)) / (1 + z * z / n)
        rows.append(
            {
                "segment": k,
                "n": int(n),
                "coverage": c,
                "ci_lo": centre - half,
                "ci_hi": centre + half,
            }
        )
    return rows


def pooled_bootstrap(
    parts: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]],
    metric: Callable[[np.ndarray, np.ndarray], float],
    n_boot: int = 500,
    level: float = 0.95,
    seed: int = 0,
) -> dict[str, float]:
    """A metric pooled over cutoffs, or the paired difference of two models, with a bootstrap
    interval that resamples customers.

    `parts` holds one `(customer, y_true, pred_a, pred_b)` per cutoff, `customer` integer codes
    shared across cutoffs, `pred_b` None for a single model. The pooled value is the mean over
    cutoffs of `metric(y, a)` (minus `metric(y, b)`): each cutoff weighs the same whatever its
    size, and no metric mixes customers of different cutoffs. A resample draws customers with
    replacement and keeps every row of a drawn customer in every cutoff (a customer is seen at
    several cutoffs, so rows are not independent); both models see the same resample. Returns
    `estimate`, `lo`, `hi`, `n_boot` and, for a difference, `p_a_better`.
    """
    if not parts:
        raise ValueError("parts is empty")
    n_customers = int(max(int(c.max()) for c, *_ in parts if c.size) + 1)
    clean = []
    for c, y, a, b in parts:
        t, pa_ = _pair(y, a, "pred_a")
        pb = _pair(t, b, "pred_b")[1] if b is not None else None
        clean.append((np.asarray(c, dtype=np.int64), t, pa_, pb))

    def pooled(weights: np.ndarray | None) -> float:
        values = []
        for c, t, a, b in clean:
            idx = np.arange(t.size) if weights is None else np.repeat(np.arange(t.size), weights[c])
            if idx.size == 0:
                continue
            v = metric(t[idx], a[idx])
            if b is not None:
                v -= metric(t[idx], b[idx])
            values.append(v)
        return float(np.mean(values)) if values else math.nan

    rng = np.random.default_rng(seed)
    draws = np.empty(n_boot)
    for i in range(n_boot):
        weights = np.bincount(rng.integers(0, n_customers, n_customers), minlength=n_customers)
        draws[i] = pooled(weights)
    draws = draws[np.isfinite(draws)]
    tail = (1 - level) / 2 * 100
    out = {
        "estimate": pooled(None),
        "lo": float(np.percentile(draws, tail)) if draws.size else math.nan,
        "hi": float(np.percentile(draws, 100 - tail)) if draws.size else math.nan,
        "n_boot": int(draws.size),
    }
    if any(b is not None for *_, b in clean):
        out["p_a_better"] = float(np.mean(draws > 0)) if draws.size else math.nan
    return out
