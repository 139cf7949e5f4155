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
