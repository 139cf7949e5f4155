"""Ingest: read each source table, map it to the contract, split accepted rows from rejects.

Accepted rows go to `<run>/ingest/<table>/`, rejected rows with the rule they broke to
`<run>/rejects/<table>/`. The counts `rows_in = rows_accepted + rows_rejected` are checked,
not assumed: `rows_in` is counted on the input, the other two on what was written.

Cost at scale: the validation runs as Ray Data tasks, streaming; accepted rows and rejects
are written by two passes over the input (the second pass is usually cheap next to the
rest of the pipeline). Reviews are shuffled by `review_id` to enforce uniqueness.

The optional customers table (`customer_id` plus string attributes) comes from
`data.customers`, or with `online_retail_csv` is derived from the transactions CSV; its
`rows_in` is then the number of distinct CustomerIDs (one derived row each). It is shuffled by
`customer_id`: of rows sharing an id, the one whose raw text sorts first is kept, the others
are rejected as `customer_id: duplicate`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import pyarrow as pa

from clvray import adapters
from clvray.config import Config
from clvray.contract import (
    CUSTOMER_KEY,
    REASON,
    REJECTS,
    SCHEMAS,
    ContractError,
    check_columns,
    customers_schema,
    mark_duplicates,
    to_contract,
    to_rejects,
    validate_customers,
)
from clvray.contract import validate_reviews as _validate_reviews
from clvray.contract import validate_transactions as _validate_transactions
from clvray.features import categorical_name
from clvray.io import count_rows, read_parquet, write_parquet
from clvray.storage import Storage, join

log = logging.getLogger(__name__)


class RejectThresholdExceeded(RuntimeError):
    """More rows of a table were rejected than `ingest.max_reject_share` allows."""


@dataclass
class TableCounts:
    rows_in: int
    rows_accepted: int
    rows_rejected: int
    rejects_by_reason: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {
            "rows_in": self.rows_in,
            "rows_accepted": self.rows_accepted,
            "rows_rejected": self.rows_rejected,
            "rejects_by_reason": self.rejects_by_reason,
        }


def _accepted(batch: pd.DataFrame, table: str, schema: pa.Schema | None = None):
    return to_contract(batch[batch[REASON].isna()], table, schema)


def _rejected(batch: pd.DataFrame, table: str):
    return to_rejects(batch[batch[REASON].notna()], table)


def validated_rows(raw, table: str, cfg: Config):
    """Lazy dataset of contract columns plus `_reject_reason` and `_raw` for every input row."""
    if table == "transactions":
        ds = raw.map_batches(_validate_transactions, batch_format="pandas")
    else:
        ds = raw.map_batches(
            _validate_reviews,
            batch_format="pandas",
            fn_kwargs={"max_text_chars": cfg.ingest.max_text_chars},
        )
        # Uniqueness needs every row of a review_id in one block: a hash shuffle, then a
        # whole-block pass (the same pattern Ray's own groupby().map_groups uses).
        ds = ds.repartition(cfg.features.num_partitions, keys=["review_id"]).map_batches(
            mark_duplicates, batch_size=None, batch_format="pandas", fn_kwargs={"key": "review_id"}
        )
    return ds


def ingest_table(table: str, cfg: Config, storage: Storage, run_dir: str) -> TableCounts:
    """Validate one table into `ingest/<table>` and `rejects/<table>`; returns its counts."""
    source_uri = getattr(cfg.data, table)
    raw = adapters.read_source(cfg.data.source, table, source_uri, storage)
    check_columns(table, raw.columns(), source_uri)
    rows_in = raw.count()

    validated = validated_rows(raw, table, cfg)
    return _write_and_count(
        table, validated, SCHEMAS[table], rows_in, source_uri, cfg, storage, run_dir
    )


def _write_and_count(
    table: str,
    validated,
    schema: pa.Schema,
    rows_in: int,
    source_uri: str,
    cfg: Config,
    storage: Storage,
    run_dir: str,
) -> TableCounts:
    """Write the accepted and rejected rows of `validated`; count, check and return them."""
    accepted_uri = join(run_dir, "ingest", table)
    rejects_uri = join(run_dir, "rejects", table)
    accepted = validated.map_batches(
        _accepted, batch_format="pandas", fn_kwargs={"table": table, "schema": schema}
    )
    rejected = validated.map_batches(_rejected, batch_format="pandas", fn_kwargs={"table": table})
    write_parquet(accepted, accepted_uri, storage, schema=schema)
    write_parquet(rejected, rejects_uri, storage, schema=REJECTS)

    rows_accepted = count_rows(accepted_uri, storage)
    rows_rejected = count_rows(rejects_uri, storage)
    by_reason: dict[str, int] = {}
    if rows_rejected:
        # A handful of distinct reasons, pre-aggregated per block: one partition is plenty
        # (the default, hundreds, costs more than the count on a small run).
        grouped = (
            read_parquet(rejects_uri, storage)
            .groupby("reason", num_partitions=1)
            .count()
            .to_pandas()
        )
        by_reason = {
            str(r): int(c) for r, c in zip(grouped["reason"], grouped["count()"], strict=True)
        }
    counts = TableCounts(rows_in, rows_accepted, rows_rejected, by_reason)
    if rows_in != rows_accepted + rows_rejected:
        raise RuntimeError(
            f"{table}: rows_in {rows_in} != accepted {rows_accepted} + rejected {rows_rejected}"
        )
    share = rows_rejected / rows_in if rows_in else 0.0
    if share > cfg.ingest.max_reject_share:
        raise RejectThresholdExceeded(
            f"{source_uri}: {rows_rejected} of {rows_in} {table} rows rejected ({share:.1%}) > "
            f"ingest.max_reject_share {cfg.ingest.max_reject_share:.1%}; by reason: {by_reason}; "
            f"see {rejects_uri}"
        )
    log.info("ingest %s: %s", table, counts)
    return counts


def customer_attributes(columns: list[str], selected: list[str] | None, source: str) -> list[str]:
    """The attribute columns to keep: `selected` (all non-key columns when None), checked.

    Raises ContractError naming `source` and the column when a selected name is not an
    attribute column, or when two attributes would share a feature name.
    """
    available = [c for c in columns if c != CUSTOMER_KEY]
    if selected is None:
        attributes = available
    else:
        unknown = [c for c in selected if c not in available]
        if unknown:
            raise ContractError(
                f"{source}: data.customer_attributes names column(s) {unknown} that are not "
                f"attribute columns of the customers table; it has {available}"
            )
        attributes = list(dict.fromkeys(selected))
    reserved = [c for c in attributes if c in (REASON, "_raw")]
    if reserved:
        raise ContractError(f"{source}: customers column name(s) {reserved} are reserved")
    by_name: dict[str, list[str]] = {}
    for a in attributes:
        by_name.setdefault(categorical_name(a), []).append(a)
    clashes = [names for names in by_name.values() if len(names) > 1]
    if clashes:
        raise ContractError(
            f"{source}: customers columns {clashes} would share a feature name; "
            "rename them or pick one with data.customer_attributes"
        )
    return attributes


@dataclass
class CustomersInput:
    """The customers table's source, opened and checked before any table is ingested."""

    source_uri: str
    attributes: list[str]
    dataset: Any
    """Lazy dataset of `customer_id` plus attribute columns (values still unvalidated)."""
    derived: bool
    """Derived from the transactions CSV (one row per distinct CustomerID), not read as is."""


