"""Evaluation on the test customers: every model and baseline on the same people.

Only per-customer columns of the test split (a few floats each, capped at
`MAX_EVAL_CUSTOMERS` by the stable hash) come to the driver; metrics need global ranks.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from clvray import baselines, metrics
from clvray.features import split_of
from clvray.io import read_parquet
from clvray.storage import join
from clvray.train import Boosters

MAX_EVAL_CUSTOMERS = 2_000_000
BTYD_FIT_CUSTOMERS = 200_000


def _test_frame(ds, n_total: int) -> pd.DataFrame:
    test = ds.filter(expr="split == 'test'")
    if n_total > MAX_EVAL_CUSTOMERS / 0.2:
        test = test.random_sample(MAX_EVAL_CUSTOMERS / n_total * 5, seed=0)
    return test.to_pandas().sort_values("customer_id").reset_index(drop=True)


def _model_metrics(y: np.ndarray, churned: np.ndarray, preds: dict[str, np.ndarray]) -> dict:
    out: dict = {"value": metrics.value_metrics(y, preds["future_value_pred"])}
    if "churn_prob" in preds:
        out["churn"] = metrics.churn_metrics(churned, preds["churn_prob"])
    if "value_p10" in preds and "value_p90" in preds:
        out["interval_coverage"] = metrics.interval_coverage(
            y, preds["value_p10"], preds["value_p90"]
        )
    return out


def _calibration(df: pd.DataFrame) -> pd.DataFrame:
    """Calibration summaries in weeks (BG/NBD is fitted on weeks, as in the literature)."""
    return pd.DataFrame(
        {
            "frequency": df["frequency"].to_numpy(float),
            "recency": df["recency_days"].to_numpy(float) / 7.0,
            "T": df["T_days"].to_numpy(float) / 7.0,
            "monetary": df["monetary_repeat"].to_numpy(float),
        }
    )


def btyd_predictions(train: pd.DataFrame, test: pd.DataFrame, horizon_days: int) -> dict:
    """BG/NBD + Gamma-Gamma fitted on train customers, predicted for test customers."""
    fit = train.sample(min(len(train), BTYD_FIT_CUSTOMERS), random_state=0)
    calib = _calibration(fit)
    repeat = calib.loc[(calib["frequency"] > 0) & (calib["monetary"] > 0), "monetary"]
    # Constant order values (Amazon reviews as purchases of value 1) leave Gamma-Gamma
    # nothing to fit: value is then expected purchases times the mean order value.
    with_spend = len(repeat) > 10 and repeat.std() > 1e-9
    model = baselines.fit_btyd(calib, value=with_spend)
    s = _calibration(test)
    t = horizon_days / 7.0
    pred = baselines.predict_btyd(model, s, t)
    spend = pred["expected_spend"] if with_spend else float(train["monetary"].mean())
    bg = model.bgnbd
    # P(no purchase in t) = P(dead) + P(alive) * E[exp(-lambda t) | data]; lambda | data,
    # alive ~ Gamma(r + x, alpha + T), whose Laplace transform gives the second factor.
    no_buy_if_alive = ((bg.alpha + s["T"]) / (bg.alpha + s["T"] + t)) ** (bg.r + s["frequency"])
    return {
        "future_value_pred": pred["expected_purchases"] * spend,
        "churn_prob": 1.0 - pred["prob_alive"] * (1.0 - no_buy_if_alive.to_numpy()),
        "params": {
            "bgnbd": vars(bg),
            "gamma_gamma": vars(model.gamma_gamma) if model.gamma_gamma else None,
        },
    }


def evaluate(
    run, fused: dict, primary: str, cutoff: pd.Timestamp, counts: dict
) -> tuple[dict, pd.DataFrame]:
    """Metrics of every model and baseline on the same test customers.

    Returns the metrics dict (written to metrics.json) and the per-customer test frame
    (`customer_id`, `future_value`, `churned`, `pred_value__<model>`, `pred_churn__<model>`)
    that the report plots.
    """
    cfg, storage = run.cfg, run.storage
    horizon = cfg.features.horizon_days
    customers = fused[next(iter(fused))]
    n_total = customers.count()
    split_counts = customers.groupby("split").count().to_pandas()
    out: dict = {
        "run_dir": run.run_dir,
        "source": cfg.data.source,
        "cutoff": cutoff.isoformat(),
        "horizon_days": horizon,
        "counts": counts,
        "population": {
            "customers": int(n_total),
            **{
                str(r): int(c)
                for r, c in zip(split_counts["split"], split_counts["count()"], strict=True)
            },
        },
        "primary_model": primary,
        "models": {},
    }
    tests = {variant: _test_frame(ds, n_total) for variant, ds in fused.items()}
    base = tests[next(iter(tests))]
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

    for variant, df in tests.items():
        if not (df["customer_id"].to_numpy() == base["customer_id"].to_numpy()).all():
            raise RuntimeError(f"{variant}: test customers differ from the behavioural set")
        boosters = Boosters(join(run.run_dir, "models", variant), storage)
        add(variant, boosters.predict(df), feature_importance=boosters.importance())

    add(
        "heuristic",
        {
            "future_value_pred": baselines.heuristic_value(
                base["total_value"].to_numpy(float), base["T_days"].to_numpy(float), horizon
            )
        },
    )
    train = customers.filter(expr="split == 'train'").select_columns(
        ["frequency", "recency_days", "T_days", "monetary", "monetary_repeat"]
    )
    n_train = out["population"].get("train", 0)
    if n_train > BTYD_FIT_CUSTOMERS:
        train = train.random_sample(BTYD_FIT_CUSTOMERS / n_train * 1.2, seed=0)
    try:
        btyd = btyd_predictions(train.to_pandas(), base, horizon)
        params = btyd.pop("params")
        add("bgnbd_gamma_gamma", btyd, params=params)
    except Exception as exc:  # a baseline that cannot be fitted is reported, not fatal
        out["models"]["bgnbd_gamma_gamma"] = {"error": f"{type(exc).__name__}: {exc}"}

    if cfg.data.source == "synthetic":
        add(
            "oracle",
            {"future_value_pred": _oracle(run, base, cutoff, horizon)},
            note="latent rate, dropout, spend and alive state at cutoff",
        )
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
