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

The same config and seed give the same boosters whatever the number of workers or blocks
(`fit_booster`): every worker bins the numeric features onto one set of edges (quantiles of a
hash sample of train customers, `MAX_BIN - 1` at most, so XGBoost's distributed sketch is
exact and its cuts are those edges), starts from one base score per booster computed from
that sample, and samples rows per round by a hash of the customer id instead of XGBoost's
per-worker sampler. The quantile booster, whose distributed leaves average per-worker
quantiles, is fitted in one process on that sample (`train.sample_customers`).
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from clvray.config import TrainSection
from clvray.features import FEATURES, categorical_columns
from clvray.storage import Storage, join

MODEL_FILES = {
    "value": "value.ubj",
    "churn": "churn.ubj",
    "quantiles": "quantiles.ubj",
    "spend": "spend.ubj",
}
SPEND_FLOOR = 0.01
"""Buyers' net future value is raised to this before the conditional (gamma) fit: a buyer
whose refunds exceed their purchases in the horizon still bought, and gamma needs y > 0."""
CALIBRATION_ROWS = 200_000
"""At most this many valid customers (a hash sample) reach the driver for model choice and
conformal calibration: one float per model each."""
BLEND_FEATURE = "btyd_expected_value"
"""The BG/NBD + Gamma-Gamma expected value over the horizon (`clvray.btyd`), a GBM feature
when `features.btyd_features` is on; the `blend` value model averages it with the hurdle's
value in log space."""
BLEND_FLOOR = 1e-6
"""Both values are raised to this before the geometric mean (log of zero)."""
MIN_CONFORMAL_GROUP = 50
"""Fewest valid customers per conformal group: the offset of a group is its
ceil((n+1)*0.8)-th score, too noisy below this."""
MODEL_FORMAT = 1
"""Version of what `models/<variant>/` holds and means (meta.json keys, booster files, feature
definitions). `clvray.model_run` refuses a run saved with another format."""
MAX_BIN = 256
"""XGBoost's `max_bin`. Numeric features are floored onto at most `MAX_BIN - 1` global edges,
so each feature has fewer distinct values than bins and XGBoost's cuts are exactly the edges
on one worker or many."""
DISTRIBUTED = ("value", "churn", "spend")
"""Boosters fitted by the Ray Train workers together; `quantiles` is fitted in one process."""
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
        "max_bin": MAX_BIN,
        "max_depth": cfg.max_depth,
        "eta": cfg.eta,
        "min_child_weight": 2.0,
        "nthread": max(1, int(cfg.cpus_per_worker)),
        "device": "cuda" if cfg.use_gpu else "cpu",
    }


def model_params(cfg: TrainSection, seed: int) -> dict[str, dict]:
    """XGBoost params of each booster the configured `value_model` needs (`value` for tweedie,
    `spend` for hurdle, both for auto; `churn` and `quantiles` always). `train.subsample` is
    applied by `fit_booster` (a hash of the customer id per round), not by XGBoost, whose
    own `subsample` is 1 here."""
    base = {**_base_params(cfg), "seed": seed}
    value = {**base, "objective": cfg.value_objective, "eval_metric": "rmse"}
    if cfg.value_objective == "reg:tweedie":
        value["tweedie_variance_power"] = cfg.tweedie_variance_power
        value["eval_metric"] = f"tweedie-nloglik@{cfg.tweedie_variance_power}"
    spend = {**base, "objective": cfg.spend_objective, "eval_metric": "rmse"}
    if cfg.spend_objective == "reg:gamma":
        spend["eval_metric"] = "gamma-deviance"
    elif cfg.spend_objective == "reg:tweedie":
        spend["tweedie_variance_power"] = cfg.tweedie_variance_power
        spend["eval_metric"] = f"tweedie-nloglik@{cfg.tweedie_variance_power}"
    params: dict[str, dict] = {}
    if cfg.value_model in ("tweedie", "auto"):
        params["value"] = value
    params["churn"] = {**base, "objective": "binary:logistic", "eval_metric": "logloss"}
    if cfg.value_model in ("hurdle", "blend", "auto"):
        params["spend"] = spend
    params["quantiles"] = {
        **base,
        "objective": "reg:quantileerror",
        "quantile_alpha": list(cfg.quantiles),
    }
    for p in params.values():
        p["subsample"] = 1.0  # drawn by fit_booster instead
    return params


