"""Per-customer behavioural features and labels under the cutoff / horizon protocol.

Features see only events with `ts < cutoff`; labels only `[cutoff, cutoff + horizon)`. The
population is every customer with at least one purchase before the cutoff.

Ray Data shape: transactions and reviews are unioned into one event stream, hash-partitioned
by `customer_id` (every event of a customer lands in one block) and reduced per block with
vectorised pandas (`customer_features`), so memory per task is one block whatever the row
count, and nothing row-level reaches the driver.
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from clvray.config import Config
from clvray.contract import as_utc, unit_hash
from clvray.io import count_rows, read_parquet, write_parquet
from clvray.storage import Storage, join

SPLITS = ("train", "valid", "test")

FEATURES = [
    "frequency",
    "recency_days",
    "T_days",
    "days_since_last",
    "n_orders",
    "monetary",
    "monetary_repeat",
    "total_value",
    "value_last_horizon",
    "orders_last_horizon",
    "gap_mean_days",
    "gap_std_days",
    "gap_max_days",
    "gap_last_days",
    "refund_share",
    "n_refunds",
    "review_count",
    "mean_rating",
    "min_rating",
    "days_since_last_review",
]
LABELS = ["future_value", "future_purchases", "churned"]
CATEGORICAL_PREFIX = "cat_"
"""Columns named `cat_<attribute>` come from the customers table: strings, used as categorical
features (XGBoost's native categorical splits), null for a customer the table lacks."""


def categorical_name(attribute: str) -> str:
    """Feature name of a customers-table attribute: `Country` -> `cat_country`. Characters
    other than letters, digits and `_` become `_` (XGBoost rejects `[`, `]`, `<` in names)."""
    return CATEGORICAL_PREFIX + re.sub(r"[^0-9a-z_]", "_", attribute.lower())


def categorical_columns(columns: list[str]) -> list[str]:
    """The categorical feature columns among `columns`, in their order."""
    return [c for c in columns if c.startswith(CATEGORICAL_PREFIX)]


def split_of(
    customer_ids: pd.Series | list[str], valid_share: float, test_share: float
) -> np.ndarray:
    """Stable split by the one stable hash of `customer_id` (`contract.unit_hash`): the same
    customer lands in the same split on every run, machine and Python version."""
    u = unit_hash(customer_ids, "split")
    return np.where(
        u < test_share, "test", np.where(u < test_share + valid_share, "valid", "train")
    )


EVENT_SCHEMA = pa.schema(
    [
        ("customer_id", pa.string()),
        ("ts", pa.timestamp("us", tz="UTC")),
        ("order_id", pa.string()),
        ("amount", pa.float64()),
        ("rating", pa.float64()),
        ("kind", pa.string()),
    ]
)


def to_events(batch: pd.DataFrame, kind: str) -> pd.DataFrame:
    """Project a transactions or reviews batch onto the common event columns."""
    n = len(batch)
    return pd.DataFrame(
        {
            "customer_id": batch["customer_id"].astype(object),
            "ts": batch["ts"],
            "order_id": batch["order_id"].astype(object) if "order_id" in batch else [None] * n,
            "amount": batch["amount"].astype("float64") if kind == "t" else np.zeros(n),
            "rating": batch["rating"].astype("float64") if kind == "r" else np.full(n, np.nan),
            "kind": np.full(n, kind, dtype=object),
        }
    )


def customer_features(
    events: pd.DataFrame | pa.Table,
    cutoff: pd.Timestamp,
    horizon_days: int,
    valid_share: float = 0.15,
    test_share: float = 0.2,
) -> pd.DataFrame:
    """Features and labels for every customer in `events` (all events of each customer), one
    row per customer sorted by `customer_id`.

    Orders are the distinct `order_id`s with positive gross value (the sum of their positive
    lines); the order's time is its first line's time. Refunds are negative amounts.
    `frequency` is repeat orders (n_orders - 1) and `recency_days` the age at the last order,
    as in the BTYD literature. Vectorised: one polars plan over the whole block.
    """
    table = events if isinstance(events, pa.Table) else _events_table(events)
    df = features_frame(table, cutoff, horizon_days, valid_share, test_share)
    return _typed(df.to_pandas())


def _events_table(events: pd.DataFrame) -> pa.Table:
    frame = events.assign(ts=pd.to_datetime(events["ts"], utc=True))
    return pa.Table.from_pandas(
        frame[EVENT_SCHEMA.names], schema=EVENT_SCHEMA, preserve_index=False
    )


def features_frame(
    events: pa.Table,
    cutoff: pd.Timestamp,
    horizon_days: int,
    valid_share: float = 0.15,
    test_share: float = 0.2,
):
    """`customer_features` as a polars DataFrame (columns in `FEATURE_SCHEMA` order)."""
    import polars as pl

    ev = pl.from_arrow(events)
    assert isinstance(ev, pl.DataFrame)
    ev = ev.with_columns(pl.col("ts").dt.cast_time_unit("us").dt.convert_time_zone("UTC"))
    tx = ev.filter(pl.col("kind") == "t").lazy()
    rv = ev.filter(pl.col("kind") == "r").lazy()
    out = feature_plan(tx, rv, as_utc(cutoff), horizon_days).collect()
    return _with_split(out, valid_share, test_share)


def _with_split(frame, valid_share: float, test_share: float):
    import polars as pl

    split = split_of(frame["customer_id"].to_arrow(), valid_share, test_share)
    return frame.with_columns(split=pl.Series(split, dtype=pl.String))


def feature_plan(tx, rv, cutoff: pd.Timestamp, horizon_days: int):
    """The polars plan of every feature and label: `tx` (customer_id, order_id, ts, amount)
    and `rv` (customer_id, ts, rating) LazyFrames in, one row per customer out. The same plan
    runs per block inside Ray (`customer_features`) and over a whole table in one process
    (`bench/ingest_features.py`), so both compute exactly the same thing."""
    import polars as pl

    cut = pl.lit(cutoff.to_pydatetime()).dt.cast_time_unit("us")
    horizon = pl.duration(days=horizon_days)
    day_us = 86_400 * 1_000_000

    def days(expr):
        return expr.dt.total_microseconds().cast(pl.Float64) / day_us

    past_tx = tx.filter(pl.col("ts") < cut)
    # Ties in time are broken by order_id, so "the first order" never depends on row order.
    orders = (
        past_tx.group_by("customer_id", "order_id")
        .agg(
            ts=pl.col("ts").min(),
            value=pl.col("amount").sum(),
            gross=pl.col("amount").clip(lower_bound=0.0).sum(),
        )
        .filter(pl.col("gross") > 0)
        .sort("customer_id", "ts", "order_id")
        .with_columns(
            gap=days(pl.col("ts").diff().over("customer_id")),
            rank=pl.int_range(pl.len()).over("customer_id"),
        )
    )
    recent = pl.col("ts") >= cut - horizon
    per_customer = orders.group_by("customer_id").agg(
        n_orders=pl.len().cast(pl.Float64),
        first=pl.col("ts").min(),
        last=pl.col("ts").max(),
        monetary=pl.col("value").mean(),
        monetary_repeat=pl.col("value").filter(pl.col("rank") > 0).mean(),
        value_last_horizon=pl.col("value").filter(recent).sum(),
        orders_last_horizon=recent.sum().cast(pl.Float64),
        gap_mean_days=pl.col("gap").drop_nulls().mean(),
        gap_std_days=pl.col("gap").drop_nulls().std(),
        gap_max_days=pl.col("gap").drop_nulls().max(),
        gap_last_days=pl.col("gap").drop_nulls().last(),
    )
    lines = past_tx.group_by("customer_id").agg(
        total_value=pl.col("amount").sum(),
        refunds=-pl.col("amount").filter(pl.col("amount") < 0).sum(),
        gross_lines=pl.col("amount").filter(pl.col("amount") > 0).sum(),
        n_refunds=(pl.col("amount") < 0).sum().cast(pl.Float64),
    )
    reviews = (
        rv.filter(pl.col("ts") < cut)
        .group_by("customer_id")
        .agg(
            review_count=pl.len().cast(pl.Float64),
            mean_rating=pl.col("rating").cast(pl.Float64).mean(),
            min_rating=pl.col("rating").cast(pl.Float64).min(),
            last_review=pl.col("ts").max(),
        )
    )
    future_tx = tx.filter((pl.col("ts") >= cut) & (pl.col("ts") < cut + horizon))
    future = future_tx.group_by("customer_id").agg(future_value=pl.col("amount").sum())
    future_orders = (
        future_tx.group_by("customer_id", "order_id")
        .agg(v=pl.col("amount").sum())
        .filter(pl.col("v") > 0)
        .group_by("customer_id")
        .agg(future_purchases=pl.len().cast(pl.Int64))
    )
    return (
        per_customer.join(lines, on="customer_id", how="left")
        .join(reviews, on="customer_id", how="left")
        .join(future, on="customer_id", how="left")
        .join(future_orders, on="customer_id", how="left")
        .with_columns(
            frequency=pl.col("n_orders") - 1,
            recency_days=days(pl.col("last") - pl.col("first")),
            T_days=days(cut - pl.col("first")),
            days_since_last=days(cut - pl.col("last")),
            monetary_repeat=pl.col("monetary_repeat").fill_null(0.0),
            refund_share=(pl.col("refunds") / pl.col("gross_lines")).fill_null(0.0),
            days_since_last_review=days(cut - pl.col("last_review")),
            review_count=pl.col("review_count").fill_null(0.0),
            future_value=pl.col("future_value").fill_null(0.0),
            future_purchases=pl.col("future_purchases").fill_null(0),
        )
        .with_columns(churned=(pl.col("future_purchases") == 0).cast(pl.Int64))
        .select(
            "customer_id",
            *[pl.col(c).cast(pl.Float64) for c in FEATURES],
            pl.col("future_value").cast(pl.Float64),
            "future_purchases",
            "churned",
        )
        .sort("customer_id")
    )


def _typed(df: pd.DataFrame) -> pd.DataFrame:
    df = df[["customer_id", *FEATURES, *LABELS, "split"]].copy()
    for c in FEATURES + ["future_value"]:
        df[c] = df[c].astype("float64")
    return df


FEATURE_SCHEMA = pa.schema(
    [("customer_id", pa.string())]
    + [(c, pa.float64()) for c in FEATURES]
    + [
        ("future_value", pa.float64()),
        ("future_purchases", pa.int64()),
        ("churned", pa.int64()),
        ("split", pa.string()),
    ]
)


def resolve_cutoff(cfg: Config, storage: Storage, run_dir: str) -> pd.Timestamp:
    """The configured cutoff, or the end of the transactions minus one horizon."""
    if cfg.features.cutoff is not None:
        return pd.Timestamp(cfg.features.cutoff, tz="UTC")
    end = read_parquet(join(run_dir, "ingest", "transactions"), storage, columns=["ts"]).max("ts")
    return (as_utc(end) - pd.Timedelta(days=cfg.features.horizon_days)).normalize()


STAGED = {
    "transactions": pa.schema(
        [
            ("customer_id", pa.string()),
            ("order_id", pa.string()),
            ("ts", pa.timestamp("us", tz="UTC")),
            ("amount", pa.float64()),
        ]
    ),
    "reviews": pa.schema(
        [
            ("customer_id", pa.string()),
            ("ts", pa.timestamp("us", tz="UTC")),
            ("rating", pa.float64()),
        ]
    ),
}
"""What the feature plan reads of each ingested table, as staged by customer bucket."""


def customer_bucket(customer_ids, n_buckets: int) -> np.ndarray:
    """Bucket of each customer in [0, n_buckets): every event of a customer, in any table,
    lands in the same bucket (the stable hash with its own salt: independent of the split)."""
    return (unit_hash(customer_ids, "bucket") * n_buckets).astype(np.int32)


def _stage_block(batch: pa.Table, table: str, n_buckets: int) -> pa.Table:
    schema = STAGED[table]
    cols = {f.name: pc.cast(batch[f.name], f.type) for f in schema}
    cols["bucket"] = pa.array(customer_bucket(batch["customer_id"], n_buckets))
    return pa.table(cols)


def _read_bucket(uri: str, bucket: int, schema: pa.Schema, storage: Storage) -> pa.Table:
    import pyarrow.dataset as pads

    fs, path = storage.filesystem(join(uri, f"bucket={bucket}"))
    files = [f for f in storage.list_files(join(uri, f"bucket={bucket}")) if f.endswith(".parquet")]
    if not files:
        return schema.empty_table()
    return pads.dataset(files, schema=schema, filesystem=fs, format="parquet").to_table()


def _bucket_features(
    batch: pa.Table,
    staged: str,
    storage: Storage,
    cutoff: pd.Timestamp,
    horizon_days: int,
    valid_share: float,
    test_share: float,
) -> pa.Table:
    """Features of every customer of the buckets in `batch` (one bucket per task): reads the
    bucket's transactions and reviews, runs the feature plan, returns one row per customer."""
    import polars as pl

    parts = []
    for bucket in batch["bucket"].to_pylist():
        tx = _read_bucket(join(staged, "transactions"), bucket, STAGED["transactions"], storage)
        rv = _read_bucket(join(staged, "reviews"), bucket, STAGED["reviews"], storage)
        frame = pl.from_arrow(tx)
        reviews = pl.from_arrow(rv)
        assert isinstance(frame, pl.DataFrame) and isinstance(reviews, pl.DataFrame)
        out = feature_plan(frame.lazy(), reviews.lazy(), as_utc(cutoff), horizon_days).collect()
        out = _with_split(out, valid_share, test_share)
        parts.append(out.to_arrow().cast(FEATURE_SCHEMA))
        counts = population_counts(frame.lazy(), reviews.lazy(), as_utc(cutoff))
        storage.write_json(join(staged, "_population", f"bucket={bucket}.json"), counts)
        splits = out["split"].value_counts()
        storage.write_json(
            join(staged, "_splits", f"bucket={bucket}.json"),
            dict(zip(splits["split"].to_list(), splits["count"].to_list(), strict=True)),
        )
    return pa.concat_tables(parts) if parts else FEATURE_SCHEMA.empty_table()


POPULATION_FILE = "population.json"
OUTSIDE_REASONS = (
    "only_zero_amount_orders",
    "only_refunds",
    "only_zero_amount_orders_and_refunds",
    "only_reviews",
    "no_events_before_cutoff",
)
"""Why a customer seen in the input is outside the population at a cutoff (first match wins,
in this order): a positive transaction line before the cutoff puts them in; else transactions
with no positive amount (zero-amount orders, refunds, or both); else only reviews; else no
event before the cutoff at all. A zero-amount order is not a purchase: it carries no money, so
it neither makes a customer part of the population, nor counts in `frequency`, nor stops
`churned` (the BTYD literature counts transactions; clvray counts purchases that carry value)."""


def population_counts(tx, rv, cutoff: pd.Timestamp) -> dict[str, int]:
    """Customers seen in `tx` / `rv` (LazyFrames) by population reason; the keys add up to
    `customers_seen`. Vectorised: two group-bys and a join, one row per reason out."""
    import polars as pl

    cut = pl.lit(cutoff.to_pydatetime()).dt.cast_time_unit("us")
    past = pl.col("ts") < cut
    flags_tx = tx.group_by("customer_id").agg(
        positive=(past & (pl.col("amount") > 0)).any(),
        zero=(past & (pl.col("amount") == 0)).any(),
        refund=(past & (pl.col("amount") < 0)).any(),
    )
    flags_rv = rv.group_by("customer_id").agg(review=past.any())
    both = flags_tx.join(flags_rv, on="customer_id", how="full", coalesce=True).fill_null(False)
    reason = (
        pl.when(pl.col("positive"))
        .then(pl.lit("in_population"))
        .when(pl.col("zero") & pl.col("refund"))
        .then(pl.lit("only_zero_amount_orders_and_refunds"))
        .when(pl.col("zero"))
        .then(pl.lit("only_zero_amount_orders"))
        .when(pl.col("refund"))
        .then(pl.lit("only_refunds"))
        .when(pl.col("review"))
        .then(pl.lit("only_reviews"))
        .otherwise(pl.lit("no_events_before_cutoff"))
    )
    grouped = both.select(reason.alias("reason")).group_by("reason").len().collect()
    found = dict(zip(grouped["reason"].to_list(), grouped["len"].to_list(), strict=True))
    out = {r: int(found.get(r, 0)) for r in ("in_population", *OUTSIDE_REASONS)}
    return {"customers_seen": sum(out.values()), **out}


SPLITS_FILE = "splits.json"
SPLITS = ("train", "valid", "test")
"""`features/splits.json`: customers of the customer table per split, counted by the tasks that
wrote it, so later stages know them without reading the table again."""


def _sum_buckets(staged: str, folder: str, storage: Storage, n_buckets: int) -> dict[str, int]:
    """The sum of the per-bucket count files `<staged>/<folder>/bucket=k.json`."""
    total: dict[str, int] = {}
    for bucket in range(n_buckets):
        counts = storage.read_json(join(staged, folder, f"bucket={bucket}.json"))
        for k, v in counts.items():
            total[k] = total.get(k, 0) + int(v)
    return total


def feature_buckets(rows: int, cfg_features) -> int:
    """Customer buckets of the features stage: at least `num_partitions`, and enough that a
    bucket holds about `rows_per_partition` events, so a task's memory does not grow with the
    data."""
    return max(cfg_features.num_partitions, -(-rows // cfg_features.rows_per_partition))


def build_features(cfg: Config, storage: Storage, run_dir: str, cutoff: pd.Timestamp):
    """Write `features/customers` (one row per customer, features + labels + split, and a
    `cat_*` column per attribute of the ingested customers table when there is one).

    No shuffle: each ingested table is staged once under `features/_staged/<table>/bucket=k/`
    (every block writes its rows of each bucket, a map-side partitioned write), then one task
    per bucket reads that bucket's transactions and reviews and runs the feature plan. Cost:
    one read and one write of the events plus one read; memory per task is one bucket.
    """
    import ray.data

    f = cfg.features
    staged = join(run_dir, "features", "_staged")
    storage.delete_dir(staged)
    rows = 0
    tables = {}
    for table in ("transactions", "reviews"):
        uri = join(run_dir, "ingest", table)
        if storage.exists(uri):
            tables[table] = uri
            rows += count_rows(uri, storage)
    n_buckets = feature_buckets(rows, f)
    for table, uri in tables.items():
        staged_ds = read_parquet(uri, storage, columns=STAGED[table].names).map_batches(
            _stage_block, batch_format="pyarrow", fn_kwargs={"table": table, "n_buckets": n_buckets}
        )
        fs, path = storage.filesystem(join(staged, table))
        staged_ds.write_parquet(path, filesystem=fs, partition_cols=["bucket"])
    buckets = ray.data.from_items(
        [{"bucket": b} for b in range(n_buckets)], override_num_blocks=n_buckets
    )
    customers = buckets.map_batches(
        _bucket_features,
        batch_size=1,
        batch_format="pyarrow",
        fn_kwargs={
            "staged": staged,
            "storage": storage,
            "cutoff": cutoff,
            "horizon_days": f.horizon_days,
            "valid_share": f.valid_share,
            "test_share": f.test_share,
        },
    )
    customers = _with_customer_attributes(customers, storage, run_dir, f.num_partitions)
    out = join(run_dir, "features", "customers")
    write_parquet(customers, out, storage)
    # Customers seen in the input but outside the population, by reason (never dropped
    # silently): one small file per bucket, summed here; evaluate puts them in metrics.json.
    population = _sum_buckets(staged, "_population", storage, n_buckets)
    storage.write_json(join(run_dir, "features", POPULATION_FILE), population)
    splits = _sum_buckets(staged, "_splits", storage, n_buckets)
    splits = {s: splits.get(s, 0) for s in SPLITS}
    written = count_rows(out, storage)
    if not sum(splits.values()) == population.get("in_population", 0) == written:
        raise RuntimeError(
            f"features: {written} customer rows written, but the buckets counted "
            f"{population.get('in_population', 0)} in the population and {splits} by split"
        )
    storage.write_json(join(run_dir, "features", SPLITS_FILE), splits)
    storage.delete_dir(staged)
    return out


def split_counts(storage: Storage, run_dir: str) -> dict[str, int]:
    """Customers per split of `<run_dir>/features/customers`: `features/splits.json`, or for a
    run whose features stage predates that file, one pass over the `split` column."""
    uri = join(run_dir, "features", SPLITS_FILE)
    if storage.exists(uri):
        return {k: int(v) for k, v in storage.read_json(uri).items()}
    ds = read_parquet(join(run_dir, "features", "customers"), storage, columns=["split"])
    per_block = ds.map_batches(_split_value_counts, batch_format="pyarrow").to_pandas()
    found = per_block.groupby("split")["n"].sum()
    return {s: int(found.get(s, 0)) for s in SPLITS}


def _split_value_counts(batch: pa.Table) -> pa.Table:
    counts = pc.value_counts(batch["split"])
    return pa.table(
        {
            "split": counts.field("values").cast(pa.string()),
            "n": counts.field("counts").cast(pa.int64()),
        }
    )


def _with_customer_attributes(customers, storage: Storage, run_dir: str, num_partitions: int):
    """Left-join the ingested customers table's attributes as `cat_*` columns (a hash join:
    both sides shuffled by customer_id, one partition per task)."""
    table_uri = join(run_dir, "ingest", "customers")
    if not storage.exists(table_uri):
        return customers
    table = read_parquet(table_uri, storage)
    attributes = [c for c in table.columns() if c != "customer_id"]
    if not attributes:
        return customers
    table = table.rename_columns({a: categorical_name(a) for a in attributes})
    return customers.join(
        table, join_type="left_outer", num_partitions=num_partitions, on=("customer_id",)
    )
