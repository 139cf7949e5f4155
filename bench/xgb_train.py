"""XGBoost fit: Ray Train's `XGBoostTrainer` (clvray's `train_models`) beside `xgboost.train` in
one process with the same threads, on the same per-customer features.

    python bench/xgb_train.py --features runs/bench_features/tx10000000 [--num-workers 2]
    python bench/xgb_train.py --quick        # 3,000 synthetic customers, what the tests run

Both sides fit clvray's boosters with the same recipe (`clvray.train.fit_booster`: parameters,
global bin edges, base scores, hash-drawn rows, train / valid split and early stopping; the
single side through `fit_local`); then both predict the test split and the metrics
(normalized Gini of value, churn ROC-AUC) are compared. Each side runs in its own process.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import REPO, Timer, describe, machine, run_child, table, write_results  # noqa: E402

FEATURES_DEFAULT = REPO / "runs" / "bench_features"


def _metrics(test, pred_value, pred_churn) -> dict:
    from sklearn.metrics import roc_auc_score

    from clvray.metrics import normalized_gini

    return {
        "gini": float(normalized_gini(test["future_value"].to_numpy(), pred_value)),
        "churn_auc": float(roc_auc_score(test["churned"].to_numpy(), pred_churn)),
    }


def _load(features_uri: str):
    import pyarrow.dataset as pads

    from clvray.features import FEATURES

    df = pads.dataset(features_uri).to_table().to_pandas()
    return df, list(FEATURES)


def _clvray_child(args) -> dict:
    import ray

    from clvray.config import TrainSection
    from clvray.storage import Storage
    from clvray.train import Boosters, train_models

    with Timer() as start:
        from clvray.pipeline import keep_idle_workers

        keep_idle_workers()  # as the job's own local Ray (clvray.pipeline)
        ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
        import ray.data

        ray.data.DataContext.get_current().enable_progress_bars = False
    df, features = _load(args.features)
    cfg = TrainSection(
        num_workers=args.num_workers, cpus_per_worker=args.num_cpus / args.num_workers
    )
    ds = ray.data.read_parquet(args.features).materialize()
    run_dir = str(Path(args.out) / "clvray")
    with Timer() as t:
        trained = train_models(ds, features, cfg, Storage(), run_dir, "bench", seed=0)
    boosters = Boosters(trained.uri, Storage())
    test = df[df["split"] == "test"]
    d = boosters._dmatrix(test)
    value = boosters.models["value"].predict(d, iteration_range=boosters._range("value"))
    return {
        "startup_s": start.seconds,
        "fit_s": t.seconds,
        "customers": len(df),
        **_metrics(test, value, boosters._churn(d)),
        "best_iterations": {k: v["best_iteration"] for k, v in trained.results.items()},
    }


def _single_child(args) -> dict:
    from clvray.config import TrainSection
    from clvray.train import feature_matrix, fit_local, model_params

    df, features = _load(args.features)
    cfg = TrainSection(cpus_per_worker=args.num_cpus)
    params = model_params(cfg, seed=0)
    plan = {
        "features": features,
        "categories": {},
        "subsample": cfg.subsample,
        "seed": 0,
        "num_boost_round": cfg.num_boost_round,
        "early_stopping_rounds": cfg.early_stopping_rounds,
    }
    test = df[df["split"] == "test"]
    with Timer() as t:
        # clvray's recipe (edges, base scores, row draws) in this process: the same boosters
        boosters, results = fit_local(df[df["split"] != "test"], plan, params, cfg.sample_customers)
    dtest = feature_matrix(test, features, {})

    def predict(name):
        b = boosters[name]
        return b.predict(dtest, iteration_range=(0, b.best_iteration + 1))

    return {
        "fit_s": t.seconds,
        "customers": len(df),
        **_metrics(test, predict("value"), predict("churn")),
        "best_iterations": {k: int(r["best_iteration"]) for k, r in results.items()},
    }


def quick_features(out: Path) -> str:
    """Per-customer features of 3,000 synthetic customers (clvray's own pipeline functions)."""
    import pandas as pd

    from clvray.config import SyntheticSection
    from clvray.features import customer_features, to_events
    from clvray.synth import generate_chunk

    chunk = generate_chunk(0, SyntheticSection(n_customers=3000, customers_per_task=3000))
    events = pd.concat(
        [to_events(chunk["transactions"], "t"), to_events(chunk["reviews"], "r")],
        ignore_index=True,
    )
    feats = customer_features(events, pd.Timestamp("2023-10-01", tz="UTC"), 90)
    out.mkdir(parents=True, exist_ok=True)
    feats.to_parquet(out / "part-0.parquet", index=False)
    return str(out)


COLUMNS = [
    "side",
    "customers",
    "workers",
    "threads",
    "fit_s",
    "ratio",
    "gini",
    "churn_auc",
]


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--features", default=None, help="parquet folder of per-customer features")
    ap.add_argument("--num-workers", type=int, default=2)
    ap.add_argument("--num-cpus", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--work", default=str(REPO / "runs" / "bench_xgb"))
    ap.add_argument("--child", choices=["clvray", "single"])
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    if args.child:
        fn = _clvray_child if args.child == "clvray" else _single_child
        print(json.dumps(fn(args)))
        return []
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    features = args.features
    if args.quick or features is None:
        features = quick_features(work / "features") if args.quick else None
    if features is None:
        found = sorted(FEATURES_DEFAULT.glob("tx*"), key=lambda p: int(p.name[2:]))
        if not found:
            raise SystemExit("no --features: run bench/ingest_features.py first")
        features = str(found[-1])
    common = [
        "--features", features, "--out", str(work),
        "--num-cpus", str(args.num_cpus), "--num-workers", str(args.num_workers),
    ]  # fmt: skip
    c, c_mem = run_child(["bench/xgb_train.py", "--child", "clvray", *common])
    s, s_mem = run_child(["bench/xgb_train.py", "--child", "single", *common])
    rows = [
        {
            "side": "XGBoostTrainer",
            "workers": args.num_workers,
            "threads": args.num_cpus,
            "peak_gib": c_mem,
            **c,
            "ratio": round(c["fit_s"] / s["fit_s"], 2),
        },
        {"side": "xgboost.train", "workers": 1, "threads": args.num_cpus, "peak_gib": s_mem, **s},
    ]
    rows[0]["gini_rel_diff"] = abs(c["gini"] - s["gini"]) / abs(s["gini"])
    rows[0]["auc_rel_diff"] = abs(c["churn_auc"] - s["churn_auc"]) / abs(s["churn_auc"])
    shutil.rmtree(work, ignore_errors=True)
    print(f"XGBoost fit on {describe(machine())}")
    print(table(rows, COLUMNS))
    if not args.quick:
        print(f"wrote {write_results('xgb_train', rows)}")
    return rows


if __name__ == "__main__":
    main()
