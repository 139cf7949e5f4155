"""Per-customer behavioural features and labels under the cutoff / horizon protocol.

Features see only events with `ts < cutoff`; labels only `[cutoff, cutoff + horizon)`. The
population is every customer with at least one purchase before the cutoff.

Ray Data shape: transactions and reviews are unioned into one event stream, hash-partitioned
by `customer_id` (every event of a customer lands in one block) and reduced per block with
vectorised pandas (`customer_features`), so memory per task is one block whatever the row
count, and nothing row-level reaches the driver.
"""

from __future__ import annotations

import hashlib
import re

import numpy as np
import pandas as pd
import pyarrow as pa

from clvray.config import Config
from clvray.io import read_parquet, write_parquet
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
DAY = pd.Timedelta(days=1)
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
    """Stable split by a hash of `customer_id`: the same customer lands in the same split on
    every run, machine and Python version (blake2b, not Python's salted `hash`)."""
    u = np.array(
        [
            int.from_bytes(hashlib.blake2b(str(c).encode(), digest_size=8).digest(), "big") / 2**64
            for c in customer_ids
        ],
        dtype="float64",
    )
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


def _events_block(batch: pd.DataFrame, kind: str) -> pa.Table:
    # One fixed schema for both kinds: the shuffle concatenates their blocks.
    return pa.Table.from_pandas(to_events(batch, kind), schema=EVENT_SCHEMA, preserve_index=False)


def customer_features(
    events: pd.DataFrame,
    cutoff: pd.Timestamp,
    horizon_days: int,
    valid_share: float = 0.15,
    test_share: float = 0.2,
) -> pd.DataFrame:
    """Features and labels for every customer in `events` (all events of each customer).

    Orders are the distinct `order_id`s with positive net value; the order's time is its
    first line's time. Refunds are negative amounts. `frequency` is repeat orders
    (n_orders - 1) and `recency_days` the age at the last order, as in the BTYD literature.
    """
    cutoff = as_utc(cutoff)
    horizon_end = cutoff + pd.Timedelta(days=horizon_days)
    ts = pd.to_datetime(events["ts"], utc=True)
    events = events.assign(ts=ts)
    past = events[events["ts"] < cutoff]
    future = events[(events["ts"] >= cutoff) & (events["ts"] < horizon_end)]

    tx = past[past["kind"] == "t"]
    orders = (
        tx.groupby(["customer_id", "order_id"], sort=False)
        .agg(ts=("ts", "min"), value=("amount", "sum"), gross=("amount", lambda a: a[a > 0].sum()))
        .reset_index()
    )
    orders = orders[orders["gross"] > 0].sort_values(["customer_id", "ts"])
    if orders.empty:
        return _empty_features()
    g = orders.groupby("customer_id", sort=False)
    first = g["ts"].min()
    last = g["ts"].max()
    out = pd.DataFrame({"n_orders": g.size()})
    out["frequency"] = out["n_orders"] - 1
    out["recency_days"] = (last - first) / DAY
    out["T_days"] = (cutoff - first) / DAY
    out["days_since_last"] = (cutoff - last) / DAY
    out["monetary"] = g["value"].mean()
    # Mean value of repeat orders (all but the first), the Gamma-Gamma convention; 0 with none.
    rank = g.cumcount()
    out["monetary_repeat"] = orders[rank > 0].groupby("customer_id")["value"].mean()
    out["monetary_repeat"] = out["monetary_repeat"].fillna(0.0)
    out["total_value"] = tx.groupby("customer_id")["amount"].sum()
    recent = orders[orders["ts"] >= cutoff - pd.Timedelta(days=horizon_days)]
    out["value_last_horizon"] = recent.groupby("customer_id")["value"].sum()
    out["orders_last_horizon"] = recent.groupby("customer_id").size()
    gaps = (
        orders.assign(gap=g["ts"].diff() / DAY).dropna(subset=["gap"]).groupby("customer_id")["gap"]
    )
    out["gap_mean_days"] = gaps.mean()
    out["gap_std_days"] = gaps.std()
    out["gap_max_days"] = gaps.max()
    out["gap_last_days"] = gaps.last()
    refunds = tx[tx["amount"] < 0].groupby("customer_id")["amount"]
    gross = tx[tx["amount"] > 0].groupby("customer_id")["amount"].sum()
    out["refund_share"] = (-refunds.sum() / gross).reindex(out.index).fillna(0.0)
    out["n_refunds"] = refunds.size()

    rv = past[past["kind"] == "r"]
    rg = rv.groupby("customer_id")
    out["review_count"] = rg.size()
    out["mean_rating"] = rg["rating"].mean()
    out["min_rating"] = rg["rating"].min()
    out["days_since_last_review"] = (cutoff - rg["ts"].max()) / DAY
    for col in ("value_last_horizon", "orders_last_horizon", "n_refunds", "review_count"):
        out[col] = out[col].fillna(0)

    ftx = future[future["kind"] == "t"]
    fut_orders = ftx.groupby(["customer_id", "order_id"])["amount"].sum()
    fut_orders = fut_orders[fut_orders > 0].groupby("customer_id").size()
    out["future_value"] = ftx.groupby("customer_id")["amount"].sum().reindex(out.index).fillna(0.0)
    out["future_purchases"] = fut_orders.reindex(out.index).fillna(0).astype("int64")
    out["churned"] = (out["future_purchases"] == 0).astype("int64")

    out = out.reset_index()
    out["split"] = split_of(out["customer_id"], valid_share, test_share)
    return _typed(out)


