"""Ingest: read each source table, map it to the contract, split accepted rows from rejects.

Accepted rows go to `<run>/ingest/<table>/`, rejected rows with the rule they broke to
`<run>/rejects/<table>/`; every input row is one or the other, or the run stops before work
naming the file and the rule (`clvray.io.plan_parts`).

The plan runs once: read tasks (one per CSV / JSON lines file, one per group of parquet row
groups of at most `ingest.block_rows` rows) read their part with clvray's own error handling,
map it to contract columns and apply the row rules (`clvray.contract`, vectorised), all in
one task, and the same task writes the block's accepted rows to `ingest/<table>/` and its
rejects (with the raw row, serialised for rejects only) to `rejects/<table>/`, returning a
one-row summary. `rows_in` sums the summaries (each input row, malformed line or skipped
file is one validated row); accepted and rejected are checked against the footers of the
files written, and the three are checked to add up.

Reviews are shuffled by `review_id` to enforce uniqueness (after the text was truncated and
scrubbed in the read task, so the shuffle moves bounded rows).

The optional customers table (`customer_id` plus string attributes) comes from
`data.customers`, or with `online_retail_csv` is derived from the transactions CSV; its
`rows_in` is then the number of distinct CustomerIDs (one derived row each). It is shuffled by
`customer_id`: of rows sharing an id, the one whose attribute values sort first is kept, the
others are rejected as `customer_id: duplicate`.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from clvray import adapters
from clvray.config import Config, ConfigError
from clvray.contract import (
    CUSTOMER_KEY,
    DECODE_ERRORS,
    REASON,
    REJECTS,
    SCHEMAS,
    ContractError,
    RowRules,
    accepted_rows,
    check_columns,
    customers_schema,
    malformed_rows,
    mark_duplicates,
    private_raw_text,
    rejected_rows,
    to_utc_timestamp,
    validate_customers_table,
    validate_reviews_table,
    validate_transactions_table,
)
from clvray.features import categorical_name
from clvray.io import BadFileError, FilePart, InputError, count_rows, plan_parts, read_part
from clvray.storage import Storage, join

log = logging.getLogger(__name__)

_VALIDATORS = {"transactions": validate_transactions_table, "reviews": validate_reviews_table}
# Of duplicate review ids, the row kept is the first by these (then by every other column).
_REVIEW_ORDER = ("ts", "customer_id", "text", "rating", "order_id", "product_id")


class RejectThresholdExceeded(RuntimeError):
    """More rows of a table were rejected than `ingest.max_reject_share` allows."""


class DataRangeError(ValueError):
    """The configured cutoff / horizon does not fit the data's time range."""


INPUT_ERRORS = (ConfigError, ContractError, InputError, DataRangeError, RejectThresholdExceeded)
"""Errors about the input or the config against the data: a job prints the message (which
names the file, key or rule) instead of a traceback."""


@dataclass
class TableCounts:
    rows_in: int
    rows_accepted: int
    rows_rejected: int
    rejects_by_reason: dict[str, int] = field(default_factory=dict)
    decode_errors: int = 0
    """Rows with a value whose invalid UTF-8 bytes were replaced (accepted or rejected)."""
    files_skipped: int = 0
    ts_min: str | None = None
    ts_max: str | None = None
    """Time range of the accepted rows (ISO), from the parquet footers."""

    def as_dict(self) -> dict:
        out = {
            "rows_in": self.rows_in,
            "rows_accepted": self.rows_accepted,
            "rows_rejected": self.rows_rejected,
            "rejects_by_reason": self.rejects_by_reason,
            "decode_errors": self.decode_errors,
            "files_skipped": self.files_skipped,
        }
        if self.ts_min is not None:
            out.update(ts_min=self.ts_min, ts_max=self.ts_max)
        return out


def row_rules(cfg: Config) -> RowRules:
    """The row rules of `cfg.ingest` / `cfg.privacy`; the HMAC key comes from the environment.

    Raises ConfigError when `privacy.pseudonymize_ids` is on and the key variable is unset.
    """
    i, p = cfg.ingest, cfg.privacy
    key = None
    if p.pseudonymize_ids:
        secret = os.environ.get(p.id_key_env)
        if not secret:
            raise ConfigError(
                f"privacy.pseudonymize_ids is on but the environment variable {p.id_key_env} "
                "(privacy.id_key_env) holding the HMAC key is not set"
            )
        key = secret.encode()
    if i.max_ts is None:
        max_ts = pd.Timestamp.now(tz="UTC").normalize() + pd.Timedelta(days=2)
    else:
        max_ts = to_utc_timestamp(i.max_ts) + pd.Timedelta(days=1)
    return RowRules(
        min_ts=to_utc_timestamp(i.min_ts),
        max_ts=max_ts - pd.Timedelta(microseconds=1),
        max_abs_amount=i.max_abs_amount,
        epoch_unit=i.epoch_unit,
        date_format=i.date_format,
        max_text_chars=i.max_text_chars,
        scrub_text=p.scrub_text,
        id_key=key,
    )


