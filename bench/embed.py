"""Embedding throughput: clvray's embed stage beside a careful loop and one-at-a-time.

    python bench/embed.py [--reviews 4000] [--model packaged:all-MiniLM-L6-v2]
    python bench/embed.py --quick --model <tiny model dir>     # what the tests run

Same model, same reviews, same `max_length_tokens`, on Amazon's real reviews and synthetic ones:
- (a) clvray: `embed_reviews` (Ray Data: read, tokenize, actor pool) over parquet files, on a
  fresh local Ray holding every core, with the project's default embed config;
- (b) a careful single-process loop: tokenize all, sort by length, batches, inference mode,
  torch on every core;
- (c) one review at a time (tokenize, forward), on a subset.
Start-up (Ray, model load) is reported separately from the reviews/s of the pass itself; (a)'s
pass still includes its actors' model loads, which is what a user waits for. (a) and (b) are
checked to give the same embeddings. Each measurement runs in its own process.
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

AMAZON = REPO.parent / "shared" / "data" / "amazon_musical_instruments"
AMAZON_FILE = AMAZON / "reviews_Musical_Instruments_5.json.gz"


def write_reviews(kind: str, n: int, out: Path, n_files: int = 8) -> Path:
    """`n` reviews in contract columns as `n_files` parquet files under `out/<kind>`."""
    import numpy as np
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = out / kind
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    if kind == "amazon":
        raw = pd.read_json(AMAZON_FILE, lines=True, nrows=n)
        text = (raw["summary"].fillna("") + ". " + raw["reviewText"].fillna("")).tolist()
        customers = raw["reviewerID"].astype(str).tolist()
    else:
        from clvray.config import SyntheticSection
        from clvray.synth import generate_chunk

        chunk = generate_chunk(
            0, SyntheticSection(n_customers=max(50, n), customers_per_task=max(50, n))
        )
        rv = chunk["reviews"].head(n)
        text, customers = rv["text"].tolist(), rv["customer_id"].astype(str).tolist()
    n = len(text)
    tbl = pa.table(
        {
            "customer_id": customers,
            "review_id": [f"R{i:08d}" for i in range(n)],
            "ts": pa.array(
                np.full(n, 1_600_000_000_000_000, dtype="int64"), pa.timestamp("us", tz="UTC")
            ),
            "text": text,
        }
    )
    per = -(-n // n_files)
    for i in range(n_files):
        part = tbl.slice(i * per, per)
        if part.num_rows:
            pq.write_table(part, folder / f"part-{i:03d}.parquet")
    return folder


def _clvray_child(args) -> dict:
    import ray

    from clvray.config import TextSection
    from clvray.storage import Storage
    from clvray.text.embed import embed_reviews

    with Timer() as start:
        from clvray.pipeline import keep_idle_workers

        keep_idle_workers()  # as the job's own local Ray (clvray.pipeline)
        ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
        import ray.data

        ray.data.DataContext.get_current().enable_progress_bars = False
    cfg = TextSection(model=args.model, max_length_tokens=args.max_length_tokens)
    if args.gpu:
        cfg.embed = cfg.embed.model_copy(
            update={"num_gpus_per_actor": 1.0, "batch_size": args.batch_size, "min_actors": 1}
        )
    storage = Storage()
    with Timer() as t:
        ds = ray.data.read_parquet(args.data)
        out = embed_reviews(ds, args.model, cfg, storage=storage)
        table = out.to_arrow_refs()
        import pyarrow as pa

        result = pa.concat_tables(ray.get(table))
    n = result.num_rows
    emb_path = Path(args.out) / "clvray.parquet"
    import pyarrow.parquet as pq

    pq.write_table(result.select(["review_id", "embedding"]), emb_path)
    return {"startup_s": start.seconds, "pass_s": t.seconds, "reviews": n, "emb": str(emb_path)}


def _load(model: str, threads: int, gpu: bool = False):
    import torch

    from clvray.storage import Storage
    from clvray.text.encoder import load_text_model, pick_device, pick_dtype
    from clvray.text.source import resolve_cached
    from clvray.text.tokens import load_tokenizer

    torch.set_num_threads(threads)
    path = resolve_cached(model, Storage())
    loaded = load_text_model(path)
    device = pick_device(gpu)
    loaded.model.encoder.to(device=device, dtype=pick_dtype(device))
    loaded.model.eval()
    return loaded, load_tokenizer(path), device


def _loop_child(args) -> dict:
    import numpy as np
    import pyarrow as pa
    import pyarrow.dataset as pads
    import pyarrow.parquet as pq
    import torch

    from clvray.text.encoder import pad_batch

    with Timer() as start:
        loaded, tok, device = _load(args.model, args.num_cpus, args.gpu)
    tbl = pads.dataset(args.data).to_table(columns=["review_id", "text"])
    texts = tbl["text"].to_pylist()
    pad_id = int(getattr(loaded.tokenizer, "pad_token_id", None) or 0)
    if args.child == "loop":
        with Timer() as t:
            ids = tok.encode(texts, args.max_length_tokens)
            order = np.argsort([len(x) for x in ids], kind="stable")
            out = np.empty((len(ids), loaded.model.encoder.config.hidden_size), np.float32)
            with torch.inference_mode():
                for s in range(0, len(order), args.batch_size):
                    idx = order[s : s + args.batch_size]
                    input_ids, mask = pad_batch([ids[i] for i in idx], pad_id)
                    pooled, _ = loaded.model(input_ids.to(device), mask.to(device))
                    out[idx] = pooled.float().cpu().numpy()
        emb_path = Path(args.out) / "loop.parquet"
        pq.write_table(
            pa.table(
                {
                    "review_id": tbl["review_id"],
                    "embedding": pa.FixedSizeListArray.from_arrays(
                        pa.array(out.reshape(-1)), out.shape[1]
                    ),
                }
            ),
            emb_path,
        )
        return {
            "startup_s": start.seconds,
            "pass_s": t.seconds,
            "reviews": len(ids),
            "emb": str(emb_path),
        }
    subset = texts[: args.single_reviews]
    with Timer() as t, torch.inference_mode():
        for text in subset:
            input_ids, mask = pad_batch(tok.encode([text], args.max_length_tokens), pad_id)
            loaded.model(input_ids.to(device), mask.to(device))[0].cpu()
    return {"startup_s": start.seconds, "pass_s": t.seconds, "reviews": len(subset)}


def same_embeddings(a: str, b: str) -> float:
    """Largest absolute difference between the two runs' embeddings of each review."""
    import numpy as np
    import pyarrow.parquet as pq

    ta = pq.read_table(a).sort_by("review_id")
    tb = pq.read_table(b).sort_by("review_id")
    assert ta["review_id"].equals(tb["review_id"]), "different reviews embedded"
    ea = np.stack(ta["embedding"].to_numpy(zero_copy_only=False))
    eb = np.stack(tb["embedding"].to_numpy(zero_copy_only=False))
    return float(np.abs(ea - eb).max())


