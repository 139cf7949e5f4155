"""The data contract: the schemas every source is mapped to, and the row rules.

The rule functions work on one pyarrow batch (no Ray), so they are unit-tested directly; the
ingest stage maps them over the input with Ray Data.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

TS = pa.timestamp("us", tz="UTC")

TRANSACTIONS = pa.schema(
    [
        ("customer_id", pa.string()),
        ("order_id", pa.string()),
        ("ts", TS),
        ("amount", pa.float64()),
    ]
)

REVIEWS = pa.schema(
    [
        ("customer_id", pa.string()),
        ("review_id", pa.string()),
        ("ts", TS),
        ("text", pa.string()),
        ("rating", pa.int8()),
        ("order_id", pa.string()),
        ("product_id", pa.string()),
    ]
)

REJECTS = pa.schema(
    [
        ("table", pa.string()),
        ("reason", pa.string()),
        ("row", pa.string()),
    ]
)

SCHEMAS = {"transactions": TRANSACTIONS, "reviews": REVIEWS}
CUSTOMER_KEY = "customer_id"
REQUIRED_INPUT = {
    "transactions": ["customer_id", "order_id", "ts", "amount"],
    "reviews": ["customer_id", "review_id", "ts", "text"],
    "customers": ["customer_id"],
}
REASON = "_reject_reason"


class ContractError(ValueError):
    """A file cannot be mapped to the contract at all (a missing column, say)."""


def require_columns(present: Iterable[str], required: Iterable[str], what: str) -> None:
    """The one column check: raises `ContractError` naming `what` (a file, a dataset, a frame)
    and every required column it lacks."""
    names = [str(c) for c in present]
    missing = [c for c in required if c not in names]
    if missing:
        raise ContractError(f"{what} lacks required column(s) {missing}; found {sorted(names)}")


def check_columns(table: str, columns: list[str], source: str) -> None:
    """Fail at the door when an input lacks a required column; names the file and column."""
    require_columns(columns, REQUIRED_INPUT[table], f"{source}: {table} input")


def as_utc(ts: Any) -> pd.Timestamp:
    """The one UTC conversion of a single timestamp (a cutoff, a data bound): tz-aware UTC; a
    naive value (Ray aggregates drop the zone) is taken as UTC."""
    t = pd.Timestamp(ts)
    return t.tz_localize("UTC") if t.tz is None else t.tz_convert("UTC")


def unit_hash(
    values: pa.ChunkedArray | pa.Array | np.ndarray | pd.Series | list, salt: str = ""
) -> np.ndarray:
    """The one stable hash of ids: a uniform number in [0, 1) per value, the same on every
    node, run and Python process (SipHash with a fixed key, vectorised; never Python's salted
    `hash`). `salt` gives independent draws for different purposes (the split, samples)."""
    arr = (
        values.to_numpy(zero_copy_only=False)
        if isinstance(values, (pa.Array, pa.ChunkedArray))
        else np.asarray(values)
    )
    key = hashlib.md5(f"clvray:{salt}".encode()).hexdigest()[:16]
    h = pd.util.hash_array(arr.astype(object), hash_key=key)
    return (h >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def _str_col(df: pd.DataFrame, name: str) -> pd.Series:
    """A column as Python strings with None for missing values (whatever the input dtype)."""
    if name not in df:
        return pd.Series([None] * len(df), dtype=object, index=df.index)
    values = [
        None if _missing(v) else (v if isinstance(v, str) else _id_str(v))
        for v in df[name].tolist()
    ]
    return pd.Series(values, dtype=object, index=df.index)


def _missing(v: object) -> bool:
    return v is None or (isinstance(v, float) and np.isnan(v)) or v is pd.NA or v is pd.NaT


def _id_str(v: object) -> str:
    # 12345.0 read from a CSV column with gaps is the id "12345", not "12345.0".
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)


def parse_ts(col: pd.Series) -> pd.Series:
    """Timestamps to UTC; numbers are unix seconds; naive strings are taken as UTC."""
    if pd.api.types.is_datetime64_any_dtype(col):
        ts = col if getattr(col.dt, "tz", None) is not None else col.dt.tz_localize("UTC")
        return ts.dt.tz_convert("UTC")
    if pd.api.types.is_numeric_dtype(col):
        return pd.to_datetime(col, unit="s", utc=True, errors="coerce")
    return pd.to_datetime(col.astype(object), utc=True, errors="coerce", format="mixed")


def _raw_json(df: pd.DataFrame, mask: np.ndarray) -> list[str]:
    sub = df.loc[mask]
    return [json.dumps(r, default=str) for r in sub.to_dict(orient="records")]


def _first_reason(reasons: list[tuple[np.ndarray, str]], n: int) -> np.ndarray:
    out = np.full(n, None, dtype=object)
    for mask, reason in reasons:
        out[(out == None) & mask] = reason  # noqa: E711 - elementwise test on an object array
    return out


def validate_transactions(batch: pd.DataFrame) -> pd.DataFrame:
    """Normalise one batch to the transactions contract; `_reject_reason` is None when accepted."""
    n = len(batch)
    customer_id = _str_col(batch, "customer_id")
    order_id = _str_col(batch, "order_id")
    ts = parse_ts(batch["ts"]) if "ts" in batch else pd.Series(pd.NaT, index=batch.index)
    amount = pd.to_numeric(batch.get("amount"), errors="coerce").astype("float64")
    reasons = _first_reason(
        [
            (
                customer_id.map(lambda v: v is None or v.strip() == "").to_numpy(bool),
                "customer_id: missing or empty",
            ),
            (order_id.map(lambda v: v is None or v == "").to_numpy(bool), "order_id: missing"),
            (ts.isna().to_numpy(bool), "ts: missing or unparseable"),
            (
                ~np.isfinite(amount.to_numpy(dtype="float64", na_value=np.nan)),
                "amount: missing or not finite",
            ),
        ],
        n,
    )
    return pd.DataFrame(
        {
            "customer_id": customer_id.to_numpy(),
            "order_id": order_id.to_numpy(),
            "ts": ts.to_numpy(),
            "amount": amount.to_numpy(dtype="float64", na_value=np.nan),
            REASON: reasons,
            "_raw": _raw_json(batch, np.ones(n, bool)) if n else [],
        }
    )


def validate_reviews(batch: pd.DataFrame, max_text_chars: int) -> pd.DataFrame:
    """Normalise one batch to the reviews contract; text is truncated, never rejected."""
    n = len(batch)
    customer_id = _str_col(batch, "customer_id")
    review_id = _str_col(batch, "review_id")
    ts = parse_ts(batch["ts"]) if "ts" in batch else pd.Series(pd.NaT, index=batch.index)
    text = _str_col(batch, "text").map(lambda v: "" if v is None else v[:max_text_chars])
    if "rating" in batch:
        rating = pd.to_numeric(batch["rating"], errors="coerce").astype("float64").to_numpy()
    else:
        rating = np.full(n, np.nan)
    bad_rating = ~np.isnan(rating) & ((rating < 1) | (rating > 5) | (rating != np.round(rating)))
    unparseable_rating = np.zeros(n, bool)
    if "rating" in batch:
        unparseable_rating = batch["rating"].notna().to_numpy() & np.isnan(rating)
    reasons = _first_reason(
        [
            (
                customer_id.map(lambda v: v is None or v.strip() == "").to_numpy(bool),
                "customer_id: missing or empty",
            ),
            (review_id.map(lambda v: v is None or v == "").to_numpy(bool), "review_id: missing"),
            (ts.isna().to_numpy(bool), "ts: missing or unparseable"),
            (bad_rating | unparseable_rating, "rating: not an integer in 1..5"),
        ],
        n,
    )
    return pd.DataFrame(
        {
            "customer_id": customer_id.to_numpy(),
            "review_id": review_id.to_numpy(),
            "ts": ts.to_numpy(),
            "text": text.to_numpy(),
            "rating": pd.array(
                np.where(np.isnan(rating) | bad_rating, np.nan, rating), dtype="Int8"
            ),
            "order_id": _str_col(batch, "order_id").to_numpy(),
            "product_id": _str_col(batch, "product_id").to_numpy(),
            REASON: reasons,
            "_raw": _raw_json(batch, np.ones(n, bool)) if n else [],
        }
    )


def customers_schema(attributes: list[str]) -> pa.Schema:
    """The customers contract: `customer_id` plus the chosen attribute columns, all strings."""
    return pa.schema([(CUSTOMER_KEY, pa.string())] + [(a, pa.string()) for a in attributes])


def _attribute_col(df: pd.DataFrame, name: str) -> pd.Series:
    # Attributes are categories: numbers become their text ("3", not "3.0"), blanks are missing.
    values = _str_col(df, name).map(lambda v: None if v is None or not v.strip() else v.strip())
    return values.astype(object)


def validate_customers(batch: pd.DataFrame, attributes: list[str]) -> pd.DataFrame:
    """Normalise one batch to the customers contract; attribute values are never rejected."""
    n = len(batch)
    customer_id = _str_col(batch, CUSTOMER_KEY)
    reasons = _first_reason(
        [
            (
                customer_id.map(lambda v: v is None or v.strip() == "").to_numpy(bool),
                "customer_id: missing or empty",
            )
        ],
        n,
    )
    cols = {CUSTOMER_KEY: customer_id.to_numpy()}
    cols.update({a: _attribute_col(batch, a).to_numpy() for a in attributes})
    cols[REASON] = reasons
    cols["_raw"] = _raw_json(batch, np.ones(n, bool)) if n else []
    return pd.DataFrame(cols)


def mark_duplicates(
    batch: pd.DataFrame, key: str, order_by: tuple[str, ...] = ("ts", "_raw")
) -> pd.DataFrame:
    """Reject every row whose `key` was already seen; the block holds all rows of each key.

    Keeps the earliest row by `order_by` (default: ts, then raw row text) so the outcome does
    not depend on the order in which the shuffle delivered rows.
    """
    if batch.empty:
        return batch
    ok = batch[REASON].isna()
    order = batch.sort_values(list(order_by), kind="stable").index
    dup = batch.loc[order, key].duplicated(keep="first") & ok.loc[order]
    batch.loc[dup[dup].index, REASON] = f"{key}: duplicate"
    return batch


def to_contract(batch: pd.DataFrame, table: str, schema: pa.Schema | None = None) -> pa.Table:
    """Accepted rows of a validated batch, typed exactly as the contract (or `schema`) says."""
    schema = schema if schema is not None else SCHEMAS[table]
    cols = {}
    for field in schema:
        values = batch[field.name]
        if field.name == "ts":
            cols[field.name] = pa.array(pd.to_datetime(values, utc=True), type=TS)
        else:
            cols[field.name] = pa.array(
                values.astype(object).where(values.notna(), None), type=field.type
            )
    return pa.table(cols, schema=schema)


def to_rejects(batch: pd.DataFrame, table: str) -> pa.Table:
    return pa.table(
        {
            "table": pa.array([table] * len(batch), pa.string()),
            "reason": pa.array(batch[REASON].astype(object), pa.string()),
            "row": pa.array(batch["_raw"].astype(object), pa.string()),
        },
        schema=REJECTS,
    )