def read_validate_part(
    part: FilePart,
    table: str,
    source: str,
    fs: pafs.FileSystem,
    rules: RowRules,
    on_bad_file: str = "stop",
    attributes: list[str] | None = None,
) -> pa.Table:
    """One read part, read, mapped to contract columns and validated: the staged table.

    Pure (no Ray): the broken-file tests call it directly. A bad file raises BadFileError
    naming it, or with `on_bad_file == "skip"` becomes one staged reject. `attributes`: the
    customers table's attribute columns (for `table == "customers"`).
    """
    schema = customers_schema(attributes or []) if table == "customers" else SCHEMAS[table]
    if part.error is None:
        try:
            read = read_part(part, fs, adapters.json_string_columns(source))
        except BadFileError as exc:
            if on_bad_file != "skip":
                raise
            part = FilePart(part.path, part.fmt, error=exc.reason)
    if part.error is not None:
        return malformed_rows(
            schema,
            [f"file: {part.error} (skipped: ingest.on_bad_file is skip)"],
            [json.dumps({"_file": part.path})],
        )
    if table == "customers":
        staged = validate_customers_table(read.table, attributes or [], rules, source=read.table)
    else:
        mapped = adapters.to_contract_columns(source, table, read.table)
        staged = _VALIDATORS[table](mapped, rules, source=read.table)
    if read.bad_reasons:
        raws = [private_raw_text(r, rules) for r in read.bad_raws]
        staged = pa.concat_tables([staged, malformed_rows(schema, read.bad_reasons, raws)])
    return staged


def _read_validate(
    batch: pa.Table,
    table: str,
    source: str,
    uri: str,
    storage: Storage,
    rules: RowRules,
    on_bad_file: str,
    block_rows: int,
    attributes: list[str] | None = None,
) -> Iterator[pa.Table]:
    fs, _ = storage.filesystem(uri)
    for item in batch.to_pylist():
        staged = read_validate_part(
            FilePart.from_item(item), table, source, fs, rules, on_bad_file, attributes
        )
        for start in range(0, max(staged.num_rows, 1), block_rows):
            yield staged.slice(start, block_rows)


def _read_raw(batch: pa.Table, uri: str, storage: Storage, on_bad_file: str) -> Iterator[pa.Table]:
    """The rows of each part as read (malformed lines left out: another pass counts them)."""
    fs, _ = storage.filesystem(uri)
    for item in batch.to_pylist():
        part = FilePart.from_item(item)
        if part.error is not None:
            continue
        try:
            yield read_part(part, fs).table
        except BadFileError:
            if on_bad_file != "skip":
                raise


def _parts_dataset(parts: list[FilePart]):
    import ray.data

    items = [p.as_item() for p in parts]
    # One block (one task) per part: a few small review files still use every core.
    return ray.data.from_items(items, override_num_blocks=len(items))


def _mark_duplicates(batch: pa.Table, key: str, order_by: tuple[str, ...]) -> pa.Table:
    return mark_duplicates(batch, key, order_by)


def read_and_validate(table: str, cfg: Config, storage: Storage, rules: RowRules):
    """Lazy dataset of the staged rows of `table` (checked file by file before any work)."""
    source_uri = getattr(cfg.data, table)
    parts, columns = plan_parts(source_uri, storage, cfg.ingest.block_rows, cfg.ingest.on_bad_file)
    adapters.check_source_columns(cfg.data.source, table, columns, source_uri)
    return validated_parts(parts, table, source_uri, cfg, storage, rules)


def validated_parts(
    parts: list[FilePart],
    table: str,
    uri: str,
    cfg: Config,
    storage: Storage,
    rules: RowRules,
    attributes: list[str] | None = None,
):
    """Lazy dataset: each part read and validated in one task."""
    return _parts_dataset(parts).map_batches(
        _read_validate,
        batch_size=1,
        batch_format="pyarrow",
        fn_kwargs={
            "table": table,
            "source": cfg.data.source,
            "uri": uri,
            "storage": storage,
            "rules": rules,
            "on_bad_file": cfg.ingest.on_bad_file,
            "block_rows": cfg.ingest.block_rows,
            "attributes": attributes,
        },
    )


