"""The fine-tuning set: which reviews, which label, which split; built with Ray Data.

Row-level transforms are plain pyarrow functions (unit-tested without Ray) and torch-free, so
the Ray Data workers that run them never pay for importing torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from clvray.config import TextSection
from clvray.contract import as_utc, unit_hash
from clvray.storage import Storage
from clvray.text.partition import before_cutoff, require_columns
from clvray.text.tokens import tokenize_reviews

if TYPE_CHECKING:
    from ray.data import Dataset

FIT_SPLITS = ("train", "valid")


def label_reviews(table: pa.Table, cutoff: pd.Timestamp, target: str) -> pa.Table:
    """Reviews before the cutoff with their row label: (rating - 3) / 2 for `rating` (rows
    without a rating dropped), null for `churn` (that label comes from the customer)."""
    table = before_cutoff(table, cutoff)
    if target == "rating":
        table = table.filter(pc.is_valid(table["rating"]))
        label = pc.divide(pc.subtract(pc.cast(table["rating"], pa.float32()), 3.0), 2.0)
    else:
        label = pa.nulls(table.num_rows, pa.float32())
    return pa.table(
        {
            "customer_id": pc.cast(table["customer_id"], pa.string()),
            "review_id": pc.cast(table["review_id"], pa.string()),
            "text": pc.fill_null(pc.cast(table["text"], pa.string()), ""),
            "label": pc.cast(label, pa.float32()),
        }
    )


def customer_side(table: pa.Table, target: str, label_column: str) -> pa.Table:
    """The customer table reduced to id, split and (for `churn`) the label as float32."""
    cols = {
        "customer_id": pc.cast(table["customer_id"], pa.string()),
        "split": pc.cast(table["split"], pa.string()),
    }
    if target == "churn":
        cols["customer_label"] = pc.cast(table[label_column], pa.float32())
    return pa.table(cols)


def attach_split(rows: pa.Table, target: str, salt: str) -> pa.Table:
    """Reviews joined with their customer's row -> reviews of train/valid customers with
    split, label, `_u`.

    For `churn` the label is the customer's (test customers and customers outside the table
    are dropped, so their labels are never seen). `_u` is a stable uniform draw per review id,
    the key of the deterministic sample.
    """
    if target == "churn":
        rows = rows.set_column(
            rows.schema.get_field_index("label"), "label", rows["customer_label"]
        )
    keep = pc.and_(pc.is_in(rows["split"], pa.array(list(FIT_SPLITS))), pc.is_valid(rows["label"]))
    drop = [c for c in ("customer_id", "customer_label") if c in rows.column_names]
    rows = rows.filter(pc.fill_null(keep, False)).drop_columns(drop)
    return rows.append_column("_u", pa.array(unit_hash(rows["review_id"], salt), type=pa.float64()))


def sample_by_hash(table: pa.Table, frac: float, salt: str) -> pa.Table:
    """Rows whose review id hashes below `frac`: the same rows on every run and node."""
    return table.filter(pa.array(unit_hash(table["review_id"], salt) < frac))


def below(table: pa.Table, column: str, bound: float) -> pa.Table:
    return table.filter(pc.less(table[column], bound))


def with_split(table: pa.Table, split: str) -> pa.Table:
    return table.filter(pc.fill_null(pc.equal(table["split"], split), False))


ORDER = ["_chunk", "n_tokens", "_u", "review_id"]
"""The training order of the fine-tuning rows: random chunks of about
`embed.tokenize_batch_size` reviews (by `_u`, the stable draw per review id), each by length,
so batches cut from them need little padding, as in the tokenizer's own blocks. It depends on
nothing but the reviews, never on the blocks or the order in which a shuffle delivered them:
the same config and seed fine-tune the same encoder."""


def with_chunk(table: pa.Table, n_chunks: int) -> pa.Table:
    """`_chunk`: which of `n_chunks` equal random chunks (by `_u`) a review falls in."""
    chunk = np.minimum((table["_u"].to_numpy() * n_chunks).astype(np.int64), n_chunks - 1)
    return table.append_column("_chunk", pa.array(chunk, type=pa.int64()))


def split_counts(table: pa.Table) -> pa.Table:
    used = pc.sum(
        pc.cast(
            pc.fill_null(pc.is_in(table["split"], pa.array(list(FIT_SPLITS))), False), pa.int64()
        )
    )
    return pa.table({"n": [table.num_rows], "n_used": [used.as_py() or 0]})


def build_finetune_datasets(
    reviews_ds: Dataset,
    customers_ds: Dataset,
    cfg: TextSection,
    cutoff: Any,
    storage: Storage | None = None,
    label_column: str = "churned",
) -> dict[str, Dataset]:
    """The exact `train` / `valid` datasets the fine-tuning workers read, tokenized, materialized.

    Rows are reviews with `ts < cutoff` of customers whose `split` is train (training) or valid
    (validation); columns review_id, split, label (float32), input_ids (list<int32>), n_tokens.
    With `finetune.max_reviews` set, at most that many reviews, chosen by a hash of the review
    id (the same sample on every run). Costs: a counting pass over the reviews and the customer
    table, one hash join of the sampled reviews with the customer table, and object-store
    memory for the sample. With `max_reviews: null` every review is tokenized and held.
    """
    ft = cfg.finetune
    target = ft.target
    cutoff = as_utc(cutoff)
    review_cols = ["customer_id", "review_id", "ts", "text"] + (
        ["rating"] if target == "rating" else []
    )
    customer_cols = ["customer_id", "split"] + ([label_column] if target == "churn" else [])
    require_columns(reviews_ds, review_cols, "reviews")
    require_columns(customers_ds, customer_cols, "customer table")

    reviews = reviews_ds.select_columns(review_cols).map_batches(
        label_reviews, fn_kwargs={"cutoff": cutoff, "target": target}, batch_format="pyarrow"
    )
    customers = customers_ds.select_columns(customer_cols).map_batches(
        customer_side,
        fn_kwargs={"target": target, "label_column": label_column},
        batch_format="pyarrow",
    )
    salt = f"finetune-{ft.seed}"
    if ft.max_reviews is not None:
        # Sample before the shuffle, so its cost follows max_reviews and not the review count.
        # The expected train+valid share comes from the customer table; the 20% margin is cut
        # back exactly below.
        n_reviews = reviews.count()
        # One row per block comes back (an aggregate would cost a shuffle).
        counts = customers.map_batches(split_counts, batch_format="pyarrow").take_all()
        share = sum(c["n_used"] for c in counts) / max(sum(c["n"] for c in counts), 1)
        frac = 1.2 * ft.max_reviews / max(n_reviews * share, 1.0)
        if frac < 1:
            reviews = reviews.map_batches(
                sample_by_hash, fn_kwargs={"frac": frac, "salt": salt}, batch_format="pyarrow"
            )
    # Customers outside the table have no split: an inner join drops their reviews.
    joined = reviews.join(
        customers, join_type="inner", num_partitions=cfg.num_partitions, on=("customer_id",)
    ).map_batches(attach_split, fn_kwargs={"target": target, "salt": salt}, batch_format="pyarrow")
    joined = joined.materialize()
    n_rows = joined.count()
    if ft.max_reviews is not None:
        # Only the sampling keys (at most ~1.2 * max_reviews floats) come to the driver.
        u = np.sort(joined.select_columns(["_u"]).to_pandas()["_u"].to_numpy())
        if len(u) > ft.max_reviews:
            joined = joined.map_batches(
                below,
                fn_kwargs={"column": "_u", "bound": float(u[ft.max_reviews])},
                batch_format="pyarrow",
            )
            n_rows = ft.max_reviews
    n_chunks = max(1, round(n_rows / cfg.embed.tokenize_batch_size))
    tokenized = (
        joined.map_batches(
            tokenize_reviews,
            fn_kwargs={
                "model": cfg.model,
                "storage": storage,
                "max_length_tokens": cfg.max_length_tokens,
            },
            batch_size=cfg.embed.tokenize_batch_size,
            batch_format="pyarrow",
        )
        .map_batches(with_chunk, fn_kwargs={"n_chunks": n_chunks}, batch_format="pyarrow")
        .materialize()
    )
    # Sorted last, right before materializing: a map after the sort could reorder blocks.
    return {
        split: tokenized.map_batches(with_split, fn_kwargs={"split": split}, batch_format="pyarrow")
        .sort(ORDER)
        .materialize()
        for split in FIT_SPLITS
    }
