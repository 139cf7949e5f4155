"""Ingest + features: clvray on Ray beside polars in one process, same parquet, same result.

    python bench/ingest_features.py --sizes 1e6,1e7,5e7 [--num-cpus 2]
    python bench/ingest_features.py --quick          # 20k transactions, what the tests run

For each size (synthetic transactions, reviews in proportion, text off), in separate processes:
- clvray: `ingest` (validate to the contract, write accepted rows and rejects) then
  `build_features` (per-customer features and labels), on a fresh local Ray;
- polars: `scan_parquet`, the same contract rules, accepted rows written with `sink_parquet`,
  then clvray's own polars feature plan (`clvray.features.feature_plan`) over the whole table
  in this one process. Both sides run the same per-customer computation, so the ratio is the
  cost of distributing it (reading, validating, shuffling by customer, writing on Ray); the
  computation itself is checked against an independent pandas reference in
  tests/test_features.py.
Wall time per stage, rows/s, peak memory summed over the process and all its descendants
(Ray's processes included), Ray object-store spilling; then the two feature tables are compared
value by value. Writes `bench/results/ingest_features.json` (the quick mode writes nothing
unless `--out` is given).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import REPO, Timer, describe, machine, run_child, table, write_results  # noqa: E402

CUTOFF = "2023-10-01"
HORIZON_DAYS = 90
TX_PER_CUSTOMER = 6.25  # measured on the synthetic generator's defaults (2.5M for 400k)


BASE_CUSTOMERS = 40_000
"""Customers generated once; larger sizes are copies of them under other ids (the generator
runs Python per order, too slow for 10^7 rows; the copies cost only parquet writes)."""


def generate_data(n_transactions: int, root: Path) -> Path:
    """Synthetic data of about `n_transactions` rows, cached under `root` by size: the
    generator's customers, copied under new ids (`K0001-C...`) as many times as needed, each
    copy its own parquet files (as data at scale arrives: many files)."""
    out = root / f"tx{n_transactions}"
    if (out / "_SUCCESS.json").exists():
        return out
    result, _ = run_child(
        [
            "bench/ingest_features.py",
            "--child",
            "generate",
            "--data",
            str(out),
            "--n-transactions",
            str(n_transactions),
        ]
    )
    (out / "_SUCCESS.json").write_text(json.dumps(result))
    return out


def _generate_child(args) -> dict:
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from clvray.config import SyntheticSection
    from clvray.contract import REVIEWS, TRANSACTIONS
    from clvray.synth import generate_chunk

    n_customers = max(200, min(BASE_CUSTOMERS, int(args.n_transactions / TX_PER_CUSTOMER)))
    chunk = generate_chunk(
        0, SyntheticSection(n_customers=n_customers, customers_per_task=n_customers)
    )
    base = {
        "transactions": pa.Table.from_pandas(
            chunk["transactions"][TRANSACTIONS.names], schema=TRANSACTIONS, preserve_index=False
        ),
        "reviews": pa.Table.from_pandas(
            chunk["reviews"][REVIEWS.names], schema=REVIEWS, preserve_index=False
        ),
    }
    copies = max(1, round(args.n_transactions / base["transactions"].num_rows))
    counts = {"transactions": 0, "reviews": 0, "copies": copies, "base_customers": n_customers}
    id_columns = {
        "transactions": ["customer_id", "order_id"],
        "reviews": ["customer_id", "review_id", "order_id"],
    }
    for name, tbl in base.items():
        folder = Path(args.data) / name
        folder.mkdir(parents=True, exist_ok=True)
        for k in range(copies):
            copy = tbl
            for col in id_columns[name]:
                i = copy.schema.get_field_index(col)
                prefixed = pc.binary_join_element_wise(f"K{k:04d}", copy[col], "-")
                copy = copy.set_column(i, col, prefixed)
            pq.write_table(copy, folder / f"part-{k:05d}.parquet")
            counts[name] += copy.num_rows
    return counts


def _spilled_mib() -> float:
    """Object-store bytes spilled to disk during this Ray session (Ray's memory summary)."""
    try:
        import ray
        from ray._private.internal_api import memory_summary

        text = memory_summary(address=ray.get_runtime_context().gcs_address, stats_only=True)
    except Exception:
        return float("nan")
    m = re.search(r"Spilled (\d+) MiB", text)
    return float(m.group(1)) if m else 0.0


def _clvray_child(args) -> dict:
    import pandas as pd

    from clvray.config import load_config
    from clvray.features import build_features
    from clvray.ingest import ingest
    from clvray.pipeline import connect_ray, open_run

    cfg = load_config(
        None,
        [
            "data.source=contract_parquet",
            f"data.transactions={args.data}/transactions",
            f"data.reviews={args.data}/reviews",
            f"run.storage={args.out}",
            f"run.run_id=clvray{args.nodes or ''}",
            "text.enabled=false",
            f"features.cutoff={CUTOFF}",
            f"features.horizon_days={HORIZON_DAYS}",
            f"ray.num_cpus={args.num_cpus}",
        ],
    )
    cfg, storage, run_dir, _ = open_run(cfg)
    cluster = None
    with Timer() as start:
        if args.nodes:
            # A simulated cluster on this machine: a head with no CPU and `nodes` workers
            # sharing the CPUs, so every task runs on a worker node.
            import ray
            from ray.cluster_utils import Cluster

            cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
            for _ in range(args.nodes):
                cluster.add_node(num_cpus=max(1, args.num_cpus // args.nodes))
            cluster.wait_for_nodes()
            ray.init(address=cluster.address, log_to_driver=False)
        else:
            connect_ray(cfg)
    with Timer() as t_ingest:
        counts = ingest(cfg, storage, run_dir)
    with Timer() as t_features:
        build_features(cfg, storage, run_dir, pd.Timestamp(CUTOFF, tz="UTC"))
    spilled = _spilled_mib()
    if cluster is not None:  # stop the processes this child started
        import ray

        ray.shutdown()
        cluster.shutdown()
    return {
        "ray_start_s": start.seconds,
        "ingest_s": t_ingest.seconds,
        "features_s": t_features.seconds,
        "rows_in": counts["transactions"]["rows_in"] + counts["reviews"]["rows_in"],
        "rows_rejected": counts["transactions"]["rows_rejected"]
        + counts["reviews"]["rows_rejected"],
        "spilled_mib": spilled,
        "features_uri": f"{args.out}/clvray{args.nodes or ''}/features/customers",
    }


def _polars_child(args) -> dict:
    import pandas as pd
    import polars as pl

    from clvray.features import feature_plan, split_of

    out = Path(args.out) / "polars"
    out.mkdir(parents=True, exist_ok=True)
    data = Path(args.data)
    with Timer() as t_ingest:
        tx = pl.scan_parquet(str(data / "transactions" / "*.parquet"))
        cid = pl.col("customer_id").cast(pl.String).str.strip_chars()
        tx_ok = (
            cid.is_not_null()
            & (cid != "")
            & pl.col("order_id").is_not_null()
            & (pl.col("order_id").cast(pl.String) != "")
            & pl.col("ts").is_not_null()
            & pl.col("amount").cast(pl.Float64).is_finite()
        )
        tx.filter(tx_ok).with_columns(customer_id=cid).sink_parquet(out / "transactions.parquet")
        rv = pl.scan_parquet(str(data / "reviews" / "*.parquet"))
        rv_ok = (
            cid.is_not_null()
            & (cid != "")
            & pl.col("review_id").is_not_null()
            & pl.col("ts").is_not_null()
            & (pl.col("rating").is_null() | pl.col("rating").is_between(1, 5))
        )
        rv.filter(rv_ok).with_columns(
            customer_id=cid, text=pl.col("text").str.slice(0, 2000)
        ).sink_parquet(out / "reviews.parquet")
        rejected = (
            tx.filter(~tx_ok).select(pl.len()).collect().item()
            + rv.filter(~rv_ok).select(pl.len()).collect().item()
        )
    with Timer() as t_features:
        features = feature_plan(
            pl.scan_parquet(out / "transactions.parquet"),
            pl.scan_parquet(out / "reviews.parquet"),
            pd.Timestamp(CUTOFF, tz="UTC"),
            HORIZON_DAYS,
        ).collect()
        features = features.with_columns(
            split=pl.Series(split_of(features["customer_id"].to_arrow(), 0.15, 0.2))
        )
        features.write_parquet(out / "features.parquet")
    return {
        "ingest_s": t_ingest.seconds,
        "features_s": t_features.seconds,
        "rows_rejected": rejected,
        "features_uri": str(out / "features.parquet"),
    }


def compare_features(clvray_uri: str, polars_uri: str) -> dict:
    """Every customer and every feature / label value equal (floats to 1e-9 relative)."""
    import numpy as np
    import pyarrow.dataset as pads

    from clvray.features import FEATURES, LABELS

    cols = ["customer_id", *FEATURES, *LABELS, "split"]
    a = pads.dataset(clvray_uri).to_table(columns=cols).to_pandas()
    b = pads.dataset(polars_uri).to_table(columns=cols).to_pandas()
    a = a.sort_values("customer_id").reset_index(drop=True)
    b = b.sort_values("customer_id").reset_index(drop=True)
    mismatched = []
    if len(a) != len(b) or not (a["customer_id"].to_numpy() == b["customer_id"].to_numpy()).all():
        return {"customers": [len(a), len(b)], "equal": False, "mismatched": ["customer_id"]}
    for c in cols[1:]:
        x, y = a[c].to_numpy(), b[c].to_numpy()
        if c == "split":
            ok = (x == y).all()
        else:
            x, y = x.astype("float64"), y.astype("float64")
            ok = np.allclose(x, y, rtol=1e-9, atol=1e-9, equal_nan=True)
        if not ok:
            mismatched.append(c)
    return {"customers": len(a), "equal": not mismatched, "mismatched": mismatched}


def bench_size(
    n: int, data_root: Path, work: Path, num_cpus: int, keep: Path, cluster_nodes: int = 0
) -> dict:
    data = generate_data(n, data_root)
    gen = json.loads((data / "_SUCCESS.json").read_text())
    shutil.rmtree(work, ignore_errors=True)
    common = ["--data", str(data), "--out", str(work), "--num-cpus", str(num_cpus)]
    c, c_mem = run_child(["bench/ingest_features.py", "--child", "clvray", *common])
    p, p_mem = run_child(["bench/ingest_features.py", "--child", "polars", *common])
    check = compare_features(c["features_uri"], p["features_uri"])
    nodes = {}
    if cluster_nodes:
        k, k_mem = run_child(
            [
                "bench/ingest_features.py",
                "--child",
                "clvray",
                *common,
                "--nodes",
                str(cluster_nodes),
            ]
        )
        same = compare_features(k["features_uri"], c["features_uri"])
        nodes = {
            "cluster_nodes": cluster_nodes,
            "cluster_total_s": round(k["ingest_s"] + k["features_s"], 2),
            "cluster_peak_gib": k_mem,
            "cluster_same_values": same["equal"],
        }
    rows = gen["transactions"] + gen["reviews"]
    kept = keep / f"tx{n}"
    shutil.rmtree(kept, ignore_errors=True)
    kept.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(c["features_uri"], kept)
    c_total = c["ingest_s"] + c["features_s"]
    p_total = p["ingest_s"] + p["features_s"]
    shutil.rmtree(work, ignore_errors=True)
    return {
        "transactions": gen["transactions"],
        "reviews": gen["reviews"],
        "customers": check["customers"],
        "clvray_ingest_s": c["ingest_s"],
        "clvray_features_s": c["features_s"],
        "clvray_total_s": round(c_total, 2),
        "clvray_rows_per_s": round(rows / c_total),
        "clvray_peak_gib": c_mem,
        "clvray_spilled_mib": c["spilled_mib"],
        "ray_start_s": c["ray_start_s"],
        "polars_ingest_s": p["ingest_s"],
        "polars_features_s": p["features_s"],
        "polars_total_s": round(p_total, 2),
        "polars_peak_gib": p_mem,
        "ratio": round(c_total / p_total, 2),
        "same_values": check["equal"],
        "mismatched": check["mismatched"],
        **nodes,
    }


COLUMNS = [
    "transactions",
    "customers",
    "clvray_ingest_s",
    "clvray_features_s",
    "clvray_rows_per_s",
    "clvray_peak_gib",
    "clvray_spilled_mib",
    "polars_total_s",
    "polars_peak_gib",
    "ratio",
    "same_values",
    "cluster_total_s",
    "cluster_same_values",
]


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="1e6,1e7")
    ap.add_argument("--quick", action="store_true", help="20k transactions; writes no results")
    ap.add_argument("--num-cpus", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--data-root", default=str(REPO / "runs" / "bench_data"))
    ap.add_argument("--work", default=str(REPO / "runs" / "bench_ingest_features"))
    ap.add_argument("--out", default=None, help="(children) where outputs go")
    ap.add_argument(
        "--keep-features",
        default=str(REPO / "runs" / "bench_features"),
        help="clvray's feature table of each size is kept here (bench/xgb_train.py reads it)",
    )
    ap.add_argument("--child", choices=["generate", "clvray", "polars"])
    ap.add_argument("--data")
    ap.add_argument("--n-transactions", type=int)
    ap.add_argument(
        "--cluster",
        type=int,
        default=0,
        help="also run clvray on a simulated cluster of this many worker nodes (ray.cluster_utils)",
    )
    ap.add_argument("--nodes", type=int, default=0, help="(child) simulated worker nodes")
    args = ap.parse_args(argv)
    if args.child:
        fn = {"generate": _generate_child, "clvray": _clvray_child, "polars": _polars_child}
        print(json.dumps(fn[args.child](args)))
        return []
    sizes = [20_000] if args.quick else [int(float(s)) for s in args.sizes.split(",")]
    rows = [
        bench_size(
            n,
            Path(args.data_root),
            Path(args.work),
            args.num_cpus,
            Path(args.keep_features),
            args.cluster,
        )
        for n in sizes
    ]
    print(f"ingest + features on {describe(machine())}")
    print(table(rows, COLUMNS))
    if not args.quick:
        print(f"wrote {write_results('ingest_features', rows)}")
    return rows


if __name__ == "__main__":
    main()
