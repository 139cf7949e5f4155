"""Per-customer text features from review embeddings, with a reduction fitted on train only.

For each customer with at least one review before the cutoff:

| column | meaning |
|---|---|
| customer_id | key (customers without reviews are absent: the caller left-joins) |
| txt_n_reviews | int64, reviews with `ts < cutoff` |
| txt_score_mean, txt_score_min | float64, mean / min of the per-review `score` (null when the model has no head) |
| txt_mean_0..k-1 | float32, the mean review embedding, reduced |
| txt_rw_0..k-1 | float32, the recency-weighted mean embedding (weight 0.5 ** (age_days / half_life), age relative to the cutoff), reduced with the same map |

The reduction (`embed.reduce`: `pca`, `random` or `none`; `k = min(reduce_dim, hidden)`, or
`hidden` for `none`) is fitted on a hash sample of at most `embed.reduce_fit_rows` TRAIN
customers' mean embeddings, brought to the driver; it is saved as `reduction.npz` +
`reduction.json` under `out_uri` so scoring applies the same map (`fitted_uri=`). Row-level data
never passes through the driver: one hash shuffle groups each customer's reviews in one block,
where every aggregate is computed; a hash join (`Dataset.join`) then adds each customer's split.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from clvray.config import TextSection
from clvray.contract import TS, as_utc, unit_hash
from clvray.storage import Storage, join
from clvray.text.partition import (
    before_cutoff,
    require_columns,
)

if TYPE_CHECKING:
    from ray.data import Dataset

log = logging.getLogger(__name__)

REDUCTION_NPZ = "reduction.npz"
REDUCTION_JSON = "reduction.json"
SECONDS_PER_DAY = 86_400.0

# --- plain functions (tested without Ray) ------------------------------------------------------


def embedding_matrix(column: Any) -> np.ndarray:
    """A (rows, hidden) float32 matrix from an embedding column in any shape Ray or pandas hands
    over: a pyarrow (fixed-size) list array, a 2-D array, or an object array of 1-D arrays."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if isinstance(column, (pa.FixedSizeListArray, pa.ListArray, pa.LargeListArray)):
        n = len(column)
        flat = column.flatten().to_numpy(zero_copy_only=False).astype(np.float32)
        return flat.reshape(n, -1) if n else np.zeros((0, 0), np.float32)
    arr = np.asarray(column)
    if arr.dtype != object and arr.ndim == 2:
        return arr.astype(np.float32)
    if len(arr) == 0:
        return np.zeros((0, 0), np.float32)
    return np.stack([np.asarray(v, dtype=np.float32) for v in arr])


def recency_weights(ts: pd.Series, cutoff: pd.Timestamp, half_life_days: float) -> np.ndarray:
    """0.5 ** (age / half-life): a review half_life_days before the cutoff weighs 0.5."""
    age_days = (
        as_utc(cutoff) - pd.to_datetime(ts, utc=True)
    ).dt.total_seconds().to_numpy() / SECONDS_PER_DAY
    return np.power(0.5, age_days / half_life_days)


