"""A head plus two worker nodes on this machine (`ray.cluster_utils.Cluster`), driven by
tests/test_multinode.py in a subprocess so the test session's own Ray is untouched.

    python -m tests.multinode_scenario <workdir> <tiny-encoder-dir> [--remove-node]

Runs ingest -> features -> XGBoost -> score and the review embedding over data spread
across the nodes, optionally removing a worker node while the embedding is running, and
prints one JSON line with what the test checks.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time

import pandas as pd


def main(workdir: str, encoder: str, remove_node: bool) -> dict:
    import ray
    import ray.data
    from ray.cluster_utils import Cluster

    from clvray.config import load_config
    from clvray.features import build_features, resolve_cutoff
    from clvray.ingest import ingest
    from clvray.io import read_parquet, write_parquet
    from clvray.score import score_customers
    from clvray.storage import Storage, join
    from clvray.synth import generate
    from clvray.text.embed import embed_reviews
    from clvray.train import train_models

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    workers = [cluster.add_node(num_cpus=1, resources={f"w{i}": 1}) for i in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    storage = Storage()
    cfg = load_config(
        None,
        [
            "data.source=synthetic",
            f"data.transactions={workdir}/in/transactions",
            f"data.reviews={workdir}/in/reviews",
            "data.synthetic.n_customers=400",
            "data.synthetic.customers_per_task=50",
            "features.num_partitions=2",
            "features.cutoff=2023-10-01",
            "train.num_boost_round=20",
            f"text.model={encoder}",
            "text.embed.batch_size=16",
            "text.embed.tokenize_batch_size=32",
            "text.embed.min_actors=1",
            "text.embed.max_actors=2",
        ],
    )
    generate(cfg.data.synthetic, f"{workdir}/in", storage)
    run_dir = f"{workdir}/run"

    counts = ingest(cfg, storage, run_dir)
    cutoff = resolve_cutoff(cfg, storage, run_dir)
    build_features(cfg, storage, run_dir, cutoff)
    customers = read_parquet(join(run_dir, "features", "customers"), storage).materialize()
    features = ["frequency", "recency_days", "T_days", "monetary", "review_count"]
    models = train_models(customers, features, cfg.train, storage, run_dir, "multinode")
    scratch = join(run_dir, "tmp", "scores")
    score_customers(customers, models.uri, cfg.score, storage, join(run_dir, "scores"), scratch)
    scores = pd.read_parquet(join(run_dir, "scores"))

    def tag_node(batch: pd.DataFrame) -> pd.DataFrame:
        return batch.assign(node_id=ray.get_runtime_context().get_node_id())

    # Which nodes ran the tasks over the ingested transactions (one read task per file).
    def slow_tag(batch: pd.DataFrame) -> pd.DataFrame:
        time.sleep(1.0)  # hold the CPU long enough that queued tasks need the other node
        return tag_node(batch)

    ingest_nodes = (
        ray.data.read_parquet(join(run_dir, "ingest", "transactions"))
        .repartition(8)  # the ingested table may be one file: spread it over 8 blocks
        .map_batches(slow_tag, batch_format="pandas", num_cpus=1)
        .unique("node_id")
    )
    reviews = read_parquet(join(run_dir, "ingest", "reviews"), storage)
    started = f"{workdir}/embedding-started"

    def tag_and_pace(batch: pd.DataFrame) -> pd.DataFrame:
        # Mark that embeddings flow, and pace the stage so that removing a node lands in the
        # middle of it however fast the tiny encoder is on this machine.
        open(started, "a").close()
        time.sleep(0.3)
        return tag_node(batch)

    embedded = embed_reviews(reviews, cfg.text.model, cfg.text, storage=storage).map_batches(
        tag_and_pace, batch_format="pandas", batch_size=16
    )
    removed = {}
    if remove_node:
        # Remove a worker once the first embeddings flow: mid-run, whatever the timing.
        out_dir = f"{workdir}/embeddings"

        def remover() -> None:
            deadline = time.time() + 300
            while time.time() < deadline:
                if os.path.exists(started) or removed.get("stop"):
                    break
                time.sleep(0.1)
            if not removed.get("stop"):
                cluster.remove_node(workers[1])
                removed["at"] = time.time()

        thread = threading.Thread(target=remover, daemon=True)
        thread.start()
        write_parquet(embedded, out_dir, storage)
        removed["stop"] = True
        thread.join()
        emb = pd.read_parquet(out_dir)
    else:
        write_parquet(embedded, f"{workdir}/embeddings", storage)
        emb = pd.read_parquet(f"{workdir}/embeddings")
    accepted = pd.read_parquet(join(run_dir, "ingest", "reviews"))
    alive = sum(1 for n in ray.nodes() if n["Alive"])
    ray.shutdown()
    cluster.shutdown()
    return {
        "counts": counts,
        "customers": int(customers.count()),
        "scored": int(len(scores)),
        "scored_unique": int(scores["customer_id"].nunique()),
        "reviews_accepted": int(len(accepted)),
        "embedded_rows": int(len(emb)),
        "embedded_unique": int(emb["review_id"].nunique()),
        "embedded_match": bool(set(emb["review_id"]) == set(accepted["review_id"])),
        "embed_nodes": sorted(set(emb["node_id"])),
        "task_nodes": sorted(ingest_nodes),
        "node_removed": "at" in removed,
        "alive_nodes": alive,
    }


if __name__ == "__main__":
    result = main(sys.argv[1], sys.argv[2], "--remove-node" in sys.argv)
    print("RESULT " + json.dumps(result), flush=True)
