"""Choose the text defaults with the models the job ships: the pipeline itself over a grid.

    python bench/text_defaults.py [--config configs/demo.yaml] [--storage runs] \
        [--run-id text-defaults] [--targets churn,rating] [--dims 4,16] [--topics false,true] \
        [--set key=value ...] [--out-name text_defaults]

Every grid point (`text.finetune.target` x `text.embed.reduce_dim` x
`text.topics.as_features`) is a run of `jobs/pipeline.py` up to `evaluate` in ONE run
directory: the stage graph re-runs only what a point changes (fine-tuning and embedding once
per target, the text features once per dimension, the fused table, booster, scores and
evaluation per point; the behavioural stages once in all). So each number comes from the
shipped models: the same features (BG/NBD columns and `cat_*` included), parameters, value-model
choice and intervals, which `bench/text_ablation.py` (XGBoost refitted alone) does not have.

Per point it keeps what the choice rests on, the valid split: the fine-tuned text model's chosen
value model with its normalized Gini and Spearman on valid (`models/<variant>/meta.json`) and
its churn booster's valid logloss; and, to report, the test-split lift over the behavioural
model with its paired bootstrap 95% interval (`metrics.json` `text_lift`). The pick is the
highest valid Gini + Spearman. The pretrained-encoder ablation is left out unless
`--set text.pretrained_variant=true`: it does not depend on the fine-tuning target.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import describe, machine, table, write_results  # noqa: E402

VARIANT = "gbm_text_finetuned"
BEHAVIOURAL = "gbm_behavioural"


def _flags(values: str) -> list[bool]:
    return [v.strip().lower() in ("1", "true", "yes") for v in values.split(",")]


def point_row(run_dir: Path) -> dict:
    """The valid-split choice numbers and the test-split lift of one finished point."""
    metrics = json.loads((run_dir / "evaluate" / "metrics.json").read_text())
    meta = json.loads((run_dir / "models" / VARIANT / "meta.json").read_text())
    behavioural = json.loads((run_dir / "models" / BEHAVIOURAL / "meta.json").read_text())
    chosen = meta["value_model"]["chosen"]
    valid = meta["value_model"]["valid"][chosen]
    base = behavioural["value_model"]["valid"][behavioural["value_model"]["chosen"]]
    lift = metrics["text_lift"][VARIANT]
    test = metrics["ablation"]

    def interval(metric: str) -> str:
        d = lift[metric]
        return f"{d['delta']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}]"

    return {
        "value_model": chosen,
        "valid_gini": valid["normalized_gini"],
        "valid_spearman": valid["spearman"],
        "valid_gini_spearman": valid["normalized_gini"] + valid["spearman"],
        "valid_gini_spearman_behavioural": base["normalized_gini"] + base["spearman"],
        "valid_churn_logloss": meta["results"]["churn"].get("valid_logloss"),
        "test_gini": test[VARIANT]["normalized_gini"],
        "test_gini_behavioural": test[BEHAVIOURAL]["normalized_gini"],
        "test_churn_auc": test[VARIANT]["churn_roc_auc"],
        "test_churn_auc_behavioural": test[BEHAVIOURAL]["churn_roc_auc"],
        "lift_gini": interval("normalized_gini"),
        "lift_spearman": interval("spearman"),
        "lift_churn_auc": interval("churn_roc_auc") if "churn_roc_auc" in lift else None,
        "test_customers": metrics["population"]["evaluated_test_customers"],
        "lift": lift,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config", default="configs/demo.yaml")
    p.add_argument("--storage", default="runs")
    p.add_argument("--run-id", default="text-defaults")
    p.add_argument("--targets", default="churn,rating")
    p.add_argument("--dims", default="4,16")
    p.add_argument("--topics", default="false,true")
    p.add_argument("--set", action="append", default=[], dest="sets", metavar="KEY=VALUE")
    p.add_argument("--out-name", default="text_defaults", help="bench/results/<name>.json")
    args = p.parse_args(argv)

    import jobs.pipeline as job

    grid = list(
        itertools.product(
            [t.strip() for t in args.targets.split(",")],
            [int(d) for d in args.dims.split(",")],
            _flags(args.topics),
        )
    )
    run_dir = Path(args.storage) / args.run_id
    rows = []
    # Ordered so that the expensive stages (fine-tuning, embedding) change least often.
    for target, dims, topics in grid:
        argv_point = [
            "--config", args.config, "--storage", args.storage, "--run-id", args.run_id,
            "--set", "text.pretrained_variant=false",
            *[a for s in args.sets for a in ("--set", s)],
            "--set", f"text.finetune.target={target}",
            "--set", f"text.embed.reduce_dim={dims}",
            "--set", f"text.topics.as_features={str(topics).lower()}",
            "--until", "evaluate",
        ]  # fmt: skip
        if job.main(argv_point) != 0:
            print(f"point target={target} dims={dims} topics={topics} failed", file=sys.stderr)
            return 1
        row = {"target": target, "dims": dims, "topics_as_features": topics}
        row.update(point_row(run_dir))
        rows.append(row)
        print(
            f"target={target} dims={dims} topics={topics}: valid G+S "
            f"{row['valid_gini_spearman']:.4f} (behavioural {row['valid_gini_spearman_behavioural']:.4f}); "
            f"test lift Gini {row['lift_gini']}, churn AUC {row['lift_churn_auc']}",
            flush=True,
        )
    best = max(rows, key=lambda r: r["valid_gini_spearman"])
    pick = {k: best[k] for k in ("target", "dims", "topics_as_features")}
    path = write_results(args.out_name, rows, {"pick_on_valid": pick, "run_dir": str(run_dir)})
    columns = [
        "target", "dims", "topics_as_features", "value_model", "valid_gini_spearman",
        "valid_gini_spearman_behavioural", "valid_churn_logloss", "lift_gini",
        "lift_churn_auc", "test_customers",
    ]  # fmt: skip
    print(f"\n{describe(machine())}\n")
    print(table(rows, columns))
    print(f"\npick on the valid split: {pick}\nwritten {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
