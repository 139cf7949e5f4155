"""Issue 11: hurdle value model, conformal intervals, population accounting, backtest pooling."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from clvray import metrics
from clvray.backtest import summarize
from clvray.config import TrainSection
from clvray.features import customer_features
from clvray.storage import Storage
from clvray.train import Boosters, fit_conformal, train_models


def _heteroscedastic(n: int, seed: int) -> tuple[np.ndarray, ...]:
    """Spend with a point mass at zero, whose spread grows with the prediction, and raw
    quantiles that are too narrow (a 40-60% band where 10-90% is asked); the raw P10 is exactly
    0 for low predictions, so many customers sit exactly on their lower end (the ties that
    make a symmetric CQR score overshoot)."""
    rng = np.random.default_rng(seed)
    pred = rng.lognormal(3.0, 1.0, n)
    zero = rng.random(n) < np.where(pred < 20, 0.75, 0.3)  # low predictions: mostly zeros
    y = np.where(zero, 0.0, pred * rng.lognormal(0.0, 0.3 + 0.2 * np.log1p(pred)))
    return y, pred, np.where(pred < 20, 0.0, pred * 0.9), pred * 1.1


def _kth_by_counting(s: np.ndarray, level: float) -> float:
    """The smallest value that at least ceil((n + 1) * level) of `s` do not exceed."""
    need = min(len(s), math.ceil((len(s) + 1) * level))
    return min(v for v in s if (s <= v).sum() >= need)


def test_conformal_offsets_match_an_independent_computation_and_cover_80_percent():
    y, pred, lo, hi = _heteroscedastic(4000, seed=0)
    cal = fit_conformal(y, pred, lo, hi, target=0.8, max_groups=4)
    # independent: pandas qcut groups, offsets found by counting
    groups = pd.qcut(pred, 4, labels=False)
    for g in range(4):
        m = groups == g
        lower = _kth_by_counting(lo[m] - y[m], 0.9)
        above = y[m] >= lo[m] - lower
        upper_scores = np.where(above, y[m] - hi[m], np.inf)
        upper = _kth_by_counting(upper_scores, 0.8)
        assert cal["offsets_lo"][g] == pytest.approx(lower)
        assert cal["offsets_hi"][g] == pytest.approx(upper)
        assert cal["n"][g] == m.sum()
    assert cal["valid_coverage_raw"] < 0.6 and abs(cal["valid_coverage"] - 0.8) < 0.01

    # fresh customers from the same process: 0.80 +- 0.03 overall and in each group
    y2, pred2, lo2, hi2 = _heteroscedastic(20000, seed=1)
    group = np.searchsorted(cal["edges"], pred2, side="right")
    inside = (y2 >= lo2 - np.asarray(cal["offsets_lo"])[group]) & (
        y2 <= hi2 + np.asarray(cal["offsets_hi"])[group]
    )
    assert abs(inside.mean() - 0.8) < 0.03
    for g in range(4):
        assert abs(inside[group == g].mean() - 0.8) < 0.03
    # the symmetric CQR score on the same data overshoots in the tied group: why two ends
    sym = np.maximum(lo - y, y - hi)[groups == 0]
    offset = _kth_by_counting(sym, 0.8)
    low2 = group == 0
    sym_cover = (y2 >= lo2 - offset) & (y2 <= hi2 + offset)
    assert sym_cover[low2].mean() > 0.83


def test_coverage_by_segment_matches_pandas():
    y, pred, lo, hi = _heteroscedastic(1000, seed=2)  # 10 equal deciles for qcut
    rows = metrics.coverage_by_segment(y, lo, hi, pred)
    inside = pd.Series((y >= lo) & (y <= hi))
    expected = inside.groupby(pd.qcut(pred, 10, labels=False)).agg(["mean", "size"])
    assert [r["n"] for r in rows] == expected["size"].tolist()
    assert [r["coverage"] for r in rows] == pytest.approx(expected["mean"].tolist())
    assert all(r["ci_lo"] <= r["coverage"] <= r["ci_hi"] for r in rows)


def test_population_reasons_add_up_to_every_customer_seen():
    import polars as pl

    from clvray.features import population_counts

    ts = pd.Timestamp("2024-01-01", tz="UTC")
    before, after = ts - pd.Timedelta(days=5), ts + pd.Timedelta(days=5)
    rows = [  # (customer, ts, order, amount, kind)
        ("buyer", before, "o1", 10.0, "t"),
        ("buyer", before, "o2", -3.0, "t"),
        ("zero", before, "o3", 0.0, "t"),
        ("zero", after, "o4", 8.0, "t"),
        ("refund", before, "o5", -4.0, "t"),
        ("both", before, "o6", 0.0, "t"),
        ("both", before, "o7", -1.0, "t"),
        ("reviewer", before, None, 0.0, "r"),
        ("late", after, "o8", 5.0, "t"),
        ("buyer2", before, "o9", 2.0, "t"),
        ("buyer2", before, "o9", 0.0, "t"),  # a free line in a paid order
        ("zero_reviewer", before, "o10", 0.0, "t"),  # zero-amount order beats the review
        ("zero_reviewer", before, None, 0.0, "r"),
    ]
    events = pd.DataFrame(rows, columns=["customer_id", "ts", "order_id", "amount", "kind"])
    events["rating"] = np.where(events["kind"] == "r", 4.0, np.nan)
    frame = pl.from_pandas(events).with_columns(pl.col("ts").dt.cast_time_unit("us"))
    tx = frame.filter(pl.col("kind") == "t").lazy()
    rv = frame.filter(pl.col("kind") == "r").lazy()
    counts = population_counts(tx, rv, ts)
    assert counts == {
        "customers_seen": 8,
        "in_population": 2,
        "only_zero_amount_orders": 2,
        "only_refunds": 1,
        "only_zero_amount_orders_and_refunds": 1,
        "only_reviews": 1,
        "no_events_before_cutoff": 1,
    }
    # the population is exactly the customers that get features
    features = customer_features(events, ts, 30)
    assert sorted(features["customer_id"]) == ["buyer", "buyer2"]
    assert counts["in_population"] == len(features)


def test_relbench_churn_labels_follow_the_91_day_windows():
    from clvray.evaluate import relbench_labels

    cutoff = pd.Timestamp("2014-01-01", tz="UTC")
    day = pd.Timedelta(days=1)
    reviews = pd.DataFrame(
        {
            "customer_id": ["a", "a", "b", "c", "c", "d"],
            "ts": [
                cutoff - 10 * day,  # a: active, reviews again -> not churned
                cutoff + 90 * day,
                cutoff - 91 * day,  # b: active (day -91 is inside), no later review -> churned
                cutoff - 92 * day,  # c: not active (too early); its review on day 91 is outside
                cutoff + 91 * day,
                cutoff,  # d: first review at the cutoff: not active
            ],
        }
    )
    active, churned = relbench_labels(reviews, pd.Series(["a", "b", "c", "d", "e"]), cutoff)
    assert active.tolist() == [True, True, False, False, False]
    assert churned.tolist() == [0, 1, 1, 0, 1]


def _hurdle_customers(n: int = 1200, seed: int = 0) -> pd.DataFrame:
    """Group A buys rarely (80% churn) but spends 100 when it buys; group B buys often (10%
    churn) and spends 20: E[value] is 20 vs 18, E[value | purchase] 100 vs 20."""
    rng = np.random.default_rng(seed)
    a = rng.random(n) < 0.5
    churned = rng.random(n) < np.where(a, 0.8, 0.1)
    spend = np.where(a, 100.0, 20.0) * rng.uniform(0.8, 1.2, n)
    return pd.DataFrame(
        {
            "customer_id": [f"c{i}" for i in range(n)],
            "group_a": a.astype(float),
            "noise": rng.normal(size=n),
            # a BG/NBD-like estimate of E[value]: right on average, noisy per customer
            "btyd_expected_value": np.where(a, 20.0, 18.0) * rng.lognormal(0.0, 0.3, n),
            "future_value": np.where(churned, 0.0, spend),
            "churned": churned.astype("int64"),
            "split": rng.choice(["train", "valid", "test"], n, p=[0.6, 0.25, 0.15]),
        }
    )


@pytest.fixture(scope="module")
def hurdle_models(ray_local, tmp_path_factory):
    import ray.data

    df = _hurdle_customers()
    customers = ray.data.from_pandas([df.iloc[:600], df.iloc[600:]])
    cfg = TrainSection(
        num_boost_round=40, early_stopping_rounds=10, max_depth=2, eta=0.3, value_model="auto"
    )
    out = tmp_path_factory.mktemp("hurdle")
    features = ["group_a", "noise", "btyd_expected_value"]
    models = train_models(customers, features, cfg, Storage(), str(out), "gbm_h")
    return df, Boosters(models.uri, Storage())


def test_hurdle_model_is_purchase_probability_times_buyers_spend(hurdle_models):
    import xgboost as xgb

    df, boosters = hurdle_models
    assert set(boosters.models) == {"value", "churn", "spend", "quantiles"}
    choice = boosters.meta["value_model"]
    assert choice["chosen"] in {"tweedie", "hurdle", "blend"}
    assert choice["reason"].startswith("auto:")
    assert set(choice["valid"]) == {"tweedie", "hurdle", "blend"}

    probe = pd.DataFrame(
        {"group_a": [1.0, 0.0], "noise": [0.0, 0.0], "btyd_expected_value": [4.0, 9.0]}
    )
    candidates = boosters.candidates(probe)
    hurdle = candidates["hurdle"]
    assert candidates["blend"] == pytest.approx(np.sqrt(hurdle * [4.0, 9.0]), rel=1e-5)
    d = xgb.DMatrix(probe[["group_a", "noise", "btyd_expected_value"]])
    rng_ = (0, boosters.meta["results"]["spend"]["best_iteration"] + 1)
    spend = boosters.models["spend"].predict(d, iteration_range=rng_)
    # the conditional part is fitted on buyers only: ~100 and ~20, not 20 and 18
    assert spend[0] == pytest.approx(100, rel=0.15) and spend[1] == pytest.approx(20, rel=0.15)
    churn = boosters.predict(probe)["churn_prob"]
    assert hurdle == pytest.approx((1 - churn) * spend, rel=1e-5)


def test_hurdle_contributions_add_up_to_log_value(hurdle_models):
    df, boosters = hurdle_models
    probe = df[["group_a", "noise", "btyd_expected_value"]].head(50)
    try:
        for kind in ("hurdle", "tweedie", "blend"):
            boosters.value_model = kind
            contribs = boosters.contributions(probe)
            value = boosters.predict(probe)["future_value_pred"]
            assert contribs.shape == (50, 4)
            assert contribs.sum(axis=1) == pytest.approx(np.log(value), abs=1e-4)
    finally:
        boosters.value_model = boosters.meta["value_model"]["chosen"]


def test_intervals_are_calibrated_and_ordered(hurdle_models):
    df, boosters = hurdle_models
    cal = boosters.conformal
    assert cal is not None and cal["target"] == pytest.approx(0.8)
    assert sum(cal["n"]) == (df["split"] == "valid").sum()
    pred = boosters.predict(df)
    assert (pred["value_p10"] <= pred["value_p50"]).all()
    assert (pred["value_p50"] <= pred["value_p90"]).all()


def _frame(rng: np.random.Generator, ids: np.ndarray) -> pd.DataFrame:
    y = np.where(rng.random(ids.size) < 0.5, 0.0, rng.lognormal(3, 1, ids.size))
    churned = (y == 0).astype(int)
    return pd.DataFrame(
        {
            "customer_id": ids,
            "future_value": y,
            "churned": churned,
            "pred_value__bgnbd_gamma_gamma": y + rng.normal(0, 30, ids.size),
            "pred_churn__bgnbd_gamma_gamma": np.clip(
                churned * 0.3 + rng.random(ids.size) * 0.7, 0, 1
            ),
            "pred_value__gbm_behavioural": y + rng.normal(0, 20, ids.size),
            "pred_churn__gbm_behavioural": np.clip(
                churned * 0.4 + rng.random(ids.size) * 0.6, 0, 1
            ),
            "pred_value__gbm_text_finetuned": y + rng.normal(0, 10, ids.size),
            "pred_churn__gbm_text_finetuned": np.clip(
                churned * 0.5 + rng.random(ids.size) * 0.5, 0, 1
            ),
        }
    )


def test_summarize_pools_cutoffs_and_pairs_models():
    rng = np.random.default_rng(3)
    frames = [
        _frame(rng, np.array([f"c{i}" for i in range(0, 300)])),
        _frame(rng, np.array([f"c{i}" for i in range(150, 420)])),  # customers seen twice
    ]
    runs = [
        ({"cutoff": f"2024-0{i + 1}-01", "run_dir": "x", "models": {}}, f)
        for i, f in enumerate(frames)
    ]
    s = summarize(runs, n_boot=200)
    assert s["cutoffs"] == ["2024-01-01", "2024-02-01"]
    gini = [
        metrics.normalized_gini(f["future_value"], f["pred_value__gbm_behavioural"]) for f in frames
    ]
    pooled = s["pooled"]["gbm_behavioural"]["normalized_gini"]
    assert pooled["estimate"] == pytest.approx(np.mean(gini))
    assert pooled["lo"] < pooled["estimate"] < pooled["hi"]
    lift = s["text_lift"]["gbm_text_finetuned"]
    auc = [
        metrics.roc_auc(f["churned"], f["pred_churn__gbm_text_finetuned"])
        - metrics.roc_auc(f["churned"], f["pred_churn__gbm_behavioural"])
        for f in frames
    ]
    assert lift["churn_roc_auc"]["estimate"] == pytest.approx(np.mean(auc))
    assert lift["normalized_gini"]["lo"] > 0  # less noise is a clear win
    assert set(s["vs_bgnbd"]) == {"gbm_behavioural", "gbm_text_finetuned"}
    # a model against itself: zero, with no spread
    same = metrics.pooled_bootstrap(
        [
            (
                np.arange(len(f)),
                f["future_value"],
                f["pred_value__gbm_behavioural"],
                f["pred_value__gbm_behavioural"],
            )
            for f in frames
        ],
        metrics.spearman,
        n_boot=20,
    )
    assert same["estimate"] == same["lo"] == same["hi"] == 0


@pytest.mark.slow
def test_backtest_job_on_tiny_synthetic_data(ray_local, tmp_path):
    import jobs.backtest as job

    out = tmp_path / "backtest_synthetic.json"
    argv = [
        "--config", "configs/demo.yaml",
        "--storage", str(tmp_path / "runs"),
        "--prefix", "bt",
        "--k", "2",
        "--spacing-days", "60",
        "--n-boot", "50",
        "--until", "evaluate",  # the pooling reads evaluate's predictions; no reports
        "--out", str(out),
        "--set", "data.synthetic.n_customers=400",
        "--set", "data.synthetic.customers_per_task=400",
        "--set", "features.num_partitions=2",
        "--set", "train.num_boost_round=30",
        "--set", "text.enabled=false",
    ]  # fmt: skip
    assert job.main(argv) == 0
    s = json.loads(out.read_text())
    assert s["k"] == 2 and s["spacing_days"] == 60 and s["horizon_days"] == 90
    c0, c1 = (pd.Timestamp(c) for c in s["cutoffs"])
    assert c0 - c1 == pd.Timedelta(days=60)
    assert len(s["per_cutoff"]) == 2
    for row in s["per_cutoff"]:
        by_reason = row["population"]
        assert by_reason["customers_seen"] == sum(
            v for k, v in by_reason.items() if k != "customers_seen"
        )
        assert row["models"]["gbm_behavioural"]["value_model"] in {"tweedie", "hurdle", "blend"}
    pooled = s["pooled"]["gbm_behavioural"]
    assert (
        pooled["normalized_gini"]["lo"]
        <= pooled["normalized_gini"]["estimate"]
        <= pooled["normalized_gini"]["hi"]
    )
    assert 0 < pooled["interval_coverage"] < 1 and len(pooled["interval_coverage_by_segment"]) == 10
    assert "gbm_behavioural" in s["vs_bgnbd"]
    # the second cutoff shared the first one's ingest (and its stage marker) instead of
    # ingesting again
    second = tmp_path / "runs" / "bt-cutoff-1"
    assert (second / "ingest").is_symlink()
    m1 = json.loads((second / "metrics.json").read_text())
    assert "ingest" in m1["skipped_stages"] and m1["cutoff"].startswith(str(c1.date()))
    assert not (second / "report").exists()  # `--until evaluate`


def test_segment_edges_are_train_deciles_of_a_stable_hash_sample(ray_local):
    """`fit_segment_edges`: every train customer while they fit in `sample_rows` (counted, or
    bounded by the scored rows a caller passes), else the same hash sample of them whatever
    the blocks; the other splits never count."""
    import ray.data

    from clvray.contract import unit_hash
    from clvray.score import fit_segment_edges

    rng = np.random.default_rng(5)
    n = 3000
    frame = pd.DataFrame(
        {
            "customer_id": [f"c{i:05d}" for i in range(n)],
            "split": rng.choice(["train", "valid", "test"], n, p=[0.6, 0.2, 0.2]),
            "future_value_pred": rng.gamma(1.0, 50.0, n),
        }
    )
    train = frame[frame["split"] == "train"].sort_values("customer_id")
    deciles = np.linspace(0, 1, 11)[1:-1]
    ds = ray.data.from_pandas(frame).repartition(4)
    everyone = np.quantile(train["future_value_pred"], deciles)
    assert fit_segment_edges(ds, 10, sample_rows=n) == pytest.approx(everyone)
    assert fit_segment_edges(ds, 10, sample_rows=n, rows=n) == pytest.approx(everyone)
    # a sample: half of the scored rows' worth, the same customers counted or bounded
    kept = train[unit_hash(train["customer_id"], "segments") < 0.5]
    sampled = np.quantile(kept["future_value_pred"], deciles)
    assert fit_segment_edges(ds.repartition(7), 10, sample_rows=n // 2, rows=n) == pytest.approx(
        sampled
    )
    frac = (n // 4) / len(train)
    counted = train[unit_hash(train["customer_id"], "segments") < frac]
    assert fit_segment_edges(ds, 10, sample_rows=n // 4) == pytest.approx(
        np.quantile(counted["future_value_pred"], deciles)
    )
