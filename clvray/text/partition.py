"""Row-level helpers the text path shares: the door check of a dataset's columns and the
cutoff filter. Joins of row data to the customer table use Ray Data's `Dataset.join` (a hash
join), like every other join in clvray.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from clvray.contract import TS, ContractError, as_utc
from clvray.contract import require_columns as check

if TYPE_CHECKING:
    from ray.data import Dataset


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
