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
  Its customers table is derived from the same CSV: one row per distinct CustomerID with
  the customer's most frequent `Country` (ties: the alphabetically first), a categorical
  feature. Lines without CustomerID belong to no customer and are not counted here.
- customers (`data.customers`, any source): `customer_id` plus attribute columns, read as
  strings.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from clvray.contract import CUSTOMER_KEY, canonical_ids, check_columns, customers_schema
from clvray.io import InputError


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


ONLINE_RETAIL_ATTRIBUTES = ["Country"]
# Amazon review JSON: text-like fields stay strings even when a block starts with nulls.
_JSON_STRING_COLUMNS = ["reviewerID", "asin", "reviewerName", "reviewText", "summary", "reviewTime"]
_LINE_SCHEMA = pa.schema([(CUSTOMER_KEY, pa.string()), ("Country", pa.string())])


def online_retail_customer_lines(batch: pa.Table | pd.DataFrame) -> pa.Table:
    """(customer_id, Country) of every line with a CustomerID; a missing Country is ""."""
    columns = batch.columns if isinstance(batch, pd.DataFrame) else batch.column_names
    if "Country" not in columns:
        raise InputError("online_retail_csv input lacks column(s) ['Country']")
    # The same canonical ids ingest gives transactions: a line it rejects names no customer,
    # and "12346.0" is customer "12346" in both tables.
    ids, _ = canonical_ids(batch["CustomerID"])
    country, _ = canonical_ids(batch["Country"])
    keep = pc.is_valid(ids)
    return pa.table(
        {CUSTOMER_KEY: ids.filter(keep), "Country": pc.fill_null(country, "").filter(keep)},
        schema=_LINE_SCHEMA,
    )


def most_frequent_country(counts: pd.DataFrame) -> pa.Table:
    """One row per customer from `(customer_id, Country, count())` rows holding all of each
    customer's countries: the country with most lines, ties to the alphabetically first; a
    known country beats a missing one whatever the counts."""
    if counts.empty:
        return customers_schema(ONLINE_RETAIL_ATTRIBUTES).empty_table()
    ranked = counts.assign(_known=counts["Country"] != "").sort_values(
        [CUSTOMER_KEY, "_known", "count()", "Country"],
        ascending=[True, False, False, True],
        kind="stable",
    )
    best = ranked.drop_duplicates(CUSTOMER_KEY, keep="first")
    country = [c if c else None for c in best["Country"].tolist()]
    return pa.table(
        {
            CUSTOMER_KEY: pa.array(best[CUSTOMER_KEY].tolist(), pa.string()),
            "Country": pa.array(country, pa.string()),
        },
        schema=customers_schema(ONLINE_RETAIL_ATTRIBUTES),
    )


def online_retail_customers(lines, uri: str, num_partitions: int):
    """Lazy dataset of one row per distinct CustomerID of an Online Retail CSV, with Country.

    `lines` is the CSV's rows as read (ingest's reader). Cost: one pass over the lines and two
    shuffles, the first of (customer, country) line counts (one row per pair), the second of
    those counts by customer; nothing row-level reaches the driver and each task holds one
    partition of the pairs.
    """
    pairs = lines.map_batches(online_retail_customer_lines, batch_format="pyarrow")
    counts = pairs.groupby([CUSTOMER_KEY, "Country"], num_partitions=num_partitions).count()
    return counts.repartition(num_partitions, keys=[CUSTOMER_KEY]).map_batches(
        most_frequent_country, batch_size=None, batch_format="pandas"
    )


def json_string_columns(source: str) -> list[str]:
    """JSON lines fields read as strings whatever the first lines suggest."""
    return _JSON_STRING_COLUMNS if source == "amazon_reviews_json" else list(_ID_FIELDS)


_ID_FIELDS = ("customer_id", "order_id", "review_id", "product_id")


def check_source_columns(source: str, table: str, columns: list[str], uri: str) -> None:
    """Fail at the door when the first file of `uri` lacks a column `source` needs.

    `columns` is empty when they cannot be known before reading (a JSON lines file whose
    first line is not an object): then each row is checked by the rules instead.
    """
    if not columns:
        return
    if source in ("synthetic", "contract_parquet"):
        check_columns(table, columns, uri)
        return
    if (source, table) not in _ADAPTERS:
        raise InputError(f"source {source!r} has no {table} table; unset data.{table}")
    missing = [c for c in _ADAPTERS[(source, table)][1] if c not in columns]
    if missing:
        raise InputError(f"{uri}: {source} input lacks column(s) {missing}")


def to_contract_columns(source: str, table: str, raw: pa.Table) -> pa.Table:
    """One read part in contract column names (values still unvalidated), no Ray.

    A column the adapter needs but a row lacks (a JSON line without the field) is null, so
    the row is rejected by the rules with its reason rather than failing the file.
    """
    if source in ("synthetic", "contract_parquet"):
        return raw
    fn, needed = _ADAPTERS[(source, table)]
    for name in needed:
        if name not in raw.column_names:
            raw = raw.append_column(name, pa.nulls(raw.num_rows, pa.string()))
    frame = raw.select([c for c in raw.column_names if c not in ("_file",)]).to_pandas()
    out = fn(frame)
    return pa.table({c: _arrow(out[c]) for c in out.columns})


def _arrow(values: pd.Series) -> pa.Array:
    values = values.astype(object).where(values.notna(), None)
    try:
        return pa.array(values, from_pandas=True)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return pa.array([None if v is None else str(v) for v in values], pa.string())
