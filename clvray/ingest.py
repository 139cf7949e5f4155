"""Ingest: read each source table, map it to the contract, split accepted rows from rejects.

Accepted rows go to `<run>/ingest/<table>/`, rejected rows with the rule they broke to
`<run>/rejects/<table>/`. The counts `rows_in = rows_accepted + rows_rejected` are checked,
not assumed: `rows_in` is counted on the input, the other two on what was written.

Cost at scale: the validation runs as Ray Data tasks, streaming; accepted rows and rejects
are written by two passes over the input (the second pass is usually cheap next to the
rest of the pipeline). Reviews are shuffled by `review_id` to enforce uniqueness.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import pandas as pd

from clvray import adapters
from clvray.config import Config
from clvray.contract import (
    REASON,
    REJECTS,
    SCHEMAS,
    check_columns,
    mark_duplicates,
    to_contract,
    to_rejects,
)
from clvray.contract import validate_reviews as _validate_reviews
from clvray.contract import validate_transactions as _validate_transactions
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


def _accepted(batch: pd.DataFrame, table: str):
    return to_contract(batch[batch[REASON].isna()], table)


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
    accepted_uri = join(run_dir, "ingest", table)
    rejects_uri = join(run_dir, "rejects", table)
    accepted = validated.map_batches(_accepted, batch_format="pandas", fn_kwargs={"table": table})
    rejected = validated.map_batches(_rejected, batch_format="pandas", fn_kwargs={"table": table})
    write_parquet(accepted, accepted_uri, storage, schema=SCHEMAS[table])
    write_parquet(rejected, rejects_uri, storage, schema=REJECTS)

    rows_accepted = count_rows(accepted_uri, storage)
    rows_rejected = count_rows(rejects_uri, storage)
    by_reason: dict[str, int] = {}
    if rows_rejected:
        grouped = read_parquet(rejects_uri, storage).groupby("reason").count().to_pandas()
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


def ingest(cfg: Config, storage: Storage, run_dir: str) -> dict[str, dict]:
    """Ingest every configured table; returns `{table: counts}` for metrics.json."""
    out = {}
    for table in ("transactions", "reviews"):
        if getattr(cfg.data, table) is None:
            continue
        out[table] = ingest_table(table, cfg, storage, run_dir).as_dict()
    return out
