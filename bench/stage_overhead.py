"""Fixed cost per stage: a small behavioural run with Ray Data's two parquet datasources.

    python bench/stage_overhead.py [--customers 400] [--repeat 2]

Runs `jobs/pipeline.py` up to `evaluate` (ingest, features, BG/NBD, fuse, train, score,
evaluate; text off) on synthetic data, each run in its own process with its own local Ray,
alternating the parquet datasource clvray reads with (`clvray.io`: Ray Data's first one)
and Ray 2.60's default (V2, `RAY_DATA_USE_DATASOURCE_V2=1`). A run of a few hundred customers
costs what the stages start, not what they compute, so the numbers are the fixed cost per
stage. Reported per run: wall seconds, the machine's busy CPU seconds while it ran (from
/proc/stat: run nothing else meanwhile) and each stage's seconds from its marker.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import describe, machine, run_child, table, write_results  # noqa: E402

SIDES = {"clvray (first datasource)": "0", "Ray default (V2)": "1"}


def busy_cpu_s() -> float:
    """Busy CPU seconds of the whole machine since boot (user, nice, system, irq, softirq)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    return (fields[0] + fields[1] + fields[2] + fields[5] + fields[6]) / 100


def child(storage: str, customers: int) -> None:
    import ray

    from clvray.pipeline import keep_idle_workers

    keep_idle_workers()  # as the job's own local Ray (clvray.pipeline)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    import jobs.pipeline as job

    argv = [
        "--config", "configs/demo.yaml", "--storage", storage, "--run-id", "overhead",
        "--set", f"data.synthetic.n_customers={customers}",
        "--set", f"data.synthetic.customers_per_task={customers}",
        "--set", "features.num_partitions=2", "--set", "train.num_boost_round=30",
        "--set", "text.enabled=false", "--until", "evaluate",
    ]  # fmt: skip
    t0, c0 = time.perf_counter(), busy_cpu_s()
    assert job.main(argv) == 0
    wall, cpu = time.perf_counter() - t0, busy_cpu_s() - c0
    stages = {}
    for f in (Path(storage) / "overhead" / "_stages").rglob("*.json"):
        m = json.loads(f.read_text())
        stages[m["stage"]] = m["seconds"]
    print(json.dumps({"wall_s": round(wall, 1), "busy_cpu_s": round(cpu, 1), "stages": stages}))


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--customers", type=int, default=400)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.child, args.customers)
        return 0
    rows = []
    for i in range(args.repeat):
        for side, v2 in SIDES.items():
            with tempfile.TemporaryDirectory() as tmp:
                out, peak = run_child(
                    [__file__, "--child", tmp, "--customers", str(args.customers)],
                    env={"RAY_DATA_USE_DATASOURCE_V2": v2},
                )
            stages = out.pop("stages")
            row = {"side": side, "repeat": i, **out, "peak_gib": peak}
            row.update({f"{k}_s": v for k, v in sorted(stages.items())})
            rows.append(row)
            print(f"{side} #{i}: {out}", flush=True)
    summary = {}
    for side in SIDES:
        mine = [r for r in rows if r["side"] == side]
        summary[side] = {
            k: round(sum(r[k] for r in mine) / len(mine), 1) for k in ("wall_s", "busy_cpu_s")
        }
    base, ours = summary["Ray default (V2)"], summary["clvray (first datasource)"]
    ratios = {k: round(base[k] / ours[k], 2) for k in ("wall_s", "busy_cpu_s")}
    path = write_results(
        "stage_overhead",
        rows,
        {"mean": summary, "v2_over_clvray": ratios, "customers": args.customers},
    )
    stage_cols = sorted({k for r in rows for k in r if k.endswith("_s")} - {"wall_s", "busy_cpu_s"})
    print(f"\n{describe(machine())}, {args.customers} customers\n")
    print(table(rows, ["side", "repeat", "wall_s", "busy_cpu_s", *stage_cols]))
    print(f"\nmean {summary}; V2 / clvray: {ratios}\nwritten {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
