"""clvray's stages as a declared graph (`build_stages`), run by `clvray.graph.Runner`.

Each stage below is a small function of a `StageContext` that wires a module's stage function
(`ingest`, `build_features`, `finetune_encoder`, `embed_reviews`, `train_models`,
`score_customers`, `evaluate`, `write_report`) to its inputs, and returns what its marker
records. Which config keys each stage reads is declared beside it, so that a change re-runs
the stages that read it and what depends on them, nothing else.

    ingest -> features -> btyd -> fuse/gbm_behavioural -> train/<v> -> score/<v> -> evaluate
                   \\-> text/finetune -> text/<v>/embed -> text/<v>/features -> fuse/<v> /  -> report
                                          \\-> text/topics (-> fuse/<primary> with topics.as_features)

`<v>` is each model variant: `gbm_behavioural`, and with text on `gbm_text_pretrained` and
`gbm_text_finetuned` (the encoder fine-tuned on the customers' reviews).
"""

from __future__ import annotations

import logging
from functools import partial

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from clvray import btyd, observability
from clvray import evaluate as evaluation
from clvray.contract import as_utc
from clvray.features import (
    FEATURES,
    build_features,
    categorical_columns,
    resolve_cutoff,
    split_counts,
)
from clvray.graph import Stage, StageContext, StageError
from clvray.ingest import check_time_protocol, ingest
from clvray.io import count_rows, write_parquet
from clvray.report import write_report
from clvray.score import score_customers
from clvray.storage import join

log = logging.getLogger("clvray")

BEHAVIOURAL = "gbm_behavioural"
TEXT_PRETRAINED = "gbm_text_pretrained"
TEXT_FINETUNED = "gbm_text_finetuned"
TEXT_PREFIXES = ("txt_", "topic_share_")


def cutoff_of(ctx: StageContext) -> pd.Timestamp:
    return pd.Timestamp(ctx.info("features")["cutoff"])


# --- ingest and behavioural features ------------------------------------------------------------


def run_ingest(ctx: StageContext) -> dict:
    counts = ingest(ctx.cfg, ctx.storage, ctx.run_dir)
    observability.record_counts(counts)
    tx = counts.get("transactions", {})
    if not tx.get("rows_accepted"):
        raise StageError(
            f"ingest accepted no transaction from {ctx.cfg.data.transactions}: "
            f"{tx.get('rows_in', 0)} rows in, {tx.get('rows_rejected', 0)} rejected "
            f"(reasons: {tx.get('rejects_by_reason') or 'none'})"
        )
    return {"counts": counts}


def _data_range(ctx: StageContext) -> tuple[pd.Timestamp, pd.Timestamp]:
    ts = ctx.read("ingest", "transactions", columns=["ts"])
    return as_utc(ts.min("ts")), as_utc(ts.max("ts"))


def run_features(ctx: StageContext) -> dict:
    # The cutoff and horizon must fit the accepted data (a features key can change them
    # without re-running ingest, so the check belongs here).
    check_time_protocol(ctx.cfg, ctx.info("ingest")["counts"])
    cutoff = resolve_cutoff(ctx.cfg, ctx.storage, ctx.run_dir)
    build_features(ctx.cfg, ctx.storage, ctx.run_dir, cutoff)
    return {"cutoff": cutoff.isoformat()}


def explain_no_customers(ctx: StageContext, folder: str) -> str:
    start, end = _data_range(ctx)
    cutoff = resolve_cutoff(ctx.cfg, ctx.storage, ctx.run_dir)
    return (
        f"no customer has a purchase before the cutoff {cutoff.date()}; "
        f"the data runs from {start.date()} to {end.date()} (set features.cutoff inside it)"
    )