def open_customers(cfg: Config, storage: Storage) -> CustomersInput | None:
    """The configured customers table (`data.customers`, or Online Retail's derived one), or
    None. Fails at the door (ContractError / InputError naming the file and column) on a
    missing `customer_id` column or a `data.customer_attributes` name the table lacks."""
    d = cfg.data
    if d.customers is not None:
        raw = adapters.read_customers(d.customers, storage)
        columns = raw.columns()
        check_columns("customers", columns, d.customers)
        attributes = customer_attributes(columns, d.customer_attributes, d.customers)
        return CustomersInput(d.customers, attributes, raw, derived=False)
    if d.source == "online_retail_csv" and d.transactions is not None:
        columns = [CUSTOMER_KEY, *adapters.ONLINE_RETAIL_ATTRIBUTES]
        attributes = customer_attributes(columns, d.customer_attributes, d.transactions)
        derived = adapters.online_retail_customers(
            d.transactions, storage, cfg.features.num_partitions
        )
        return CustomersInput(d.transactions, attributes, derived, derived=True)
    return None


def _validated_table(batch: pd.DataFrame, schema: pa.Schema) -> pa.Table:
    # One fixed schema for every block, so the staged files read back as one table.
    cols = {}
    for f in schema:
        values = batch[f.name].astype(object)
        cols[f.name] = pa.array(values.where(values.notna(), None).tolist(), f.type)
    return pa.table(cols, schema=schema)