def value_candidates(value_model: str, features: list[str]) -> list[str]:
    """The value models built for `train.value_model` (auto: all that `features` allow)."""
    blend_ok = BLEND_FEATURE in features
    if value_model == "blend" and not blend_ok:
        raise ValueError(
            f"train.value_model=blend needs the {BLEND_FEATURE} feature "
            "(features.btyd_features: true, and a BG/NBD + Gamma-Gamma fit)"
        )
    if value_model == "auto":
        return ["tweedie", "hurdle", *(["blend"] if blend_ok else [])]
    return ["hurdle", "blend"] if value_model == "blend" else [value_model]


def _rows(df: pd.DataFrame, model: str) -> pd.DataFrame:
    """The customers a booster is fitted on: buyers only for the hurdle's conditional part."""
    return df[df["churned"].to_numpy() == 0] if model == "spend" else df


def _labels(df: pd.DataFrame, model: str, params: dict) -> np.ndarray:
    if model == "churn":
        return df["churned"].to_numpy("float64")
    y = df["future_value"].to_numpy("float64")
    if model == "spend" and params.get("objective") in ("reg:gamma", "reg:tweedie"):
        return np.clip(y, SPEND_FLOOR, None)
    return np.clip(y, 0, None) if params.get("objective") == "reg:tweedie" else y


def numeric_features(features: list[str], categories: dict[str, list[str]]) -> list[str]:
    """The features binned onto global edges: every one that is not categorical."""
    return [f for f in features if f not in categories]


def bin_edges(df: pd.DataFrame, columns: list[str], max_bin: int = MAX_BIN) -> dict[str, list]:
    """Per column, at most `max_bin - 1` edges: distinct values of `df` at evenly spaced
    quantile levels from the minimum up (each edge is a value of `df`); [] for a column with
    no finite value."""
    levels = np.linspace(0.0, 1.0, max_bin)[:-1]
    out: dict[str, list] = {}
    for c in columns:
        v = df[c].to_numpy("float64")
        v = v[np.isfinite(v)]
        out[c] = np.unique(np.quantile(v, levels, method="lower")).tolist() if len(v) else []
    return out


def floor_to_edges(df: pd.DataFrame, edges: dict[str, list]) -> pd.DataFrame:
    """`df` with each column of `edges` replaced by its largest edge <= the value (the lowest
    edge below them all; missing stays missing).

    A booster fitted on floored values splits on edges (XGBoost's cuts are the distinct
    values) and sends `x` left when `x < edge`: for any edge that holds for the raw value
    exactly when it holds for its floor, so the booster predicts raw features as it would the
    floored ones, and scoring needs no edges (tested)."""
    out = df.copy()
    for column, e in edges.items():
        if not e:
            continue
        a = np.asarray(e, dtype="float64")
        v = out[column].to_numpy("float64")
        idx = np.clip(np.searchsorted(a, v, side="right") - 1, 0, None)
        out[column] = np.where(np.isnan(v), np.nan, a[np.minimum(idx, len(a) - 1)])
    return out


def base_scores(train: pd.DataFrame, params: dict[str, dict]) -> dict[str, float]:
    """One starting value per distributed booster (XGBoost's `base_score`): the mean of its
    labels over `train` (rows sorted by customer, so the float sum is always the same), kept
    inside the objective's domain. XGBoost would otherwise estimate it on every worker's
    shard and combine them, which depends on the number of workers."""
    out = {}
    for name in DISTRIBUTED:
        if name not in params:
            continue
        y = _labels(_rows(train, name), name, params[name])
        m = float(np.mean(y)) if len(y) else 0.5
        objective = params[name]["objective"]
        if objective == "binary:logistic":
            m = min(max(m, 1e-6), 1.0 - 1e-6)
        elif objective in ("reg:tweedie", "reg:gamma"):
            m = max(m, 1e-6)
        out[name] = m
    return out


_GOLDEN = 0x9E3779B97F4A7C15