def _empty_features() -> pd.DataFrame:
    cols = {"customer_id": pd.Series(dtype=object)}
    cols.update({c: pd.Series(dtype="float64") for c in FEATURES})
    cols.update(
        {"future_value": pd.Series(dtype="float64"), "future_purchases": pd.Series(dtype="int64")}
    )
    cols.update({"churned": pd.Series(dtype="int64"), "split": pd.Series(dtype=object)})
    return pd.DataFrame(cols)


def _typed(df: pd.DataFrame) -> pd.DataFrame:
    df = df[["customer_id", *FEATURES, *LABELS, "split"]].copy()
    for c in FEATURES + ["future_value"]:
        df[c] = df[c].astype("float64")
    return df


def _features_block(batch: pd.DataFrame, cutoff, horizon_days, valid_share, test_share) -> pa.Table:
    df = customer_features(batch, cutoff, horizon_days, valid_share, test_share)
    return pa.Table.from_pandas(df, preserve_index=False, schema=FEATURE_SCHEMA)


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


def as_utc(ts) -> pd.Timestamp:
    """A timestamp in UTC; a naive one (Ray aggregates drop the zone) is taken as UTC."""
    ts = pd.Timestamp(ts)
    return ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")


def build_features(cfg: Config, storage: Storage, run_dir: str, cutoff: pd.Timestamp):
    """Write `features/customers` (one row per customer, features + labels + split, and a
    `cat_*` column per attribute of the ingested customers table when there is one)."""
    f = cfg.features
    events = read_parquet(join(run_dir, "ingest", "transactions"), storage).map_batches(
        _events_block, batch_format="pandas", fn_kwargs={"kind": "t"}
    )
    reviews_uri = join(run_dir, "ingest", "reviews")
    if storage.exists(reviews_uri):
        reviews = read_parquet(
            reviews_uri, storage, columns=["customer_id", "ts", "order_id", "rating"]
        )
        events = events.union(
            reviews.map_batches(_events_block, batch_format="pandas", fn_kwargs={"kind": "r"})
        )
    customers = events.repartition(f.num_partitions, keys=["customer_id"]).map_batches(
        _features_block,
        batch_size=None,
        batch_format="pandas",
        fn_kwargs={
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
    # silently); evaluate puts them in metrics.json.
    storage.write_json(
        join(run_dir, "features", POPULATION_FILE),
        count_population(events, cutoff, f.num_partitions),
    )
    return out


POPULATION_FILE = "population.json"
OUTSIDE_REASONS = (
    "only_zero_amount_orders",
    "only_refunds",
    "only_zero_amount_orders_and_refunds",
    "only_reviews",
    "no_events_before_cutoff",
)
"""Why a customer seen in the input is outside the population at a cutoff, first match wins
in this order of checks: no event before the cutoff; only reviews before it; transactions
before it, none of them with a positive amount (zero-amount orders only, refunds only, or
both). A zero-amount order is not a purchase here: it carries no money, so it neither makes
a customer part of the population, nor counts in `frequency`, nor stops `churned`."""


def _population_flags(batch: pd.DataFrame, cutoff: pd.Timestamp) -> pd.DataFrame:
    """Per event: which kinds of evidence it gives about its customer before the cutoff."""
    past = (pd.to_datetime(batch["ts"], utc=True) < cutoff).to_numpy()
    tx = (batch["kind"] == "t").to_numpy()
    amount = batch["amount"].to_numpy("float64")
    return pd.DataFrame(
        {
            "customer_id": batch["customer_id"].to_numpy(),
            "positive": (past & tx & (amount > 0)).astype("int8"),
            "zero": (past & tx & (amount == 0)).astype("int8"),
            "refund": (past & tx & (amount < 0)).astype("int8"),
            "review": (past & ~tx).astype("int8"),
        }
    )


def population_reason(flags: pd.DataFrame) -> pd.DataFrame:
    """`reason` per customer from their `max(...)` flags: `in_population` or an
    `OUTSIDE_REASONS` entry."""
    pos, zero = flags["max(positive)"] > 0, flags["max(zero)"] > 0
    refund, review = flags["max(refund)"] > 0, flags["max(review)"] > 0
    reason = np.select(
        [pos, zero & refund, zero, refund, review],
        [
            "in_population",
            "only_zero_amount_orders_and_refunds",
            "only_zero_amount_orders",
            "only_refunds",
            "only_reviews",
        ],
        default="no_events_before_cutoff",
    )
    return pd.DataFrame({"reason": reason})


def count_population(events, cutoff: pd.Timestamp, num_partitions: int) -> dict[str, int]:
    """Customers of the `events` dataset by population reason: `{"customers_seen": n,
    "in_population": n, <reason>: n, ...}`; every reason key is present and they add up to
    `customers_seen`. Cost: one pass over the events and a hash groupby of four int8 flags
    per event (one row per customer after it); one row per reason reaches the driver."""
    from ray.data.aggregate import Max

    per_customer = (
        events.map_batches(
            _population_flags, batch_format="pandas", fn_kwargs={"cutoff": as_utc(cutoff)}
        )
        .groupby("customer_id", num_partitions=num_partitions)
        .aggregate(Max("positive"), Max("zero"), Max("refund"), Max("review"))
    )
    counts = (
        per_customer.map_batches(population_reason, batch_format="pandas")
        .groupby("reason")
        .count()
        .to_pandas()
    )
    by_reason = dict(zip(counts["reason"], counts["count()"].astype(int), strict=True))
    out = {r: int(by_reason.get(r, 0)) for r in ("in_population", *OUTSIDE_REASONS)}
    return {"customers_seen": sum(out.values()), **out}


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
