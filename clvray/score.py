"""Batch scoring of every customer with Ray Data: boosters loaded once per actor.

Output `scores/`: customer_id, split, future_value_pred, churn_prob, value_p10/p50/p90,
value_segment (1 = lowest decile of predicted value .. n_segments = highest, edges are
quantiles of the scored train split, saved beside the scores), the labels when the input has
them and the top contributing features of the value
prediction (XGBoost `pred_contribs`).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from clvray import observability
from clvray.config import ScoreSection
from clvray.contract import customer_sample
from clvray.io import write_parquet
from clvray.storage import Storage, join
from clvray.train import Boosters

SEGMENTS_FILE = "_segments.json"
"""Segment edges beside the scores they were fitted on (`_`: parquet readers skip it)."""
LABELS = ("future_value", "churned")
"""Label columns passed through to `scores/` when the input has them (evaluation reads them)."""


def fit_segment_edges(
    predictions, n_segments: int, sample_rows: int, rows: int | None = None
) -> list[float]:
    """Quantile edges of `future_value_pred` over the scored train split.

    `predictions` is a scored dataset (`customer_id`, `split`, `future_value_pred`). At most
    about `sample_rows` train customers (a stable hash sample, the same whatever the block
    layout) reach the driver: two floats each. `rows`, the number of scored customers when the
    caller knows it (parquet footers), bounds the train split from above and spares a pass
    that counts it: the sample is then `sample_rows` x the train share, every customer while
    all of them fit.
    """
    train = predictions.filter(expr="split == 'train'").select_columns(
        ["customer_id", "future_value_pred"]
    )
    n = train.count() if rows is None else rows
    frac = min(1.0, sample_rows / max(n, 1))
    if frac < 1:
        train = train.map_batches(
            customer_sample, fn_kwargs={"share": frac, "salt": "segments"}, batch_format="pandas"
        )
    sample = train.to_pandas()
    pred = sample.sort_values("customer_id")["future_value_pred"].to_numpy(float)
    if not len(pred):
        return []
    return np.quantile(pred, np.linspace(0, 1, n_segments + 1)[1:-1]).tolist()


def assign_segments(batch: pd.DataFrame, edges: list[float]) -> pd.DataFrame:
    """`value_segment`: 1 (lowest predicted value) .. len(edges) + 1 (highest)."""
    segment = np.searchsorted(np.asarray(edges), batch["future_value_pred"].to_numpy(), "right")
    return batch.assign(value_segment=segment + 1)


def top_contributions(
    contribs: np.ndarray, features: list[str], k: int
) -> dict[str, list | np.ndarray]:
    """The k features with the largest |contribution| per row, with their signed values."""
    values = contribs[:, :-1]  # last column is the bias term
    order = np.argsort(-np.abs(values), axis=1, kind="stable")[:, :k]
    out: dict[str, list | np.ndarray] = {}
    for j in range(k):
        idx = order[:, j]
        out[f"top_feature_{j + 1}"] = [features[i] for i in idx]
        out[f"top_contrib_{j + 1}"] = values[np.arange(len(values)), idx].astype("float64")
    return out


class Scorer:
    """Callable class for `map_batches`: loads the boosters once per actor. With `edges`
    (serving, or a finished run's `_segments.json`) each row also gets its `value_segment`."""

    def __init__(
        self, model_uri: str, storage: Storage, top_k: int, edges: list[float] | None = None
    ):
        self.boosters = Boosters(model_uri, storage)
        self.edges = edges
        self.top_k = top_k

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        preds = self.boosters.predict(batch)
        out = pd.DataFrame(
            {"customer_id": batch["customer_id"].to_numpy(), "split": batch["split"].to_numpy()}
        )
        for name in LABELS:
            if name in batch:
                out[name] = batch[name].to_numpy()
        for name, values in preds.items():
            out[name] = np.asarray(values, dtype="float64")
        if self.edges is not None:
            out = assign_segments(out, self.edges)
        if self.top_k:
            contribs = self.boosters.contributions(batch)
            for name, top in top_contributions(
                contribs, self.boosters.features, self.top_k
            ).items():
                out[name] = top
        observability.record(
            "customers_scored", len(out), {"variant": self.boosters.meta["variant"]}
        )
        return out


def score_customers(
    customers,
    model_uri: str,
    cfg: ScoreSection,
    storage: Storage,
    out_uri: str,
    scratch_uri: str,
) -> list[float]:
    """Score every customer of `customers` into `out_uri`; returns the segment edges.

    Predictions run once, on an actor pool (`score.max_actors` actors of
    `score.cpus_per_actor` CPUs), and go to `scratch_uri`; the segment edges are quantiles of
    the scored train split; a second, cheap pass adds `value_segment` and writes `out_uri`
    with the edges beside it (`_segments.json`). No booster runs on the driver.
    """
    import ray.data

    from clvray.io import count_rows, read_parquet

    scored = customers.map_batches(
        Scorer,
        fn_constructor_kwargs={
            "model_uri": model_uri,
            "storage": storage,
            "top_k": cfg.top_contributions,
        },
        batch_size=cfg.batch_size,
        batch_format="pandas",
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=cfg.max_actors),
        num_cpus=cfg.cpus_per_actor,
    )
    write_parquet(scored, scratch_uri, storage)
    edges = fit_segment_edges(
        read_parquet(scratch_uri, storage),
        cfg.n_segments,
        cfg.edge_sample_rows,
        rows=count_rows(scratch_uri, storage),
    )
    segmented = read_parquet(scratch_uri, storage).map_batches(
        assign_segments, fn_kwargs={"edges": edges}, batch_format="pandas"
    )
    write_parquet(segmented, out_uri, storage)
    storage.write_json(join(out_uri, SEGMENTS_FILE), {"edges": edges, "n_segments": cfg.n_segments})
    storage.delete_dir(scratch_uri)
    return edges


def load_segment_edges(scores_uri: str, storage: Storage) -> list[float]:
    return list(storage.read_json(join(scores_uri, SEGMENTS_FILE))["edges"])