def round_mask(keys: np.ndarray, boosting_round: int, fraction: float) -> np.ndarray:
    """0/1 weights: which rows (by their `id_hash64` keys) the round `boosting_round` sees, a
    share `fraction` of them; independent draws per round (a SplitMix64 finalizer of the key
    and the round)."""
    h = keys ^ np.uint64(((boosting_round + 1) * _GOLDEN) % (1 << 64))
    h = (h ^ (h >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    h = (h ^ (h >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    h = h ^ (h >> np.uint64(31))
    u = (h >> np.uint64(11)).astype(np.float64) / float(1 << 53)
    return (u < fraction).astype(np.float32)


def _row_sample(dtrain, keys: np.ndarray, fraction: float):
    """An XGBoost callback that sets the round's row weights (`round_mask`) before each
    round: what XGBoost's `subsample` does (unsampled rows count zero), drawn globally."""
    import xgboost as xgb

    class RowSample(xgb.callback.TrainingCallback):
        def before_iteration(self, model, epoch: int, evals_log) -> bool:
            dtrain.set_weight(round_mask(keys, epoch, fraction))
            return False

    return RowSample()


def fit_booster(
    name: str,
    params: dict,
    train: pd.DataFrame,
    valid: pd.DataFrame,
    plan: dict,
) -> tuple[Any, dict]:
    """One booster fitted on `train` (early stopping on `valid`), in one process or, inside a
    Ray Train worker, on every worker's shard together (XGBoost's collective).

    `plan` holds what makes the fit independent of the shards: `features`, `categories`,
    `edges` (numeric features are floored onto them), `base_scores`, `subsample` and `seed`
    (the hash-drawn rows per round), `num_boost_round`, `early_stopping_rounds`. Both frames
    must be sorted by `customer_id`. Returns the booster and its valid result."""
    import xgboost as xgb

    from clvray.contract import id_hash64

    tr, va = _rows(train, name), _rows(valid, name)
    edges = plan.get("edges", {})
    p = dict(params)
    if name in plan.get("base_scores", {}):
        p["base_score"] = plan["base_scores"][name]
    features, categories = plan["features"], plan["categories"]
    dtrain = feature_matrix(floor_to_edges(tr, edges), features, categories,
                            label=_labels(tr, name, p))  # fmt: skip
    dvalid = feature_matrix(floor_to_edges(va, edges), features, categories,
                            label=_labels(va, name, p))  # fmt: skip
    callbacks = []
    fraction = plan.get("subsample", 1.0)
    if fraction < 1.0:
        keys = id_hash64(tr["customer_id"], f"subsample:{plan.get('seed', 0)}:{name}")
        callbacks.append(_row_sample(dtrain, keys, fraction))
    history: dict = {}
    booster = xgb.train(
        p,
        dtrain,
        num_boost_round=plan["num_boost_round"],
        evals=[(dvalid, "valid")],
        early_stopping_rounds=plan["early_stopping_rounds"],
        evals_result=history,
        verbose_eval=False,
        callbacks=callbacks,
    )
    metric = next(iter(history["valid"]))
    # rows of every worker together (one process: this one's)
    rows = xgb.collective.allreduce(
        np.array([len(tr), len(va)], dtype=np.float64), xgb.collective.Op.SUM
    )
    result = {
        "best_iteration": int(booster.best_iteration),
        f"valid_{metric}": float(history["valid"][metric][booster.best_iteration]),
        "train_rows": int(rows[0]),
        "valid_rows": int(rows[1]),
    }
    return booster, result


def _sorted(df: pd.DataFrame) -> pd.DataFrame:
    return df.sort_values("customer_id", kind="stable").reset_index(drop=True)


def _splits(df: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    df = _sorted(df)
    return tuple(  # type: ignore[return-value]
        df[df["split"] == split].reset_index(drop=True) for split in ("train", "valid")
    )


def prepare(sample: pd.DataFrame, plan: dict, params: dict[str, dict]) -> dict:
    """The shard-independent part of `plan` from the train customers of `sample` (a hash
    sample of train + valid customers): global bin edges and base scores."""
    train, _ = _splits(sample)
    numeric = numeric_features(plan["features"], plan["categories"])
    return {
        **plan,
        "edges": bin_edges(train, numeric),
        "base_scores": base_scores(train, params),
    }


def fit_quantiles(sample: pd.DataFrame, plan: dict, params: dict) -> tuple[bytes, dict]:
    """The quantile booster fitted in one process on `sample`'s train customers (early
    stopping on its valid ones); its saved bytes (UBJSON) and valid result."""
    train, valid = _splits(sample)
    booster, result = fit_booster("quantiles", params, train, valid, plan)
    result["customers"] = int(len(train))
    return bytes(booster.save_raw("ubj")), result  # type: ignore[attr-defined]


SAMPLE_SALT = "train-sample"
"""Salt of the hash sample behind `prepare` and `fit_quantiles` (`contract.customer_sample`)."""


def sample_share(n_rows: int, sample_customers: int) -> float:
    """Share of customers in the hash sample behind `prepare` and `fit_quantiles`."""
    return 1.0 if n_rows <= sample_customers else sample_customers / n_rows


def fit_local(
    df: pd.DataFrame, plan: dict, params: dict[str, dict], sample_customers: int
) -> tuple[dict, dict]:
    """Every booster of `params` fitted in this process the way `train_models` fits them on
    Ray Train workers (same sample, edges, base scores and row draws): the boosters by name
    and their results. For benchmarks and tests; `df` holds train and valid customers."""
    import xgboost as xgb

    from clvray.contract import customer_sample

    sample = customer_sample(df, sample_share(len(df), sample_customers), SAMPLE_SALT)
    plan = prepare(sample, plan, params)
    train, valid = _splits(df)
    boosters: dict[str, Any] = {}
    results: dict[str, dict] = {}
    for name, p in params.items():
        if name == "quantiles":
            raw, results[name] = fit_quantiles(sample, plan, p)
            boosters[name] = xgb.Booster(model_file=bytearray(raw))
        else:
            boosters[name], results[name] = fit_booster(name, p, train, valid, plan)
    return boosters, results


def _every_row_config():
    """Ray Train's dataset config with every row kept: its default splits a dataset over
    workers with `equal=True`, which drops up to `num_workers - 1` rows to even the shards.
    XGBoost needs no equal shards (a torch loop does: DDP's collectives hang on uneven
    batches), so the boosters' shards are split with `equal=False`."""
    import ray.train

    class EveryRow(ray.train.DataConfig):
        def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
            out: list[dict] = [{} for _ in range(world_size)]
            for name, ds in datasets.items():
                ds = ds.copy(ds)
                ds.context.execution_options = self.default_ingest_options()
                splits = ds.streaming_split(world_size, equal=False, locality_hints=worker_node_ids)
                for i, split in enumerate(splits):
                    out[i][name] = split
            return out

    return EveryRow()


def _train_loop(config: dict) -> None:
    """Runs on every Ray Train worker: fit the distributed boosters on this worker's shard."""
    import ray.train

    plan = config["plan"]
    # Sorted by customer: the boosters must not depend on the order (or the blocks) in which
    # Ray Data delivers rows, or the same config and seed would give different models.
    shard = ray.train.get_dataset_shard("customers").materialize().to_pandas()
    if shard.empty:  # more workers than blocks: this one fits on no rows, with the others
        shard = pd.DataFrame({c: pd.Series(dtype=t) for c, t in config["dtypes"].items()})
    train_df, valid_df = _splits(shard)
    results: dict[str, dict] = {}
    boosters = {}
    for name, params in config["params"].items():
        boosters[name], results[name] = fit_booster(name, params, train_df, valid_df, plan)
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


def _model_rows(batch: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """Train and valid customers, the model's columns and `split`."""
    return batch.loc[batch["split"].isin(("train", "valid")), [*columns, "split"]]


def _calibration_columns(batch: pd.DataFrame, model_uri: str, storage: Storage) -> pd.DataFrame:
    """Per valid customer: actual value, each fitted value model's prediction and the raw
    outer quantiles (a `map_batches` function; boosters loaded per block)."""
    boosters = Boosters(model_uri, storage)
    d = boosters._dmatrix(batch)
    churn = boosters._churn(d)
    out = pd.DataFrame({"future_value": batch["future_value"].to_numpy("float64")})
    for name, values in boosters._candidates(d, churn, batch).items():
        out[f"pred_{name}"] = np.asarray(values, dtype="float64")
    q = boosters._raw_quantiles(d, len(batch))
    out["q_lo"], out["q_hi"] = q[:, 0], q[:, -1]
    return out


def _valid_predictions(valid_ds, model_uri: str, storage: Storage) -> pd.DataFrame:
    n = valid_ds.count()
    if n == 0:
        raise ValueError("the valid split holds no customers: cannot choose or calibrate")
    if n > CALIBRATION_ROWS:  # a hash sample: the same customers whatever the blocks
        from clvray.contract import customer_sample

        valid_ds = valid_ds.map_batches(
            customer_sample,
            batch_format="pandas",
            fn_kwargs={"share": CALIBRATION_ROWS / n, "salt": "calibration"},
        )
    return valid_ds.map_batches(
        _calibration_columns,
        batch_format="pandas",
        fn_kwargs={"model_uri": model_uri, "storage": storage},
    ).to_pandas()


def choose_value_model(valid: pd.DataFrame, configured: str) -> dict:
    """The value model kept, with the valid-split numbers behind the choice.

    `valid` holds `future_value` and `pred_<model>` per fitted model (`tweedie`, `hurdle`). With
    `auto` the model with the higher normalized Gini + Spearman on the valid split is kept
    (ranking customers is what the value is used for); otherwise the configured one.
    """
    from clvray import metrics

    y = valid["future_value"].to_numpy(float)
    scores = {}
    for col in valid.columns:
        if col.startswith("pred_"):
            p = valid[col].to_numpy(float)
            scores[col[5:]] = {
                "normalized_gini": metrics.normalized_gini(y, p),
                "spearman": metrics.spearman(y, p),
                "n": len(y),
            }
    if configured != "auto":
        return {"chosen": configured, "reason": "configured", "valid": scores}

    def total(name: str) -> float:
        v = scores[name]["normalized_gini"] + scores[name]["spearman"]
        return v if np.isfinite(v) else -np.inf

    # Sorted names: a tie keeps the same model on every run.
    chosen = max(sorted(scores), key=total)
    others = ", ".join(f"{n} {total(n):.4f}" for n in sorted(scores) if n != chosen)
    reason = f"auto: higher valid normalized Gini + Spearman ({chosen} {total(chosen):.4f}" + (
        f" vs {others})" if others else ")"
    )
    return {"chosen": chosen, "reason": reason, "valid": scores}


def conformal_groups(pred: np.ndarray, edges: list[float]) -> np.ndarray:
    """Group (0-based) of each predicted value given the upper-exclusive group edges."""
    return np.searchsorted(np.asarray(edges, dtype=float), pred, side="right")


def fit_conformal(
    y: np.ndarray,
    pred: np.ndarray,
    q_lo: np.ndarray,
    q_hi: np.ndarray,
    target: float = 0.8,
    max_groups: int = 10,
) -> dict:
    """Conformalised quantile regression (Romano et al., 2019) per group of predicted value,
    with the two ends calibrated one after the other.

    Future value has a point mass at zero (customers who buy nothing) and the raw P10 is often
    exactly zero too, so the symmetric CQR score `max(q_lo - y, y - q_hi)` is tied at zero for
    a large share of customers and its quantile overshoots the target (0.83-0.85 measured on
    Online Retail for 0.80). Instead, in each group: the lower offset is the
    ceil((n + 1)(1 - a/2))-th smallest `q_lo - y` (a = 1 - target: at most a/2 fall below);
    then among the customers above their lower end the upper score `y - q_hi` (those below
    count as +inf) gives the upper offset as its ceil((n + 1) * target)-th smallest. Upper
    scores are continuous in practice, so the interval `[q_lo - lower, q_hi + upper]` holds
    close to `target` of a group's customers, not more. Groups are equal-count bins of the
    predicted value (at most `max_groups`, at least `MIN_CONFORMAL_GROUP` customers each): the
    customers with the highest predicted value get their own calibration. Returns the JSON
    saved in meta.json.
    """
    y, pred = np.asarray(y, float), np.asarray(pred, float)
    q_lo, q_hi = np.asarray(q_lo, float), np.asarray(q_hi, float)
    n_groups = int(max(1, min(max_groups, len(y) // MIN_CONFORMAL_GROUP)))
    edges = np.unique(np.quantile(pred, np.linspace(0, 1, n_groups + 1)[1:-1])).tolist()
    group = conformal_groups(pred, edges)

    def kth(s: np.ndarray, level: float) -> float:
        s = np.sort(s)
        k = min(int(np.ceil((len(s) + 1) * level)), len(s))
        finite = s[np.isfinite(s)]
        return float(s[k - 1]) if np.isfinite(s[k - 1]) else float(finite.max(initial=0.0))

    def offsets(m: np.ndarray) -> tuple[float, float]:
        lower = kth(q_lo[m] - y[m], 1 - (1 - target) / 2)
        upper = np.where(y[m] >= q_lo[m] - lower, y[m] - q_hi[m], np.inf)
        return lower, kth(upper, target)

    lows, highs, sizes = [], [], []
    everyone = np.ones(len(y), dtype=bool)
    for g in range(len(edges) + 1):
        m = group == g
        lo_off, hi_off = offsets(m if m.any() else everyone)
        lows.append(lo_off)
        highs.append(hi_off)
        sizes.append(int(m.sum()))
    lo_adj, hi_adj = np.asarray(lows)[group], np.asarray(highs)[group]
    return {
        "target": target,
        "edges": edges,
        "offsets_lo": lows,
        "offsets_hi": highs,
        "n": sizes,
        "valid_coverage_raw": float(np.mean((y >= q_lo) & (y <= q_hi))),
        "valid_coverage": float(np.mean((y >= q_lo - lo_adj) & (y <= q_hi + hi_adj))),
    }


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
    `<run_dir>/models/<variant>/`, with the value model chosen on the valid split
    (`value_model`) and the conformal offsets of the interval (`conformal`). Cost: one Ray
    Train run with `cfg.num_workers` workers for the value, churn and spend boosters (each
    worker holds its shard of train + valid customers in memory as a DMatrix), and beside it
    one task fitting the quantile booster on at most `cfg.sample_customers` customers.
    """
    import ray.train
    from ray.train.xgboost import XGBoostTrainer

    columns = ["customer_id", *features, "future_value", "churned"]
    # Materialized before the trainer starts: workers that hold every CPU would otherwise wait
    # forever for the map tasks feeding their shards (2 workers of 1 CPU on a 2-CPU node).
    # One row per customer and only the model's columns: bounded by the customer count.
    # Train and valid customers are one dataset: one split coordinator in Ray Train, not two.
    rows = customers.map_batches(
        _model_rows, batch_format="pandas", fn_kwargs={"columns": columns}
    ).materialize()
    if rows.num_blocks() < cfg.num_workers:  # shards are whole blocks: one per worker at least
        rows = rows.repartition(cfg.num_workers).materialize()
    train_ds = rows.filter(expr="split == 'train'")
    # materialized: the model choice counts it, then predicts on it
    valid_ds = rows.filter(expr="split == 'valid'").materialize()
    categories = fit_categories(train_ds, categorical_columns(features))
    params = model_params(cfg, seed)
    candidates = value_candidates(cfg.value_model, features)
    plan = {
        "features": features,
        "categories": categories,
        "subsample": cfg.subsample,
        "seed": seed,
        "num_boost_round": cfg.num_boost_round,
        "early_stopping_rounds": cfg.early_stopping_rounds,
    }
    # The shard-independent parts (edges, base scores) and the quantile booster come from one
    # hash sample of customers, in tasks: the sample's rows never reach the driver.
    from clvray.contract import customer_sample

    n_rows = rows.count()  # materialized: from block metadata
    share = sample_share(n_rows, cfg.sample_customers)
    sample = rows.map_batches(
        customer_sample,
        batch_format="pandas",
        fn_kwargs={"share": share, "salt": SAMPLE_SALT},
    )
    sample = sample.materialize()
    task = ray.remote(num_cpus=cfg.cpus_per_worker)
    plan = ray.get(task(_prepare_task).remote(sample, plan, params))
    quantiles = task(_quantiles_task).remote(sample, plan, params["quantiles"])
    distributed = {k: v for k, v in params.items() if k in DISTRIBUTED}
    fs, storage_path = storage.filesystem(join(run_dir, "ray_train"))
    trainer = XGBoostTrainer(
        _train_loop,
        train_loop_config={
            "plan": plan,
            "params": distributed,
            "dtypes": {f.name: f.type.to_pandas_dtype() for f in rows.schema().base_schema},
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
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
        ),
        datasets={"customers": rows},
        dataset_config=_every_row_config(),
    )
    result = trainer.fit()
    out = join(run_dir, "models", variant)
    with result.checkpoint.as_directory() as ckpt:
        with open(os.path.join(ckpt, "train_results.json")) as f:
            results = json.load(f)
        storage.delete_dir(out)
        storage.upload_dir(ckpt, out)
    raw, results["quantiles"] = ray.get(quantiles)
    n_valid = valid_ds.count()
    seen = (results["churn"]["train_rows"], results["churn"]["valid_rows"])
    if seen != (n_rows - n_valid, n_valid):
        raise RuntimeError(
            f"the boosters saw {seen[0]} train and {seen[1]} valid customers of "
            f"{n_rows - n_valid} and {n_valid}: rows were lost between Ray Data and "
            "the Ray Train workers"
        )
    storage.write_bytes(join(out, MODEL_FILES["quantiles"]), raw)
    meta: dict = {
        "variant": variant,
        "features": features,
        "params": params,
        "results": results,
        "candidates": candidates,
        # How the fit was made independent of workers and blocks (fit_booster)
        "subsample": {"share": cfg.subsample, "drawn_by": "customer id hash per round"},
        "sample_customers": {"share": share, "max": cfg.sample_customers},
        "bin_edges": {k: len(v) for k, v in plan["edges"].items()},
        "base_scores": plan["base_scores"],
        # What a scorer checks before trusting these boosters (clvray.model_run).
        "model_format": MODEL_FORMAT,
        "clvray_version": clvray_version(),
        "behavioural_features": list(FEATURES),
    }
    if categories:
        meta["categories"] = categories
    storage.write_json(join(out, "meta.json"), meta)
    # Model choice and interval calibration on the valid split, with the saved boosters.
    valid = _valid_predictions(valid_ds, out, storage)
    meta["value_model"] = choose_value_model(valid, cfg.value_model)
    if cfg.conformal:
        meta["conformal"] = fit_conformal(
            valid["future_value"].to_numpy(float),
            valid[f"pred_{meta['value_model']['chosen']}"].to_numpy(float),
            valid["q_lo"].to_numpy(float),
            valid["q_hi"].to_numpy(float),
            target=max(cfg.quantiles) - min(cfg.quantiles),
            max_groups=cfg.conformal_groups,
        )
    storage.write_json(join(out, "meta.json"), meta)
    return TrainedModels(out, features, results)


def _prepare_task(sample, plan: dict, params: dict) -> dict:
    return prepare(sample.to_pandas(), plan, params)


def _quantiles_task(sample, plan: dict, params: dict) -> tuple[bytes, dict]:
    return fit_quantiles(sample.to_pandas(), plan, params)


def clvray_version() -> str:
    """The installed clvray's version ("unknown" when run from a source tree without metadata)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("clvray")
    except PackageNotFoundError:
        return "unknown"


class Boosters:
    """The boosters of a variant loaded once (per actor, in scoring) with their feature order,
    the value model chosen on the valid split and the conformal interval offsets."""

    def __init__(self, model_uri: str, storage: Storage):
        import xgboost as xgb

        self.meta = storage.read_json(join(model_uri, "meta.json"))
        self.features: list[str] = self.meta["features"]
        self.categories: dict[str, list[str]] = self.meta.get("categories", {})
        self.models = {}
        for name in self.meta["results"]:
            booster = xgb.Booster()
            booster.load_model(bytearray(storage.read_bytes(join(model_uri, MODEL_FILES[name]))))
            booster.set_param({"nthread": 1, "device": "cpu"})
            self.models[name] = booster
        default = "tweedie" if "value" in self.models else "hurdle"
        self.value_model: str = self.meta.get("value_model", {}).get("chosen", default)
        self.conformal: dict | None = self.meta.get("conformal")

    def _dmatrix(self, df: pd.DataFrame):
        missing = [c for c in self.features if c not in df]
        if missing:
            raise KeyError(f"scoring input lacks feature column(s) {missing}")
        return feature_matrix(df, self.features, self.categories)

    def _churn(self, d) -> np.ndarray:
        return self.models["churn"].predict(d, iteration_range=self._range("churn"))

    def _candidates(self, d, churn: np.ndarray, df: pd.DataFrame) -> dict[str, np.ndarray]:
        """Point value of every value model built: `tweedie`, `hurdle`, `blend`."""
        out = {}
        if "value" in self.models:
            out["tweedie"] = self.models["value"].predict(d, iteration_range=self._range("value"))
        if "spend" in self.models:
            spend = self.models["spend"].predict(d, iteration_range=self._range("spend"))
            out["hurdle"] = (1.0 - churn) * spend
        # Models saved before the blend existed list no candidates: no blend for them.
        if "blend" in self.meta.get("candidates", []):
            bg = df[BLEND_FEATURE].to_numpy("float64")
            out["blend"] = np.sqrt(
                np.clip(out["hurdle"], BLEND_FLOOR, None) * np.clip(bg, BLEND_FLOOR, None)
            )
        return out

    def _raw_quantiles(self, d, n: int) -> np.ndarray:
        q = np.asarray(
            self.models["quantiles"].predict(d, iteration_range=self._range("quantiles"))
        )
        return np.sort(q.reshape(n, -1), axis=1)

    def predict(self, df: pd.DataFrame) -> dict[str, np.ndarray]:
        """Point value (the chosen value model), churn probability and value quantiles.

        With conformal offsets the outer quantiles are widened (or narrowed) by their group's
        offset and the inner ones clipped into that interval, so P10 <= P50 <= P90 holds.
        """
        d = self._dmatrix(df)
        churn = self._churn(d)
        value = self._candidates(d, churn, df)[self.value_model]
        out = {"future_value_pred": value, "churn_prob": churn}
        q = self._raw_quantiles(d, len(df))
        if self.conformal is not None:
            group = conformal_groups(value, self.conformal["edges"])
            # "offsets": one symmetric offset per group (models saved before the two ends
            # were calibrated separately)
            both = self.conformal.get("offsets")
            lo_off = np.asarray(self.conformal.get("offsets_lo", both), dtype=float)[group]
            hi_off = np.asarray(self.conformal.get("offsets_hi", both), dtype=float)[group]
            lo, hi = q[:, 0] - lo_off, q[:, -1] + hi_off
            hi = np.maximum(lo, hi)  # an offset below -(width / 2) would invert the interval
            q = np.clip(q, lo[:, None], hi[:, None])
            q[:, 0], q[:, -1] = lo, hi
        for i, alpha in enumerate(self.meta["params"]["quantiles"]["quantile_alpha"]):
            out[f"value_p{round(alpha * 100):02d}"] = q[:, i]
        return out

    def candidates(self, df: pd.DataFrame) -> dict[str, np.ndarray]:
        """Point value of every value model fitted for this variant (evaluation compares them)."""
        d = self._dmatrix(df)
        return self._candidates(d, self._churn(d), df)

    def contributions(self, df: pd.DataFrame) -> np.ndarray:
        """Per-feature contributions to log(predicted value) (SHAP; last column is the bias).

        Tweedie: the value booster's margin, log(value). Hurdle: log(value) =
        log P(purchase) + log E[value | purchase]. The spend booster's margin contributions are
        exact for the second term (log link); the churn booster's logit contributions are
        rescaled by (log P(purchase) - its value at the bias) / (logit - bias), so they add up
        to the first term. Blend: half the hurdle's contributions, plus half of log(BG/NBD
        expected value) in that feature's column. Rows sum to log(value) in every case.
        """
        if self.value_model == "blend":
            out = 0.5 * self._hurdle_contributions(df)
            bg = np.clip(df[BLEND_FEATURE].to_numpy("float64"), BLEND_FLOOR, None)
            out[:, self.features.index(BLEND_FEATURE)] += 0.5 * np.log(bg)
            return out
        if self.value_model == "tweedie":
            return self.models["value"].predict(
                self._dmatrix(df), pred_contribs=True, iteration_range=self._range("value")
            )
        return self._hurdle_contributions(df)

    def _hurdle_contributions(self, df: pd.DataFrame) -> np.ndarray:
        d = self._dmatrix(df)
        churn = self.models["churn"].predict(
            d, pred_contribs=True, iteration_range=self._range("churn")
        )
        spend = self.models["spend"].predict(
            d, pred_contribs=True, iteration_range=self._range("spend")
        )
        margin, bias = churn.sum(axis=1), churn[:, -1]

        def log_p_buy(m: np.ndarray) -> np.ndarray:
            return -np.logaddexp(0.0, m)  # log(1 - sigmoid(m))

        step = margin - bias
        safe = np.where(np.abs(step) > 1e-9, step, 1.0)
        slope = np.where(
            np.abs(step) > 1e-9,
            (log_p_buy(margin) - log_p_buy(bias)) / safe,
            -1.0 / (1.0 + np.exp(-margin)),
        )
        buy = churn * slope[:, None]
        buy[:, -1] = log_p_buy(bias)
        return buy + spend

    def _range(self, name: str) -> tuple[int, int]:
        return (0, self.meta["results"][name]["best_iteration"] + 1)

    def importance(self) -> dict[str, float]:
        """Gain of each feature in the chosen value model (hurdle: both boosters' gains)."""
        names = ["value"] if self.value_model == "tweedie" else ["churn", "spend"]
        # (blend: the hurdle's boosters; its BG/NBD half is a fitted formula, not a booster)
        out: dict[str, float] = {}
        for name in names:
            for k, v in self.models[name].get_score(importance_type="gain").items():
                out[k] = out.get(k, 0.0) + float(np.sum(v))
        return out
