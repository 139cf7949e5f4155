"""Batch scoring of every customer with Ray Data: boosters loaded once per actor.

Output `scores/`: customer_id, split, future_value_pred, churn_prob, value_p10/p50/p90,
value_segment (1 = lowest decile of predicted value .. n_segments = highest, edges fitted on
train customers and saved with the model) and the top contributing features of the value
prediction (XGBoost `pred_contribs`).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from clvray import observability
from clvray.config import ScoreSection
from clvray.io import write_parquet
from clvray.storage import Storage, join
from clvray.train import Boosters

# A bounded sample is enough to place decile edges; the driver never sees all customers.
EDGE_SAMPLE_ROWS = 200_000


def fit_segment_edges(
    customers, model_uri: str, storage: Storage, n_segments: int, n_customers: int
) -> list[float]:
    """Quantile edges of predicted value over (a sample of) train customers; saved with the model."""
    frac = min(1.0, EDGE_SAMPLE_ROWS / max(n_customers, 1))
    boosters = Boosters(model_uri, storage)
    train = customers.filter(expr="split == 'train'")
    sample = (
        (train.random_sample(frac, seed=0) if frac < 1 else train)
        .select_columns(boosters.features)
        .to_pandas()
    )
    pred = boosters.predict(sample)["future_value_pred"]
    edges = np.quantile(pred, np.linspace(0, 1, n_segments + 1)[1:-1]).tolist() if len(pred) else []
    storage.write_json(join(model_uri, "segments.json"), {"edges": edges, "n_segments": n_segments})
    return edges


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
    """Callable class for `map_batches`: loads the boosters once per actor."""

    def __init__(self, model_uri: str, storage: Storage, top_k: int):
        self.boosters = Boosters(model_uri, storage)
        self.edges = np.asarray(storage.read_json(join(model_uri, "segments.json"))["edges"])
        self.top_k = top_k

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        preds = self.boosters.predict(batch)
        out = pd.DataFrame(
            {"customer_id": batch["customer_id"].to_numpy(), "split": batch["split"].to_numpy()}
        )
        for name, values in preds.items():
            out[name] = np.asarray(values, dtype="float64")
        out["value_segment"] = (
            np.searchsorted(self.edges, out["future_value_pred"].to_numpy(), side="right") + 1
        )
        if self.top_k:
            contribs = self.boosters.contributions(batch)
            for name, column in top_contributions(
                contribs, self.boosters.features, self.top_k
            ).items():
                out[name] = column
        observability.record(
            "customers_scored", len(out), {"variant": self.boosters.meta["variant"]}
        )
        return out


def score_customers(
    customers,
    model_uri: str,
    cfg: ScoreSection,
    storage: Storage,
    run_dir: str,
    max_actors: int = 2,
) -> str:
    """Write `<run_dir>/scores/` for every customer in `customers`; returns its URI."""
    import ray.data

    scores = customers.map_batches(
        Scorer,
        fn_constructor_kwargs={
            "model_uri": model_uri,
            "storage": storage,
            "top_k": cfg.top_contributions,
        },
        batch_size=cfg.batch_size,
        batch_format="pandas",
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max_actors),
        num_cpus=1,
    )
    out = join(run_dir, "scores")
    write_parquet(scores, out, storage)
    return out
