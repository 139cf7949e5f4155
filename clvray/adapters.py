"""Source adapters: map public data formats to the contract's column names, row by row.

Adapters only rename and derive columns; every rule of the contract is still checked by
ingest, so a bad row of a public data set is rejected and counted like any other.
- `synthetic`, `contract_parquet`: already in contract columns (parquet, CSV or JSON lines).
- `amazon_reviews_json`: McAuley et al. review JSON lines. A review is a purchase of value 1
  (no prices), so the same file feeds both tables; text is `summary` + `reviewText`.
- `online_retail_csv`: UCI Online Retail invoice lines. Each line is a transaction row of
  `Quantity * UnitPrice` under its invoice (the order); features aggregate lines to orders.
  Cancellations (`C` invoices, negative quantity) are refunds. Lines without CustomerID are
  rejected by ingest with reason `customer_id: missing or empty`.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from clvray.contract import REQUIRED_INPUT
from clvray.io import InputError, read_input
from clvray.storage import Storage


def amazon_to_reviews(batch: pd.DataFrame) -> pd.DataFrame:
    summary = batch.get("summary", pd.Series("", index=batch.index)).fillna("").astype(str)
    body = batch.get("reviewText", pd.Series("", index=batch.index)).fillna("").astype(str)
    return pd.DataFrame(
        {
            "customer_id": batch["reviewerID"],
            "review_id": batch["reviewerID"].astype(str) + "|" + batch["asin"].astype(str),
            "ts": pd.to_numeric(batch["unixReviewTime"], errors="coerce"),
            "text": (summary + ". " + body).str.strip(". "),
            "rating": batch["overall"],
            "order_id": batch["reviewerID"].astype(str) + "|" + batch["asin"].astype(str),
            "product_id": batch["asin"],
        }
    )


def amazon_to_transactions(batch: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "customer_id": batch["reviewerID"],
            "order_id": batch["reviewerID"].astype(str) + "|" + batch["asin"].astype(str),
            "ts": pd.to_numeric(batch["unixReviewTime"], errors="coerce"),
            "amount": np.ones(len(batch)),
        }
    )


def online_retail_to_transactions(batch: pd.DataFrame) -> pd.DataFrame:
    qty = pd.to_numeric(batch["Quantity"], errors="coerce")
    price = pd.to_numeric(batch["UnitPrice"], errors="coerce")
    return pd.DataFrame(
        {
            "customer_id": batch["CustomerID"],
            "order_id": batch["InvoiceNo"],
            "ts": batch["InvoiceDate"],
            "amount": (qty * price).astype("float64"),
        }
    )


_ADAPTERS = {
    ("amazon_reviews_json", "reviews"): (
        amazon_to_reviews,
        ["reviewerID", "asin", "unixReviewTime", "overall"],
    ),
    ("amazon_reviews_json", "transactions"): (
        amazon_to_transactions,
        ["reviewerID", "asin", "unixReviewTime"],
    ),
    ("online_retail_csv", "transactions"): (
        online_retail_to_transactions,
        ["InvoiceNo", "InvoiceDate", "Quantity", "UnitPrice", "CustomerID"],
    ),
}


def read_source(source: str, table: str, uri: str, storage: Storage):
    """Lazy dataset of `table` in contract column names (values still unvalidated)."""
    if source in ("synthetic", "contract_parquet"):
        return read_input(uri, storage, string_columns=REQUIRED_INPUT[table])
    if (source, table) not in _ADAPTERS:
        raise InputError(f"source {source!r} has no {table} table; unset data.{table}")
    fn, needed = _ADAPTERS[(source, table)]
    # IDs as strings: CustomerID "12346.0" in a CSV column with gaps is still customer 12346.
    raw = read_input(
        uri, storage, string_columns=["CustomerID", "InvoiceNo", "InvoiceDate", "StockCode"]
    )
    missing = [c for c in needed if c not in raw.columns()]
    if missing:
        raise InputError(f"{uri}: {source} input lacks column(s) {missing}")
    return raw.map_batches(fn, batch_format="pandas")