def run_btyd(ctx: StageContext) -> dict:
    customers = ctx.read("features", "customers")
    n_train = split_counts(ctx.storage, ctx.run_dir)["train"]
    try:
        btyd.fit_train_btyd(customers, n_train, ctx.storage, ctx.uri("btyd"))
    except Exception as exc:  # a baseline that cannot be fitted is reported, not fatal
        log.warning("BG/NBD + Gamma-Gamma could not be fitted: %s", exc)
        return {"error": f"{type(exc).__name__}: {exc}"}
    return {}


def btyd_fit(ctx: StageContext) -> btyd.TrainBTYD | None:
    if ctx.info("btyd").get("error"):
        return None
    return btyd.load(ctx.storage, ctx.uri("btyd"))


def run_fuse_behavioural(ctx: StageContext) -> dict:
    """`fuse/gbm_behavioural/`: the customer table the behavioural model trains and scores on
    (features, labels, split, and the train-fitted BG/NBD predictions as features)."""
    customers = ctx.read("features", "customers")
    features = list(FEATURES) + categorical_columns(customers.columns())
    fit = btyd_fit(ctx)
    if ctx.cfg.features.btyd_features and fit is not None:
        customers = customers.map_batches(
            btyd.btyd_columns,
            fn_kwargs={"fit": fit, "horizon_days": ctx.cfg.features.horizon_days},
            batch_format="pandas",
        )
        features += btyd.BTYD_FEATURES
    write_parquet(customers, ctx.uri("fuse", BEHAVIOURAL), ctx.storage)
    return {"features": features}


# --- text -----------------------------------------------------------------------------------------


def run_finetune(ctx: StageContext) -> dict:
    from clvray.text.finetune import finetune_encoder

    model_uri = finetune_encoder(
        ctx.read("ingest", "reviews"),
        ctx.read("features", "customers"),
        ctx.cfg.text,
        cutoff_of(ctx),
        ctx.uri("text", "finetune"),
        ctx.storage,
        # Train V2 resumes a run found under the same name: the stage's fingerprint, so a
        # killed fine-tune resumes and a changed config starts afresh.
        name=f"encoder-{ctx.fingerprint}",
    )
    return {"model_uri": model_uri}


def run_embed(ctx: StageContext, variant: str) -> dict:
    from clvray.text.embed import embed_reviews

    model = (
        ctx.info("text/finetune")["model_uri"] if variant == TEXT_FINETUNED else ctx.cfg.text.model
    )
    embeddings = embed_reviews(
        ctx.read("ingest", "reviews"),
        model,
        ctx.cfg.text,
        cutoff=cutoff_of(ctx),
        storage=ctx.storage,
    )
    uri = ctx.uri("text", variant, "embeddings")
    write_parquet(embeddings, uri, ctx.storage)
    truncated = ctx.read("text", variant, "embeddings", columns=["truncated"]).sum("truncated")
    counts = {
        "reviews_embedded": count_rows(uri, ctx.storage),
        "reviews_truncated": int(truncated or 0),
        "max_length_tokens": ctx.cfg.text.max_length_tokens,
    }
    log.info(
        "text/%s/embed: %d reviews embedded, %d cut to their first %d tokens",
        variant, counts["reviews_embedded"], counts["reviews_truncated"],
        counts["max_length_tokens"],
    )  # fmt: skip
    return {"model": model, **counts}


def run_text_features(ctx: StageContext, variant: str) -> dict:
    from clvray.text.features import build_text_features

    base = ctx.uri("text", variant, "features")
    text_features = build_text_features(
        ctx.read("text", variant, "embeddings"),
        ctx.read("features", "customers"),
        cutoff_of(ctx),
        ctx.cfg.text,
        ctx.storage,
        base,
    )
    write_parquet(text_features, join(base, "customers"), ctx.storage)
    return {}


