"""Topics: spherical k-means on review embeddings, c-TF-IDF names, shares and lifts on Ray Data."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from clvray.config import TopicsSection
from clvray.storage import Storage
from clvray.text.topics import (
    assign_topics,
    class_tfidf,
    count_words,
    customer_topic_shares,
    fit_topics,
    kmeans_centroids,
    load_centroids,
    nearest_topic,
    profile_rows,
    topic_profile,
    topic_words,
)

THEMES = {
    0: "guitar strings tuning bright",
    1: "shipping late refund broken",
    2: "cable noise hum ground",
}


def test_class_tfidf_matches_a_hand_worked_example() -> None:
    counts = pd.DataFrame(
        {
            "topic": [0, 0, 1, 1],
            "word": ["apple", "fruit", "fruit", "car"],
            "n": [4, 2, 2, 4],
        }
    )
    # A = mean words per topic = 6. apple: tf 4/6, f 4 -> 4/6 * ln(1 + 6/4) = 0.6109;
    # fruit in topic 0: 2/6 * ln(1 + 6/4) = 0.3054, so apple ranks first.
    names = class_tfidf(counts, top_k=2)
    assert names == {0: ["apple", "fruit"], 1: ["car", "fruit"]}
    assert math.isclose(4 / 6 * math.log(2.5), 0.6109, abs_tol=1e-4)
    # A word common to every topic loses to a rarer one with the same count in the topic.
    counts = pd.DataFrame(
        {"topic": [0, 0, 1, 1], "word": ["the_", "rare", "the_", "other"], "n": [3, 3, 30, 3]}
    )
    assert class_tfidf(counts, top_k=1)[0] == ["rare"]


def test_count_words_drops_stop_words_and_counts_per_topic() -> None:
    out = count_words(np.array([0, 0, 1]), ["The strings are great", "great STRINGS!", "it is"])
    got = {(r.topic, r.word): r.n for r in out.itertuples()}
    assert got == {(0, "strings"): 2, (0, "great"): 2}


def _blobs(n_per: tuple[int, ...], dim: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    directions = np.eye(dim)[: len(n_per)] * 3
    x = np.concatenate(
        [d + rng.normal(0, 0.3, (n, dim)) for d, n in zip(directions, n_per, strict=False)]
    )
    y = np.concatenate([np.full(n, k) for k, n in enumerate(n_per)])
    return x.astype(np.float32), y


def test_kmeans_recovers_separated_clusters_largest_first() -> None:
    x, y = _blobs((30, 90, 60))
    centroids = kmeans_centroids(x, 3, seed=0)
    assert np.allclose(np.linalg.norm(centroids, axis=1), 1, atol=1e-5)
    got = nearest_topic(x, centroids)
    # Same partition as the truth, and topics numbered by size: 90 -> 0, 60 -> 1, 30 -> 2.
    assert {(int(a), int(b)) for a, b in zip(y, got, strict=True)} == {(1, 0), (2, 1), (0, 2)}
    # Scale does not matter: assignments use the cosine.
    assert (nearest_topic(x * 7, centroids) == got).all()


def test_profile_lifts_from_counts() -> None:
    agg = pd.DataFrame(
        {"topic": [0, 1], "reviews": [60, 40], "churner": [30, 0], "top_value": [0, 0]}
    )
    rows = profile_rows(agg, {0: ["late"], 1: ["love"]})
    assert rows[0]["share"] == 0.6 and rows[0]["churner_lift"] == pytest.approx(1 / 0.6)
    assert rows[1]["churner_lift"] == 0
    assert rows[0]["top_value_lift"] is None  # nobody in the group wrote a review


@pytest.mark.slow
def test_topics_on_ray_data_every_review_once_names_shares_and_lifts(ray_local, tmp_path) -> None:
    import ray.data

    rng = np.random.default_rng(1)
    x, y = _blobs((120, 80, 50), seed=2)
    n = len(y)
    customers = [f"C{rng.integers(0, 60):03d}" for _ in range(n)]
    reviews = pd.DataFrame(
        {
            "review_id": [f"R{i:05d}" for i in range(n)],
            "customer_id": customers,
            "text": [f"{THEMES[k]} and the item" for k in y],
        }
    )
    embeddings = ray.data.from_arrow(
        pa.table(
            {
                "review_id": reviews["review_id"],
                "customer_id": reviews["customer_id"],
                "embedding": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), x.shape[1]),
            }
        )
    ).repartition(4)
    cfg = TopicsSection(n_topics=3, fit_rows=100, top_words=4, min_word_count=2)
    storage = Storage()
    fit_topics(embeddings, cfg, storage, str(tmp_path))
    centroids = load_centroids(storage, str(tmp_path))
    assignments = assign_topics(embeddings, centroids).materialize()
    a = assignments.to_pandas()
    assert len(a) == n and a["review_id"].is_unique  # every review exactly once
    truth = dict(zip(reviews["review_id"], y, strict=True))
    pairs = {(truth[r], t) for r, t in zip(a["review_id"], a["topic"], strict=True)}
    assert len(pairs) == 3 and len({t for _, t in pairs}) == 3  # the planted clusters

    names = topic_words(
        assignments, ray.data.from_pandas(reviews).repartition(3), cfg, num_partitions=2
    )
    for theme, topic in pairs:
        assert set(names[topic]) == set(THEMES[theme].split()), names

    shares = (
        customer_topic_shares(assignments, 3, num_partitions=2).to_pandas().set_index("customer_id")
    )
    expected = pd.crosstab(a["customer_id"], a["topic"], normalize="index")
    expected.columns = [f"topic_share_{k}" for k in expected.columns]
    pd.testing.assert_frame_equal(
        shares.sort_index()[expected.columns],
        expected.sort_index(),
        check_names=False,
        check_dtype=False,
    )

    ids = sorted(set(customers))
    scores = pd.DataFrame(
        {
            "customer_id": ids,
            "churn_prob": rng.uniform(0, 1, len(ids)),
            "value_segment": rng.integers(1, 11, len(ids)),
        }
    )
    rows = topic_profile(
        assignments, ray.data.from_pandas(scores), names, top_segment=10, num_partitions=2
    )
    # Independent computation of the lifts with pandas.
    m = a.merge(scores, on="customer_id")
    share = m["topic"].value_counts(normalize=True)
    churn = m[m["churn_prob"] >= 0.5]["topic"].value_counts(normalize=True)
    for r in rows:
        assert r["reviews"] == (a["topic"] == r["topic"]).sum()
        assert r["churner_lift"] == pytest.approx(churn.get(r["topic"], 0) / share[r["topic"]])
        assert r["words"] == names[r["topic"]]
