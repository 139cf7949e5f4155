"""Synthetic customers with known latent parameters, generated in parallel Ray tasks.

Each customer has a purchase rate `lam` (per day), a dropout probability `p` after each
purchase (a buy-till-you-die process, as in BG/NBD), a spend level and a latent `satisfaction`.
Satisfaction lowers dropout, and it shows in what the customer writes (sentiment words,
loyalty phrases) more clearly than in the star rating, which also depends on the product. So
text carries signal about future behaviour that past purchases do not fully reveal.

Every task generates `customers_per_task` customers from its own seed and writes one parquet
file per table; the driver only sees counts. Adding nodes adds tasks running at once, so 10^8
transactions is a matter of `n_customers` and cluster size.
"""

from __future__ import annotations

import datetime as dt
import math

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from clvray.config import SyntheticSection
from clvray.contract import REVIEWS, TRANSACTIONS
from clvray.storage import Storage, join

PRODUCTS = {
    "guitar": ["guitar", "neck", "frets", "tone", "body"],
    "strings": ["strings", "gauge", "tuning", "bright", "set"],
    "amp": ["amp", "speaker", "volume", "watts", "cabinet"],
    "pedal": ["pedal", "distortion", "switch", "effect", "knob"],
    "cable": ["cable", "jack", "length", "shielding", "plug"],
    "mic": ["mic", "vocals", "stand", "clarity", "recording"],
    "drum": ["drum", "sticks", "snare", "cymbal", "kit"],
    "keys": ["keyboard", "keys", "piano", "synth", "weighted"],
}
POSITIVE = ["great", "excellent", "love", "perfect", "solid", "amazing", "happy", "recommend"]
NEGATIVE = ["poor", "broke", "disappointed", "cheap", "noisy", "returned", "awful", "flimsy"]
NEUTRAL = ["okay", "fine", "average", "decent", "works", "expected", "standard", "usable"]
LOYAL = [
    "will order again from this shop",
    "my go to store for gear",
    "already planning my next order",
    "fast shipping as always here",
]
LEAVING = [
    "probably my last order here",
    "found a better shop elsewhere",
    "support never answered me",
    "shipping took far too long",
]
FILLER = ["the", "it", "is", "and", "for", "my", "this", "with", "a", "was"]

TRUTH = pa.schema(
    [
        ("customer_id", pa.string()),
        ("birth_ts", pa.timestamp("us", tz="UTC")),
        ("death_ts", pa.timestamp("us", tz="UTC")),
        ("lam_per_day", pa.float64()),
        ("dropout_p", pa.float64()),
        ("mean_spend", pa.float64()),
        ("refund_rate", pa.float64()),
        ("satisfaction", pa.float64()),
    ]
)


def vocabulary() -> list[str]:
    """Every word the generator can write (the tiny test tokenizer is built from it)."""
    words = set(POSITIVE + NEGATIVE + NEUTRAL + FILLER)
    for ws in PRODUCTS.values():
        words.update(ws)
    for phrase in LOYAL + LEAVING:
        words.update(phrase.split())
    return sorted(words)


def _review_text(
    rng: np.random.Generator, satisfaction: float, product: str, quality: float
) -> str:
    mood = satisfaction + 0.5 * quality
    p_pos = 1 / (1 + math.exp(-1.8 * mood))
    n_words = int(rng.integers(6, 18))
    words = []
    for _ in range(n_words):
        u = rng.random()
        if u < 0.35:
            words.append(str(rng.choice(PRODUCTS[product])))
        elif u < 0.70:
            pool = POSITIVE if rng.random() < p_pos else NEGATIVE
            if rng.random() < 0.25:
                pool = NEUTRAL
            words.append(str(rng.choice(pool)))
        else:
            words.append(str(rng.choice(FILLER)))
    # Loyalty phrases depend on satisfaction only, not on the product: this is the signal about
    # dropout that the star rating (product-driven too) blurs.
    if rng.random() < 0.6:
        p_loyal = 1 / (1 + math.exp(-2.5 * satisfaction))
        words.append(str(rng.choice(LOYAL if rng.random() < p_loyal else LEAVING)))
    return " ".join(words)


