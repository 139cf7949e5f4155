"""What a billion-review run costs, from the throughput one of the project's own runs measured.

    python bench/cost.py --run runs/bench/<synthetic run dir> [--reviews 1e9] [--vcpu-hour-usd 0.02]

Reads the run's `metrics.json` (stage seconds, row counts, the Ray cluster it ran on) and the
fine-tuned model's `clvray_text.json` (reviews it trained on), turns every stage into rows per
second per vCPU, and scales to `--reviews` reviews with the run's own ratios of transactions and
customers per review. Writes the table between the `cost` markers in README.md.

Small runs carry fixed per-stage costs (Ray Data planning, actor and worker start-up, model
loading) that a large run amortises, so throughput measured on them is a lower bound and the
cost an upper bound. The GPU path is not in the estimate unless a GPU run is given.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
START, END = "<!-- cost:start -->", "<!-- cost:end -->"


def _text_meta(run_dir: Path) -> dict:
    found = sorted(run_dir.glob("text/finetune/*/model/clvray_text.json"))
    return json.loads(found[-1].read_text()) if found else {}


def _embedded(run_dir: Path, variant: str) -> int:
    import pyarrow.parquet as pq

    files = sorted((run_dir / "text" / variant / "embeddings").glob("*.parquet"))
    return sum(pq.ParquetFile(f).metadata.num_rows for f in files)


def stage_rates(run_dir: Path) -> tuple[dict, dict]:
    """Per stage: (rows, what the rows are, seconds, vCPUs) and the run's ratios."""
    m = json.loads((run_dir / "metrics.json").read_text())
    t = m["timings_s"]
    counts = m["counts"]
    tx = counts["transactions"]["rows_in"]
    rv = counts.get("reviews", {}).get("rows_in", 0)
    customers = m["population"]["customers"]
    vcpus = float((m.get("cluster") or {}).get("CPU") or 0) or None
    meta = _text_meta(run_dir)
    stages = {
        "ingest (validate, normalise)": (tx + rv, "input rows", t.get("ingest")),
        "features (customer shuffle)": (tx + rv, "input rows", t.get("features")),
    }
    if meta:
        epochs = (meta.get("text_config") or {}).get("finetune", {}).get("epochs", 1)
        n = meta["n_train_reviews"] * epochs + meta["n_valid_reviews"]
        stages["fine-tune (sample)"] = (n, "reviews", t.get("text/finetune"))
    for variant in ("gbm_text_finetuned", "gbm_text_pretrained"):
        key = f"text/{variant}/embed"
        if key in t:
            stages[f"tokenize + embed ({variant.split('_')[-1]})"] = (
                _embedded(run_dir, variant),
                "reviews",
                t[key],
            )
            stages[f"text features ({variant.split('_')[-1]})"] = (
                _embedded(run_dir, variant),
                "reviews",
                t.get(f"text/{variant}/features"),
            )
    for key, secs in t.items():
        if key.startswith("train/"):
            stages[f"XGBoost {key.split('/', 1)[1]}"] = (customers, "customers", secs)
        if key.startswith("score/"):
            stages[f"score {key.split('/', 1)[1]}"] = (customers, "customers", secs)
    ratios = {
        "transactions_per_review": tx / rv if rv else None,
        "customers_per_review": customers / rv if rv else None,
        "vcpus": vcpus,
        "source": str(run_dir),
        "cutoff": m["cutoff"],
        "finetune_reviews": meta.get("n_train_reviews"),
    }
    return {k: v for k, v in stages.items() if v[2]}, ratios


def estimate(
    run_dir: Path,
    reviews: float,
    vcpu_hour_usd: float,
    finetune_reviews: float,
    cluster_vcpus: int = 640,
) -> str:
    stages, r = stage_rates(run_dir)
    vcpus = r["vcpus"] or 2.0
    scale = {
        "input rows": reviews * (1 + r["transactions_per_review"]),
        "reviews": reviews,
        "customers": reviews * r["customers_per_review"],
    }
    lines = [
        "| stage | measured: rows in seconds on vCPUs | rows per vCPU-second | rows at 10^9 reviews "
        "| vCPU-hours | cost at the assumed price |",
        "|---|---|---|---|---|---|",
    ]
    total_h = 0.0
    for name, (rows, what, secs) in stages.items():
        rate = rows / secs / vcpus
        target = finetune_reviews if name.startswith("fine-tune") else scale[what]
        hours = target / rate / 3600
        total_h += hours
        lines.append(
            f"| {name} | {rows:,} {what} in {secs:.0f} s on {vcpus:g} | {rate:,.1f} "
            f"| {target:,.3g} {what} | {hours:,.0f} | ${hours * vcpu_hour_usd:,.0f} |"
        )
    lines.append(f"| **total** | | | | **{total_h:,.0f}** | **${total_h * vcpu_hour_usd:,.0f}** |")
    assumptions = [
        f"{reviews:,.0f} reviews; transactions and customers scale with the measured run's "
        f"ratios ({r['transactions_per_review']:.2f} transactions and "
        f"{r['customers_per_review']:.3f} customers per review);",
        f"fine-tuning on a sample of {finetune_reviews:,.0f} reviews, 1 epoch "
        "(`text.finetune.max_reviews`), not on every review;",
        "every stage on CPU workers at the throughput measured on this machine per vCPU, "
        "scaling linearly with vCPUs (Ray Data and Ray Train shard by rows and customers; the "
        "only driver-side work is bounded samples);",
        f"${vcpu_hour_usd} per vCPU-hour: an assumed spot price for compute-optimised x86 "
        "instances (check `aws ec2 describe-spot-price-history` for the region and day); the head "
        "node, S3 storage and requests, and node start-up are not included;",
        "the run measured is small, so per-stage fixed costs are counted as if they were per "
        "row: the estimate is an upper bound on compute.",
    ]
    wall = (
        f"\nOn a cluster of {cluster_vcpus:,} worker vCPUs (for example 20 `cpu_worker` nodes of "
        f"32 vCPUs) that is about {total_h / cluster_vcpus:,.0f} hours of wall time, stages run "
        "one after another.\n"
    )
    return (
        f"Estimated by `python bench/cost.py --run {r['source']}` from that run's own stage "
        f"timings ({vcpus:g} vCPUs, no GPU). Assumptions:\n\n"
        + "\n".join(f"- {a}" for a in assumptions)
        + "\n\n"
        + "\n".join(lines)
        + "\n"
        + wall
    )


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--run", required=True, type=Path, help="a run directory with text stages")
    p.add_argument("--reviews", type=float, default=1e9)
    p.add_argument("--vcpu-hour-usd", type=float, default=0.02)
    p.add_argument("--finetune-reviews", type=float, default=1e6)
    p.add_argument("--cluster-vcpus", type=int, default=640)
    p.add_argument("--no-readme", action="store_true")
    args = p.parse_args()
    body = estimate(
        args.run, args.reviews, args.vcpu_hour_usd, args.finetune_reviews, args.cluster_vcpus
    )
    print(body)
    readme = REPO / "README.md"
    text = readme.read_text()
    if not args.no_readme and START in text and END in text:
        head, rest = text.split(START, 1)
        readme.write_text(head + START + "\n" + body + END + rest.split(END, 1)[1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
