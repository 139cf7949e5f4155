"""Distributed XGBoost with Ray Train's `XGBoostTrainer`: value, churn and value quantiles.

One trainer run fits the three boosters of a feature set over the same materialized shards,
so a run pays Ray Train's start-up once instead of three times. Each worker reads its own
shard (`ray.train.get_dataset_shard`); XGBoost's collective allreduces histograms and eval
metrics across workers, so early stopping on the valid split sees every valid customer.

Value objective: Tweedie (compound Poisson-Gamma, variance power 1 < p < 2). Future spend is a
point mass at zero (churned customers) plus a right-skewed positive part; squared error chases
the few whales and predicts negative values, Tweedie models exactly that shape with a log link.
Net future value can be negative (refunds); the Tweedie label is clipped at 0 and the
evaluation still uses the actual net value.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass

import numpy as np
import pandas as pd

from clvray.config import TrainSection
from clvray.storage import Storage, join

MODEL_FILES = {"value": "value.ubj", "churn": "churn.ubj", "quantiles": "quantiles.ubj"}


def _base_params(cfg: TrainSection) -> dict:
    return {
        "tree_method": "hist",
        "max_depth": cfg.max_depth,
        "eta": cfg.eta,
        "subsample": cfg.subsample,
        "min_child_weight": 2.0,
        "nthread": max(1, int(cfg.cpus_per_worker)),
        "device": "cuda" if cfg.use_gpu else "cpu",
    }


def model_params(cfg: TrainSection, seed: int) -> dict[str, dict]:
    base = {**_base_params(cfg), "seed": seed}
    value = {**base, "objective": cfg.value_objective, "eval_metric": "rmse"}
    if cfg.value_objective == "reg:tweedie":
        value["tweedie_variance_power"] = cfg.tweedie_variance_power
        value["eval_metric"] = f"tweedie-nloglik@{cfg.tweedie_variance_power}"
    return {
        "value": value,
        "churn": {**base, "objective": "binary:logistic", "eval_metric": "logloss"},
        "quantiles": {
            **base,
            "objective": "reg:quantileerror",
            "quantile_alpha": list(cfg.quantiles),
        },
    }


def _labels(df: pd.DataFrame, model: str, params: dict) -> np.ndarray:
    if model == "churn":
        return df["churned"].to_numpy("float64")
    y = df["future_value"].to_numpy("float64")
    return np.clip(y, 0, None) if params.get("objective") == "reg:tweedie" else y


def _train_loop(config: dict) -> None:
    """Runs on every Ray Train worker: fit the three boosters on this worker's shards."""
    import ray.train
    import xgboost as xgb

    features = config["features"]
    train_df = ray.train.get_dataset_shard("train").materialize().to_pandas()
    valid_df = ray.train.get_dataset_shard("valid").materialize().to_pandas()
    results: dict[str, dict] = {}
    boosters = {}
    for name, params in config["params"].items():
        dtrain = xgb.DMatrix(
            train_df[features], label=_labels(train_df, name, params), feature_names=features
        )
        dvalid = xgb.DMatrix(
            valid_df[features], label=_labels(valid_df, name, params), feature_names=features
        )
        history: dict = {}
        booster = xgb.train(
            params,
            dtrain,
            num_boost_round=config["num_boost_round"],
            evals=[(dvalid, "valid")],
            early_stopping_rounds=config["early_stopping_rounds"],
            evals_result=history,
            verbose_eval=False,
        )
        metric = next(iter(history["valid"]))
        results[name] = {
            "best_iteration": int(booster.best_iteration),
            f"valid_{metric}": float(history["valid"][metric][booster.best_iteration]),
        }
        boosters[name] = booster
    flat = {f"{m}/{k}": v for m, d in results.items() for k, v in d.items()}
    if ray.train.get_context().get_world_rank() == 0:
        with tempfile.TemporaryDirectory() as tmp:
            for name, booster in boosters.items():
                booster.save_model(os.path.join(tmp, MODEL_FILES[name]))
            with open(os.path.join(tmp, "train_results.json"), "w") as f:
                json.dump(results, f)
            ray.train.report(flat, checkpoint=ray.train.Checkpoint.from_directory(tmp))
    else:
        ray.train.report(flat)


def _split(batch: pd.DataFrame, split: str, columns: list[str]) -> pd.DataFrame:
    return batch.loc[batch["split"] == split, columns]


@dataclass
class TrainedModels:
    """Where a feature set's boosters went, and what they were trained on."""

    uri: str
    features: list[str]
    results: dict


