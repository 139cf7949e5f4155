"""Load benchmark of the Serve app: a real HTTP client against a local app, beside the same
scoring called in-process.

    PYTHONPATH=. python bench/serve.py --model-run runs/<run-id> [--duration-s 8] [--quick]

For each request kind (one customer's history with its reviews, and without them) and each
concurrency (1, 8, 32 clients, each sending its next request when the last one is answered),
requests go to `POST /v1/score` for at most `--duration-s` seconds or `--max-requests`
requests, whichever comes first. Reported: throughput (answers/s), p50/p95/p99 latency. The
in-process row runs the very same steps (`contract_frames`, the encoder's `embed_now`,
`ModelRun.score_history`) in this process, one request at a time: the difference is the
cost of serving (HTTP, the proxy, the ingress, the handle calls and `@serve.batch` waits).
Customers are the run's own, with their history before the run's cutoff.

Writes `bench/results/serve.json` (with the machine: CPU model, cores, RAM, GPU) and prints a
table. `--url` benchmarks an app that is already running instead of starting one.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
DEFAULT_OUT = REPO / "bench" / "results" / "serve.json"

from bench.common import machine  # noqa: E402  (one machine description for every benchmark)


def request_bodies(run_uri: str, n_customers: int, with_text: bool) -> list[dict]:
    """`POST /v1/score` bodies for up to `n_customers` of the run's customers with reviews,
    their history before the run's cutoff (the as-of)."""
    from clvray.graph import MARKERS
    from clvray.model_run import load_model_run
    from clvray.storage import join

    run = load_model_run(run_uri)
    cutoff = pd.Timestamp(run.storage.read_json(join(run.uri, MARKERS, "features.json"))["cutoff"])
    fs_path = run.storage.fs_path
    tx = pd.read_parquet(fs_path(join(run.uri, "ingest", "transactions")))
    rv = pd.read_parquet(fs_path(join(run.uri, "ingest", "reviews")))
    tx, rv = tx[tx["ts"] < cutoff], rv[rv["ts"] < cutoff]
    ids = sorted(set(tx["customer_id"]) & set(rv["customer_id"]))[:n_customers]
    tx_by, rv_by = dict(list(tx.groupby("customer_id"))), dict(list(rv.groupby("customer_id")))
    bodies = []
    for cid in ids:
        t, r = tx_by[cid], rv_by[cid]
        body = {
            "customer_id": cid,
            "as_of": cutoff.isoformat(),
            "transactions": [
                {"order_id": o, "ts": ts.isoformat(), "amount": float(a)}
                for o, ts, a in zip(t["order_id"], t["ts"], t["amount"], strict=True)
            ],
            "reviews": [],
        }
        if with_text:
            body["reviews"] = [
                {
                    "review_id": rid,
                    "ts": ts.isoformat(),
                    "text": text,
                    "rating": None if pd.isna(rating) else int(rating),
                }
                for rid, ts, text, rating in zip(
                    r["review_id"], r["ts"], r["text"], r["rating"], strict=True
                )
            ]
        bodies.append(body)
    return bodies


def summarize(latencies_s: list[float], wall_s: float, errors: int) -> dict[str, Any]:
    ms = np.asarray(latencies_s) * 1000
    return {
        "requests": len(latencies_s),
        "errors": errors,
        "wall_s": round(wall_s, 3),
        "throughput_rps": round(len(latencies_s) / wall_s, 2) if wall_s > 0 else None,
        "p50_ms": round(float(np.percentile(ms, 50)), 2) if len(ms) else None,
        "p95_ms": round(float(np.percentile(ms, 95)), 2) if len(ms) else None,
        "p99_ms": round(float(np.percentile(ms, 99)), 2) if len(ms) else None,
        "mean_ms": round(statistics.fmean(ms), 2) if len(ms) else None,
    }


async def http_load(
    url: str, bodies: list[dict], concurrency: int, duration_s: float, max_requests: int
) -> dict[str, Any]:
    """`concurrency` clients in a closed loop against `url`/v1/score, bounded in time and
    in requests; every answer must be 200."""
    import httpx

    latencies: list[float] = []
    errors = 0
    sent = 0
    deadline = time.perf_counter() + duration_s
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        # One warm-up request per body kind outside the measurement.
        await client.post("/v1/score", json=bodies[0])

        async def worker(k: int) -> None:
            nonlocal sent, errors
            i = k
            while time.perf_counter() < deadline and sent < max_requests:
                sent += 1
                start = time.perf_counter()
                r = await client.post("/v1/score", json=bodies[i % len(bodies)])
                if r.status_code == 200:
                    latencies.append(time.perf_counter() - start)
                else:
                    errors += 1
                i += concurrency

        start = time.perf_counter()
        await asyncio.gather(*[worker(k) for k in range(concurrency)])
        wall = time.perf_counter() - start
    return summarize(latencies, wall, errors)


