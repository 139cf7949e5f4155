"""How one booster is fitted (`clvray.train.fit_booster`), in one process: global bin edges,
base scores and the hash-drawn rows that make a fit independent of how customers are spread
over workers. The multi-worker comparison is in tests/reliability/test_hostile_ingest.py."""

from __future__ import annotations

import numpy as np
import pandas as pd
import xgboost as xgb

from clvray.config import TrainSection
from clvray.contract import id_hash64, unit_hash
from clvray.train import (
    MAX_BIN,
    base_scores,
    bin_edges,
    fit_booster,
    fit_local,
    floor_to_edges,
    model_params,
    round_mask,
)


def _customers(n: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    x = rng.lognormal(0.0, 1.5, size=(n, 3))
    x[rng.random(n) < 0.1, 2] = np.nan
    buys = rng.random(n) < np.clip(np.log1p(x[:, 1]), 0.1, 0.9)
    value = np.where(buys, x[:, 0] * 5 + rng.gamma(1.0, 2.0, n), 0.0)
    return pd.DataFrame(
        {
            "customer_id": [f"c{i:05d}" for i in range(n)],
            "split": rng.choice(["train", "valid"], n, p=[0.8, 0.2]),
            "f0": x[:, 0],
            "f1": np.round(x[:, 1], 1),  # repeated values
            "f2": x[:, 2],
            "future_value": value,
            "churned": (value == 0).astype(np.int64),
        }
    )


PLAN = {
    "features": ["f0", "f1", "f2"],
    "categories": {},
    "subsample": 0.8,
    "seed": 0,
    "num_boost_round": 40,
    "early_stopping_rounds": 10,
}


def test_bin_edges_are_at_most_max_bin_minus_one_values_of_the_data():
    df = _customers(5000)
    edges = bin_edges(df, ["f0", "f1", "f2"])
    for column, e in edges.items():
        values = set(df[column].dropna())
        assert 0 < len(e) <= MAX_BIN - 1
        assert e == sorted(e) and set(e) <= values
        assert e[0] == df[column].min()
    assert bin_edges(df.assign(f2=np.nan), ["f2"]) == {"f2": []}


def test_floor_to_edges_takes_the_largest_edge_at_or_below():
    df = pd.DataFrame({"a": [-5.0, 0.0, 0.5, 1.0, 2.5, 99.0, np.nan], "b": [1, 2, 3, 4, 5, 6, 7]})
    out = floor_to_edges(df, {"a": [0.0, 1.0, 2.0], "b": []})
    np.testing.assert_array_equal(out["a"], [0.0, 0.0, 0.0, 1.0, 2.0, 2.0, np.nan])
    assert out["b"].tolist() == df["b"].tolist()  # no edges: unchanged
    assert df["a"].iloc[0] == -5.0  # the input is not modified


def test_a_booster_fitted_on_floored_features_predicts_raw_ones_identically():
    """Scoring passes raw features to boosters fitted on floored ones: XGBoost's cuts are the
    edges and `x < edge` holds for x exactly when it holds for x's floor, inside, below and
    above the edges' range and for missing values."""
    df = _customers(6000)
    train, valid = df[df["split"] == "train"], df[df["split"] == "valid"]
    edges = bin_edges(train, PLAN["features"])
    assert max(len(e) for e in edges.values()) == MAX_BIN - 1  # f0 has far more values
    plan = {**PLAN, "edges": edges}
    params = model_params(TrainSection(), seed=0)
    booster, _ = fit_booster("value", params["value"], train, valid, plan)
    fresh = _customers(3000, seed=7)
    fresh.loc[:10, "f0"] = [-1.0, 1e9, np.nan, 0.0, *fresh["f0"].iloc[4:11]]
    raw = booster.predict(xgb.DMatrix(fresh[PLAN["features"]]))
    floored = booster.predict(xgb.DMatrix(floor_to_edges(fresh, edges)[PLAN["features"]]))
    np.testing.assert_array_equal(raw, floored)
    assert len(np.unique(raw)) > 100  # not a constant model


def test_round_mask_draws_the_share_independently_per_round_and_customer():
    keys = id_hash64([f"c{i}" for i in range(50_000)], "subsample:0:value")
    a, b = round_mask(keys, 0, 0.8), round_mask(keys, 1, 0.8)
    assert a.dtype == np.float32 and set(np.unique(a)) == {0.0, 1.0}
    assert abs(a.mean() - 0.8) < 0.01 and abs(b.mean() - 0.8) < 0.01
    assert abs((a * b).mean() - 0.64) < 0.01  # rounds independent
    np.testing.assert_array_equal(round_mask(keys[::-1], 0, 0.8), a[::-1])  # per customer
    assert round_mask(keys, 3, 1.0).min() == 1.0


def test_unit_hash_is_the_64_bit_hash_scaled():
    ids = ["a", "b", "12345"]
    np.testing.assert_array_equal(
        unit_hash(ids, "x"), (id_hash64(ids, "x") >> np.uint64(11)) / float(1 << 53)
    )


def test_base_scores_are_label_means_inside_each_objective_domain():
    df = _customers(2000)
    params = model_params(TrainSection(), seed=0)
    got = base_scores(df, params)
    assert got["churn"] == df["churned"].mean()
    assert got["value"] == np.clip(df["future_value"], 0, None).mean()
    buyers = df[df["churned"] == 0]
    assert got["spend"] == np.clip(buyers["future_value"], 0.01, None).mean()
    assert "quantiles" not in got
    assert base_scores(df.assign(churned=0), params)["churn"] == 1e-6
    assert 0 < got["churn"] < 1


def test_fit_local_does_not_depend_on_row_order():
    df = _customers(3000)
    params = {k: v for k, v in model_params(TrainSection(), seed=0).items() if k != "value"}
    first, results = fit_local(df, PLAN, params, sample_customers=1000)
    shuffled = df.sample(frac=1.0, random_state=3)
    second, _ = fit_local(shuffled, PLAN, params, sample_customers=1000)
    d = xgb.DMatrix(df[PLAN["features"]])
    for name in params:
        np.testing.assert_array_equal(first[name].predict(d), second[name].predict(d))
    assert results["quantiles"]["customers"] < 1000  # train customers of the sample
    # another seed draws other rows: another model
    third, _ = fit_local(df, {**PLAN, "seed": 1}, params, sample_customers=1000)
    assert not np.array_equal(first["churn"].predict(d), third["churn"].predict(d))


def test_customer_sample_is_the_same_whatever_the_batches():
    """The hash sample behind btyd's fit, the calibration rows and the train sample: the same
    customers however the rows are cut into blocks (Dataset.random_sample seeds per block)."""
    from clvray.contract import customer_sample

    df = _customers(20_000)
    whole = customer_sample(df, 0.1, "btyd")
    cuts = [0, 3, 2900, 7000, 12_345, 19_999, 20_000]  # uneven blocks
    blocks = [df.iloc[a:b] for a, b in zip(cuts, cuts[1:], strict=False)]
    parts = pd.concat(customer_sample(block, 0.1, "btyd") for block in blocks)
    assert whole["customer_id"].tolist() == parts["customer_id"].tolist()
    assert 1800 < len(whole) < 2200
    assert customer_sample(df, 1.0, "btyd") is df
    other = customer_sample(df, 0.1, "calibration")["customer_id"]
    assert set(other) != set(whole["customer_id"])  # salts draw independently