def run_topics(ctx: StageContext, variant: str) -> dict:
    """`text/topics/`: centroids, per-review `assignments/`, per-customer shares `customers/`;
    the marker holds each topic's words and the encoder variant it clustered."""
    from clvray.text.topics import assign_topics, customer_topic_shares, fit_topics, topic_words

    cfg, storage, base = ctx.cfg.text, ctx.storage, ctx.uri("text", "topics")
    embeddings = ctx.read("text", variant, "embeddings")
    centroids = fit_topics(embeddings, cfg.topics, storage, base)
    write_parquet(assign_topics(embeddings, centroids), join(base, "assignments"), storage)
    assignments = ctx.read("text", "topics", "assignments")
    names = topic_words(assignments, ctx.read("ingest", "reviews"), cfg.topics, cfg.num_partitions)
    write_parquet(
        customer_topic_shares(assignments, len(centroids), cfg.num_partitions),
        join(base, "customers"),
        storage,
    )
    return {
        "variant": variant,
        "n_topics": len(centroids),
        "words": {str(k): v for k, v in names.items()},
    }


def run_fuse_text(ctx: StageContext, variant: str, with_topics: bool) -> dict:
    """`fuse/<variant>/`: the behavioural table left-joined with the variant's text features
    (and the topic shares with `text.topics.as_features`)."""
    n = ctx.cfg.features.num_partitions
    text = ctx.read("text", variant, "features", "customers")
    if with_topics:
        text = text.join(
            ctx.read("text", "topics", "customers"),
            join_type="left_outer",
            num_partitions=n,
            on=("customer_id",),
        )
    fused = ctx.read("fuse", BEHAVIOURAL).join(
        text, join_type="left_outer", num_partitions=n, on=("customer_id",)
    )
    write_parquet(fused, ctx.uri("fuse", variant), ctx.storage)
    columns = ctx.read("fuse", variant).columns()  # from the parquet footers
    text_cols = [c for c in columns if c.startswith(TEXT_PREFIXES)]
    return {"features": ctx.info(f"fuse/{BEHAVIOURAL}")["features"] + text_cols}


# --- models, scores, evaluation -------------------------------------------------------------------


def run_train(ctx: StageContext, variant: str) -> dict:
    from clvray.train import train_models

    customers = ctx.read("fuse", variant)
    # the fused tables hold the features stage's customers, one row each
    splits = split_counts(ctx.storage, ctx.run_dir)
    if splits["train"] == 0:
        raise StageError(
            f"train/{variant}: no customer in the train split "
            f"({sum(splits.values())} customers; features.valid_share and test_share leave none)"
        )
    models = train_models(
        customers,
        ctx.info(f"fuse/{variant}")["features"],
        ctx.cfg.train,
        ctx.storage,
        ctx.run_dir,
        variant,
        seed=ctx.cfg.run.seed,
    )
    return {"results": models.results}


def run_score(ctx: StageContext, variant: str) -> dict:
    edges = score_customers(
        ctx.read("fuse", variant),
        ctx.uri("models", variant),
        ctx.cfg.score,
        ctx.storage,
        ctx.uri("scores", variant),
        ctx.uri("tmp", f"scores-{variant}"),
    )
    return {"edges": edges}


def run_evaluate(ctx: StageContext, variants: list[str], primary: str, topics: bool) -> dict:
    fit = btyd_fit(ctx)
    metrics, frame = evaluation.evaluate(
        ctx,
        {v: ctx.read("scores", v) for v in variants},
        ctx.read("fuse", BEHAVIOURAL),
        primary,
        cutoff_of(ctx),
        ctx.info("ingest")["counts"],
        split_counts(ctx.storage, ctx.run_dir),
        btyd_fit=fit,
        btyd_error=ctx.info("btyd").get("error"),
    )
    if topics:
        metrics["topics"] = topics_summary(ctx, primary)
    ctx.storage.write_json(ctx.uri("evaluate", "metrics.json"), metrics)
    _write_frame(ctx, frame, ctx.uri("evaluate", "test_frame.parquet"))
    return {}


