"""On a GPU: embedding and fine-tuning throughput in bf16 with model FLOP utilisation, for
MiniLM and a BERT-base-sized encoder (random weights from `BertConfig`), then the three-way
embed comparison. One short run does it all:

    python bench/gpu.py                      # on the GPU machine (about 5 minutes)
    python bench/gpu.py --quick              # CPU smoke of the same code (what the tests run)

Reviews are Amazon's real ones (token lengths as they are), sorted by length into batches.
MFU = achieved FLOP/s / the GPU's dense bf16 peak (`PEAK_BF16_TFLOPS`, or `--peak-tflops`).
FLOPs per token of a BERT forward: 2 x (non-embedding parameters) + 4 x layers x length x
hidden (attention scores and their weighted sum); a training step is 3x the forward.
Writes `bench/results/gpu.json`, then runs `bench/embed.py --gpu` (writes `embed_gpu.json`).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import REPO, describe, machine, table, write_results  # noqa: E402

PEAK_BF16_TFLOPS = {
    "H200": 989.0,
    "H100": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
    "A10": 125.0,
}


def peak_tflops(name: str, override: float | None) -> float | None:
    if override:
        return override
    for key, value in PEAK_BF16_TFLOPS.items():
        if key in name:
            return value
    return None


def flops_per_token(config, length: float) -> float:
    """Forward FLOPs per token of a BERT encoder at sequence length `length`."""
    h, layers, inter = config.hidden_size, config.num_hidden_layers, config.intermediate_size
    per_layer = 4 * h * h + 2 * h * inter  # Q, K, V, output projections + the MLP
    return 2 * layers * per_layer + 4 * layers * length * h


def load_reviews(n: int, tokenizer, max_length: int) -> list[list[int]]:
    import pandas as pd

    path = REPO.parent / "shared" / "data" / "amazon_musical_instruments"
    raw = pd.read_json(path / "reviews_Musical_Instruments_5.json.gz", lines=True, nrows=n)
    texts = (raw["summary"].fillna("") + ". " + raw["reviewText"].fillna("")).tolist()
    return tokenizer.encode(texts, max_length)


def batches(ids: list[list[int]], batch_size: int, pad_id: int, device):
    import numpy as np

    from clvray.text.encoder import pad_batch

    order = np.argsort([len(x) for x in ids], kind="stable")
    for s in range(0, len(order), batch_size):
        seqs = [ids[i] for i in order[s : s + batch_size]]
        input_ids, mask = pad_batch(seqs, pad_id)
        yield input_ids.to(device, non_blocking=True), mask.to(device, non_blocking=True)


def measure(model_name: str, encoder, ids, args, device) -> list[dict]:
    import torch

    from clvray.text.encoder import TextModel, new_head

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = encoder.config
    tokens = sum(len(x) for x in ids)
    mean_len = tokens / len(ids)
    fpt = flops_per_token(cfg, mean_len)
    peak = peak_tflops(machine().get("gpu") or "", args.peak_tflops)
    rows = []

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    model = TextModel(encoder.to(device, dtype=dtype), new_head(cfg.hidden_size).to(device))
    model.eval()
    with torch.inference_mode():
        for input_ids, mask in batches(ids[: args.batch_size], args.batch_size, 0, device):
            model(input_ids, mask)  # warm-up: kernels, allocator
        sync()
        start = time.perf_counter()
        for input_ids, mask in batches(ids, args.batch_size, 0, device):
            model(input_ids, mask)
        sync()
    secs = time.perf_counter() - start
    achieved = tokens * fpt / secs
    rows.append(
        {
            "model": model_name,
            "work": "embed (bf16)" if dtype == torch.bfloat16 else "embed (fp32)",
            "reviews": len(ids),
            "mean_tokens": round(mean_len, 1),
            "reviews_per_s": round(len(ids) / secs, 1),
            "tflops": round(achieved / 1e12, 2),
            "mfu": round(achieved / (peak * 1e12), 3) if peak else None,
        }
    )
    model.train()
    model.encoder.to(dtype=torch.float32)  # fp32 master weights, bf16 autocast
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    train_ids = ids[: args.train_reviews]
    train_tokens = sum(len(x) for x in train_ids)

    def step(input_ids, mask):
        ctx = (
            torch.autocast(device_type="cuda", dtype=torch.bfloat16)
            if device.type == "cuda"
            else torch.autocast(device_type="cpu", enabled=False)
        )
        with ctx:
            _, raw = model(input_ids, mask)
        loss = raw.float().pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for input_ids, mask in batches(train_ids[: args.train_batch], args.train_batch, 0, device):
        step(input_ids, mask)
    sync()
    start = time.perf_counter()
    for input_ids, mask in batches(train_ids, args.train_batch, 0, device):
        step(input_ids, mask)
    sync()
    secs = time.perf_counter() - start
    achieved = 3 * train_tokens * flops_per_token(cfg, train_tokens / len(train_ids)) / secs
    rows.append(
        {
            "model": model_name,
            "work": "fine-tune step (bf16 autocast)"
            if device.type == "cuda"
            else "fine-tune (fp32)",
            "reviews": len(train_ids),
            "mean_tokens": round(train_tokens / len(train_ids), 1),
            "reviews_per_s": round(len(train_ids) / secs, 1),
            "tflops": round(achieved / 1e12, 2),
            "mfu": round(achieved / (peak * 1e12), 3) if peak else None,
        }
    )
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    import torch
    from transformers import BertConfig, BertModel

    from clvray.storage import Storage
    from clvray.text.encoder import load_encoder
    from clvray.text.source import resolve_cached
    from clvray.text.tokens import load_tokenizer

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reviews", type=int, default=10_000)
    ap.add_argument("--train-reviews", type=int, default=4096)
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--train-batch", type=int, default=64)
    ap.add_argument("--max-length-tokens", type=int, default=128)
    ap.add_argument("--peak-tflops", type=float, default=None)
    ap.add_argument("--quick", action="store_true", help="CPU smoke: 64 reviews, tiny BERT")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.quick else "cpu")
    if args.quick:
        args.reviews, args.train_reviews, args.batch_size, args.train_batch = 64, 32, 16, 16
    path = resolve_cached("packaged:all-MiniLM-L6-v2", Storage())
    tok = load_tokenizer(path)
    ids = load_reviews(args.reviews, tok, args.max_length_tokens)
    if args.quick:
        small = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=64, vocab_size=tok_vocab(path))  # fmt: skip
        models = {"tiny BERT (random)": lambda: BertModel(small)}
    else:
        base = BertConfig(vocab_size=tok_vocab(path))  # BERT-base: 768 wide, 12 layers
        models = {
            "all-MiniLM-L6-v2": lambda: load_encoder(path)[1],
            "BERT-base size (random)": lambda: BertModel(base),
        }
    rows = []
    for name, build in models.items():
        torch.manual_seed(0)
        rows += measure(name, build(), ids, args, device)
    columns = ["model", "work", "reviews", "mean_tokens", "reviews_per_s", "tflops", "mfu"]
    print(f"GPU throughput on {describe(machine())}")
    print(table(rows, columns))
    if args.quick:
        return rows
    print(f"wrote {write_results('gpu', rows)}")
    subprocess.run(
        [sys.executable, "bench/embed.py", "--gpu", "--reviews", str(args.reviews)],
        cwd=REPO,
        check=True,
    )
    return rows


def tok_vocab(path: str) -> int:
    import json

    return int(json.loads((Path(path) / "config.json").read_text())["vocab_size"])


if __name__ == "__main__":
    main()
