"""Per-customer co-partitioning of two datasets, and the row-level helpers the text path shares.

Ray Data's `Dataset.join` needs polars, which clvray does not depend on. A join of row data to
the customer table is done here instead with one hash shuffle: each side is conformed to one
shared schema with a `_side` tag, the two are unioned and hash-partitioned by `customer_id`, and
a plain pyarrow function attaches the customer's columns to every row of a partition. All rows
of a customer (from both sides) land in the same block, so the work per block stays bounded by
the partition size whatever the row count.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from clvray.contract import TS

if TYPE_CHECKING:
    from ray.data import Dataset

SIDE = "_side"
KEY = "customer_id"


class TextInputError(ValueError):
    """A dataset handed to the text path lacks a column it needs."""


def require_columns(ds: Dataset, columns: list[str], what: str) -> None:
    """Fail at the door, naming the dataset and the missing columns.

    Checks only a schema Ray knows without running anything (files, materialized data, plain
    projections): fetching the schema of a lazy pipeline would run its first block, and for an
    actor-pool stage that means starting the actors twice. Unknown schemas fail later, in the
    first transform that reads the column.
    """
    names = ds.columns(fetch_if_missing=False)
    if names is None:
        return
    missing = [c for c in columns if c not in names]
    if missing:
        raise TextInputError(f"{what} lacks required column(s) {missing}; found {sorted(names)}")


def as_utc(ts: Any) -> pd.Timestamp:
    """A cutoff as a tz-aware UTC Timestamp (a naive value is taken as UTC)."""
    t = pd.Timestamp(ts)
    return t.tz_localize("UTC") if t.tz is None else t.tz_convert("UTC")


def before_cutoff(table: pa.Table, cutoff: pd.Timestamp, column: str = "ts") -> pa.Table:
    """Rows with `ts < cutoff`; rows without a timestamp never pass."""
    ts = table[column]
    if ts.type != TS:
        ts = pc.cast(ts, TS)
    bound = pa.scalar(as_utc(cutoff).to_pydatetime(), type=TS)
    return table.filter(pc.fill_null(pc.less(ts, bound), False))


def unit_hash(
    values: pa.ChunkedArray | pa.Array | np.ndarray | pd.Series, salt: str = ""
) -> np.ndarray:
    """A stable uniform number in [0, 1) per value (the same on every node and every run).

    `salt` gives independent draws for different purposes from the same ids.
    """
    arr = (
        values.to_numpy(zero_copy_only=False)
        if isinstance(values, (pa.Array, pa.ChunkedArray))
        else np.asarray(values)
    )
    key = hashlib.md5(f"clvray:{salt}".encode()).hexdigest()[:16]
    h = pd.util.hash_array(arr.astype(object), hash_key=key)
    return (h >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def conform(table: pa.Table, schema: pa.Schema, side: int) -> pa.Table:
    """`table` with exactly `schema`'s columns and types (missing ones as nulls) plus `_side`."""
    cols = []
    for field in schema:
        if field.name in table.column_names:
            col = table[field.name]
            cols.append(col if col.type == field.type else pc.cast(col, field.type))
        else:
            cols.append(pa.nulls(table.num_rows, type=field.type))
    cols.append(pa.array(np.full(table.num_rows, side, dtype=np.int8)))
    return pa.table(cols, schema=schema.append(pa.field(SIDE, pa.int8())))


def co_partition(
    left: Dataset,
    right: Dataset,
    schema: pa.Schema,
    num_partitions: int,
) -> Dataset:
    """Union `left` (side 0) and `right` (side 1), both conformed to `schema`, hash-partitioned
    by `customer_id`: a block then holds every row of each of its customers from both sides.

    Follow with `map_batches(fn, batch_size=None, batch_format="pyarrow")` and `split_sides`.
    """
    a = left.map_batches(conform, fn_kwargs={"schema": schema, "side": 0}, batch_format="pyarrow")
    b = right.map_batches(conform, fn_kwargs={"schema": schema, "side": 1}, batch_format="pyarrow")
    return a.union(b).repartition(num_partitions, keys=[KEY])


def split_sides(table: pa.Table) -> tuple[pa.Table, pa.Table]:
    side = table[SIDE]
    left = table.filter(pc.equal(side, 0)).drop_columns([SIDE])
    right = table.filter(pc.equal(side, 1)).drop_columns([SIDE])
    return left, right


def lookup(left: pa.Table, right: pa.Table, columns: list[str]) -> pa.Table:
    """`left` with `columns` taken from the `right` row of the same customer (null if none).

    `right` is the customer table: one row per customer (the first one wins if not).
    """
    rk = right[KEY].to_pandas()
    right = right.filter(pa.array(~rk.duplicated(keep="first").to_numpy()))
    pos = pd.Index(right[KEY].to_pandas()).get_indexer(left[KEY].to_pandas())
    idx = pa.array(pos, type=pa.int64(), mask=pos < 0)
    out = left.drop_columns([c for c in columns if c in left.column_names])
    for c in columns:
        out = out.append_column(c, right[c].take(idx))
    return out