def aggregate_customer_text(
    reviews: pd.DataFrame, cutoff: pd.Timestamp, half_life_days: float
) -> pd.DataFrame:
    """Per-customer aggregates of review rows (customer_id, ts, embedding, score).

    Rows at or after the cutoff are ignored. Returns customer_id, txt_n_reviews,
    txt_score_mean, txt_score_min, emb_mean and emb_rw (float32 vectors), sorted by customer_id.
    """
    ts = pd.to_datetime(reviews["ts"], utc=True)
    reviews = reviews.loc[(ts < as_utc(cutoff)).to_numpy()]
    if reviews.empty:
        return pd.DataFrame(
            {
                "customer_id": pd.Series([], dtype=object),
                "txt_n_reviews": pd.Series([], dtype="int64"),
                "txt_score_mean": pd.Series([], dtype="float64"),
                "txt_score_min": pd.Series([], dtype="float64"),
                "emb_mean": pd.Series([], dtype=object),
                "emb_rw": pd.Series([], dtype=object),
            }
        )
    order = np.argsort(reviews["customer_id"].to_numpy(dtype=object), kind="stable")
    reviews = reviews.iloc[order]
    ids = reviews["customer_id"].to_numpy(dtype=object)
    starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
    counts = np.diff(np.r_[starts, len(ids)])
    emb = embedding_matrix(reviews["embedding"].to_numpy()).astype(np.float64)
    w = recency_weights(reviews["ts"], cutoff, half_life_days)
    emb_sum = np.add.reduceat(emb, starts, axis=0)
    emb_wsum = np.add.reduceat(emb * w[:, None], starts, axis=0)
    w_sum = np.add.reduceat(w, starts)
    score = pd.to_numeric(reviews["score"], errors="coerce").astype("float64")
    grouped = score.groupby(np.repeat(np.arange(len(starts)), counts))
    mean = (emb_sum / counts[:, None]).astype(np.float32)
    rw = (emb_wsum / w_sum[:, None]).astype(np.float32)
    return pd.DataFrame(
        {
            "customer_id": ids[starts],
            "txt_n_reviews": counts.astype("int64"),
            "txt_score_mean": grouped.mean().to_numpy(dtype="float64"),
            "txt_score_min": grouped.min().to_numpy(dtype="float64"),
            "emb_mean": list(mean),
            "emb_rw": list(rw),
        }
    )


@dataclass
class Reduction:
    """x -> (x - center) @ components.T; `none` is the identity."""

    method: str
    center: np.ndarray
    components: np.ndarray
    n_fit: int

    @property
    def dim(self) -> int:
        return int(self.components.shape[0])

    def apply(self, x: np.ndarray) -> np.ndarray:
        if self.method == "none":
            return x.astype(np.float32)
        return ((x - self.center) @ self.components.T).astype(np.float32)


def fit_reduction(x: np.ndarray, method: str, dim: int, seed: int = 0) -> Reduction:
    """Fit on the rows of `x` (train customers' mean embeddings).

    PCA keeps `min(dim, hidden)` components (zero rows past the sample's rank, so the column
    count never depends on the sample), each signed so its largest entry is positive: the same
    data always gives the same features.
    """
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(
            "text features: no train customer has a review before the cutoff; cannot fit the reduction"
        )
    hidden = x.shape[1]
    x = x.astype(np.float64)
    if method == "none":
        return Reduction("none", np.zeros(hidden), np.eye(hidden), len(x))
    k = min(dim, hidden)
    center = x.mean(axis=0)
    if method == "random":
        rng = np.random.default_rng(seed)
        return Reduction("random", center, rng.standard_normal((k, hidden)) / np.sqrt(k), len(x))
    if method != "pca":
        raise ValueError(f"text.embed.reduce: unknown method {method!r}")
    _, _, vt = np.linalg.svd(x - center, full_matrices=False)
    comps = np.zeros((k, hidden))
    m = min(k, vt.shape[0])
    comps[:m] = vt[:m]
    signs = np.sign(comps[np.arange(k), np.abs(comps).argmax(axis=1)])
    comps *= np.where(signs == 0, 1.0, signs)[:, None]
    return Reduction("pca", center, comps, len(x))


def save_reduction(
    reduction: Reduction, storage: Storage, out_uri: str, extra: dict[str, Any] | None = None
) -> None:
    buf = io.BytesIO()
    np.savez(buf, center=reduction.center, components=reduction.components)
    storage.write_bytes(join(out_uri, REDUCTION_NPZ), buf.getvalue())
    meta = {
        "method": reduction.method,
        "dim": reduction.dim,
        "input_dim": int(reduction.components.shape[1]),
        "n_fit_customers": reduction.n_fit,
        "columns": feature_columns(reduction.dim),
        **(extra or {}),
    }
    storage.write_json(join(out_uri, REDUCTION_JSON), meta)