def _write_frame(ctx: StageContext, frame: pd.DataFrame, uri: str) -> None:
    """A small driver-side frame (the capped test split) as one parquet file."""
    fs, path = ctx.storage.filesystem(uri)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), path, filesystem=fs)


def topics_summary(ctx: StageContext, primary: str) -> dict:
    """Each topic's words, size and over-representation among predicted churners and the top
    value segment (one row per topic reaches the driver)."""
    from clvray.text.topics import topic_profile

    info = ctx.info("text/topics")
    names = {int(k): v for k, v in info["words"].items()}
    rows = topic_profile(
        ctx.read("text", "topics", "assignments"),
        ctx.read("scores", primary),
        names,
        top_segment=ctx.cfg.score.n_segments,
        num_partitions=ctx.cfg.features.num_partitions,
    )
    return {"variant": info["variant"], "churn_threshold": 0.5, "topics": rows}


def run_report(ctx: StageContext, primary: str) -> dict:
    from clvray.pipeline import summarize_segments

    metrics = ctx.storage.read_json(ctx.uri("evaluate", "metrics.json"))
    metrics["timings_s"] = ctx.runner.timings()
    fs, path = ctx.storage.filesystem(ctx.uri("evaluate", "test_frame.parquet"))
    frame = pq.read_table(path, filesystem=fs).to_pandas()
    scores = ctx.read("scores", primary)
    n = metrics["population"]["customers"]
    sample = scores.random_sample(
        min(1.0, ctx.cfg.evaluate.report_sample_rows / max(n, 1)), seed=0
    ).to_pandas()
    uri = write_report(metrics, sample, frame, summarize_segments(scores), ctx.run_dir, ctx.storage)
    return {"report": uri}


# --- the graph ------------------------------------------------------------------------------------


def variants_of(cfg, has_reviews: bool) -> list[str]:
    """Model variants in ablation order; the last is the primary (scored into the report)."""
    if not (cfg.text.enabled and has_reviews):
        return [BEHAVIOURAL]
    if not cfg.text.finetune.enabled:
        return [BEHAVIOURAL, TEXT_PRETRAINED]
    if not cfg.text.pretrained_variant:
        return [BEHAVIOURAL, TEXT_FINETUNED]
    return [BEHAVIOURAL, TEXT_PRETRAINED, TEXT_FINETUNED]


EMBED_KEYS = (
    "text.max_length_tokens",
    "text.embed.dtype",
    # the call shapes decide the embeddings' last bits (clvray.text.embed)
    "text.embed.fixed_shapes",
    "text.embed.micro_batch",
    "text.embed.length_bucket",
)
TEXT_FEATURE_KEYS = (
    "text.num_partitions",
    "text.embed.reduce",
    "text.embed.reduce_dim",
    "text.embed.recency_half_life_days",
    "text.embed.reduce_fit_rows",
    "text.embed.reduce_seed",
)
TOPIC_KEYS = (
    "text.num_partitions",
    "text.topics.n_topics",
    "text.topics.fit_rows",
    "text.topics.top_words",
    "text.topics.min_word_count",
    "text.topics.seed",
)