def generate_chunk(task_index: int, cfg: SyntheticSection) -> dict[str, pd.DataFrame]:
    """Customers `[task_index * k, (task_index + 1) * k)`: truth, transactions, reviews."""
    k = cfg.customers_per_task
    first = task_index * k
    n = min(k, cfg.n_customers - first)
    rng = np.random.default_rng([cfg.seed, task_index])
    start = pd.Timestamp(cfg.start, tz="UTC")
    end = pd.Timestamp(cfg.end, tz="UTC")
    span_days = (end - start).days
    products = list(PRODUCTS)
    quality = {
        p: q
        for p, q in zip(
            products, np.random.default_rng(cfg.seed).normal(0, 0.7, len(products)), strict=True
        )
    }

    sat = rng.normal(0, 1, n)
    lam = rng.gamma(2.0, 1 / 60, n) * np.exp(0.25 * sat)  # ~1 purchase / 30 days on average
    p = 1 / (1 + np.exp(-(-1.7 - 1.1 * sat + rng.normal(0, 0.3, n))))
    spend = np.exp(rng.normal(3.6 + 0.15 * sat, 0.5, n))
    refund_rate = np.clip(rng.beta(1, 25, n) * np.exp(-0.3 * sat), 0, 0.5)
    birth = rng.uniform(0, span_days * 0.85, n)

    t_rows: list[tuple] = []
    r_rows: list[tuple] = []
    death = np.full(n, np.nan)
    for i in range(n):
        cid = f"C{first + i:09d}"
        t = birth[i]
        j = 0
        while t < span_days:
            order = f"O{first + i:09d}-{j:04d}"
            amount = float(np.round(rng.gamma(4.0, spend[i] / 4.0), 2))
            t_rows.append((cid, order, t, amount))
            if rng.random() < refund_rate[i]:
                t_rows.append((cid, order, t + rng.uniform(1, 20), -amount))
            if rng.random() < cfg.review_prob:
                product = products[int(rng.integers(len(products)))]
                q = quality[product]
                rating = int(
                    np.clip(np.round(3.4 + 0.6 * sat[i] + 0.8 * q + rng.normal(0, 1.0)), 1, 5)
                )
                text = _review_text(rng, float(sat[i]), product, float(q))
                r_rows.append(
                    (
                        cid,
                        f"R{first + i:09d}-{j:04d}",
                        t + rng.uniform(0.5, 10),
                        text,
                        rating,
                        order,
                        product,
                    )
                )
            j += 1
            if rng.random() < p[i]:
                death[i] = t
                break
            t += rng.exponential(1 / lam[i])

    def to_ts(days: np.ndarray) -> pd.Series:
        return pd.Series(
            start + pd.to_timedelta(np.asarray(days, dtype="float64"), unit="D")
        ).dt.floor("s")

    tx = pd.DataFrame(t_rows, columns=["customer_id", "order_id", "t", "amount"])
    tx = tx[tx["t"] < span_days]
    tx = tx.assign(ts=to_ts(tx["t"].to_numpy()).to_numpy()).drop(columns="t")
    rv = pd.DataFrame(
        r_rows,
        columns=["customer_id", "review_id", "t", "text", "rating", "order_id", "product_id"],
    )
    rv = rv[rv["t"] < span_days]
    rv = rv.assign(ts=to_ts(rv["t"].to_numpy()).to_numpy()).drop(columns="t")
    truth = pd.DataFrame(
        {
            "customer_id": [f"C{first + i:09d}" for i in range(n)],
            "birth_ts": to_ts(birth),
            "death_ts": to_ts(death),
            "lam_per_day": lam,
            "dropout_p": p,
            "mean_spend": spend,
            "refund_rate": refund_rate,
            "satisfaction": sat,
        }
    )
    return {"truth": truth, "transactions": tx, "reviews": rv}


def _write_chunk(
    task_index: int, cfg: SyntheticSection, out: str, storage: Storage
) -> dict[str, int]:
    chunk = generate_chunk(task_index, cfg)
    schemas = {"truth": TRUTH, "transactions": TRANSACTIONS, "reviews": REVIEWS}
    counts = {}
    for name, df in chunk.items():
        table = pa.Table.from_pandas(
            df[schemas[name].names], schema=schemas[name], preserve_index=False
        )
        fs, path = storage.filesystem(join(out, name, f"part-{task_index:05d}.parquet"))
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        pq.write_table(table, path, filesystem=fs)
        counts[name] = table.num_rows
    return counts


def generate(cfg: SyntheticSection, out: str, storage: Storage) -> dict[str, int]:
    """Write `truth/`, `transactions/`, `reviews/` parquet under `out` with Ray tasks.

    Returns the row count of each table. Deterministic for `cfg.seed` whatever the cluster.
    """
    import ray

    n_tasks = math.ceil(cfg.n_customers / cfg.customers_per_task)
    task = ray.remote(num_cpus=1)(_write_chunk).options(name="clvray.synth.generate_chunk")
    refs = [task.remote(i, cfg, out, storage) for i in range(n_tasks)]
    totals = {"truth": 0, "transactions": 0, "reviews": 0}
    for counts in ray.get(refs):
        for k, v in counts.items():
            totals[k] += v
    return totals


def expected_future_value(
    truth: pd.DataFrame, cutoff: dt.datetime, horizon_days: int
) -> np.ndarray:
    """Oracle: expected net spend in `[cutoff, cutoff + horizon)` given the latent state at cutoff.

    A customer alive at the cutoff buys at rate `lam` and dies at each purchase with probability
    `p`, so the death hazard is `lam * p` and the expected count is (1 - exp(-lam p H)) / p.
    """
    cutoff_ts = pd.Timestamp(cutoff)
    cutoff_ts = cutoff_ts.tz_localize("UTC") if cutoff_ts.tz is None else cutoff_ts
    born = truth["birth_ts"] < cutoff_ts
    alive = born & (truth["death_ts"].isna() | (truth["death_ts"] >= cutoff_ts))
    lam = truth["lam_per_day"].to_numpy()
    p = truth["dropout_p"].to_numpy()
    count = (1 - np.exp(-lam * p * horizon_days)) / p
    value = count * truth["mean_spend"].to_numpy() * (1 - truth["refund_rate"].to_numpy())
    return np.where(alive.to_numpy(), value, 0.0)
