"""What customers write about: topics from clustering review embeddings, named by c-TF-IDF.

1. **Fit** (`fit_topics`): k-means (`text.topics.n_topics` clusters) on the unit-normalised
   embeddings of a hash sample of at most `text.topics.fit_rows` reviews, the only rows that
   reach the driver. The centroids are saved as `centroids.npz` under the stage's directory.
2. **Assign** (`assign_topics`): every review embedding goes to its nearest centroid (cosine) in
   Ray Data tasks; output `review_id`, `customer_id`, `topic`.
3. **Name** (`topic_words`): the review texts are joined to their topic by `review_id`, each
   block counts its words per topic, and a `groupby(topic, word)` sums them; the driver receives
   one row per (topic, word) that occurs at least `min_word_count` times, which grows with the
   vocabulary, not the row count. Each topic is named by its top words under class-based TF-IDF
   (`class_tfidf`): `tf(w, t) * log(1 + A / f(w))`, with `tf` the word's share of the topic's
   words, `f(w)` its count over all topics and `A` the mean number of words per topic.
4. **Per-customer shares** (`customer_topic_shares`): `topic_share_<k>`, the share of the
   customer's reviews (before the cutoff) in topic k; optional model features
   (`text.topics.as_features`).
5. **Profile** (`topic_profile`): per topic, its share of all reviews and its lift among the
   reviews of predicted churners and of the top value segment (share in the group / share
   overall), for the report.
"""

from __future__ import annotations

import collections
import logging
import re
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow as pa

from clvray.config import TopicsSection
from clvray.contract import unit_hash
from clvray.storage import Storage, join
from clvray.text.features import embedding_matrix
from clvray.text.partition import require_columns

if TYPE_CHECKING:
    from ray.data import Dataset

log = logging.getLogger(__name__)

CENTROIDS = "centroids.npz"
WORD = re.compile(r"[a-z][a-z']+[a-z]")
# Words that say nothing about a topic in English reviews (c-TF-IDF discounts common words,
# but function words would still crowd the top of small topics).
STOP_WORDS = frozenset(
    """a about above after again against all also am an and any are as at be because been
    before being below between both but by can could did do does doing don't down during each
    even few for from further get got had has have having he her here hers herself him himself
    his how i i'm i've if in into is isn't it it's its itself just let's me more most much my
    myself no nor not now of off on once one only or other our ours ourselves out over own
    really same she should so some such than that that's the their theirs them themselves then
    there these they they're this those through to too under until up use used very was wasn't
    we were what when where which while who whom why will with would you your yours yourself
    yourselves""".split()  # noqa: SIM905 (a word list reads better as text)
)


# --- plain functions (tested without Ray) ------------------------------------------------------


def unit_rows(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms > 0, norms, 1.0)


def kmeans_centroids(x: np.ndarray, n_topics: int, seed: int) -> np.ndarray:
    """Unit-norm centroids of k-means on the unit-normalised rows of `x` (spherical k-means)."""
    from sklearn.cluster import KMeans

    x = unit_rows(np.asarray(x, dtype=np.float64))
    k = min(n_topics, len(np.unique(x, axis=0)))
    if k < 1:
        raise ValueError("topics: no review embeddings to cluster")
    km = KMeans(n_clusters=k, n_init=4, random_state=seed).fit(x)
    # Topics numbered by size, largest first, so topic 0 is the most common in the sample.
    order = np.argsort(-np.bincount(km.labels_, minlength=k), kind="stable")
    return unit_rows(km.cluster_centers_[order]).astype(np.float32)


