"""BG/NBD + Gamma-Gamma fitted on train customers, as a baseline and as GBM features."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from clvray import baselines, btyd
from clvray.storage import Storage


def _customers(n: int = 600, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    T = rng.uniform(60, 700, n)
    freq = rng.poisson(T / 80)
    recency = np.where(freq > 0, T * rng.uniform(0.2, 1.0, n), 0.0)
    monetary = rng.gamma(4, 10, n)
    return pd.DataFrame(
        {
            "customer_id": [f"C{i:05d}" for i in range(n)],
            "frequency": freq.astype(float),
            "recency_days": recency,
            "T_days": T,
            "monetary": monetary,
            "monetary_repeat": np.where(freq > 0, monetary * rng.uniform(0.8, 1.2, n), 0.0),
            "split": np.where(np.arange(n) % 5 == 0, "test", "train"),
        }
    )


def test_columns_agree_with_the_baseline_and_survive_a_json_round_trip() -> None:
    df = _customers()
    fit = btyd.fit_calibration(df[df["split"] == "train"])
    again = btyd.TrainBTYD.from_json(fit.to_json())
    cols = btyd.btyd_columns(df, again, horizon_days=90)
    direct = baselines.predict_btyd(fit.model, btyd.calibration(df), 90 / 7)
    np.testing.assert_allclose(cols["btyd_expected_purchases"], direct["expected_purchases"])
    np.testing.assert_allclose(cols["btyd_p_alive"], direct["prob_alive"])
    np.testing.assert_allclose(
        cols["btyd_expected_value"], direct["expected_purchases"] * direct["expected_spend"]
    )
    assert cols["btyd_p_alive"].between(0, 1).all()
    p = btyd.predict(fit, df, 90)
    assert ((p["churn_prob"] >= 0) & (p["churn_prob"] <= 1)).all()


@pytest.mark.slow
def test_fit_sees_train_customers_only(ray_local, tmp_path) -> None:
    import ray.data

    df = _customers()
    storage = Storage()
    n_train = int((df["split"] == "train").sum())
    first = btyd.fit_train_btyd(
        ray.data.from_pandas(df).repartition(3), n_train, storage, str(tmp_path / "a")
    )
    # Test customers' histories changed beyond recognition: the fitted parameters do not move.
    changed = df.copy()
    test = changed["split"] == "test"
    changed.loc[test, "frequency"] = 50.0
    changed.loc[test, "recency_days"] = changed.loc[test, "T_days"]
    second = btyd.fit_train_btyd(
        ray.data.from_pandas(changed).repartition(2), n_train, storage, str(tmp_path / "b")
    )
    assert first.to_json() == second.to_json()
    assert btyd.load(storage, str(tmp_path / "a")).to_json() == first.to_json()
    assert storage.read_json(str(tmp_path / "a" / btyd.PARAMS_FILE))["n_fit"] == n_train
