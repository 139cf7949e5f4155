"""What was tried to beat BG/NBD + Gamma-Gamma on a backtest, with every number.

    python bench/value_search.py --runs runs/bt-or-cutoff-0,runs/bt-or-cutoff-1,... \
        [--out bench/results/value_search_online_retail.json]

For each cutoff's run directory it reads the customers' features and labels
(`features/customers`), adds the run's own train-fitted BG/NBD + Gamma-Gamma predictions as
features (as the pipeline does), and fits each candidate with the shipped parameter builder
(`clvray.train.model_params`, `feature_matrix`, early stopping on the valid split) in one
process: the same boosters `train_models` fits with one worker. Candidates: Tweedie powers,
tree depths, the hurdle model, and a blend of the GBM with BG/NBD (geometric mean of the
two predictions). Each is pooled over the cutoffs on the test split with the backtest's
bootstrap (`clvray.metrics.pooled_bootstrap`) and paired against BG/NBD + Gamma-Gamma. The
valid-split numbers are reported too: a candidate should be picked on them, not on test.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from clvray import btyd, metrics
from clvray.config import TrainSection
from clvray.features import FEATURES, categorical_columns
from clvray.storage import Storage
from clvray.train import feature_matrix, fit_local, model_params

CANDIDATES: dict[str, dict] = {
    "tweedie p1.3 d5 (shipped tweedie)": {"value_model": "tweedie"},
    "hurdle gamma d5 (shipped hurdle)": {"value_model": "hurdle"},
    "tweedie p1.1 d5": {"value_model": "tweedie", "tweedie_variance_power": 1.1},
    "tweedie p1.6 d5": {"value_model": "tweedie", "tweedie_variance_power": 1.6},
    "tweedie p1.3 d2": {"value_model": "tweedie", "max_depth": 2},
    "tweedie p1.3 d3": {"value_model": "tweedie", "max_depth": 3},
    "hurdle gamma d3": {"value_model": "hurdle", "max_depth": 3},
    "hurdle tweedie d3": {
        "value_model": "hurdle",
        "max_depth": 3,
        "spend_objective": "reg:tweedie",
    },
}


def _categories(train: pd.DataFrame, columns: list[str]) -> dict[str, list[str]]:
    out = {}
    for c in columns:
        counts = train[c].dropna().astype(str).value_counts()
        ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:64]
        out[c] = [v for v, _ in ranked]
    return out


def predict_candidate(df: pd.DataFrame, features: list[str], cfg: TrainSection) -> np.ndarray:
    """Point value of one candidate for every row of `df` (fitted on its train split)."""
    params = model_params(cfg, seed=0)
    cats = _categories(df[df["split"] == "train"], categorical_columns(features))
    plan = {
        "features": features,
        "categories": cats,
        "subsample": cfg.subsample,
        "seed": 0,
        "num_boost_round": cfg.num_boost_round,
        "early_stopping_rounds": cfg.early_stopping_rounds,
    }
    names = ["value"] if cfg.value_model == "tweedie" else ["churn", "spend"]
    boosters, _ = fit_local(
        df[df["split"] != "test"], plan, {n: params[n] for n in names}, cfg.sample_customers
    )
    d_all = feature_matrix(df, features, cats)

    def predict(name: str) -> np.ndarray:
        b = boosters[name]
        return b.predict(d_all, iteration_range=(0, b.best_iteration + 1))

    if cfg.value_model == "tweedie":
        return predict("value")
    return (1 - predict("churn")) * predict("spend")


def load_cutoff(run_dir: Path) -> tuple[pd.DataFrame, list[str], np.ndarray]:
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    horizon = cfg["features"]["horizon_days"]
    df = pd.read_parquet(run_dir / "features" / "customers").sort_values("customer_id")
    df = df.reset_index(drop=True)
    fit = btyd.load(Storage(), str(run_dir / "btyd"))
    df = btyd.btyd_columns(df, fit, horizon)
    features = list(FEATURES) + categorical_columns(list(df.columns)) + btyd.BTYD_FEATURES
    return df, features, df["btyd_expected_value"].to_numpy(float)


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--runs", required=True, help="comma-separated run directories, one per cutoff")
    p.add_argument("--out", default=None)
    p.add_argument("--n-boot", type=int, default=500)
    args = p.parse_args()
    cutoffs = [load_cutoff(Path(r)) for r in args.runs.split(",")]
    ids = pd.concat([df["customer_id"] for df, _, _ in cutoffs], ignore_index=True)
    codes_all, _ = pd.factorize(ids, sort=True)
    codes, start = [], 0
    for df, _, _ in cutoffs:
        codes.append(codes_all[start : start + len(df)])
        start += len(df)

    preds: dict[str, list[np.ndarray]] = {"bgnbd_gamma_gamma": [bg for _, _, bg in cutoffs]}
    for name, over in CANDIDATES.items():
        cfg = TrainSection(**over)
        preds[name] = [predict_candidate(df, f, cfg) for df, f, _ in cutoffs]
        gbm = preds[name]
        preds[f"{name} x BG/NBD blend"] = [
            np.sqrt(np.clip(g, 1e-9, None) * np.clip(bg, 1e-9, None))
            for g, (_, _, bg) in zip(gbm, cutoffs, strict=True)
        ]
        print(f"fitted {name}", flush=True)

    def parts(name: str, other: str | None, split: str) -> list:
        out = []
        for i, (df, _, _) in enumerate(cutoffs):
            m = (df["split"] == split).to_numpy()
            out.append(
                (
                    codes[i][m],
                    df["future_value"].to_numpy(float)[m],
                    preds[name][i][m],
                    None if other is None else preds[other][i][m],
                )
            )
        return out

    results = {}
    for name in preds:
        row = {}
        for metric, fn in (
            ("normalized_gini", metrics.normalized_gini),
            ("spearman", metrics.spearman),
        ):
            row[f"valid_{metric}"] = metrics.pooled_bootstrap(parts(name, None, "valid"), fn, 1)[
                "estimate"
            ]
            row[f"test_{metric}"] = metrics.pooled_bootstrap(
                parts(name, None, "test"), fn, args.n_boot
            )
            if name != "bgnbd_gamma_gamma":
                row[f"test_{metric}_vs_bgnbd"] = metrics.pooled_bootstrap(
                    parts(name, "bgnbd_gamma_gamma", "test"), fn, args.n_boot
                )
        results[name] = row
        g, s = row["test_normalized_gini"], row["test_spearman"]
        line = f"{name:45s} valid G {row['valid_normalized_gini']:.3f} S {row['valid_spearman']:.3f} | test G {g['estimate']:.3f} S {s['estimate']:.3f}"
        if name != "bgnbd_gamma_gamma":
            dg, ds = row["test_normalized_gini_vs_bgnbd"], row["test_spearman_vs_bgnbd"]
            line += (
                f" | dG {dg['estimate']:+.3f} [{dg['lo']:+.3f},{dg['hi']:+.3f}]"
                f" dS {ds['estimate']:+.3f} [{ds['lo']:+.3f},{ds['hi']:+.3f}]"
            )
        print(line, flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(
            json.dumps({"runs": args.runs.split(","), "results": results}, indent=1) + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
