"""Evaluation on the test customers: every model and baseline on the same people.

Models are not run here: every variant was scored once, on the scoring actors, into
`scores/<variant>/`; this reads the test split's labels and predictions from there, and the
baselines' inputs from the behavioural customer table. Only per-customer columns of the test
split (a few floats each, at most `evaluate.max_customers`, a stable hash sample) come to the
driver; metrics need global ranks.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from clvray import baselines, btyd, metrics
from clvray.contract import customer_sample
from clvray.features import split_of
from clvray.io import read_parquet
from clvray.storage import join
from clvray.train import Boosters

PREDICTIONS = ("future_value_pred", "churn_prob")


def select_test_split(ds, n_total: int, max_customers: int, columns: list[str] | None = None):
    """The test split of `ds` as pandas, sorted by customer: at most about `max_customers`
    (a hash sample, so every dataset of the run yields the same customers)."""
    test = ds.filter(expr="split == 'test'")
    if columns is not None:
        test = test.select_columns(columns)
    frac = max_customers / (n_total * 0.2) if n_total else 1.0
    if frac < 1:
        test = test.map_batches(
            customer_sample, fn_kwargs={"share": frac, "salt": "evaluate"}, batch_format="pandas"
        )
    return test.to_pandas().sort_values("customer_id").reset_index(drop=True)


def _model_metrics(y: np.ndarray, churned: np.ndarray, preds: dict[str, np.ndarray]) -> dict:
    out: dict = {"value": metrics.value_metrics(y, preds["future_value_pred"])}
    if "churn_prob" in preds:
        out["churn"] = metrics.churn_metrics(churned, preds["churn_prob"])
    if "value_p10" in preds and "value_p90" in preds:
        out["interval_coverage"] = metrics.interval_coverage(
            y, preds["value_p10"], preds["value_p90"]
        )
        out["interval_coverage_by_segment"] = metrics.coverage_by_segment(
            y, preds["value_p10"], preds["value_p90"], preds["future_value_pred"]
        )
    return out


PREDICTIONS_FILE = "test_predictions.parquet"
"""Per test customer, every model's predictions (`<run_dir>/evaluate/`): the backtest pools
these over cutoffs for its bootstrap intervals."""


def _save_frame(frame: pd.DataFrame, storage, run_dir: str) -> None:
    import io

    buf = io.BytesIO()
    frame.to_parquet(buf, index=False)
    storage.write_bytes(join(run_dir, "evaluate", PREDICTIONS_FILE), buf.getvalue())


def _population_outside(storage, run_dir: str) -> dict | None:
    """Customers seen in the input by population reason (`features/population.json`)."""
    from clvray.features import POPULATION_FILE

    uri = join(run_dir, "features", POPULATION_FILE)
    return storage.read_json(uri) if storage.exists(uri) else None


def evaluate(
    run,
    scores: dict,
    customers,
    primary: str,
    cutoff: pd.Timestamp,
    counts: dict,
    splits: dict[str, int],
    btyd_fit: btyd.TrainBTYD | None = None,
    btyd_error: str | None = None,
) -> tuple[dict, pd.DataFrame]:
    """Metrics of every model and baseline on the same test customers.

    `scores` maps each variant to its scored dataset (`scores/<variant>/`, labels included);
    `customers` is the behavioural customer table (the baselines' inputs). `run` gives `cfg`,
    `storage` and `run_dir`. Returns the metrics dict (written to metrics.json) and the
    per-customer test frame (`customer_id`, `future_value`, `churned`,
    `pred_value__<model>`, `pred_churn__<model>`) that the report plots. `splits` counts the
    customers of `customers` per split (`clvray.features.split_counts`). `btyd_fit` is the
    BG/NBD + Gamma-Gamma fitted on the train customers (`clvray.btyd`), or None with
    `btyd_error` saying why it could not be fitted.
    """
    cfg, storage = run.cfg, run.storage
    horizon = cfg.features.horizon_days
    cap = cfg.evaluate.max_customers
    n_total = sum(splits.values())
    out: dict = {
        "run_dir": run.run_dir,
        "source": cfg.data.source,
        "cutoff": cutoff.isoformat(),
        "horizon_days": horizon,
        "counts": counts,
        "population": {
            "customers": int(n_total),
            **{s: int(n) for s, n in splits.items() if n},
        },
        "primary_model": primary,
        "models": {},
    }
    seen = _population_outside(storage, run.run_dir)
    if seen is not None:
        out["population"]["by_reason"] = seen
    base = select_test_split(customers, n_total, cap)
    y = base["future_value"].to_numpy(float)
    churned = base["churned"].to_numpy(int)
    out["population"]["evaluated_test_customers"] = len(base)
    out["population"]["test_churn_rate"] = float(churned.mean()) if len(churned) else None
    frame = base[["customer_id", "future_value", "churned"]].copy()

    def add(name: str, preds: dict[str, np.ndarray], **extra) -> None:
        out["models"][name] = {**_model_metrics(y, churned, preds), **extra}
        frame[f"pred_value__{name}"] = np.asarray(preds["future_value_pred"], dtype=float)
        if "churn_prob" in preds:
            frame[f"pred_churn__{name}"] = np.asarray(preds["churn_prob"], dtype=float)
        if "value_p10" in preds and "value_p90" in preds:
            frame[f"p10__{name}"] = np.asarray(preds["value_p10"], dtype=float)
            frame[f"p90__{name}"] = np.asarray(preds["value_p90"], dtype=float)

    for variant, ds in scores.items():
        df = select_test_split(ds, n_total, cap)
        if not (df["customer_id"].to_numpy() == base["customer_id"].to_numpy()).all():
            raise RuntimeError(f"{variant}: scored test customers differ from the customer table")
        if not np.allclose(df["future_value"].to_numpy(float), y, equal_nan=True):
            raise RuntimeError(f"{variant}: labels in scores/ differ from the customer table")
        preds = {c: df[c].to_numpy(float) for c in df.columns if c in PREDICTIONS}
        preds.update({c: df[c].to_numpy(float) for c in df.columns if c.startswith("value_p")})
        boosters = Boosters(join(run.run_dir, "models", variant), storage)
        add(
            variant,
            preds,
            feature_importance=boosters.importance(),
            value_model=boosters.meta.get("value_model"),
            conformal=boosters.conformal,
        )

    add(
        "heuristic",
        {
            "future_value_pred": baselines.heuristic_value(
                base["total_value"].to_numpy(float), base["T_days"].to_numpy(float), horizon
            )
        },
    )
    if btyd_fit is None:
        out["models"]["bgnbd_gamma_gamma"] = {"error": btyd_error or "not fitted"}
    else:
        pred = btyd.predict(btyd_fit, base, horizon)
        add(
            "bgnbd_gamma_gamma",
            {k: pred[k] for k in ("future_value_pred", "churn_prob")},
            params=btyd_fit.to_json(),
        )

    if cfg.data.source == "synthetic":
        add(
            "oracle",
            {"future_value_pred": _oracle(run, base, cutoff, horizon)},
            note="latent rate, dropout, spend and alive state at cutoff",
        )
    if "reviews" in counts:
        out["relbench_churn"] = relbench_churn(run, base, frame, cutoff)
    out["vs_bgnbd"] = _versus(frame, out["models"], "bgnbd_gamma_gamma")
    if BEHAVIOURAL_MODEL in out["models"]:
        lift = _versus(frame, out["models"], BEHAVIOURAL_MODEL, churned=churned)
        out["text_lift"] = {k: v for k, v in lift.items() if k.startswith("gbm_text")}
    _save_frame(frame, storage, run.run_dir)
    out["ablation"] = {
        name: {
            "normalized_gini": m["value"]["normalized_gini"],
            "spearman": m["value"]["spearman"],
            "churn_roc_auc": m.get("churn", {}).get("roc_auc"),
        }
        for name, m in out["models"].items()
        if name.startswith("gbm_")
    }
    return out, frame


BEHAVIOURAL_MODEL = "gbm_behavioural"


def _versus(
    frame: pd.DataFrame, models: dict, reference: str, churned: np.ndarray | None = None
) -> dict:
    """Each GBM minus the reference model on normalized Gini and Spearman (and churn ROC-AUC
    when `churned` is given and both have a churn probability), with a paired bootstrap 95%
    interval over test customers: is the difference more than this split's noise?"""
    ref = f"pred_value__{reference}"
    if ref not in frame:
        return {}
    y = frame["future_value"].to_numpy(float)
    out = {}
    for name in models:
        col = f"pred_value__{name}"
        if not name.startswith("gbm_") or "@" in name or name == reference or col not in frame:
            continue
        out[name] = {
            metric: metrics.paired_bootstrap_difference(
                y, frame[col].to_numpy(float), frame[ref].to_numpy(float), fn
            )
            for metric, fn in (
                ("normalized_gini", metrics.normalized_gini),
                ("spearman", metrics.spearman),
            )
        }
        a, b = f"pred_churn__{name}", f"pred_churn__{reference}"
        if churned is not None and a in frame and b in frame and 0 < churned.mean() < 1:
            out[name]["churn_roc_auc"] = metrics.paired_bootstrap_difference(
                churned, frame[a].to_numpy(float), frame[b].to_numpy(float), metrics.roc_auc
            )
    return out


RELBENCH_DAYS = 91


def relbench_labels(
    reviews: pd.DataFrame, customer_ids: pd.Series, cutoff: pd.Timestamp
) -> tuple[np.ndarray, np.ndarray]:
    """RelBench `user-churn` for `customer_ids` from their reviews (`customer_id`, `ts`):
    `active` (a review in the 91 days before `cutoff`) and `churned` (no review in the 91 days
    from it), both aligned with `customer_ids`."""
    window = pd.Timedelta(days=RELBENCH_DAYS)
    ts = pd.to_datetime(reviews["ts"], utc=True)
    before = reviews.loc[(ts >= cutoff - window) & (ts < cutoff), "customer_id"]
    after = reviews.loc[(ts >= cutoff) & (ts < cutoff + window), "customer_id"]
    active = customer_ids.isin(set(before)).to_numpy()
    churned = (~customer_ids.isin(set(after))).to_numpy().astype(int)
    return active, churned


def relbench_churn(run, base: pd.DataFrame, frame: pd.DataFrame, cutoff: pd.Timestamp) -> dict:
    """Churn as RelBench's `rel-amazon` `user-churn` task defines it, on our test customers:
    customers with a review in the 91 days before the cutoff; churned = no review in the 91
    days from it; AUROC of each model's churn probability against that label. Our models are
    trained for `features.horizon_days`: the numbers match RelBench's task exactly only with
    `horizon_days: 91` (RelBench also trains on many timestamps, we on one cutoff).
    Cost: one filtered pass over the reviews; the test customers' reviews in the 182 days
    around the cutoff (two columns) reach the driver."""
    window = pd.Timedelta(days=RELBENCH_DAYS)
    ids = set(base["customer_id"])
    lo, hi = cutoff - window, cutoff + window

    def keep(b: pd.DataFrame) -> pd.DataFrame:
        ts = pd.to_datetime(b["ts"], utc=True)
        return b.loc[(ts >= lo) & (ts < hi) & b["customer_id"].isin(ids), ["customer_id", "ts"]]

    reviews = (
        read_parquet(join(run.run_dir, "ingest", "reviews"), run.storage, ["customer_id", "ts"])
        .map_batches(keep, batch_format="pandas")
        .to_pandas()
    )
    active, churned = relbench_labels(reviews, base["customer_id"], cutoff)
    label = churned[active]
    out: dict = {
        "definition": "active: a review in the 91 days before the cutoff; churn: no review in "
        "the 91 days from it; AUROC",
        "horizon_days_of_models": run.cfg.features.horizon_days,
        "customers": int(active.sum()),
        "churn_rate": float(label.mean()) if label.size else None,
        "roc_auc": {},
    }
    if label.size and 0 < label.mean() < 1:
        for col in frame.columns:
            if col.startswith("pred_churn__"):
                p = frame[col].to_numpy(float)[active]
                out["roc_auc"][col.removeprefix("pred_churn__")] = metrics.roc_auc(label, p)
    return out


def _oracle(run, base: pd.DataFrame, cutoff: pd.Timestamp, horizon: int) -> np.ndarray:
    """Expected future value from the generating process's latent state (the best possible)."""
    from clvray.synth import expected_future_value

    truth_uri = join(run.cfg.data.transactions.rsplit("/", 1)[0], "truth")
    f = run.cfg.features
    truth = (
        read_parquet(truth_uri, run.storage)
        .map_batches(
            lambda b: b[split_of(b["customer_id"], f.valid_share, f.test_share) == "test"],
            batch_format="pandas",
        )
        .to_pandas()
    )
    truth = truth.set_index("customer_id").loc[base["customer_id"]].reset_index()
    return expected_future_value(truth, cutoff, horizon)