def build_stages(cfg, has_reviews: bool) -> list[Stage]:
    """The stage graph for `cfg` (its shape follows `text.*.enabled`), in dependency order."""
    variants = variants_of(cfg, has_reviews)
    primary = variants[-1]
    stages = [
        Stage(
            "ingest",
            run_ingest,
            outputs=("ingest", "rejects"),
            sections=("data", "ingest"),
            scratch=("tmp/customers_validated",),
            doc="read, validate, normalise to the contract; rejects with their rule",
        ),
        Stage(
            "features",
            run_features,
            inputs=("ingest",),
            outputs=("features",),
            sections=(
                "features.cutoff",
                "features.horizon_days",
                "features.valid_share",
                "features.test_share",
                "features.num_partitions",
                "features.rows_per_partition",
            ),  # fmt: skip
            require_rows=("features/customers",),
            explain_empty=explain_no_customers,
            doc="per-customer behavioural features, labels and split",
        ),
        Stage("btyd", run_btyd, inputs=("features",), outputs=("btyd",), doc="BG/NBD + GG fit"),
        Stage(
            f"fuse/{BEHAVIOURAL}",
            run_fuse_behavioural,
            inputs=("features", "btyd"),
            outputs=(f"fuse/{BEHAVIOURAL}",),
            sections=("features.btyd_features", "features.horizon_days"),
            require_rows=(f"fuse/{BEHAVIOURAL}",),
        ),
    ]
    with_topics = primary != BEHAVIOURAL and cfg.text.topics.enabled
    if primary != BEHAVIOURAL:
        if TEXT_FINETUNED in variants:
            stages.append(
                Stage(
                    "text/finetune",
                    run_finetune,
                    inputs=("ingest", "features"),
                    outputs=("text/finetune",),
                    sections=(
                        "text.model",
                        "text.max_length_tokens",
                        "text.num_partitions",
                        "text.finetune",
                    ),  # fmt: skip
                    resumable=True,
                )
            )
        for v in variants[1:]:
            model_keys = ("text.model",) if v == TEXT_PRETRAINED else ()
            encoder = ("text/finetune",) if v == TEXT_FINETUNED else ()
            stages += [
                Stage(
                    f"text/{v}/embed",
                    partial(run_embed, variant=v),
                    inputs=("ingest", "features", *encoder),
                    outputs=(f"text/{v}/embeddings",),
                    sections=(*model_keys, *EMBED_KEYS),
                ),
                Stage(
                    f"text/{v}/features",
                    partial(run_text_features, variant=v),
                    inputs=(f"text/{v}/embed", "features"),
                    outputs=(f"text/{v}/features",),
                    sections=TEXT_FEATURE_KEYS,
                ),
            ]
        if with_topics:
            stages.append(
                Stage(
                    "text/topics",
                    partial(run_topics, variant=primary),
                    inputs=(f"text/{primary}/embed", "ingest"),
                    outputs=("text/topics",),
                    sections=TOPIC_KEYS,
                )
            )
        for v in variants[1:]:
            topic_input = v == primary and with_topics and cfg.text.topics.as_features
            stages.append(
                Stage(
                    f"fuse/{v}",
                    partial(run_fuse_text, variant=v, with_topics=topic_input),
                    inputs=(f"fuse/{BEHAVIOURAL}", f"text/{v}/features")
                    + (("text/topics",) if topic_input else ()),
                    outputs=(f"fuse/{v}",),
                    sections=("features.num_partitions",),
                    require_rows=(f"fuse/{v}",),
                )
            )
    for v in variants:
        stages += [
            Stage(
                f"train/{v}",
                partial(run_train, variant=v),
                inputs=(f"fuse/{v}",),
                outputs=(f"models/{v}",),
                sections=("train", "run.seed"),
            ),
            Stage(
                f"score/{v}",
                partial(run_score, variant=v),
                inputs=(f"fuse/{v}", f"train/{v}"),
                outputs=(f"scores/{v}",),
                sections=("score",),
                scratch=(f"tmp/scores-{v}",),
                require_rows=(f"scores/{v}",),
            ),
        ]
    evaluate_inputs = ("ingest", "features", "btyd", f"fuse/{BEHAVIOURAL}") + tuple(
        f"score/{v}" for v in variants
    )
    stages += [
        Stage(
            "evaluate",
            partial(run_evaluate, variants=variants, primary=primary, topics=with_topics),
            inputs=evaluate_inputs + (("text/topics",) if with_topics else ()),
            outputs=("evaluate",),
            sections=("evaluate.max_customers", "data.source"),
        ),
        Stage(
            "report",
            partial(run_report, primary=primary),
            inputs=("evaluate", f"score/{primary}"),
            outputs=("report",),
            sections=("evaluate.report_sample_rows",),
        ),
    ]
    return stages
