"""Synthetic data: deterministic, written by Ray tasks, and text that carries signal."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from clvray.config import SyntheticSection
from clvray.storage import Storage
from clvray.synth import LEAVING, LOYAL, expected_future_value, generate, generate_chunk


def test_chunks_are_deterministic_and_disjoint():
    cfg = SyntheticSection(n_customers=300, customers_per_task=150, seed=3)
    a, b = generate_chunk(0, cfg), generate_chunk(0, cfg)
    pd.testing.assert_frame_equal(a["transactions"], b["transactions"])
    other = generate_chunk(1, cfg)
    assert not set(a["truth"]["customer_id"]) & set(other["truth"]["customer_id"])


def test_no_events_after_death_and_text_tracks_satisfaction():
    cfg = SyntheticSection(n_customers=1500, customers_per_task=1500, seed=5)
    c = generate_chunk(0, cfg)
    truth = c["truth"].set_index("customer_id")
    positive = c["transactions"][c["transactions"]["amount"] > 0]
    last_order = positive.groupby("customer_id")["ts"].max()
    dead = truth.loc[truth["death_ts"].notna()]
    assert len(dead) > 100
    assert (last_order.reindex(dead.index) <= dead["death_ts"]).all()
    rv = c["reviews"].join(truth["satisfaction"], on="customer_id")
    loyal = rv["text"].map(lambda t: any(p in t for p in LOYAL))
    leaving = rv["text"].map(lambda t: any(p in t for p in LEAVING))
    assert rv.loc[loyal, "satisfaction"].mean() - rv.loc[leaving, "satisfaction"].mean() > 0.6
    # satisfaction lowers dropout: the latent link that text can reveal
    assert np.corrcoef(truth["satisfaction"], truth["dropout_p"])[0, 1] < -0.5


def test_oracle_matches_simulated_future_value():
    """The closed-form expectation agrees with the generator's own futures, averaged."""
    cfg = SyntheticSection(n_customers=4000, customers_per_task=4000, seed=11)
    c = generate_chunk(0, cfg)
    cutoff = pd.Timestamp("2023-07-01", tz="UTC")
    tx = c["transactions"]
    window = tx[(tx["ts"] >= cutoff) & (tx["ts"] < cutoff + pd.Timedelta(days=90))]
    born_before = set(c["truth"].loc[c["truth"]["birth_ts"] < cutoff, "customer_id"])
    actual = window.loc[window["customer_id"].isin(born_before), "amount"].sum()
    expected = expected_future_value(c["truth"], cutoff, 90).sum()
    assert actual == pytest.approx(expected, rel=0.1)


def test_generate_writes_parquet_with_ray_tasks(ray_local, tmp_path):
    cfg = SyntheticSection(n_customers=120, customers_per_task=50)
    counts = generate(cfg, str(tmp_path), Storage())
    assert counts["truth"] == 120
    assert len(list((tmp_path / "transactions").glob("*.parquet"))) == 3
    assert len(pd.read_parquet(tmp_path / "transactions")) == counts["transactions"]