def train_models(
    customers,
    features: list[str],
    cfg: TrainSection,
    storage: Storage,
    run_dir: str,
    variant: str,
    seed: int = 0,
) -> TrainedModels:
    """Fit value, churn and quantile boosters on `features` of the `customers` dataset.

    `customers` holds one row per customer with `split`, the feature columns and labels.
    Boosters, feature names and order, params and valid metrics are saved together under
    `<run_dir>/models/<variant>/`. Cost: one Ray Train run with `cfg.num_workers` workers;
    each worker holds its shard of train + valid customers in memory as a DMatrix.
    """
    import ray.train
    from ray.train.xgboost import XGBoostTrainer

    columns = [*features, "future_value", "churned"]
    train_ds = customers.map_batches(
        _split, batch_format="pandas", fn_kwargs={"split": "train", "columns": columns}
    )
    valid_ds = customers.map_batches(
        _split, batch_format="pandas", fn_kwargs={"split": "valid", "columns": columns}
    )
    params = model_params(cfg, seed)
    fs, storage_path = storage.filesystem(join(run_dir, "ray_train"))
    trainer = XGBoostTrainer(
        _train_loop,
        train_loop_config={
            "features": features,
            "params": params,
            "num_boost_round": cfg.num_boost_round,
            "early_stopping_rounds": cfg.early_stopping_rounds,
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.num_workers,
            use_gpu=cfg.use_gpu,
            resources_per_worker={"CPU": cfg.cpus_per_worker},
        ),
        run_config=ray.train.RunConfig(
            name=f"xgboost-{variant}-{os.path.basename(run_dir.rstrip('/'))}",
            storage_path=storage_path,
            storage_filesystem=fs,
            failure_config=ray.train.FailureConfig(max_failures=1),
        ),
        datasets={"train": train_ds, "valid": valid_ds},
    )
    result = trainer.fit()
    out = join(run_dir, "models", variant)
    with result.checkpoint.as_directory() as ckpt:
        with open(os.path.join(ckpt, "train_results.json")) as f:
            results = json.load(f)
        storage.delete_dir(out)
        storage.upload_dir(ckpt, out)
    meta = {"variant": variant, "features": features, "params": params, "results": results}
    storage.write_json(join(out, "meta.json"), meta)
    return TrainedModels(out, features, results)


class Boosters:
    """The boosters of a variant loaded once (per actor, in scoring) with their feature order."""

    def __init__(self, model_uri: str, storage: Storage):
        import xgboost as xgb

        self.meta = storage.read_json(join(model_uri, "meta.json"))
        self.features: list[str] = self.meta["features"]
        self.models = {}
        for name, filename in MODEL_FILES.items():
            booster = xgb.Booster()
            booster.load_model(bytearray(storage.read_bytes(join(model_uri, filename))))
            booster.set_param({"nthread": 1, "device": "cpu"})
            self.models[name] = booster

    def _dmatrix(self, df: pd.DataFrame):
        import xgboost as xgb

        missing = [c for c in self.features if c not in df]
        if missing:
            raise KeyError(f"scoring input lacks feature column(s) {missing}")
        return xgb.DMatrix(df[self.features], feature_names=self.features)

    def predict(self, df: pd.DataFrame) -> dict[str, np.ndarray]:
        """Point value, churn probability and value quantiles (sorted so P10 <= P50 <= P90)."""
        d = self._dmatrix(df)
        out = {
            "future_value_pred": self.models["value"].predict(
                d, iteration_range=self._range("value")
            ),
            "churn_prob": self.models["churn"].predict(d, iteration_range=self._range("churn")),
        }
        q = np.asarray(
            self.models["quantiles"].predict(d, iteration_range=self._range("quantiles"))
        )
        q = np.sort(q.reshape(len(df), -1), axis=1)
        for i, alpha in enumerate(self.meta["params"]["quantiles"]["quantile_alpha"]):
            out[f"value_p{round(alpha * 100):02d}"] = q[:, i]
        return out

    def contributions(self, df: pd.DataFrame) -> np.ndarray:
        """Per-feature contributions to the value model's margin (SHAP values; last column is bias)."""
        return self.models["value"].predict(
            self._dmatrix(df), pred_contribs=True, iteration_range=self._range("value")
        )

    def _range(self, name: str) -> tuple[int, int]:
        return (0, self.meta["results"][name]["best_iteration"] + 1)

    def importance(self) -> dict[str, float]:
        return {
            k: float(v) for k, v in self.models["value"].get_score(importance_type="gain").items()
        }
