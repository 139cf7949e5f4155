"""Per-customer co-partitioning of two datasets, and the row-level helpers the text path shares.

Ray Data's `Dataset.join` needs polars, which clvray does not depend on. A join of row data to
the customer table is done here instead with one hash shuffle: each side is conformed to one
shared schema with a `_side` tag, the two are unioned and hash-partitioned by `customer_id`, and
a plain pyarrow function attaches the customer's columns to every row of a partition. All rows
of a customer (from both sides) land in the same block, so the work per block stays bounded by
the partition size whatever the row count.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from clvray.contract import TS, ContractError, as_utc
from clvray.contract import require_columns as check

if TYPE_CHECKING:
    from ray.data import Dataset

SIDE = "_side"
KEY = "customer_id"


class TextInputError(ContractError):
    """A dataset handed to the text path lacks a column it needs."""


def require_columns(ds: Dataset, columns: list[str], what: str) -> None:
    """Fail at the door, naming the dataset and the missing columns (`contract.require_columns`).

    Checks only a schema Ray knows without running anything (files, materialized data, plain
    projections): fetching the schema of a lazy pipeline would run its first block, and for an
    actor-pool stage that means starting the actors twice. Unknown schemas fail later, in the
    first transform that reads the column.
    """
    names = ds.columns(fetch_if_missing=False)
    if names is None:
        return
    try:
        check(names, columns, what)
    except ContractError as exc:
        raise TextInputError(str(exc)) from None


def before_cutoff(table: pa.Table, cutoff: pd.Timestamp, column: str = "ts") -> pa.Table:
    """Rows with `ts < cutoff`; rows without a timestamp never pass."""
    ts = table[column]
    if ts.type != TS:
        ts = pc.cast(ts, TS)
    bound = pa.scalar(as_utc(cutoff).to_pydatetime(), type=TS)
    return table.filter(pc.fill_null(pc.less(ts, bound), False))


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
