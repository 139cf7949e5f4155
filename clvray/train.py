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

Categorical features (`cat_*` columns, strings) use XGBoost's native categorical splits. Each
column's categories are fitted on train customers only (the `MAX_CATEGORIES` most frequent
values), saved in `meta.json` and applied identically on every worker and at scoring time:
any other value, unseen ones included, is missing.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa

from clvray.config import TrainSection
from clvray.features import FEATURES, categorical_columns
from clvray.storage import Storage, join

MODEL_FILES = {"value": "value.ubj", "churn": "churn.ubj", "quantiles": "quantiles.ubj"}
MODEL_FORMAT = 1
"""Version of what `models/<variant>/` holds and means (meta.json keys, booster files, feature
definitions). `clvray.model_run` refuses a run saved with another format."""
MAX_CATEGORIES = 64
"""Categories kept per categorical feature: its most frequent values among train customers
(ties by value). Rarer values carry too few customers to split on and would make scoring
depend on values a model never learned from."""
_VOCAB_PARTITIONS = 8
"""Hash partitions of the (column, value) count: distinct values go through it, not rows."""
_PAIR_SCHEMA = pa.schema([("column", pa.string()), ("value", pa.string())])


def _category_values(batch: pd.DataFrame, columns: list[str]) -> pa.Table:
    """Every non-null (column, value) pair of a batch, one row each."""
    names: list[str] = []
    values: list[str] = []
    for c in columns:
        present = [str(v) for v in batch[c].dropna().tolist()]
        names += [c] * len(present)
        values += present
    return pa.table({"column": names, "value": values}, schema=_PAIR_SCHEMA)


def _top_values(counts: pd.DataFrame, k: int) -> pd.DataFrame:
    """At most `k` rows per column: the most frequent values, ties by value."""
    ranked = counts.sort_values(
        ["column", "count()", "value"], ascending=[True, False, True], kind="stable"
    )
    return ranked.groupby("column", sort=False).head(k)[["column", "value", "count()"]]


def fit_categories(
    train, columns: list[str], max_categories: int = MAX_CATEGORIES
) -> dict[str, list[str]]:
    """Categories of each of `columns` over the `train` dataset: `{column: [values]}`, most
    frequent first (ties by value), at most `max_categories` each; [] for an all-null column.

    Cost: one pass over `train` and one hash shuffle of (column, value) counts. Each pair's
    total count is in exactly one batch of counts, so the per-batch top values together hold
    the overall top values: the driver receives at most `max_categories` rows per column and
    batch, whatever the number of customers or distinct values.
    """
    if not columns:
        return {}
    pairs = train.map_batches(
        _category_values, batch_format="pandas", fn_kwargs={"columns": columns}
    )
    counts = pairs.groupby(["column", "value"], num_partitions=_VOCAB_PARTITIONS).count()
    top = counts.map_batches(
        _top_values, batch_format="pandas", fn_kwargs={"k": max_categories}
    ).to_pandas()
    out: dict[str, list[str]] = {c: [] for c in columns}
    if not top.empty:
        for column, values in _top_values(top, max_categories).groupby("column", sort=False):
            out[str(column)] = [str(v) for v in values["value"]]
    return out


def feature_frame(
    df: pd.DataFrame, features: list[str], categories: dict[str, list[str]]
) -> pd.DataFrame:
    """`df[features]`, with each column of `categories` as a pandas Categorical holding
    exactly those categories (other values missing). A column with no categories (all null
    in train) becomes an all-missing float column, which XGBoost never splits on."""
    frame = df[features]
    if not categories:
        return frame
    frame = frame.copy()
    for column, values in categories.items():
        if values:
            codes = pd.Index(values).get_indexer(frame[column].astype(object))
            frame[column] = pd.Categorical.from_codes(codes, categories=values)
        else:
            frame[column] = np.full(len(frame), np.nan)
    return frame


def feature_matrix(
    df: pd.DataFrame,
    features: list[str],
    categories: dict[str, list[str]],
    label: np.ndarray | None = None,
):
    """The `xgb.DMatrix` of `df`; categorical splits only when there are categorical columns."""
    import xgboost as xgb

    return xgb.DMatrix(
        feature_frame(df, features, categories),
        label=label,
        feature_names=features,
        enable_categorical=bool(categories),
    )


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
    categories = config["categories"]
    train_df = ray.train.get_dataset_shard("train").materialize().to_pandas()
    valid_df = ray.train.get_dataset_shard("valid").materialize().to_pandas()
    results: dict[str, dict] = {}
    boosters = {}
    for name, params in config["params"].items():
        dtrain = feature_matrix(
            train_df, features, categories, label=_labels(train_df, name, params)
        )
        dvalid = feature_matrix(
            valid_df, features, categories, label=_labels(valid_df, name, params)
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
    Features named `cat_*` are categorical (strings): their categories are fitted on the
    train split (`fit_categories`) and saved in meta.json under `categories`.
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
    categories = fit_categories(train_ds, categorical_columns(features))
    params = model_params(cfg, seed)
    fs, storage_path = storage.filesystem(join(run_dir, "ray_train"))
    trainer = XGBoostTrainer(
        _train_loop,
        train_loop_config={
            "features": features,
            "categories": categories,
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
    meta = {
        "variant": variant,
        "features": features,
        "params": params,
        "results": results,
        # What a scorer checks before trusting these boosters (clvray.model_run).
        "model_format": MODEL_FORMAT,
        "clvray_version": clvray_version(),
        "behavioural_features": list(FEATURES),
    }
    if categories:
        meta["categories"] = categories
    storage.write_json(join(out, "meta.json"), meta)
    return TrainedModels(out, features, results)


def clvray_version() -> str:
    """The installed clvray's version ("unknown" when run from a source tree without metadata)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("clvray")
    except PackageNotFoundError:
        return "unknown"


class Boosters:
    """The boosters of a variant loaded once (per actor, in scoring) with their feature order."""

    def __init__(self, model_uri: str, storage: Storage):
        import xgboost as xgb

        self.meta = storage.read_json(join(model_uri, "meta.json"))
        self.features: list[str] = self.meta["features"]
        self.categories: dict[str, list[str]] = self.meta.get("categories", {})
        self.models = {}
        for name, filename in MODEL_FILES.items():
            booster = xgb.Booster()
            booster.load_model(bytearray(storage.read_bytes(join(model_uri, filename))))
            booster.set_param({"nthread": 1, "device": "cpu"})
            self.models[name] = booster

    def _dmatrix(self, df: pd.DataFrame):
        missing = [c for c in self.features if c not in df]
        if missing:
            raise KeyError(f"scoring input lacks feature column(s) {missing}")
        return feature_matrix(df, self.features, self.categories)

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