def nearest_topic(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    return np.argmax(unit_rows(x) @ centroids.T, axis=1).astype(np.int32)


def words(text: str) -> list[str]:
    return [w for w in WORD.findall(text.lower()) if w not in STOP_WORDS]


def count_words(topics: np.ndarray, texts: list[str]) -> pd.DataFrame:
    """Rows (topic, word, n): the word counts of each topic over these texts."""
    counts: collections.Counter = collections.Counter()
    for topic, text in zip(topics, texts, strict=True):
        counts.update((int(topic), w) for w in words(text or ""))
    return pd.DataFrame(
        [(t, w, n) for (t, w), n in counts.items()], columns=["topic", "word", "n"]
    ).astype({"topic": "int32", "word": "string", "n": "int64"})


def class_tfidf(counts: pd.DataFrame, top_k: int) -> dict[int, list[str]]:
    """`{topic: its top_k words}` by class-based TF-IDF over `counts` (topic, word, n)."""
    if counts.empty:
        return {}
    per_topic = counts.groupby("topic")["n"].transform("sum")
    per_word = counts.groupby("word")["n"].transform("sum")
    avg_words = counts.groupby("topic")["n"].sum().mean()
    scored = counts.assign(
        score=(counts["n"] / per_topic) * np.log1p(avg_words / per_word.astype("float64"))
    )
    scored = scored.sort_values(["topic", "score", "word"], ascending=[True, False, True])
    return {
        int(t): group["word"].head(top_k).astype(str).tolist()
        for t, group in scored.groupby("topic", sort=True)
    }


def share_columns(n_topics: int) -> list[str]:
    return [f"topic_share_{k}" for k in range(n_topics)]


# --- Ray Data --------------------------------------------------------------------------------


def _sample_block(table: pa.Table, frac: float) -> pa.Table:
    keep = unit_hash(table["review_id"], "topics") < frac
    return table.filter(pa.array(keep)).select(["review_id", "embedding"])


def _assign_block(table: pa.Table, centroids: np.ndarray) -> pa.Table:
    topics = nearest_topic(embedding_matrix(table["embedding"]), centroids)
    return pa.table(
        {
            "review_id": table["review_id"],
            "customer_id": table["customer_id"],
            "topic": pa.array(topics, pa.int32()),
        }
    )


def _count_block(batch: pd.DataFrame) -> pd.DataFrame:
    return count_words(batch["topic"].to_numpy(), batch["text"].astype(object).tolist())


def _frequent_block(batch: pd.DataFrame, min_count: int) -> pd.DataFrame:
    batch = batch.rename(columns={"sum(n)": "n"})
    return batch[batch["n"] >= min_count]


def _one_hot_block(table: pa.Table, n_topics: int) -> pa.Table:
    topics = table["topic"].to_numpy()
    cols = {"customer_id": table["customer_id"]}
    for k in range(n_topics):
        cols[f"t{k}"] = pa.array((topics == k).astype(np.int64))
    return pa.table(cols)


def _shares_block(batch: pd.DataFrame, n_topics: int) -> pd.DataFrame:
    counts = batch[[f"sum(t{k})" for k in range(n_topics)]].to_numpy(dtype=np.float64)
    total = counts.sum(axis=1, keepdims=True)
    shares = pd.DataFrame(counts / np.where(total > 0, total, 1.0), columns=share_columns(n_topics))
    return pd.concat([batch[["customer_id"]].reset_index(drop=True), shares], axis=1)


def fit_topics(
    embeddings: Dataset, cfg: TopicsSection, storage: Storage, out_uri: str
) -> np.ndarray:
    """Fit and save the centroids on a hash sample of at most `cfg.fit_rows` reviews."""
    require_columns(embeddings, ["review_id", "embedding"], "review embeddings")
    frac = min(1.0, cfg.fit_rows / max(embeddings.count(), 1))
    refs = (
        embeddings.select_columns(["review_id", "embedding"])
        .map_batches(_sample_block, fn_kwargs={"frac": frac}, batch_format="pyarrow")
        .to_arrow_refs()
    )
    import ray

    tables = [t for t in ray.get(refs) if t.num_rows]
    if not tables:
        raise ValueError("topics: no review embeddings to cluster")
    sample = pa.concat_tables(tables).sort_by("review_id")  # order-free, reproducible fit
    centroids = kmeans_centroids(embedding_matrix(sample["embedding"]), cfg.n_topics, cfg.seed)
    import io

    buf = io.BytesIO()
    np.savez(buf, centroids=centroids)
    storage.write_bytes(join(out_uri, CENTROIDS), buf.getvalue())
    log.info("topics: %d clusters fitted on %d reviews", len(centroids), sample.num_rows)
    return centroids


def load_centroids(storage: Storage, out_uri: str) -> np.ndarray:
    import io

    return np.load(io.BytesIO(storage.read_bytes(join(out_uri, CENTROIDS))))["centroids"]


def assign_topics(embeddings: Dataset, centroids: np.ndarray) -> Dataset:
    """`review_id`, `customer_id`, `topic` for every review embedding."""
    return embeddings.select_columns(["review_id", "customer_id", "embedding"]).map_batches(
        _assign_block, fn_kwargs={"centroids": centroids}, batch_format="pyarrow"
    )


def topic_words(
    assignments: Dataset, reviews: Dataset, cfg: TopicsSection, num_partitions: int
) -> dict[int, list[str]]:
    """Each topic's most distinctive words (see the module docstring)."""
    texts = reviews.select_columns(["review_id", "text"])
    counts = (
        assignments.select_columns(["review_id", "topic"])
        .join(texts, join_type="inner", num_partitions=num_partitions, on=("review_id",))
        .map_batches(_count_block, batch_format="pandas")
        .groupby(["topic", "word"], num_partitions=num_partitions)
        .sum("n")
        .map_batches(
            _frequent_block, fn_kwargs={"min_count": cfg.min_word_count}, batch_format="pandas"
        )
        .to_pandas()
    )
    return class_tfidf(counts, cfg.top_words)


def customer_topic_shares(assignments: Dataset, n_topics: int, num_partitions: int) -> Dataset:
    """One row per customer with reviews: `customer_id`, `topic_share_0..n_topics-1`."""
    return (
        assignments.map_batches(
            _one_hot_block, fn_kwargs={"n_topics": n_topics}, batch_format="pyarrow"
        )
        .groupby("customer_id", num_partitions=num_partitions)
        .sum([f"t{k}" for k in range(n_topics)])
        .map_batches(_shares_block, fn_kwargs={"n_topics": n_topics}, batch_format="pandas")
    )


def _group_block(batch: pd.DataFrame, churn_threshold: float, top_segment: int) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "topic": batch["topic"].to_numpy(),
            "churner": (batch["churn_prob"].to_numpy() >= churn_threshold).astype(np.int64),
            "top_value": (batch["value_segment"].to_numpy() == top_segment).astype(np.int64),
        }
    )


