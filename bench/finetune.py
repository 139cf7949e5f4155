"""Fine-tuning: Ray Train's TorchTrainer (clvray's `finetune_on_datasets`) beside a plain
single-process torch loop, same model, reviews, batches and epochs.

    python bench/finetune.py [--reviews 1000] [--model packaged:all-MiniLM-L6-v2]
    python bench/finetune.py --quick --model <tiny model dir>     # what the tests run

Both sides train on the exact tokenized train / valid datasets the pipeline builds
(`build_finetune_datasets`, target `rating`), with the same optimizer, schedule, batch size and
epochs, and run one validation pass per epoch; (a) also writes its per-epoch checkpoint, as the
stage does. Samples/s = train reviews x epochs / wall seconds of the fit. One process each.
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

CUTOFF = "2024-01-01"


def _datasets(args):
    import pandas as pd
    import ray

    from clvray.config import SyntheticSection, TextSection
    from clvray.features import split_of
    from clvray.storage import Storage
    from clvray.synth import generate_chunk
    from clvray.text.finetune import build_finetune_datasets

    n_customers = max(100, args.reviews)
    chunk = generate_chunk(
        0, SyntheticSection(n_customers=n_customers, customers_per_task=n_customers)
    )
    reviews = chunk["reviews"].head(args.reviews)
    customers = pd.DataFrame({"customer_id": reviews["customer_id"].unique()})
    customers["split"] = split_of(customers["customer_id"], 0.15, 0.2)
    cfg = TextSection(model=args.model, max_length_tokens=args.max_length_tokens)
    cfg.finetune = cfg.finetune.model_copy(
        update={
            "target": "rating",
            "epochs": args.epochs,
            "batch_size": args.batch_size,
            "max_reviews": None,
            "cpus_per_worker": float(args.num_cpus),
        }
    )
    datasets = build_finetune_datasets(
        ray.data.from_arrow(pa_table(reviews)),
        ray.data.from_arrow(pa_table(customers)),
        cfg,
        pd.Timestamp(CUTOFF, tz="UTC"),
        Storage(),
    )
    return cfg, datasets


def pa_table(df):
    import pyarrow as pa

    return pa.Table.from_pandas(df, preserve_index=False)


def _start_ray(num_cpus: int) -> None:
    import ray

    from clvray.pipeline import keep_idle_workers

    keep_idle_workers()  # as the job's own local Ray (clvray.pipeline)
    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False


def _trainer_child(args) -> dict:
    import pandas as pd

    from clvray.storage import Storage
    from clvray.text.finetune import finetune_on_datasets

    _start_ray(args.num_cpus)
    cfg, datasets = _datasets(args)
    n_train = datasets["train"].count()
    with Timer() as t:
        finetune_on_datasets(
            datasets,
            cfg,
            pd.Timestamp(CUTOFF, tz="UTC"),
            str(Path(args.out) / "trainer"),
            Storage(),
            name="bench-finetune",
        )
    return {"reviews": n_train, "fit_s": t.seconds}


def _loop_child(args) -> dict:
    import math

    import torch

    from clvray.storage import Storage
    from clvray.text.encoder import load_text_model, new_head, pad_batch
    from clvray.text.source import resolve_cached

    _start_ray(args.num_cpus)  # only to build the same datasets; training below is plain torch
    cfg, datasets = _datasets(args)
    train = datasets["train"].to_arrow_refs()
    valid = datasets["valid"].to_arrow_refs()
    import pyarrow as pa
    import ray

    train_t = pa.concat_tables(ray.get(train))
    valid_t = pa.concat_tables(ray.get(valid))
    torch.set_num_threads(args.num_cpus)
    torch.manual_seed(0)
    loaded = load_text_model(resolve_cached(args.model, Storage()))
    model = loaded.model
    if model.head is None:
        model.head = new_head(model.encoder.config.hidden_size)
    pad_id = int(getattr(loaded.tokenizer, "pad_token_id", None) or 0)
    ft = cfg.finetune
    steps = math.ceil(train_t.num_rows / ft.batch_size) * ft.epochs
    opt = torch.optim.AdamW(model.parameters(), lr=ft.learning_rate, weight_decay=ft.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1 - s / max(1, steps)))
    loss_fn = torch.nn.MSELoss()

    def batches(t: pa.Table):
        for s in range(0, t.num_rows, ft.batch_size):
            b = t.slice(s, ft.batch_size)
            ids, mask = pad_batch(b["input_ids"], pad_id)
            yield ids, mask, torch.from_numpy(b["label"].to_numpy().astype("float32"))

    with Timer() as t:
        for _ in range(ft.epochs):
            model.train()
            for ids, mask, label in batches(train_t):
                _, raw = model(ids, mask)
                loss = loss_fn(raw.float(), label)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), ft.grad_clip_norm)
                opt.step()
                sched.step()
            model.eval()
            with torch.inference_mode():
                for ids, mask, label in batches(valid_t):
                    _, raw = model(ids, mask)
                    loss_fn(raw.float(), label)
    return {"reviews": train_t.num_rows, "fit_s": t.seconds}


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reviews", type=int, default=1000)
    ap.add_argument("--model", default="packaged:all-MiniLM-L6-v2")
    ap.add_argument("--max-length-tokens", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--num-cpus", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--quick", action="store_true", help="120 reviews; writes no results")
    ap.add_argument("--work", default=str(REPO / "runs" / "bench_finetune"))
    ap.add_argument("--child", choices=["trainer", "loop"])
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps((_trainer_child if args.child == "trainer" else _loop_child)(args)))
        return []
    if args.quick:
        args.reviews = 120
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    common = [
        "--out", str(work), "--model", args.model, "--reviews", str(args.reviews),
        "--num-cpus", str(args.num_cpus), "--max-length-tokens", str(args.max_length_tokens),
        "--batch-size", str(args.batch_size), "--epochs", str(args.epochs),
    ]  # fmt: skip
    a, a_mem = run_child(["bench/finetune.py", "--child", "trainer", *common])
    b, b_mem = run_child(["bench/finetune.py", "--child", "loop", *common])
    rows = []
    for side, r, mem, workers in (("TorchTrainer", a, a_mem, 1), ("plain loop", b, b_mem, 1)):
        rows.append(
            {
                "side": side,
                "reviews": r["reviews"],
                "workers": workers,
                "threads": args.num_cpus,
                "fit_s": r["fit_s"],
                "samples_per_s": round(r["reviews"] * args.epochs / r["fit_s"], 1),
                "peak_gib": mem,
            }
        )
    rows[0]["ratio"] = round(rows[0]["samples_per_s"] / rows[1]["samples_per_s"], 2)
    shutil.rmtree(work, ignore_errors=True)
    print(f"fine-tuning ({args.model}) on {describe(machine())}")
    print(table(rows, ["side", "reviews", "workers", "threads", "fit_s", "samples_per_s", "ratio"]))
    if not args.quick:
        print(f"wrote {write_results('finetune', rows, {'model': args.model})}")
    return rows


if __name__ == "__main__":
    main()
