"""Features and labels: hand-checked values, the cutoff protocol, the stable split."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from clvray.features import FEATURES, customer_features, split_of, to_events

CUTOFF = pd.Timestamp("2024-01-01", tz="UTC")


def _events(tx_rows, review_rows=()):
    tx = pd.DataFrame(tx_rows, columns=["customer_id", "order_id", "ts", "amount"])
    tx["ts"] = pd.to_datetime(tx["ts"], utc=True)
    parts = [to_events(tx, "t")]
    if review_rows:
        rv = pd.DataFrame(review_rows, columns=["customer_id", "ts", "rating"])
        rv["ts"] = pd.to_datetime(rv["ts"], utc=True)
        rv["order_id"] = None
        parts.append(to_events(rv, "r"))
    return pd.concat(parts, ignore_index=True)


BASE = [
    ("a", "o1", "2023-10-02", 10.0),
    ("a", "o2", "2023-10-12", 30.0),
    ("a", "o2", "2023-10-12", 5.0),  # second line of the same order
    ("a", "o3", "2023-12-22", 20.0),
    ("a", "o3", "2023-12-25", -20.0),  # refund of o3 (order still counted: gross > 0)
    ("b", "o4", "2023-12-01", 100.0),
    ("a", "o5", "2024-01-10", 40.0),  # future
    ("a", "o6", "2024-05-01", 99.0),  # after the horizon: never seen
]


def test_hand_checked_values():
    df = customer_features(
        _events(BASE, [("a", "2023-10-20", 4), ("a", "2023-12-30", 2)]), CUTOFF, 90
    )
    a = df.set_index("customer_id").loc["a"]
    assert a["n_orders"] == 3 and a["frequency"] == 2
    assert a["recency_days"] == pytest.approx(81)  # 2023-10-02 -> 2023-12-22
    assert a["T_days"] == pytest.approx(91)  # 2023-10-02 -> 2024-01-01
    assert a["days_since_last"] == pytest.approx(10)
    assert a["monetary"] == pytest.approx((10 + 35 + 0) / 3)
    assert a["monetary_repeat"] == pytest.approx((35 + 0) / 2)
    assert a["total_value"] == pytest.approx(45)
    assert a["gap_mean_days"] == pytest.approx((10 + 71) / 2)
    assert a["gap_last_days"] == pytest.approx(71)
    assert a["refund_share"] == pytest.approx(20 / 65)
    assert a["n_refunds"] == 1
    assert a["review_count"] == 2 and a["mean_rating"] == 3 and a["min_rating"] == 2
    assert a["days_since_last_review"] == pytest.approx(2)
    assert a["future_value"] == 40 and a["future_purchases"] == 1 and a["churned"] == 0
    b = df.set_index("customer_id").loc["b"]
    assert b["frequency"] == 0 and b["churned"] == 1 and b["future_value"] == 0
    assert np.isnan(b["gap_mean_days"]) and b["review_count"] == 0


def test_event_after_cutoff_changes_labels_never_features():
    before = customer_features(_events(BASE), CUTOFF, 90).set_index("customer_id")
    late = BASE + [("b", "o9", "2024-01-05", 70.0), ("b", "o9", "2024-01-01", 1.0)]
    after = customer_features(_events(late, [("b", "2024-01-02", 1)]), CUTOFF, 90).set_index(
        "customer_id"
    )
    pd.testing.assert_frame_equal(before[FEATURES], after[FEATURES])
    assert before.loc["b", "future_value"] == 0 and after.loc["b", "future_value"] == 71
    assert after.loc["b", "churned"] == 0


def test_event_exactly_at_cutoff_is_a_label():
    df = customer_features(_events(BASE + [("b", "o8", "2024-01-01", 5.0)]), CUTOFF, 90)
    b = df.set_index("customer_id").loc["b"]
    assert b["n_orders"] == 1 and b["future_value"] == 5


def test_customer_only_after_cutoff_is_not_in_population():
    df = customer_features(_events(BASE + [("c", "o7", "2024-01-03", 5.0)]), CUTOFF, 90)
    assert set(df["customer_id"]) == {"a", "b"}


def test_split_is_stable_and_shares_hold():
    ids = [f"C{i:06d}" for i in range(20000)]
    s1 = split_of(ids, 0.15, 0.2)
    assert (s1 == split_of(list(reversed(ids)), 0.15, 0.2)[::-1]).all()
    shares = {k: float(np.mean(s1 == k)) for k in ("train", "valid", "test")}
    assert shares["test"] == pytest.approx(0.2, abs=0.01)
    assert shares["valid"] == pytest.approx(0.15, abs=0.01)
    # pinned values: a change of hash function would silently reshuffle every run's splits
    assert list(split_of(["C000000", "C000001", "C000002"], 0.15, 0.2)) == list(s1[:3])


def _pandas_reference(
    events: pd.DataFrame, cutoff: pd.Timestamp, horizon_days: int
) -> pd.DataFrame:
    """The feature definitions written a second, independent way (pandas, as clvray computed
    them before the polars plan), to check `customer_features` on random data."""
    day = pd.Timedelta(days=1)
    horizon_end = cutoff + pd.Timedelta(days=horizon_days)
    past = events[events["ts"] < cutoff]
    future = events[(events["ts"] >= cutoff) & (events["ts"] < horizon_end)]
    tx = past[past["kind"] == "t"]
    orders = (
        tx.assign(gross=tx["amount"].clip(lower=0.0))
        .groupby(["customer_id", "order_id"], sort=False)
        .agg(ts=("ts", "min"), value=("amount", "sum"), gross=("gross", "sum"))
        .reset_index()
    )
    orders = orders[orders["gross"] > 0].sort_values(["customer_id", "ts", "order_id"])
    g = orders.groupby("customer_id", sort=False)
    first, last = g["ts"].min(), g["ts"].max()
    out = pd.DataFrame({"n_orders": g.size()})
    out["frequency"] = out["n_orders"] - 1
    out["recency_days"] = (last - first) / day
    out["T_days"] = (cutoff - first) / day
    out["days_since_last"] = (cutoff - last) / day
    out["monetary"] = g["value"].mean()
    rank = g.cumcount()
    out["monetary_repeat"] = orders[rank > 0].groupby("customer_id")["value"].mean()
    out["monetary_repeat"] = out["monetary_repeat"].fillna(0.0)
    out["total_value"] = tx.groupby("customer_id")["amount"].sum()
    recent = orders[orders["ts"] >= cutoff - pd.Timedelta(days=horizon_days)]
    out["value_last_horizon"] = recent.groupby("customer_id")["value"].sum()
    out["orders_last_horizon"] = recent.groupby("customer_id").size()
    gaps = orders.assign(gap=g["ts"].diff() / day).dropna(subset=["gap"]).groupby("customer_id")
    out["gap_mean_days"] = gaps["gap"].mean()
    out["gap_std_days"] = gaps["gap"].std()
    out["gap_max_days"] = gaps["gap"].max()
    out["gap_last_days"] = gaps["gap"].last()
    refunds = tx[tx["amount"] < 0].groupby("customer_id")["amount"]
    gross = tx[tx["amount"] > 0].groupby("customer_id")["amount"].sum()
    out["refund_share"] = (-refunds.sum() / gross).reindex(out.index).fillna(0.0)
    out["n_refunds"] = refunds.size()
    rg = past[past["kind"] == "r"].groupby("customer_id")
    out["review_count"] = rg.size()
    out["mean_rating"] = rg["rating"].mean()
    out["min_rating"] = rg["rating"].min()
    out["days_since_last_review"] = (cutoff - rg["ts"].max()) / day
    for col in ("value_last_horizon", "orders_last_horizon", "n_refunds", "review_count"):
        out[col] = out[col].fillna(0)
    ftx = future[future["kind"] == "t"]
    fut_orders = ftx.groupby(["customer_id", "order_id"])["amount"].sum()
    fut_orders = fut_orders[fut_orders > 0].groupby("customer_id").size()
    out["future_value"] = ftx.groupby("customer_id")["amount"].sum().reindex(out.index).fillna(0.0)
    out["future_purchases"] = fut_orders.reindex(out.index).fillna(0).astype("int64")
    out["churned"] = (out["future_purchases"] == 0).astype("int64")
    return out.sort_index()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_features_equal_an_independent_pandas_computation(seed):
    rng = np.random.default_rng(seed)
    n = 3000
    customers = rng.integers(0, 300, n)
    # Coarse times (whole days) make ties between orders, lines and the cutoff common.
    days = rng.integers(-400, 120, n)
    tx = pd.DataFrame(
        {
            "customer_id": [f"c{c}" for c in customers],
            "order_id": [
                f"o{c}-{k}" for c, k in zip(customers, rng.integers(0, 12, n), strict=True)
            ],
            "ts": CUTOFF + pd.to_timedelta(days, unit="D"),
            "amount": np.round(rng.normal(20, 30, n), 2),  # a third negative: refunds
        }
    )
    m = 800
    rv = pd.DataFrame(
        {
            "customer_id": [f"c{c}" for c in rng.integers(0, 320, m)],
            "ts": CUTOFF + pd.to_timedelta(rng.integers(-400, 60, m), unit="D"),
            "rating": np.where(rng.random(m) < 0.2, np.nan, rng.integers(1, 6, m)),
            "order_id": None,
        }
    )
    events = pd.concat([to_events(tx, "t"), to_events(rv, "r")], ignore_index=True)
    got = customer_features(events, CUTOFF, 90).set_index("customer_id")
    want = _pandas_reference(events, CUTOFF, 90)
    assert list(got.index) == sorted(want.index)
    for c in [*FEATURES, "future_value", "future_purchases", "churned"]:
        np.testing.assert_allclose(
            got[c].to_numpy("float64"), want.loc[got.index, c].to_numpy("float64"),
            rtol=1e-9, atol=1e-9, err_msg=c,
        )  # fmt: skip


def test_build_features_on_ray_equals_one_pass_over_all_events(ray_local, tmp_path):
    """The bucketed stage (staged by customer hash, one task per bucket) gives every customer
    exactly once, with the values of one `customer_features` call over all events."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    from clvray.config import SyntheticSection, load_config
    from clvray.contract import REVIEWS, TRANSACTIONS
    from clvray.features import build_features, split_counts
    from clvray.storage import Storage
    from clvray.synth import generate_chunk

    chunk = generate_chunk(0, SyntheticSection(n_customers=400, customers_per_task=400))
    run_dir = tmp_path / "run"
    for name, schema in (("transactions", TRANSACTIONS), ("reviews", REVIEWS)):
        folder = run_dir / "ingest" / name
        folder.mkdir(parents=True)
        table = pa.Table.from_pandas(chunk[name][schema.names], schema=schema, preserve_index=False)
        for i in range(3):  # several files: several blocks write into each bucket
            pq.write_table(
                table.slice(i * len(table) // 3, len(table) // 3 + 1), folder / f"p{i}.parquet"
            )
    cutoff = pd.Timestamp("2023-06-01", tz="UTC")
    # 3 buckets at least; ~1,000 events per bucket makes more of them.
    cfg = load_config(None, ["features.num_partitions=3", "features.rows_per_partition=1000"])
    build_features(cfg, Storage(), str(run_dir), cutoff)
    got = pq.read_table(run_dir / "features" / "customers").to_pandas()
    assert not (run_dir / "features" / "_staged").exists()
    ingested = {
        n: pq.read_table(run_dir / "ingest" / n).to_pandas() for n in ("transactions", "reviews")
    }
    events = pd.concat(
        [to_events(ingested["transactions"], "t"), to_events(ingested["reviews"], "r")],
        ignore_index=True,
    )
    want = customer_features(events, cutoff, 90)
    got = got.sort_values("customer_id").reset_index(drop=True)
    assert got["customer_id"].is_unique and len(got) == len(want) > 300
    population = json.loads((run_dir / "features" / "population.json").read_text())
    assert population["in_population"] == len(want)
    assert population["customers_seen"] == sum(
        v for k, v in population.items() if k != "customers_seen"
    )
    assert population["customers_seen"] == ingested["transactions"]["customer_id"].nunique() + len(
        set(ingested["reviews"]["customer_id"]) - set(ingested["transactions"]["customer_id"])
    )
    pd.testing.assert_frame_equal(got[want.columns], want, check_dtype=False)
    # the split counts later stages read instead of the table, as the buckets counted them and
    # as one pass over the written table counts them (the fallback for older runs)
    want_splits = got["split"].value_counts().reindex(["train", "valid", "test"]).to_dict()
    assert split_counts(Storage(), str(run_dir)) == want_splits
    (run_dir / "features" / "splits.json").unlink()
    assert split_counts(Storage(), str(run_dir)) == want_splits


def test_population_counts_every_customer_seen_by_reason():
    import polars as pl

    from clvray.features import population_counts

    tx = pl.DataFrame(
        {
            "customer_id": ["in", "zero", "refund", "both", "both", "late", "in"],
            "ts": pd.to_datetime(
                [
                    "2023-10-01",
                    "2023-10-01",
                    "2023-10-01",
                    "2023-10-01",
                    "2023-11-01",
                    "2024-02-01",
                    "2024-02-01",
                ],
                utc=True,
            ),  # fmt: skip
            "amount": [5.0, 0.0, -3.0, 0.0, -1.0, 9.0, 1.0],
        }
    ).with_columns(pl.col("ts").dt.cast_time_unit("us"))
    rv = pl.DataFrame(
        {
            "customer_id": ["reviewer", "in"],
            "ts": pd.to_datetime(["2023-09-01", "2023-09-01"], utc=True),
        }
    ).with_columns(pl.col("ts").dt.cast_time_unit("us"))
    counts = population_counts(tx.lazy(), rv.lazy(), CUTOFF)
    assert counts == {
        "customers_seen": 6,
        "in_population": 1,
        "only_zero_amount_orders": 1,
        "only_refunds": 1,
        "only_zero_amount_orders_and_refunds": 1,
        "only_reviews": 1,
        "no_events_before_cutoff": 1,
    }
    # the population is exactly the customers that get a feature row
    events = pd.concat(
        [
            to_events(
                tx.to_pandas().assign(order_id=lambda d: d["customer_id"] + d.index.astype(str)),
                "t",
            )
        ],
        ignore_index=True,
    )
    assert len(customer_features(events, CUTOFF, 90)) == counts["in_population"]