class InProcess:
    """The scoring steps of one request in this process, with no Serve in between."""

    def __init__(self, model_run: str) -> None:
        from clvray.model_run import load_model_run
        from clvray.serve import RunEncoder

        self.run = load_model_run(model_run)
        self.encoder = RunEncoder(self.run) if self.run.text is not None else None

    def score(self, body: dict) -> dict:
        from clvray.serve import ScoreRequest, contract_frames, with_embeddings

        req = ScoreRequest.model_validate(body)
        tx, reviews, attributes = contract_frames([req], self.run.cfg.ingest.max_text_chars)
        if reviews is not None and self.encoder is not None:
            reviews = with_embeddings(reviews, self.encoder.embed(list(reviews["text"])))
        scores, _ = self.run.score_history(tx, reviews, req.as_of, attributes)
        return scores.iloc[0].to_dict()

    def load(self, bodies: list[dict], duration_s: float, max_requests: int) -> dict[str, Any]:
        self.score(bodies[0])  # warm-up
        latencies: list[float] = []
        deadline = time.perf_counter() + duration_s
        start = time.perf_counter()
        i = 0
        while time.perf_counter() < deadline and i < max_requests:
            t0 = time.perf_counter()
            self.score(bodies[i % len(bodies)])
            latencies.append(time.perf_counter() - t0)
            i += 1
        return summarize(latencies, time.perf_counter() - start, 0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_app(model_run: str, num_cpus: int) -> str:
    """A local Ray + Serve app for the run on a free port; returns its URL."""
    import ray
    from ray import serve

    from clvray.serve import build_app

    if not ray.is_initialized():
        from clvray.pipeline import keep_idle_workers

        keep_idle_workers()  # as the job's own local Ray (clvray.pipeline)
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    one = {"min_replicas": 1, "max_replicas": 1}
    share = max(num_cpus / 4, 0.1)
    serve.run(
        build_app(
            {
                "model_run": model_run,
                "ingress_num_cpus": share,
                "ingress_autoscaling": one,
                "embedder": {"num_cpus": share, "autoscaling": one},
                "scorer": {"num_cpus": share, "autoscaling": one},
            }
        ),
        name="clvray-bench",
        route_prefix="/",
    )
    return f"http://127.0.0.1:{port}"


def run_benchmark(
    model_run: str,
    url: str | None = None,
    concurrencies: tuple[int, ...] = (1, 8, 32),
    duration_s: float = 8.0,
    max_requests: int = 2000,
    n_customers: int = 50,
    out: Path = DEFAULT_OUT,
    num_cpus: int = 2,
) -> dict[str, Any]:
    """Run every cell and write `out`; returns what was written."""
    started_here = url is None
    if started_here:
        url = start_app(model_run, num_cpus)
    assert url is not None
    in_process = InProcess(model_run)
    rows = []
    try:
        for with_text in (True, False):
            bodies = request_bodies(model_run, n_customers, with_text)
            reviews = sum(len(b["reviews"]) for b in bodies) / max(len(bodies), 1)
            common = {"text": with_text, "customers": len(bodies), "reviews_per_request": reviews}
            rows.append(
                {"path": "in-process", "concurrency": 1, **common,
                 **in_process.load(bodies, duration_s, max_requests)}
            )  # fmt: skip
            for c in concurrencies:
                result = asyncio.run(http_load(url, bodies, c, duration_s, max_requests))
                rows.append({"path": "serve-http", "concurrency": c, **common, **result})
    finally:
        if started_here:
            from ray import serve

            serve.shutdown()
    report = {
        "machine": machine(),
        "model_run": model_run,
        "duration_s_per_cell": duration_s,
        "max_requests_per_cell": max_requests,
        "rows": rows,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    return report


def table(report: dict[str, Any]) -> str:
    df = pd.DataFrame(report["rows"])[
        [
            "text",
            "path",
            "concurrency",
            "requests",
            "errors",
            "throughput_rps",
            "p50_ms",
            "p95_ms",
            "p99_ms",
        ]
    ]
    return df.to_markdown(index=False) if _has_tabulate() else df.to_string(index=False)


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401
    except ImportError:
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model-run", required=True)
    p.add_argument("--url", default=None, help="an app already running (default: start one)")
    p.add_argument("--duration-s", type=float, default=8.0, help="seconds per cell at most")
    p.add_argument("--max-requests", type=int, default=2000, help="requests per cell at most")
    p.add_argument("--concurrency", default="1,8,32")
    p.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--quick", action="store_true", help="1 s and 20 requests per cell")
    args = p.parse_args(argv)
    duration, max_requests = args.duration_s, args.max_requests
    if args.quick:
        duration, max_requests = 1.0, 20
    report = run_benchmark(
        args.model_run,
        url=args.url,
        concurrencies=tuple(int(c) for c in args.concurrency.split(",")),
        duration_s=duration,
        max_requests=max_requests,
        out=args.out,
        num_cpus=args.num_cpus,
    )
    m = report["machine"]
    print(f"machine: {m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB RAM, GPU: {m['gpu']}")
    print(table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
