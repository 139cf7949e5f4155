"""How much the text features add, and with how many dimensions, over XGBoost seeds.

    python bench/text_ablation.py --run runs/<run with text> [--dims 4,16] [--seeds 5]

Reads the run's fused features (`fuse/<variant>/`: behavioural + text columns, one row per
customer, with the split and labels) and refits the value (Tweedie) and churn (logistic)
boosters on the train split with early stopping on valid, for the behavioural columns alone
and with the first k reduced text dimensions (PCA components are ordered, so the first k of a
16-dim reduction are the 4-dim reduction), over several seeds. Prints mean ± std of normalized
Gini and churn ROC-AUC on the test split. Used to choose `text.embed.reduce_dim` and
`text.finetune.target` (README, "Choosing the text defaults").
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import xgboost as xgb

from clvray.features import FEATURES
from clvray.metrics import normalized_gini, roc_auc


def _fit_predict(params: dict, train, valid, test, features, label) -> np.ndarray:
    y_tr = train[label].clip(lower=0) if label == "future_value" else train[label]
    y_va = valid[label].clip(lower=0) if label == "future_value" else valid[label]
    booster = xgb.train(
        params,
        xgb.DMatrix(train[features], y_tr),
        2000,
        evals=[(xgb.DMatrix(valid[features], y_va), "valid")],
        early_stopping_rounds=50,
        verbose_eval=False,
    )
    return booster.predict(
        xgb.DMatrix(test[features]), iteration_range=(0, booster.best_iteration + 1)
    )


def ablation(df: pd.DataFrame, dims: list[int], seeds: int) -> pd.DataFrame:
    behavioural = [c for c in FEATURES if c in df.columns]
    scores = [c for c in ("txt_n_reviews", "txt_score_mean", "txt_score_min") if c in df.columns]
    sets = {"behavioural": behavioural}
    for k in dims:
        text = [f"txt_mean_{i}" for i in range(k)] + [f"txt_rw_{i}" for i in range(k)]
        if all(c in df.columns for c in text):
            sets[f"+ text, {k} dims"] = behavioural + scores + text
    train, valid, test = (df[df["split"] == s] for s in ("train", "valid", "test"))
    rows = []
    for name, features in sets.items():
        gini, auc = [], []
        for seed in range(seeds):
            common = {"max_depth": 5, "eta": 0.05, "subsample": 0.8, "colsample_bytree": 0.8}
            value = {**common, "seed": seed, "objective": "reg:tweedie"}
            value["tweedie_variance_power"] = 1.3
            churn = {**common, "seed": seed, "objective": "binary:logistic"}
            pred = _fit_predict(value, train, valid, test, features, "future_value")
            gini.append(normalized_gini(test["future_value"].to_numpy(), pred))
            prob = _fit_predict(churn, train, valid, test, features, "churned")
            auc.append(roc_auc(test["churned"].to_numpy(), prob))
        rows.append(
            {
                "features": name,
                "gini": f"{np.mean(gini):.3f} ± {np.std(gini):.3f}",
                "churn_roc_auc": f"{np.mean(auc):.3f} ± {np.std(auc):.3f}",
                "test_customers": len(test),
            }
        )
    return pd.DataFrame(rows)


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--run", required=True, type=Path)
    p.add_argument("--variant", default="gbm_text_finetuned")
    p.add_argument("--dims", default="4,16")
    p.add_argument("--seeds", type=int, default=5)
    args = p.parse_args()
    df = pd.read_parquet(args.run / "fuse" / args.variant)
    out = ablation(df, [int(d) for d in args.dims.split(",")], args.seeds)
    print("| " + " | ".join(out.columns) + " |")
    print("|" + "---|" * len(out.columns))
    for row in out.itertuples(index=False):
        print("| " + " | ".join(str(v) for v in row) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
