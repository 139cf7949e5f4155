"""Ingest: every malformed row is rejected with its rule, and counts add up."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clvray.config import load_config
from clvray.contract import ContractError, validate_reviews, validate_transactions
from clvray.ingest import RejectThresholdExceeded, ingest
from clvray.io import read_parquet
from clvray.storage import Storage

GOOD_TX = [("c1", "o1", "2023-01-05", 10.0), ("c2", "o2", "2023-02-01 10:00:00", -5.0)]
BAD_TX = [
    (None, "o3", "2023-01-05", 1.0),  # missing customer_id
    ("  ", "o4", "2023-01-05", 1.0),  # empty customer_id
    ("c3", "o5", "not a date", 1.0),  # unparseable ts
    ("c3", "o6", "2023-01-05", float("inf")),  # non-finite amount
    ("c3", "o7", "2023-01-05", float("nan")),  # missing amount
    ("c3", None, "2023-01-05", 2.0),  # missing order_id
]


def _reasons(out: pd.DataFrame) -> list:
    return [None if pd.isna(r) else r for r in out["_reject_reason"]]


def _tx_frame(rows):
    return pd.DataFrame(rows, columns=["customer_id", "order_id", "ts", "amount"])


def test_validate_transactions_reasons():
    out = validate_transactions(_tx_frame(GOOD_TX + BAD_TX))
    assert _reasons(out) == [
        None,
        None,
        "customer_id: missing or empty",
        "customer_id: missing or empty",
        "ts: unparseable",
        "amount: not a finite number",
        "amount: missing",
        "order_id: missing",
    ]
    assert out["ts"].iloc[1] == pd.Timestamp("2023-02-01 10:00", tz="UTC")


def test_validate_reviews_rating_and_text():
    df = pd.DataFrame(
        {
            "customer_id": ["a", "b", "c", "d"],
            "review_id": ["r1", "r2", "r3", "r4"],
            "ts": [1700000000, 1700000000, 1700000000, 1700000000],
            "text": ["x" * 50, None, "ok", "fine"],
            "rating": [5, None, 9, 2.5],
        }
    )
    out = validate_reviews(df, max_text_chars=10)
    assert _reasons(out) == [
        None,
        None,
        "rating: not an integer in 1..5",
        "rating: not an integer in 1..5",
    ]
    assert out["text"].iloc[0] == "x" * 10 and out["text"].iloc[1] == ""
    assert out["ts"].iloc[0] == pd.Timestamp(1700000000, unit="s", tz="UTC")


def _write_inputs(tmp_path, tx_rows, review_rows):
    tx_dir = tmp_path / "in" / "transactions"
    rv_dir = tmp_path / "in" / "reviews"
    tx_dir.mkdir(parents=True)
    rv_dir.mkdir(parents=True)
    # A CSV: the path where bad values arrive as text
    _tx_frame(tx_rows).to_csv(tx_dir / "part-0.csv", index=False)
    rv = pd.DataFrame(review_rows, columns=["customer_id", "review_id", "ts", "text", "rating"])
    pq.write_table(pa.Table.from_pandas(rv, preserve_index=False), rv_dir / "part-0.parquet")
    return tx_dir, rv_dir


def _cfg(tmp_path, tx_dir, rv_dir, share=0.9):
    return load_config(
        None,
        [
            "data.source=contract_parquet",
            f"data.transactions={tx_dir}",
            f"data.reviews={rv_dir}",
            f"ingest.max_reject_share={share}",
            "features.num_partitions=2",
        ],
    )


REVIEWS = [
    ("c1", "r1", "2023-01-06T00:00:00Z", "great strings", 5),
    ("c1", "r2", "2023-01-07T00:00:00Z", "", None),
    ("c2", "r3", "2023-01-08T00:00:00Z", "bad", 9),  # rating 9
    (None, "r4", "2023-01-08T00:00:00Z", "who", 3),  # missing customer
    ("c2", "r1", "2023-01-09T00:00:00Z", "dup id, later", 4),  # duplicate review_id
    ("c2", "r5", "garbage", "bad ts", 4),
]


def test_ingest_counts_add_up_with_malformed_rows(ray_local, tmp_path):
    tx_dir, rv_dir = _write_inputs(tmp_path, GOOD_TX + BAD_TX, REVIEWS)
    run_dir = str(tmp_path / "run")
    counts = ingest(_cfg(tmp_path, tx_dir, rv_dir), Storage(), run_dir)
    tx = counts["transactions"]
    assert (tx["rows_in"], tx["rows_accepted"], tx["rows_rejected"]) == (8, 2, 6)
    assert tx["rejects_by_reason"] == {
        "customer_id: missing or empty": 2,
        "ts: unparseable": 1,
        "amount: not a finite number": 1,
        "amount: missing": 1,
        "order_id: missing": 1,
    }
    rv = counts["reviews"]
    assert (rv["rows_in"], rv["rows_accepted"], rv["rows_rejected"]) == (6, 2, 4)
    assert rv["rejects_by_reason"] == {
        "rating: not an integer in 1..5": 1,
        "customer_id: missing or empty": 1,
        "review_id: duplicate": 1,
        "ts: unparseable": 1,
    }
    accepted = (
        read_parquet(f"{run_dir}/ingest/reviews", Storage()).to_pandas().sort_values("review_id")
    )
    # the earlier of the two r1 rows is kept
    assert (
        list(accepted["review_id"]) == ["r1", "r2"] and accepted["text"].iloc[0] == "great strings"
    )
    rejects = read_parquet(f"{run_dir}/rejects/transactions", Storage()).to_pandas()
    assert "not a date" in " ".join(rejects["row"])  # the raw row is kept for inspection
    tx_out = read_parquet(f"{run_dir}/ingest/transactions", Storage()).to_pandas()
    assert np.isclose(tx_out["amount"].sum(), 5.0)


def test_reject_threshold_stops_with_a_message(ray_local, tmp_path):
    tx_dir, rv_dir = _write_inputs(tmp_path, GOOD_TX + BAD_TX, REVIEWS)
    with pytest.raises(
        RejectThresholdExceeded, match=r"6 of 8 transactions rows rejected .*max_reject_share"
    ):
        ingest(_cfg(tmp_path, tx_dir, rv_dir, share=0.5), Storage(), str(tmp_path / "run"))


def test_missing_column_names_file_and_column(ray_local, tmp_path):
    tx_dir, rv_dir = _write_inputs(tmp_path, GOOD_TX, REVIEWS)
    _tx_frame(GOOD_TX).drop(columns="amount").to_csv(tx_dir / "part-0.csv", index=False)
    with pytest.raises(
        ContractError, match=r"transactions.*lacks required column\(s\) \['amount'\]"
    ):
        ingest(_cfg(tmp_path, tx_dir, rv_dir), Storage(), str(tmp_path / "run"))


AMAZON_LINES = [
    # a null reviewerName first: the reader must not type the column from it
    {"reviewerID": "A1", "asin": "P1", "reviewerName": None, "helpful": [0, 0],
     "reviewText": "Strings sound bright. " * 400, "overall": 5.0, "summary": "Great",
     "unixReviewTime": 1393545600, "reviewTime": "02 28, 2014"},
    {"reviewerID": "A1", "asin": "P2", "reviewerName": "Jo", "helpful": [1, 2],
     "reviewText": "Broke in a week", "overall": 1.0, "summary": "Bad",
     "unixReviewTime": 1393645600, "reviewTime": "03 01, 2014"},
    {"reviewerID": None, "asin": "P3", "reviewerName": "X", "helpful": [0, 0],
     "reviewText": "who wrote this", "overall": 3.0, "summary": "?",
     "unixReviewTime": 1393745600, "reviewTime": "03 02, 2014"},
    {"reviewerID": "A2", "asin": "P1", "reviewerName": "Y", "helpful": [0, 0],
     "reviewText": "fine", "overall": 9.0, "summary": "ok",
     "unixReviewTime": 1393845600, "reviewTime": "03 03, 2014"},
]  # fmt: skip


def test_amazon_json_lines_gz_counts_add_up(ray_local, tmp_path):
    import gzip
    import json

    path = tmp_path / "reviews.json.gz"
    with gzip.open(path, "wt") as f:
        for line in AMAZON_LINES:
            f.write(json.dumps(line) + "\n")
    cfg = load_config(
        None,
        [
            "data.source=amazon_reviews_json",
            f"data.transactions={path}",
            f"data.reviews={path}",
            "ingest.max_reject_share=0.9",
            "ingest.max_text_chars=100000",
        ],
    )
    run_dir = str(tmp_path / "run")
    counts = ingest(cfg, Storage(), run_dir)
    tx, rv = counts["transactions"], counts["reviews"]
    assert (tx["rows_in"], tx["rows_accepted"], tx["rows_rejected"]) == (4, 3, 1)
    assert (rv["rows_in"], rv["rows_accepted"], rv["rows_rejected"]) == (4, 2, 2)
    assert rv["rejects_by_reason"] == {
        "customer_id: missing or empty": 1,
        "rating: not an integer in 1..5": 1,
    }
    reviews = read_parquet(f"{run_dir}/ingest/reviews", Storage()).to_pandas()
    reviews = reviews.sort_values("review_id")
    assert list(reviews["review_id"]) == ["A1|P1", "A1|P2"]
    assert reviews["text"].iloc[1] == "Bad. Broke in a week"  # summary + text
    amounts = read_parquet(f"{run_dir}/ingest/transactions", Storage()).to_pandas()["amount"]
    assert (amounts == 1.0).all()  # a review is a purchase of value 1


@pytest.mark.parametrize("chosen", [None, "1"])
def test_parquet_reads_use_the_first_datasource_unless_the_user_chose(
    ray_local, tmp_path, monkeypatch, chosen
):
    """clvray.io reads parquet through Ray Data's first datasource (no FooterReader actor pool
    per read); `RAY_DATA_USE_DATASOURCE_V2`, when set, decides. Either way the datasource's
    sampling bar is off while the dataset is created, and the dataset keeps the caller's
    progress-bar setting for its own executions."""
    import ray.data

    from clvray.io import DATASOURCE_V2_ENV

    if chosen is None:
        monkeypatch.delenv(DATASOURCE_V2_ENV, raising=False)
    else:
        monkeypatch.setenv(DATASOURCE_V2_ENV, chosen)
    ctx = ray.data.DataContext.get_current()
    monkeypatch.setattr(ctx, "use_datasource_v2", True)
    monkeypatch.setattr(ctx, "enable_progress_bars", True)
    folder = tmp_path / "t"
    folder.mkdir()
    for i in range(3):
        pq.write_table(
            pa.table({"customer_id": [f"c{i}", f"d{i}"], "x": [i, 2 * i]}), folder / f"{i}.parquet"
        )
    ds = read_parquet(str(folder), Storage(), columns=["customer_id"])
    assert ctx.use_datasource_v2 is (chosen is not None)
    assert ctx.enable_progress_bars and ds.context.enable_progress_bars
    got = ds.to_pandas().sort_values("customer_id")["customer_id"].tolist()
    assert got == ["c0", "c1", "c2", "d0", "d1", "d2"]