def ingest_customers(
    customers: CustomersInput, cfg: Config, storage: Storage, run_dir: str
) -> TableCounts:
    """Validate the customers table into `ingest/customers` and `rejects/customers`.

    The validated rows (accepted or not) are staged once as parquet under `<run_dir>/tmp/`,
    so the duplicate shuffle (or, for a derived table, the CSV read and groupby) runs once,
    not once per output. A derived table has one row per CustomerID by construction, so it
    skips the duplicate shuffle; its `rows_in` is that number of rows.
    """
    schema = customers_schema(customers.attributes)
    validated = customers.dataset.map_batches(
        validate_customers, batch_format="pandas", fn_kwargs={"attributes": customers.attributes}
    )
    if not customers.derived:
        # Uniqueness needs every row of an id in one block (as for reviews). Customers have no
        # time, so the row kept is the one whose raw text sorts first: the same on every run.
        validated = validated.repartition(
            cfg.features.num_partitions, keys=[CUSTOMER_KEY]
        ).map_batches(
            mark_duplicates,
            batch_size=None,
            batch_format="pandas",
            fn_kwargs={"key": CUSTOMER_KEY, "order_by": ("_raw",)},
        )
    staged_schema = schema.append(pa.field(REASON, pa.string())).append(
        pa.field("_raw", pa.string())
    )
    staged = join(run_dir, "tmp", "customers_validated")
    try:
        write_parquet(
            validated.map_batches(
                _validated_table, batch_format="pandas", fn_kwargs={"schema": staged_schema}
            ),
            staged,
            storage,
            schema=staged_schema,
        )
        # Counted on the input itself; a derived table's input is the groupby's output.
        rows_in = count_rows(staged, storage) if customers.derived else customers.dataset.count()
        return _write_and_count(
            "customers",
            read_parquet(staged, storage),
            schema,
            rows_in,
            customers.source_uri,
            cfg,
            storage,
            run_dir,
        )
    finally:
        storage.delete_dir(staged)


def ingest(cfg: Config, storage: Storage, run_dir: str) -> dict[str, dict]:
    """Ingest every configured table; returns `{table: counts}` for metrics.json."""
    customers = open_customers(cfg, storage)  # a bad customers config fails before any work
    out = {}
    for table in ("transactions", "reviews"):
        if getattr(cfg.data, table) is None:
            continue
        out[table] = ingest_table(table, cfg, storage, run_dir).as_dict()
    if customers is not None:
        out["customers"] = ingest_customers(customers, cfg, storage, run_dir).as_dict()
    else:
        # build_features joins whatever is there: a table from an earlier config must go.
        storage.delete_dir(join(run_dir, "ingest", "customers"))
    return out