def bench_kind(kind: str, args, work: Path) -> dict:
    data = write_reviews(kind, args.reviews, work / "data")
    common = [
        "--data", str(data), "--out", str(work), "--model", args.model,
        "--num-cpus", str(args.num_cpus), "--max-length-tokens", str(args.max_length_tokens),
        "--batch-size", str(args.batch_size), "--single-reviews", str(args.single_reviews),
    ] + (["--gpu"] if args.gpu else [])  # fmt: skip
    a, a_mem = run_child(["bench/embed.py", "--child", "clvray", *common])
    b, b_mem = run_child(["bench/embed.py", "--child", "loop", *common])
    c, _ = run_child(["bench/embed.py", "--child", "single", *common])
    diff = same_embeddings(a["emb"], b["emb"])
    ra, rb, rc = (x["reviews"] / x["pass_s"] for x in (a, b, c))
    return {
        "data": kind,
        "reviews": a["reviews"],
        "a_clvray_per_s": round(ra, 1),
        "b_loop_per_s": round(rb, 1),
        "c_single_per_s": round(rc, 1),
        "a_over_b": round(ra / rb, 2),
        "a_over_c": round(ra / rc, 2),
        "a_startup_s": a["startup_s"],
        "b_startup_s": b["startup_s"],
        "a_peak_gib": a_mem,
        "b_peak_gib": b_mem,
        "max_abs_diff": diff,
    }


COLUMNS = [
    "data",
    "reviews",
    "a_clvray_per_s",
    "b_loop_per_s",
    "c_single_per_s",
    "a_over_b",
    "a_over_c",
    "a_startup_s",
    "b_startup_s",
    "max_abs_diff",
]


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reviews", type=int, default=4000)
    ap.add_argument("--single-reviews", type=int, default=500)
    ap.add_argument("--model", default="packaged:all-MiniLM-L6-v2")
    ap.add_argument("--max-length-tokens", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--num-cpus", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--kinds", default="amazon,synthetic")
    ap.add_argument("--quick", action="store_true", help="64 reviews; writes no results")
    ap.add_argument("--gpu", action="store_true", help="encoders on the GPU in bf16 (all three)")
    ap.add_argument("--work", default=str(REPO / "runs" / "bench_embed"))
    ap.add_argument("--child", choices=["clvray", "loop", "single"])
    ap.add_argument("--data")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    if args.child:
        fn = _clvray_child if args.child == "clvray" else _loop_child
        print(json.dumps(fn(args)))
        return []
    if args.quick:
        args.reviews, args.single_reviews = 64, 16
    if args.gpu and args.batch_size == 64:
        args.batch_size = 256  # what suits a GPU in bf16
    kinds = [k for k in args.kinds.split(",") if k != "amazon" or AMAZON_FILE.exists()]
    work = Path(args.work)
    rows = [bench_kind(k, args, work) for k in kinds]
    shutil.rmtree(work, ignore_errors=True)
    print(f"embed ({args.model}, {args.max_length_tokens} tokens) on {describe(machine())}")
    print(table(rows, COLUMNS))
    if not args.quick:
        name = "embed_gpu" if args.gpu else "embed"
        print(f"wrote {write_results(name, rows, {'model': args.model})}")
    return rows


if __name__ == "__main__":
    main()
