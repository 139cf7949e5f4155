"""README.md's Performance section, generated from `bench/results/*.json`.

    python bench/perf_readme.py

Replaces the block between the `performance` markers in README.md with one table per benchmark
result file, each with the machine it ran on and the command that produced it. Nothing in that
block is typed by hand: rerun the benchmarks, then this.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import REPO, RESULTS, describe, table  # noqa: E402
from bench.embed import COLUMNS as EMBED_COLUMNS  # noqa: E402
from bench.ingest_features import COLUMNS as INGEST_COLUMNS  # noqa: E402

START, END = "<!-- performance:start -->", "<!-- performance:end -->"

SECTIONS = {
    "ingest_features": (
        "Ingest + features: clvray vs polars in one process (same parquet, same values)",
        INGEST_COLUMNS,
        "`ratio` = clvray seconds / polars seconds (ingest + features). Peak memory is summed "
        "over each side's process and all its descendants (Ray's processes included).",
    ),
    "embed": (
        "Embedding: (a) clvray's embed stage, (b) a careful single-process loop, (c) one at a time",
        EMBED_COLUMNS,
        "Reviews per second of the pass itself; start-up (Ray / model load) separately. "
        "`max_abs_diff`: largest difference between (a)'s and (b)'s embeddings.",
    ),
    "xgb_train": (
        "XGBoost: Ray Train's XGBoostTrainer vs `xgboost.train` with the same threads",
        ["side", "customers", "workers", "threads", "fit_s", "ratio", "gini", "churn_auc"],
        "Value, churn and spend boosters (on the Ray Train workers) and the quantile booster "
        "(one task, on a hash sample of at most 200,000 customers) with early stopping, fitted "
        "by clvray's recipe on both sides (`fit_booster`), so both sides fit the same boosters; "
        "metrics on the test split. `fit_s` includes the sample, edges and quantile fit.",
    ),
    "finetune": (
        "Fine-tuning: Ray Train's TorchTrainer vs a plain single-process loop",
        ["side", "reviews", "workers", "threads", "samples_per_s", "ratio"],
        "",
    ),
    "end_to_end": (
        "End to end: seconds per stage by customer count (text off)",
        None,
        "",
    ),
    "stage_overhead": (
        "Fixed cost per stage: a 400-customer behavioural run, by parquet datasource",
        None,
        "Each run in its own process and local Ray, sides alternating; `busy_cpu_s` is the whole "
        "machine's busy CPU while it ran. Ray 2.60's default datasource (V2) starts a pool of "
        "`FooterReader` actors for every parquet read; clvray reads through the first one.",
    ),
    "serve": (
        "Serving: Ray Serve over HTTP vs the same scorer in-process",
        None,
        "",
    ),
}


def section() -> str:
    parts = []
    for name, (title, columns, note) in SECTIONS.items():
        path = RESULTS / f"{name}.json"
        if not path.exists():
            continue
        data = json.loads(path.read_text())
        rows = data["rows"]
        cols = columns or list(dict.fromkeys(k for r in rows for k in r))
        parts.append(
            f"#### {title}\n\n{table(rows, cols)}\n\n"
            + (f"{note}\n" if note else "")
            + f"Machine: {describe(data['machine'])}; {data.get('date', '')}; "
            f"`{data.get('command', '')}`.\n"
        )
    return "\n".join(parts) or "No benchmark results yet: run the scripts in `bench/`.\n"


def update_readme(readme: Path = REPO / "README.md") -> None:
    text = readme.read_text()
    block = f"{START}\n{section()}{END}"
    if START in text:
        text = re.sub(re.escape(START) + r".*?" + re.escape(END), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n## Performance\n\n" + block + "\n"
    readme.write_text(text)


if __name__ == "__main__":
    update_readme()
    print(section())