def load_reduction(storage: Storage, uri: str) -> Reduction:
    meta = storage.read_json(join(uri, REDUCTION_JSON))
    arrays = np.load(io.BytesIO(storage.read_bytes(join(uri, REDUCTION_NPZ))))
    return Reduction(
        meta["method"], arrays["center"], arrays["components"], int(meta["n_fit_customers"])
    )


def feature_columns(dim: int) -> list[str]:
    return (
        ["customer_id", "txt_n_reviews", "txt_score_mean", "txt_score_min"]
        + [f"txt_mean_{i}" for i in range(dim)]
        + [f"txt_rw_{i}" for i in range(dim)]
    )


def reduce_features(aggs: pd.DataFrame, reduction: Reduction) -> pd.DataFrame:
    """Aggregates (with emb_mean / emb_rw vectors) -> the flat feature columns."""
    dim = reduction.dim
    out = aggs[["customer_id", "txt_n_reviews", "txt_score_mean", "txt_score_min"]].reset_index(
        drop=True
    )
    mean = (
        reduction.apply(embedding_matrix(aggs["emb_mean"].to_numpy()))
        if len(aggs)
        else np.zeros((0, dim), np.float32)
    )
    rw = (
        reduction.apply(embedding_matrix(aggs["emb_rw"].to_numpy()))
        if len(aggs)
        else np.zeros((0, dim), np.float32)
    )
    cols = {f"txt_mean_{i}": mean[:, i] for i in range(dim)}
    cols.update({f"txt_rw_{i}": rw[:, i] for i in range(dim)})
    return pd.concat([out, pd.DataFrame(cols)], axis=1)


# --- Ray Data wiring -----------------------------------------------------------------------------


def _list_array(matrix: np.ndarray, rows: int) -> pa.ListArray:
    """A (rows, hidden) matrix as list<float32> without a Python loop over rows."""
    hidden = matrix.shape[1] if matrix.size else 0
    offsets = pa.array(np.arange(rows + 1, dtype=np.int32) * hidden, type=pa.int32())
    return pa.ListArray.from_arrays(
        offsets, pa.array(matrix.reshape(-1).astype(np.float32), type=pa.float32())
    )


def embedding_rows(table: pa.Table, cutoff: pd.Timestamp) -> pa.Table:
    table = before_cutoff(table, cutoff)
    return pa.table(
        {
            "customer_id": pc.cast(table["customer_id"], pa.string()),
            "ts": pc.cast(table["ts"], TS),
            "embedding": _list_array(embedding_matrix(table["embedding"]), table.num_rows),
            "score": pc.cast(table["score"], pa.float32()),
        }
    )


def customer_split_rows(table: pa.Table) -> pa.Table:
    return pa.table(
        {
            "customer_id": pc.cast(table["customer_id"], pa.string()),
            "split": pc.cast(table["split"], pa.string()),
        }
    )


def aggregate_partition(table: pa.Table, cutoff: pd.Timestamp, half_life_days: float) -> pa.Table:
    """Per-customer aggregates of a block holding every review of each of its customers."""
    aggs = aggregate_customer_text(
        table.select(["customer_id", "ts", "embedding", "score"]).to_pandas(),
        cutoff,
        half_life_days,
    )
    out = pa.table(
        {
            "customer_id": pa.array(aggs["customer_id"].tolist(), type=pa.string()),
            "txt_n_reviews": pa.array(aggs["txt_n_reviews"].to_numpy(), type=pa.int64()),
            "txt_score_mean": pa.array(aggs["txt_score_mean"].to_numpy(), type=pa.float64()),
            "txt_score_min": pa.array(aggs["txt_score_min"].to_numpy(), type=pa.float64()),
            "emb_mean": _list_array(embedding_matrix(aggs["emb_mean"].to_numpy()), len(aggs)),
            "emb_rw": _list_array(embedding_matrix(aggs["emb_rw"].to_numpy()), len(aggs)),
        }
    )
    return out


