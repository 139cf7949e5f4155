"""BG/NBD + Gamma-Gamma fitted on the train customers: a baseline, and features for the GBMs.

One fit serves both: `fit_train_btyd` fits on (a sample of at most `FIT_CUSTOMERS`) train
customers' calibration summaries, the only rows that reach the driver, and saves the parameters
as JSON; `btyd_columns` then computes for every customer, inside Ray Data tasks, what the model
predicts from their own history. The GBMs get those predictions as features (`BTYD_FEATURES`)
when `features.btyd_features` is on: a GBM can then start from the standard model's answer and
learn where it is wrong, instead of rediscovering the buy-till-you-die curve from raw recency
and frequency. The parameters come from train customers only; valid and test customers are
scored with them, never fitted on.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from clvray import baselines
from clvray.storage import Storage, join

FIT_CUSTOMERS = 200_000
BTYD_FEATURES = ["btyd_p_alive", "btyd_expected_purchases", "btyd_expected_value"]
PARAMS_FILE = "btyd.json"


@dataclass(frozen=True)
class TrainBTYD:
    model: baselines.BTYDModel
    with_spend: bool
    """False when order values are constant (Amazon: a purchase is worth 1) or too few repeat
    buyers: Gamma-Gamma then has nothing to fit, and spend is `mean_spend`."""
    mean_spend: float

    def to_json(self) -> dict:
        m = self.model
        return {
            "bgnbd": dataclasses.asdict(m.bgnbd),
            "gamma_gamma": dataclasses.asdict(m.gamma_gamma) if m.gamma_gamma else None,
            "fallback_spend": m.fallback_spend,
            "with_spend": self.with_spend,
            "mean_spend": self.mean_spend,
        }

    @classmethod
    def from_json(cls, d: dict) -> TrainBTYD:
        gg = d.get("gamma_gamma")
        fallback = d.get("fallback_spend")
        model = baselines.BTYDModel(
            bgnbd=baselines.BGNBDParams(**d["bgnbd"]),
            gamma_gamma=baselines.GGParams(**gg) if gg else None,
            fallback_spend=math.nan if fallback is None else fallback,
        )
        return cls(model, d["with_spend"], d["mean_spend"])


def calibration(df: pd.DataFrame) -> pd.DataFrame:
    """Calibration summaries in weeks (BG/NBD is fitted on weeks, as in the literature)."""
    return pd.DataFrame(
        {
            "frequency": df["frequency"].to_numpy(float),
            "recency": df["recency_days"].to_numpy(float) / 7.0,
            "T": df["T_days"].to_numpy(float) / 7.0,
            "monetary": df["monetary_repeat"].to_numpy(float),
        }
    )


def fit_calibration(train: pd.DataFrame) -> TrainBTYD:
    """Fit on the train customers' rows (`frequency`, `recency_days`, `T_days`, `monetary`,
    `monetary_repeat`)."""
    calib = calibration(train)
    repeat = calib.loc[(calib["frequency"] > 0) & (calib["monetary"] > 0), "monetary"]
    with_spend = len(repeat) > 10 and repeat.std() > 1e-9
    model = baselines.fit_btyd(calib, value=with_spend)
    return TrainBTYD(model, with_spend, float(train["monetary"].mean()))


def predict(fit: TrainBTYD, df: pd.DataFrame, horizon_days: int) -> dict[str, np.ndarray]:
    """`future_value_pred`, `churn_prob` (no purchase in the horizon), `prob_alive` and
    `expected_purchases` for the customers of `df`, in row order."""
    s = calibration(df)
    t = horizon_days / 7.0
    pred = baselines.predict_btyd(fit.model, s, t)
    spend = pred["expected_spend"] if fit.with_spend else fit.mean_spend
    bg = fit.model.bgnbd
    # P(no purchase in t) = P(dead) + P(alive) * E[exp(-lambda t) | data]; lambda | data,
    # alive ~ Gamma(r + x, alpha + T), whose Laplace transform gives the second factor.
    no_buy_if_alive = ((bg.alpha + s["T"]) / (bg.alpha + s["T"] + t)) ** (bg.r + s["frequency"])
    return {
        "future_value_pred": pred["expected_purchases"] * spend,
        "churn_prob": 1.0 - pred["prob_alive"] * (1.0 - no_buy_if_alive.to_numpy()),
        "prob_alive": pred["prob_alive"],
        "expected_purchases": pred["expected_purchases"],
    }


def btyd_columns(batch: pd.DataFrame, fit: TrainBTYD, horizon_days: int) -> pd.DataFrame:
    """The batch with `BTYD_FEATURES` added (a Ray Data `map_batches` function)."""
    p = predict(fit, batch, horizon_days)
    return batch.assign(
        btyd_p_alive=p["prob_alive"],
        btyd_expected_purchases=p["expected_purchases"],
        btyd_expected_value=p["future_value_pred"],
    )


def fit_train_btyd(customers, n_train: int, storage: Storage, out_dir: str) -> TrainBTYD:
    """Fit on at most `FIT_CUSTOMERS` train customers of the `customers` dataset and save the
    parameters to `<out_dir>/btyd.json`."""
    train = customers.filter(expr="split == 'train'").select_columns(
        ["customer_id", "frequency", "recency_days", "T_days", "monetary", "monetary_repeat"]
    )
    if n_train > FIT_CUSTOMERS:  # a hash sample: the same customers whatever the blocks
        from clvray.contract import customer_sample

        train = train.map_batches(
            customer_sample,
            batch_format="pandas",
            fn_kwargs={"share": FIT_CUSTOMERS / n_train * 1.2, "salt": "btyd"},
        )
    # Sorted by customer: the fit does not depend on the order blocks arrive in.
    df = train.to_pandas().sort_values("customer_id").head(FIT_CUSTOMERS)
    fit = fit_calibration(df)
    storage.write_json(join(out_dir, PARAMS_FILE), {**fit.to_json(), "n_fit": len(df)})
    return fit


def load(storage: Storage, out_dir: str) -> TrainBTYD:
    return TrainBTYD.from_json(storage.read_json(join(out_dir, PARAMS_FILE)))
