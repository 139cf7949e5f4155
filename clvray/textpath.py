"""The text stages of a run: fine-tune, embed (pretrained and fine-tuned), per-customer features.

Each stage writes under `<run_dir>/text/` and is skipped on re-run like every other stage.
The pretrained encoder's features feed the `gbm_text_pretrained` variant of the ablation, the
fine-tuned encoder's the `gbm_text_finetuned` one.
"""

from __future__ import annotations

import pandas as pd

from clvray.io import read_parquet, write_parquet
from clvray.storage import join
from clvray.text.embed import embed_reviews
from clvray.text.features import build_text_features
from clvray.text.finetune import finetune_encoder
from clvray.text.topics import (
    assign_topics,
    customer_topic_shares,
    fit_topics,
    topic_words,
)

TEXT_PRETRAINED = "gbm_text_pretrained"
TEXT_FINETUNED = "gbm_text_finetuned"


def run_text_stages(run, customers, cutoff: pd.Timestamp) -> dict[str, str]:
    """Returns `{variant: URI of its per-customer text features}`; with `text.topics` on, the
    topic stage runs on the last variant's embeddings (fine-tuned when there is one)."""
    cfg, storage, run_dir = run.cfg, run.storage, run.run_dir
    reviews = read_parquet(join(run_dir, "ingest", "reviews"), storage)
    encoders = {TEXT_PRETRAINED: cfg.text.model}
    if cfg.text.finetune.enabled:
        stage = "text/finetune"
        if run.done(stage):
            run.skipped.append(stage)
        else:
            with run.timed(stage):
                model_uri = finetune_encoder(
                    reviews,
                    customers,
                    cfg.text,
                    cutoff,
                    join(run_dir, "text", "finetune"),
                    storage,
                    # Train V2 resumes a run found under the same name: one name per run dir.
                    name=f"encoder-{run.fingerprint}",
                )
            run.mark(stage, {"model_uri": model_uri})
        encoders[TEXT_FINETUNED] = run.info(stage)["model_uri"]

    out = {}
    for variant, model in encoders.items():
        base = join(run_dir, "text", variant)
        embeddings_uri = join(base, "embeddings")
        stage = f"text/{variant}/embed"
        if run.done(stage):
            run.skipped.append(stage)
        else:
            with run.timed(stage):
                write_parquet(
                    embed_reviews(reviews, model, cfg.text, cutoff=cutoff, storage=storage),
                    embeddings_uri,
                    storage,
                )
            run.mark(stage)
        features_uri = join(base, "features", "customers")
        stage = f"text/{variant}/features"
        if run.done(stage):
            run.skipped.append(stage)
        else:
            with run.timed(stage):
                text_features = build_text_features(
                    read_parquet(embeddings_uri, storage),
                    customers,
                    cutoff,
                    cfg.text,
                    storage,
                    join(base, "features"),
                )
                write_parquet(text_features, features_uri, storage)
            run.mark(stage)
        out[variant] = features_uri
    if cfg.text.topics.enabled:
        run_topic_stage(run, reviews, join(run_dir, "text", variant, "embeddings"), variant)
    return out


def topics_dir(run_dir: str) -> str:
    return join(run_dir, "text", "topics")


def run_topic_stage(run, reviews, embeddings_uri: str, variant: str) -> None:
    """`text/topics/`: centroids, per-review `assignments/`, per-customer shares `customers/`;
    the marker holds each topic's words and the encoder variant it clustered."""
    cfg, storage = run.cfg.text, run.storage
    stage = "text/topics"
    if run.done(stage):
        run.skipped.append(stage)
        return
    base = topics_dir(run.run_dir)
    with run.timed(stage):
        embeddings = read_parquet(embeddings_uri, storage)
        centroids = fit_topics(embeddings, cfg.topics, storage, base)
        write_parquet(assign_topics(embeddings, centroids), join(base, "assignments"), storage)
        assignments = read_parquet(join(base, "assignments"), storage)
        names = topic_words(assignments, reviews, cfg.topics, cfg.num_partitions)
        write_parquet(
            customer_topic_shares(assignments, len(centroids), cfg.num_partitions),
            join(base, "customers"),
            storage,
        )
    run.mark(
        stage,
        {
            "variant": variant,
            "n_topics": len(centroids),
            "words": {str(k): v for k, v in names.items()},
        },
    )
