"""End to end: seconds per stage of the whole job by customer count, so growth and the dominant
stage are visible.

    python bench/end_to_end.py --customers 10000,100000 [--text]

Each size runs `jobs/pipeline.py` on synthetic data (text off unless `--text`) in its own
process and Ray, on a fresh storage folder; stage seconds come from the run's own metrics.json
(`timings_s`), peak memory is sampled over the process and all its descendants. Writes
`bench/results/end_to_end.json`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import REPO, PeakMemory, Timer, describe, machine, table, write_results  # noqa: E402


def run_size(n_customers: int, work: Path, text: bool) -> dict:
    storage = work / f"c{n_customers}"
    shutil.rmtree(storage, ignore_errors=True)
    args = [
        sys.executable, "jobs/pipeline.py", "--storage", str(storage), "--run-id", "e2e",
        "--set", f"data.synthetic.n_customers={n_customers}",
        "--set", f"data.synthetic.customers_per_task={max(1000, n_customers // 8)}",
        "--set", f"text.enabled={'true' if text else 'false'}",
    ]  # fmt: skip
    with Timer() as wall:
        proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL)
        with PeakMemory(proc.pid) as mem:
            proc.wait()
    if proc.returncode != 0:
        raise RuntimeError(f"pipeline at {n_customers} customers exited with {proc.returncode}")
    metrics = json.loads((storage / "e2e" / "metrics.json").read_text())
    timings = {k: round(float(v), 1) for k, v in metrics["timings_s"].items()}
    counts = metrics.get("counts", {})
    row = {
        "customers": n_customers,
        "transactions": counts.get("transactions", {}).get("rows_in"),
        "wall_s": wall.seconds,
        "peak_gib": mem.peak_gib,
        **timings,
    }
    row["dominant_stage"] = max(timings, key=timings.get) if timings else None
    shutil.rmtree(storage, ignore_errors=True)
    return row


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--customers", default="10000,100000")
    ap.add_argument("--text", action="store_true")
    ap.add_argument("--work", default=str(REPO / "runs" / "bench_e2e"))
    args = ap.parse_args(argv)
    rows = [run_size(int(float(n)), Path(args.work), args.text) for n in args.customers.split(",")]
    columns = list(dict.fromkeys(k for r in rows for k in r))
    print(f"end to end on {describe(machine())}")
    print(table(rows, columns))
    print(f"wrote {write_results('end_to_end', rows, {'text': args.text})}")
    return rows


if __name__ == "__main__":
    main()