def train_sample(table: pa.Table, frac: float) -> pa.Table:
    train = table.filter(pc.fill_null(pc.equal(table["split"], "train"), False))
    keep = unit_hash(train["customer_id"], "reduce") < frac
    return train.filter(pa.array(keep)).select(["customer_id", "emb_mean"])


def reduce_block(table: pa.Table, reduction: Reduction) -> pa.Table:
    df = reduce_features(table.drop_columns(["split"]).to_pandas(), reduction)
    return pa.Table.from_pandas(df, preserve_index=False)


def build_text_features(
    embeddings_ds: Dataset,
    customers_ds: Dataset,
    cutoff: Any,
    cfg: TextSection,
    storage: Storage,
    out_uri: str,
    fitted_uri: str | None = None,
) -> Dataset:
    """Per-customer text features (see the module docstring for the columns).

    `embeddings_ds` is `embed_reviews`' output (customer_id, ts, embedding, score); rows at or
    after `cutoff` are dropped here too. `customers_ds` gives each customer's `split`; the
    reduction is fitted on train customers only and saved under `out_uri`. With `fitted_uri`
    (scoring), the reduction saved there is applied instead (the split is then unused) and
    nothing is written.
    Returns a lazy dataset over materialized per-customer aggregates: one hash shuffle of the
    embeddings, object-store memory for two vectors per customer.
    """
    emb = cfg.embed
    cutoff = as_utc(cutoff)
    require_columns(embeddings_ds, ["customer_id", "ts", "embedding", "score"], "review embeddings")
    require_columns(customers_ds, ["customer_id", "split"], "customer table")
    reviews = embeddings_ds.select_columns(["customer_id", "ts", "embedding", "score"]).map_batches(
        embedding_rows, fn_kwargs={"cutoff": cutoff}, batch_format="pyarrow"
    )
    customers = customers_ds.select_columns(["customer_id", "split"]).map_batches(
        customer_split_rows, batch_format="pyarrow"
    )
    aggs = (
        reviews.repartition(cfg.num_partitions, keys=["customer_id"])
        .map_batches(
            aggregate_partition,
            fn_kwargs={"cutoff": cutoff, "half_life_days": emb.recency_half_life_days},
            batch_size=None,
            batch_format="pyarrow",
        )
        .join(
            customers,
            join_type="left_outer",
            num_partitions=cfg.num_partitions,
            on=("customer_id",),
        )
        .materialize()
    )
    if fitted_uri is not None:
        reduction = load_reduction(storage, fitted_uri)
    else:
        # The sampling rate is set over all customers (a free count on materialized data), so
        # at most reduce_fit_rows train customers come back, without a counting pass.
        frac = min(1.0, emb.reduce_fit_rows / max(aggs.count(), 1))
        sample = aggs.map_batches(
            train_sample, fn_kwargs={"frac": frac}, batch_format="pyarrow"
        ).to_arrow_refs()
        x = stack_sample(sample)
        reduction = fit_reduction(x, emb.reduce, emb.reduce_dim, emb.reduce_seed)
        save_reduction(
            reduction,
            storage,
            out_uri,
            {"cutoff": cutoff.isoformat(), "recency_half_life_days": emb.recency_half_life_days},
        )
        log.info(
            "text features: %s reduction to %d dims fitted on %d train customers",
            reduction.method,
            reduction.dim,
            len(x),
        )
    return aggs.map_batches(
        reduce_block, fn_kwargs={"reduction": reduction}, batch_format="pyarrow"
    )


def stack_sample(refs: list[Any]) -> np.ndarray:
    import ray

    tables = [t for t in ray.get(refs) if t.num_rows]
    if not tables:
        return np.zeros((0, 0), np.float32)
    # Blocks arrive in any order; sorted by customer the fit is bit-for-bit reproducible.
    sample = pa.concat_tables(tables).sort_by("customer_id")
    return embedding_matrix(sample["emb_mean"])