def topic_profile(
    assignments: Dataset,
    scores: Dataset,
    names: dict[int, list[str]],
    top_segment: int,
    num_partitions: int,
    churn_threshold: float = 0.5,
) -> list[dict[str, Any]]:
    """Per topic: words, reviews, share of all reviews, and the lift among predicted churners'
    reviews and among the top value segment's (None when the group wrote nothing)."""
    from ray.data.aggregate import Count, Sum

    agg = (
        assignments.select_columns(["customer_id", "topic"])
        .join(
            scores.select_columns(["customer_id", "churn_prob", "value_segment"]),
            join_type="inner",
            num_partitions=num_partitions,
            on=("customer_id",),
        )
        .map_batches(
            _group_block,
            fn_kwargs={"churn_threshold": churn_threshold, "top_segment": top_segment},
            batch_format="pandas",
        )
        .groupby("topic", num_partitions=num_partitions)
        .aggregate(Count(alias_name="reviews"), Sum("churner"), Sum("top_value"))
        .to_pandas()
        .rename(columns={"sum(churner)": "churner", "sum(top_value)": "top_value"})
        .sort_values("topic")
    )
    return profile_rows(agg, names)


def profile_rows(agg: pd.DataFrame, names: dict[int, list[str]]) -> list[dict[str, Any]]:
    """Lifts from per-topic counts (`topic`, `reviews`, `churner`, `top_value`)."""
    total = agg["reviews"].sum()
    rows = []
    for r in agg.itertuples(index=False):
        share = r.reviews / total if total else None
        row = {
            "topic": int(r.topic),
            "words": names.get(int(r.topic), []),
            "reviews": int(r.reviews),
        }
        row["share"] = share
        for group in ("churner", "top_value"):
            group_total = agg[group].sum()
            row[f"{group}_reviews"] = int(getattr(r, group))
            row[f"{group}_lift"] = (
                (getattr(r, group) / group_total) / share if group_total and share else None
            )
        rows.append(row)
    return rows
