"""What a billion-review run costs, from the throughput one of the project's own runs measured.

    python bench/cost.py --run runs/bench/<synthetic run dir> [--reviews 1e9] [--vcpu-hour-usd 0.02]
        [--cluster-yaml cluster.yaml] [--node-type cpu_worker]

Reads the run's `metrics.json` (stage seconds, row counts, the Ray cluster it ran on) and the
fine-tuned model's `clvray_text.json` (reviews it trained on), turns every stage into rows per
second per vCPU, and scales to `--reviews` reviews with the run's own ratios of transactions and
customers per review. The wall time is for the CPU worker type of `cluster.yaml` (instance type
and vCPUs per node read from it) at its `max_workers`. Writes the table between the `cost`
markers in README.md.

Small runs carry fixed per-stage costs (Ray Data planning, actor and worker start-up, model
loading) that a large run amortises, so throughput measured on them is a lower bound and the
cost an upper bound. The GPU path is not in the estimate unless a GPU run is given.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
START, END = "<!-- cost:start -->", "<!-- cost:end -->"


def instance_vcpus(instance_type: str) -> int:
    """vCPUs of an EC2 instance type from its size, as AWS sizes general-purpose, compute- and
    memory-optimised and GPU families: `large` 2, `xlarge` 4, `<n>xlarge` 4n (m5.4xlarge 16,
    c5.9xlarge 36, g5.xlarge 4). Other sizes (metal, nano...) raise: give the node type
    `resources: {"CPU": n}` in cluster.yaml instead."""
    size = instance_type.split(".", 1)[-1]
    match = re.fullmatch(r"(\d*)xlarge", size)
    if match:
        return 4 * int(match.group(1) or 1)
    if size == "large":
        return 2
    raise ValueError(
        f"vCPUs of instance type {instance_type!r} unknown: set resources: {{CPU: n}} on its "
        "node type in cluster.yaml"
    )


def cluster_workers(cluster_yaml: Path, node_type: str = "cpu_worker") -> dict:
    """The CPU worker type the estimate's wall time is for, from a Ray cluster launcher file:
    its instance type, vCPUs per node (`resources.CPU` when set, else from the instance type,
    as Ray's autoscaler detects it) and `max_workers`."""
    import yaml

    cluster = yaml.safe_load(cluster_yaml.read_text())
    types = cluster["available_node_types"]
    if node_type not in types:
        raise KeyError(f"{cluster_yaml}: no node type {node_type!r}; has {sorted(types)}")
    spec = types[node_type]
    instance = spec["node_config"]["InstanceType"]
    vcpus = (spec.get("resources") or {}).get("CPU") or instance_vcpus(instance)
    return {
        "node_type": node_type,
        "instance_type": instance,
        "vcpus_per_node": int(vcpus),
        "max_workers": int(spec.get("max_workers", cluster.get("max_workers", 0))),
        "file": cluster_yaml.name,
    }


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


def scale_rates(results: Path) -> dict[str, tuple[float, str]]:
    """Rows per vCPU-second measured at scale by the benchmarks, where their results exist:
    ingest and features from the largest `bench/results/ingest_features.json` size, embedding
    from `embed.json` (Amazon's real reviews). `{stage name prefix: (rate, where from)}`;
    these replace the small run's rates, whose fixed costs are counted as if per row."""
    out: dict[str, tuple[float, str]] = {}
    path = results / "ingest_features.json"
    if path.exists():
        data = json.loads(path.read_text())
        cores = data["machine"]["cores"]
        row = max(data["rows"], key=lambda r: r["transactions"])
        rows = row["transactions"] + row["reviews"]
        where = f"bench/results/ingest_features.json at {row['transactions']:,} transactions"
        out["ingest"] = (rows / row["clvray_ingest_s"] / cores, where)
        out["features"] = (rows / row["clvray_features_s"] / cores, where)
    path = results / "embed.json"
    if path.exists():
        data = json.loads(path.read_text())
        cores = data["machine"]["cores"]
        for row in data["rows"]:
            if row["data"] == "amazon":
                where = f"bench/results/embed.json, {row['reviews']:,} Amazon reviews"
                out["tokenize + embed"] = (row["a_clvray_per_s"] / cores, where)
    return out


def estimate(
    run_dir: Path,
    reviews: float,
    vcpu_hour_usd: float,
    finetune_reviews: float,
    workers: dict | None = None,
    measured: dict[str, tuple[float, str]] | None = None,
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
        source = f"{rows:,} {what} in {secs:.0f} s on {vcpus:g}"
        for prefix, (at_scale, where) in (measured or {}).items():
            if name.startswith(prefix):
                rate, source = at_scale, f"at scale: {where}"
        target = finetune_reviews if name.startswith("fine-tune") else scale[what]
        hours = target / rate / 3600
        total_h += hours
        lines.append(
            f"| {name} | {source} | {rate:,.1f} "
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
        "stages marked 'at scale' use rates the benchmarks measured on 10^6-10^7 rows; the "
        "others come from the small run, whose per-stage fixed costs are counted as if they "
        "were per row, so those are upper bounds on compute.",
    ]
    w = workers or cluster_workers(REPO / "cluster.yaml")
    cluster_vcpus = w["vcpus_per_node"] * w["max_workers"]
    wall = (
        f"\nOn `{w['file']}`'s CPU workers at their cap, {w['max_workers']} `{w['node_type']}` "
        f"nodes ({w['instance_type']}, {w['vcpus_per_node']} vCPUs each: {cluster_vcpus:,} "
        f"vCPUs), that is about {total_h / cluster_vcpus:,.0f} hours of wall time, stages run "
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
    p.add_argument("--cluster-yaml", type=Path, default=REPO / "cluster.yaml")
    p.add_argument("--node-type", default="cpu_worker", help="worker type for the wall time")
    p.add_argument("--no-readme", action="store_true")
    p.add_argument(
        "--results",
        type=Path,
        default=REPO / "bench" / "results",
        help="benchmark results whose at-scale rates replace the run's (ingest, features, embed)",
    )
    args = p.parse_args()
    workers = cluster_workers(args.cluster_yaml, args.node_type)
    body = estimate(
        args.run,
        args.reviews,
        args.vcpu_hour_usd,
        args.finetune_reviews,
        workers,
        measured=scale_rates(args.results),
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