def ingest_table(
    table: str, cfg: Config, storage: Storage, run_dir: str, rules: RowRules | None = None
) -> TableCounts:
    """Validate one table into `ingest/<table>` and `rejects/<table>`; returns its counts."""
    rules = rules or row_rules(cfg)
    validated = read_and_validate(table, cfg, storage, rules)
    if table == "reviews":
        # Uniqueness needs every row of a review_id in one block: a hash shuffle, then a
        # whole-block pass (the same pattern Ray's own groupby().map_groups uses).
        validated = validated.repartition(
            cfg.features.num_partitions, keys=["review_id"]
        ).map_batches(
            _mark_duplicates,
            batch_size=None,
            batch_format="pyarrow",
            fn_kwargs={"key": "review_id", "order_by": _REVIEW_ORDER},
        )
    return write_split(
        table, validated, SCHEMAS[table], getattr(cfg.data, table), cfg, storage, run_dir
    )


def _bad_file_in(exc: BaseException) -> BadFileError | None:
    """The BadFileError behind an error raised through Ray (task error, user code error)."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, BadFileError):
            return BadFileError(e.path, e.reason)
        todo += [e.__cause__, e.__context__, getattr(e, "cause", None)]
    return None


_SUMMARY = pa.schema(
    [
        ("file", pa.string()),
        ("accepted", pa.int64()),
        ("rejected", pa.int64()),
        ("decode_errors", pa.int64()),
        ("reasons", pa.string()),
        ("ts_min", pa.int64()),
        ("ts_max", pa.int64()),
    ]
)


def write_block(
    batch: pa.Table,
    table: str,
    schema: pa.Schema,
    accepted_uri: str,
    rejects_uri: str,
    storage: Storage,
) -> pa.Table:
    """Write one block's accepted rows and rejects as parquet files (same name in both
    folders) and return a one-row summary: counts, reasons, decode errors, time range.

    This is where ingest's single execution ends: the validated rows are never re-computed
    and never go through the driver; only the summaries (one row per block) do.
    """
    name = f"{uuid.uuid4().hex}.parquet"
    if batch.num_rows == 0:
        return pa.table({"file": [name], "accepted": [0], "rejected": [0], "decode_errors": [0],
                         "reasons": ["{}"], "ts_min": [None], "ts_max": [None]}, schema=_SUMMARY)  # fmt: skip
    accepted = accepted_rows(batch, schema)
    rejected = rejected_rows(batch, table)
    for rows, uri in ((accepted, accepted_uri), (rejected, rejects_uri)):
        if rows.num_rows:
            fs, path = storage.filesystem(join(uri, name))
            pq.write_table(rows, path, filesystem=fs)
    reasons: dict[str, int] = {}
    if rejected.num_rows:
        grouped = rejected.group_by("reason").aggregate([("reason", "count")])
        reasons = dict(
            zip(grouped["reason"].to_pylist(), grouped["reason_count"].to_pylist(), strict=True)
        )
    lo = hi = None
    if "ts" in schema.names and accepted.num_rows:
        mm = pc.min_max(accepted.column("ts").cast(pa.int64()))
        lo, hi = mm["min"].as_py(), mm["max"].as_py()
    return pa.table(
        {
            "file": [name],
            "accepted": [accepted.num_rows],
            "rejected": [rejected.num_rows],
            "decode_errors": [int(pc.sum(batch.column(DECODE_ERRORS)).as_py() or 0)],
            "reasons": [json.dumps(reasons)],
            "ts_min": [lo],
            "ts_max": [hi],
        },
        schema=_SUMMARY,
    )


def write_split(
    table: str,
    validated,
    schema: pa.Schema,
    source_uri: str,
    cfg: Config,
    storage: Storage,
    run_dir: str,
) -> TableCounts:
    """Execute `validated` once, each task writing its accepted rows and rejects; then count
    from the summaries, check against the files written, and return the counts.

    Files that no summary names (left by a task attempt that failed after writing) are
    deleted, so a retried task never doubles rows.
    """
    accepted_uri = join(run_dir, "ingest", table)
    rejects_uri = join(run_dir, "rejects", table)
    for uri in (accepted_uri, rejects_uri):
        storage.delete_dir(uri)
        storage.makedirs(uri)
    summaries = validated.map_batches(
        write_block,
        batch_size=None,
        batch_format="pyarrow",
        fn_kwargs={
            "table": table,
            "schema": schema,
            "accepted_uri": accepted_uri,
            "rejects_uri": rejects_uri,
            "storage": storage,
        },
    )
    try:
        summary = pd.DataFrame(summaries.take_all(), columns=_SUMMARY.names)
    except Exception as exc:
        bad = _bad_file_in(exc)
        if bad is None:
            raise
        raise bad from None
    written = set(summary["file"])
    for uri, empty in ((accepted_uri, schema), (rejects_uri, REJECTS)):
        for f in storage.list_files(uri):
            if f.rsplit("/", 1)[-1] not in written:
                storage.filesystem(uri)[0].delete_file(f)
        if not storage.list_files(uri):
            # readers (and counts) always find the table, even when it has no rows
            fs, path = storage.filesystem(join(uri, "empty.parquet"))
            pq.write_table(empty.empty_table(), path, filesystem=fs)
    by_reason: dict[str, int] = {}
    for text in summary["reasons"]:
        for reason, n in json.loads(text).items():
            by_reason[reason] = by_reason.get(reason, 0) + n
    ts_min = summary["ts_min"].dropna()
    ts_max = summary["ts_max"].dropna()
    rows_accepted = count_rows(accepted_uri, storage)
    rows_rejected = count_rows(rejects_uri, storage)
    if (rows_accepted, rows_rejected) != (summary["accepted"].sum(), summary["rejected"].sum()):
        raise RuntimeError(
            f"{table}: files hold {rows_accepted} accepted and {rows_rejected} rejected rows, "
            f"the tasks wrote {summary['accepted'].sum()} and {summary['rejected'].sum()}"
        )
    counts = TableCounts(
        rows_in=int(summary["accepted"].sum() + summary["rejected"].sum()),
        rows_accepted=rows_accepted,
        rows_rejected=rows_rejected,
        rejects_by_reason=dict(sorted(by_reason.items())),
        decode_errors=int(summary["decode_errors"].sum()),
        files_skipped=sum(c for r, c in by_reason.items() if r.startswith("file: ")),
        ts_min=_iso_us(int(ts_min.min())) if len(ts_min) else None,
        ts_max=_iso_us(int(ts_max.max())) if len(ts_max) else None,
    )
    return _check(table, counts, source_uri, rejects_uri, cfg)


def _iso_us(us: int) -> str:
    return pd.Timestamp(us, unit="us", tz="UTC").isoformat()


def _check(
    table: str, counts: TableCounts, source_uri: str, rejects_uri: str, cfg: Config
) -> TableCounts:
    rows_in, rows_rejected = counts.rows_in, counts.rows_rejected
    if rows_in != counts.rows_accepted + rows_rejected:
        raise RuntimeError(
            f"{table}: rows_in {rows_in} != accepted {counts.rows_accepted} + rejected "
            f"{rows_rejected}"
        )
    share = rows_rejected / rows_in if rows_in else 0.0
    if share > cfg.ingest.max_reject_share:
        raise RejectThresholdExceeded(
            f"{source_uri}: {rows_rejected} of {rows_in} {table} rows rejected ({share:.1%}) > "
            f"ingest.max_reject_share {cfg.ingest.max_reject_share:.1%}; by reason: "
            f"{counts.rejects_by_reason}; see {rejects_uri}"
        )
    log.info("ingest %s: %s", table, counts)
    return counts


def check_time_protocol(cfg: Config, counts: dict[str, dict]) -> None:
    """Right after ingest: the cutoff and horizon fit the accepted transactions' time range.

    The cutoff (configured, or the default end - horizon) must lie in (start of data,
    end of data - horizon]. Raises DataRangeError naming the key and the data's range.
    """
    tx = counts.get("transactions", {})
    if not tx.get("rows_accepted"):
        raise DataRangeError(
            f"no transaction was accepted ({tx.get('rows_in', 0)} read; rejects by reason: "
            f"{tx.get('rejects_by_reason', {})}); nothing to compute features from"
        )
    if tx.get("ts_min") is None:  # counts of an ingest from before the range was recorded
        return
    start, end = pd.Timestamp(tx["ts_min"]), pd.Timestamp(tx["ts_max"])
    horizon = pd.Timedelta(days=cfg.features.horizon_days)
    latest = end - horizon
    span = f"the accepted transactions run from {start.date()} to {end.date()}"
    if latest <= start:
        raise DataRangeError(
            f"features.horizon_days {cfg.features.horizon_days} leaves no time before the "
            f"horizon: {span} ({(end - start).days} days)"
        )
    if cfg.features.cutoff is None:
        return
    cutoff = to_utc_timestamp(cfg.features.cutoff)
    if not start < cutoff <= latest:
        raise DataRangeError(
            f"features.cutoff {cfg.features.cutoff} must lie after the start of the data and at "
            f"most features.horizon_days {cfg.features.horizon_days} before its end, in "
            f"({start.date()}, {latest.date()}]: {span}"
        )


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


def open_customers(
    cfg: Config, storage: Storage, rules: RowRules | None = None
) -> CustomersInput | None:
    """The configured customers table (`data.customers`, or Online Retail's derived one), or
    None. Fails at the door (ContractError / InputError naming the file and column) on a
    missing `customer_id` column, a `data.customer_attributes` name the table lacks, or a bad
    file. A `data.customers` table is read and validated by ingest's own reader."""
    d = cfg.data
    if d.customers is not None:
        parts, columns = plan_parts(
            d.customers, storage, cfg.ingest.block_rows, cfg.ingest.on_bad_file
        )
        check_columns("customers", columns, d.customers)
        attributes = customer_attributes(columns, d.customer_attributes, d.customers)
        validated = validated_parts(
            parts, "customers", d.customers, cfg, storage, rules or row_rules(cfg), attributes
        )
        return CustomersInput(d.customers, attributes, validated, derived=False)
    if d.source == "online_retail_csv" and d.transactions is not None:
        columns = [CUSTOMER_KEY, *adapters.ONLINE_RETAIL_ATTRIBUTES]
        attributes = customer_attributes(columns, d.customer_attributes, d.transactions)
        parts, _ = plan_parts(
            d.transactions, storage, cfg.ingest.block_rows, cfg.ingest.on_bad_file
        )
        lines = _parts_dataset(parts).map_batches(
            _read_raw,
            batch_size=1,
            batch_format="pyarrow",
            fn_kwargs={
                "uri": d.transactions,
                "storage": storage,
                "on_bad_file": cfg.ingest.on_bad_file,
            },
        )
        derived = adapters.online_retail_customers(
            lines, d.transactions, cfg.features.num_partitions
        )
        return CustomersInput(d.transactions, attributes, derived, derived=True)
    return None


def _validate_customers(batch: pa.Table, attributes: list[str], rules: RowRules) -> pa.Table:
    return validate_customers_table(batch, attributes, rules)


def ingest_customers(
    customers: CustomersInput,
    cfg: Config,
    storage: Storage,
    run_dir: str,
    rules: RowRules | None = None,
) -> TableCounts:
    """Validate the customers table into `ingest/customers` and `rejects/customers`.

    Like the other tables, the validated rows are staged once under `<run_dir>/tmp/` and
    split from there, so the duplicate shuffle (or, for a derived table, the CSV read and
    groupby) runs once. A derived table has one row per CustomerID by construction, so it
    skips the duplicate shuffle; its `rows_in` is that number of rows.
    """
    rules = rules or row_rules(cfg)
    schema = customers_schema(customers.attributes)
    validated = customers.dataset
    if customers.derived:
        validated = validated.map_batches(
            _validate_customers,
            batch_format="pyarrow",
            fn_kwargs={"attributes": customers.attributes, "rules": rules},
        )
    else:
        # Uniqueness needs every row of an id in one block (as for reviews). Customers have no
        # time, so the row kept is the one whose attribute values sort first.
        validated = validated.repartition(
            cfg.features.num_partitions, keys=[CUSTOMER_KEY]
        ).map_batches(
            _mark_duplicates,
            batch_size=None,
            batch_format="pyarrow",
            fn_kwargs={"key": CUSTOMER_KEY, "order_by": tuple(customers.attributes)},
        )
    return write_split("customers", validated, schema, customers.source_uri, cfg, storage, run_dir)


def ingest(cfg: Config, storage: Storage, run_dir: str) -> dict[str, dict]:
    """Ingest every configured table; returns `{table: counts}` for metrics.json.

    Fails before any work on a bad customers config, an unset HMAC key, or a bad file
    (unless `ingest.on_bad_file: skip`).
    """
    rules = row_rules(cfg)
    customers = open_customers(cfg, storage, rules)  # a bad customers input fails before work
    out = {}
    for table in ("transactions", "reviews"):
        if getattr(cfg.data, table) is None:
            continue
        out[table] = ingest_table(table, cfg, storage, run_dir, rules).as_dict()
    if customers is not None:
        out["customers"] = ingest_customers(customers, cfg, storage, run_dir, rules).as_dict()
    else:
        # build_features joins whatever is there: a table from an earlier config must go.
        storage.delete_dir(join(run_dir, "ingest", "customers"))
    return out
