"""A finished training run as a ready scorer, and batch scoring of a new data snapshot with it.

`load_model_run(uri)` reads everything a scorer needs from the run directory, once, and checks
it before anything is scored:

| what | from |
|---|---|
| resolved training config (contract, horizon, text settings) | `config.yaml` |
| primary variant (a finished run) | `evaluate/metrics.json` (`primary_model`) |
| boosters, feature order, category vocabularies, format and clvray version | `models/<variant>/` (`meta.json`, `*.ubj`) |
| value segment edges | `scores/<variant>/_segments.json` |
| BG/NBD + Gamma-Gamma parameters (when the GBMs use them) | `btyd/btyd.json` |
| encoder with its head, reduction, topic centroids (text variants) | `text/finetune/.../model/`, `text/<variant>/features/reduction.*`, `text/topics/centroids.npz` |

A run that lacks a file, or was saved by a clvray whose model format or behavioural feature
definitions differ from this one, is refused with `ModelRunError` naming the file.

Both scoring paths build a customer's row with the same functions as training:
`features.to_events` + `features.customer_features` (behaviour), `btyd.btyd_columns`,
`text.features.aggregate_customer_text` + `reduce_features` (text), `topics.nearest_topic`
(topic shares), and `score.Scorer` (predictions, segment, contributions). The batch job
(`score_snapshot`) runs them in Ray Data tasks; the online path (`ModelRun.score_history`, used
by `clvray.serve`) runs them on one request's pandas frames. Nothing is refitted on either path.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import yaml

from clvray import btyd
from clvray.config import Config, ConfigError
from clvray.features import (
    FEATURES,
    LABELS,
    as_utc,
    categorical_columns,
    categorical_name,
    customer_features,
    to_events,
)
from clvray.graph import MARKERS
from clvray.score import SEGMENTS_FILE, Scorer
from clvray.storage import Storage, join
from clvray.train import MODEL_FILES, MODEL_FORMAT

log = logging.getLogger("clvray")

TEXT_FINETUNED = "gbm_text_finetuned"
TEXT_PREFIXES = ("txt_", "topic_share_")
TEXT_BASE_COLUMNS = ("txt_n_reviews", "txt_score_mean", "txt_score_min")
PROVENANCE = ["model_run", "as_of", "data_snapshot"]
"""Columns `score_snapshot` adds to the training run's score columns."""


class ModelRunError(ValueError):
    """A training run cannot be used for scoring; the message names the file."""


@dataclass
class TextState:
    """The fitted text path of a run: encoder (with head), reduction, optional topic centroids."""

    variant: str
    encoder: str
    """Model spec `embed_reviews` and `ReviewEncoder` accept: the fine-tuned model's URI, or the
    pretrained spec the run embedded with."""
    reduction: Any  # clvray.text.features.Reduction
    reduction_uri: str
    centroids: np.ndarray | None
    """Topic centroids when topic shares are model features, else None."""


@dataclass
class ModelRun:
    """Everything fitted in a training run, loaded once; `score_history` scores customers."""

    uri: str
    run_id: str
    cfg: Config
    storage: Storage
    variant: str
    model_uri: str
    meta: dict
    scorer: Scorer
    btyd_fit: btyd.TrainBTYD | None
    text: TextState | None

    @property
    def features(self) -> list[str]:
        return self.scorer.boosters.features

    @property
    def clvray_version(self) -> str:
        return str(self.meta.get("clvray_version", "unknown"))

    @property
    def categorical(self) -> list[str]:
        return categorical_columns(self.features)

    # --- the online path: one request's frames, the same functions as the batch job ---------

    def behaviour_frame(
        self, transactions: pd.DataFrame, reviews: pd.DataFrame | None, as_of: Any
    ) -> pd.DataFrame:
        """Behavioural features (no labels) of every customer of `transactions` with an order
        before `as_of`, from contract-shaped frames (what ingest writes)."""
        events = [to_events(transactions, "t")]
        if reviews is not None and len(reviews):
            events.append(to_events(reviews, "r"))
        f = self.cfg.features
        out = customer_features(
            pd.concat(events, ignore_index=True),
            as_utc(as_of),
            f.horizon_days,
            f.valid_share,
            f.test_share,
        )
        return out.drop(columns=LABELS)

    def text_frame(self, reviews: pd.DataFrame, as_of: Any) -> pd.DataFrame:
        """Per-customer text features from review rows with `embedding` and `score` (the run's
        encoder output): aggregates, the fitted reduction and topic shares."""
        from clvray.text.features import aggregate_customer_text, embedding_matrix, reduce_features

        assert self.text is not None
        as_of = as_utc(as_of)
        aggs = aggregate_customer_text(reviews, as_of, self.cfg.text.embed.recency_half_life_days)
        out = reduce_features(aggs, self.text.reduction)
        if self.text.centroids is not None:
            from clvray.text.topics import nearest_topic, share_columns

            before = reviews.loc[(pd.to_datetime(reviews["ts"], utc=True) < as_of).to_numpy()]
            n_topics = len(self.text.centroids)
            topics = nearest_topic(
                embedding_matrix(before["embedding"].to_numpy()), self.text.centroids
            )
            onehot = pd.DataFrame(
                (topics[:, None] == np.arange(n_topics)[None, :]).astype("float64"),
                columns=share_columns(n_topics),
            )
            shares = onehot.groupby(before["customer_id"].to_numpy()).mean()
            out = out.merge(
                shares.rename_axis("customer_id").reset_index(), on="customer_id", how="left"
            )
        return out

    def complete(
        self, frame: pd.DataFrame, text: pd.DataFrame | None, attributes: pd.DataFrame | None
    ) -> pd.DataFrame:
        """Add what the boosters need besides behaviour: customer attributes as `cat_*`,
        BG/NBD columns, text features (null for a customer without reviews)."""
        if attributes is not None and len(attributes):
            renamed = attributes.rename(
                columns={c: categorical_name(c) for c in attributes.columns if c != "customer_id"}
            )
            keep = ["customer_id", *[c for c in self.categorical if c in renamed]]
            frame = frame.merge(renamed[keep], on="customer_id", how="left")
        frame = with_missing_categoricals(frame, self.categorical)
        if self.btyd_fit is not None:
            frame = btyd.btyd_columns(frame, self.btyd_fit, self.cfg.features.horizon_days)
        if self.text is not None:
            text_cols = [c for c in self.features if c.startswith(TEXT_PREFIXES)]
            if text is not None and len(text):
                frame = frame.merge(text[["customer_id", *text_cols]], on="customer_id", how="left")
            else:
                frame = frame.assign(**{c: np.nan for c in text_cols})
        return frame

    def score_history(
        self,
        transactions: pd.DataFrame,
        reviews: pd.DataFrame | None,
        as_of: Any,
        attributes: pd.DataFrame | None = None,
    ) -> tuple[pd.DataFrame, pd.DataFrame]:
        """Scores of the customers in contract-shaped frames as of `as_of`; `reviews` carries
        `embedding` and `score` when the run uses text. Returns (scores, feature rows), both
        in the order of the customers' ids; a customer without an order before `as_of` is
        absent from both (as in the batch job)."""
        frame = self.behaviour_frame(transactions, reviews, as_of)
        if frame.empty:  # nobody with an order before as_of: nothing to score
            return pd.DataFrame({"customer_id": pd.Series([], dtype=object)}), frame
        text = None
        if self.text is not None and reviews is not None and len(reviews):
            text = self.text_frame(reviews, as_of)
        frame = self.complete(frame, text, attributes)
        frame = frame.sort_values("customer_id", kind="stable").reset_index(drop=True)
        return self.scorer(frame), frame


def with_missing_categoricals(frame: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """Categorical features absent from `frame` (no customers table) as all-null columns: a
    customer the table lacks has no category, as in training."""
    missing = [c for c in columns if c not in frame]
    return frame.assign(**{c: None for c in missing}) if missing else frame


# --- loading -------------------------------------------------------------------------------------


def _require(storage: Storage, uri: str, what: str) -> str:
    if not storage.exists(uri):
        raise ModelRunError(f"model run incomplete: {uri} is missing ({what})")
    return uri


def _read_json(storage: Storage, uri: str, what: str) -> dict:
    _require(storage, uri, what)
    try:
        data = storage.read_json(uri)
    except ValueError as exc:
        raise ModelRunError(f"model run: {uri} is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ModelRunError(f"model run: {uri} must hold a JSON object")
    return data


def _load_config(storage: Storage, run_uri: str) -> Config:
    uri = _require(storage, join(run_uri, "config.yaml"), "the resolved training config")
    try:
        return Config.model_validate(yaml.safe_load(storage.read_text(uri)) or {})
    except Exception as exc:  # pydantic ValidationError or YAML error: name the file
        raise ModelRunError(
            f"model run: {uri} does not match this clvray's config schema "
            f"(trained with an incompatible clvray version?): {exc}"
        ) from None


def _check_meta(meta: dict, meta_uri: str) -> None:
    fmt = meta.get("model_format")
    if fmt != MODEL_FORMAT:
        raise ModelRunError(
            f"model run: {meta_uri} has model_format {fmt!r} (saved by clvray "
            f"{meta.get('clvray_version', 'before model formats were recorded')}); this clvray "
            f"reads model_format {MODEL_FORMAT}: retrain with this version"
        )
    if meta.get("behavioural_features") != FEATURES:
        raise ModelRunError(
            f"model run: {meta_uri} was trained on another behavioural feature set "
            f"({meta.get('behavioural_features')}) than this clvray computes ({FEATURES})"
        )
    for key in ("features", "params", "results"):
        if key not in meta:
            raise ModelRunError(f"model run: {meta_uri} lacks {key!r}")


def _unknown_features(features: list[str], text_dim: int, n_topics: int) -> list[str]:
    known = set(FEATURES) | set(btyd.BTYD_FEATURES) | set(TEXT_BASE_COLUMNS)
    known |= {f"txt_mean_{i}" for i in range(text_dim)} | {f"txt_rw_{i}" for i in range(text_dim)}
    known |= {f"topic_share_{k}" for k in range(n_topics)}
    return [f for f in features if f not in known and not f.startswith("cat_")]


def _load_text(
    storage: Storage, run_uri: str, cfg: Config, variant: str, features: list[str]
) -> TextState:
    from clvray.text.encoder import META_FILE
    from clvray.text.features import REDUCTION_JSON, REDUCTION_NPZ, load_reduction

    if variant == TEXT_FINETUNED:
        marker = join(run_uri, MARKERS, "text", "finetune.json")
        saved = _read_json(storage, marker, "the fine-tuned encoder's location")["model_uri"]
        # Located relative to the run directory, so a run copied elsewhere (to S3) still loads.
        encoder = join(run_uri, "text", "finetune", saved.split("/text/finetune/", 1)[-1])
        _require(storage, join(encoder, META_FILE), "the fine-tuned encoder's head and meta")
    else:
        encoder = cfg.text.model
    reduction_uri = join(run_uri, "text", variant, "features")
    _require(storage, join(reduction_uri, REDUCTION_JSON), "the text reduction")
    _require(storage, join(reduction_uri, REDUCTION_NPZ), "the text reduction")
    reduction = load_reduction(storage, reduction_uri)
    centroids = None
    if any(f.startswith("topic_share_") for f in features):
        from clvray.text.topics import CENTROIDS, load_centroids

        topics_uri = join(run_uri, "text", "topics")
        _require(storage, join(topics_uri, CENTROIDS), "the topic centroids")
        centroids = load_centroids(storage, topics_uri)
    return TextState(variant, encoder, reduction, reduction_uri, centroids)


def load_model_run(uri: str, storage: Storage | None = None) -> ModelRun:
    """Load and check a finished training run at `uri` (local path or `s3://`).

    `storage` reaches the run (S3 endpoint, region); default: plain local / AWS S3.
    Raises ModelRunError naming the file when the run is incomplete or incompatible.
    Cost: a few small JSON reads, the three boosters and, for a text run, the reduction and
    centroids (the encoder itself is loaded by whoever embeds).
    """
    import os

    storage = storage or Storage()
    if "://" not in uri:
        uri = os.path.abspath(uri)
    uri = uri.rstrip("/")
    if not storage.exists(uri):
        raise ModelRunError(f"model run: {uri} does not exist")
    cfg = _load_config(storage, uri)
    metrics_uri = join(uri, "evaluate", "metrics.json")
    variant_name = _read_json(storage, metrics_uri, "the finished run's metrics").get(
        "primary_model"
    )
    if not variant_name:
        raise ModelRunError(f"model run: {metrics_uri} names no primary model")
    model_uri = join(uri, "models", variant_name)
    meta_uri = join(model_uri, "meta.json")
    meta = _read_json(storage, meta_uri, "the boosters' feature order and params")
    _check_meta(meta, meta_uri)
    for name in meta.get("results", {}):
        _require(storage, join(model_uri, MODEL_FILES[name]), "a booster")
    segments_uri = join(uri, "scores", variant_name, SEGMENTS_FILE)
    edges = list(_read_json(storage, segments_uri, "the value segment edges")["edges"])
    features: list[str] = meta["features"]

    text = None
    if any(f.startswith(TEXT_PREFIXES) for f in features):
        text = _load_text(storage, uri, cfg, variant_name, features)
    n_topics = 0 if text is None or text.centroids is None else len(text.centroids)
    unknown = _unknown_features(features, 0 if text is None else text.reduction.dim, n_topics)
    if unknown:
        raise ModelRunError(
            f"model run: {meta_uri} uses feature(s) {unknown} this clvray cannot compute"
        )
    btyd_fit = None
    if any(f in btyd.BTYD_FEATURES for f in features):
        params = join(uri, "btyd", btyd.PARAMS_FILE)
        _require(storage, params, "the BG/NBD + Gamma-Gamma parameters")
        btyd_fit = btyd.load(storage, join(uri, "btyd"))
    scorer = Scorer(model_uri, storage, cfg.score.top_contributions, edges=edges)
    return ModelRun(
        uri=uri,
        run_id=uri.rsplit("/", 1)[-1],
        cfg=cfg,
        storage=storage,
        variant=variant_name,
        model_uri=model_uri,
        meta=meta,
        scorer=scorer,
        btyd_fit=btyd_fit,
        text=text,
    )


# --- batch scoring of a new snapshot -------------------------------------------------------------


def scoring_config(run: ModelRun, new: Config) -> Config:
    """The config a new snapshot is ingested and featurised with: where the data is, the
    storage and the Ray resources from `new`; the contract, the time protocol and every setting
    that changes a feature's value from the training run."""
    data = new.data
    if data.customer_attributes is None:
        data = data.model_copy(update={"customer_attributes": run.cfg.data.customer_attributes})
    features = run.cfg.features.model_copy(update={"num_partitions": new.features.num_partitions})
    resources = {
        k: getattr(new.text.embed, k)
        for k in (
            "batch_size",
            "min_actors",
            "max_actors",
            "num_gpus_per_actor",
            "cpus_per_actor",
            "tokenize_batch_size",
        )
    }
    text = run.cfg.text.model_copy(
        update={
            "num_partitions": new.text.num_partitions,
            "embed": run.cfg.text.embed.model_copy(update=resources),
        }
    )
    return run.cfg.model_copy(
        update={
            "run": new.run,
            "s3": new.s3,
            "ray": new.ray,
            "data": data,
            "features": features,
            "text": text,
            "score": run.cfg.score.model_copy(update={"batch_size": new.score.batch_size}),
        }
    )


def default_as_of(storage: Storage, score_dir: str) -> pd.Timestamp:
    """End of the data: midnight (UTC) after the last transaction or review, so that every
    event of the snapshot is before it."""
    from clvray.io import read_parquet

    ends = [read_parquet(join(score_dir, "ingest", "transactions"), storage, ["ts"]).max("ts")]
    reviews = join(score_dir, "ingest", "reviews")
    if storage.exists(reviews):
        ends.append(read_parquet(reviews, storage, ["ts"]).max("ts"))
    end = max(as_utc(t) for t in ends if t is not None)
    return end.normalize() + pd.Timedelta(days=1)


def _drop_labels(batch: pd.DataFrame) -> pd.DataFrame:
    return batch.drop(columns=[c for c in LABELS if c in batch])


def _add_provenance(batch: pd.DataFrame, model_run: str, as_of, snapshot: str) -> pd.DataFrame:
    return batch.assign(
        model_run=model_run, as_of=pd.Timestamp(as_of).tz_convert("UTC"), data_snapshot=snapshot
    )


def data_snapshot_id(cfg: Config, counts: dict) -> str:
    """A short id of the scored snapshot: its data section (where and what) and row counts."""
    payload = {"data": cfg.data.model_dump(mode="json"), "counts": counts}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def score_snapshot(
    model_run_uri: str,
    new: Config,
    as_of: Any = None,
    out_uri: str | None = None,
    max_actors: int = 2,
) -> dict:
    """Score a new data snapshot with a finished training run; returns the run's summary.

    `new` says where the snapshot is (`data`), where results go (`run.storage`, `run.run_id`)
    and the Ray resources; everything that shapes a feature comes from the training run
    (`scoring_config`). Steps: ingest with the run's contract (rejects and counts as in
    training), behavioural features as of `as_of` (default: end of data) without labels,
    BG/NBD columns, reviews embedded with the run's encoder and reduced with its fitted
    reduction, and the run's boosters and segment edges. Writes `<out>/scores/` (the training
    run's score columns plus `PROVENANCE`) and `<out>/score.json`. Nothing is fitted.
    Cost: one ingest pass, one feature shuffle, one embedding pass (text runs) and one scoring
    pass, all in Ray Data; only counts and the as-of date reach the driver.
    """
    import ray.data

    from clvray.features import build_features
    from clvray.ingest import ingest
    from clvray.io import read_parquet, write_parquet
    from clvray.pipeline import absolute_paths, connect_ray

    new = absolute_paths(new)
    storage = Storage(new.s3.endpoint_url, new.s3.region)
    run = load_model_run(model_run_uri, storage)
    connect_ray(new)
    cfg = scoring_config(run, new)
    if cfg.data.transactions is None:
        raise ConfigError("scoring: data.transactions must name the snapshot to score")
    run_id = new.run.run_id or f"score-{run.run_id}-{data_snapshot_id(cfg, {})}"
    out = out_uri or join(new.run.storage, run_id)
    storage.makedirs(out)
    storage.write_text(join(out, "config.yaml"), cfg.to_yaml())

    counts = ingest(cfg, storage, out)
    as_of = default_as_of(storage, out) if as_of is None else as_utc(as_of)
    snapshot = data_snapshot_id(cfg, counts)
    build_features(cfg, storage, out, as_of)
    customers = (
        read_parquet(join(out, "features", "customers"), storage)
        .map_batches(_drop_labels, batch_format="pandas")
        .map_batches(
            with_missing_categoricals,
            fn_kwargs={"columns": run.categorical},
            batch_format="pandas",
        )
    )
    if run.btyd_fit is not None:
        customers = customers.map_batches(
            btyd.btyd_columns,
            fn_kwargs={"fit": run.btyd_fit, "horizon_days": cfg.features.horizon_days},
            batch_format="pandas",
        )
    customers = customers.materialize()
    if run.text is not None:
        customers = _with_text(run, cfg, storage, out, customers, as_of)
    scores = customers.map_batches(
        Scorer,
        fn_constructor_kwargs={
            "model_uri": run.model_uri,
            "storage": storage,
            "top_k": cfg.score.top_contributions,
            "edges": run.scorer.edges,
        },
        batch_size=cfg.score.batch_size,
        batch_format="pandas",
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max_actors),
        num_cpus=1,
    ).map_batches(
        _add_provenance,
        fn_kwargs={"model_run": run.uri, "as_of": as_of, "snapshot": snapshot},
        batch_format="pandas",
    )
    scores_uri = join(out, "scores")
    write_parquet(scores, scores_uri, storage)
    summary = {
        "model_run": run.uri,
        "model_variant": run.variant,
        "clvray_version": run.clvray_version,
        "as_of": as_of.isoformat(),
        "data_snapshot": snapshot,
        "counts": counts,
        "customers_scored": read_parquet(scores_uri, storage).count(),
        "scores": scores_uri,
        "out": out,
    }
    storage.write_json(join(out, "score.json"), summary)
    return summary


def _with_text(run: ModelRun, cfg: Config, storage: Storage, out: str, customers, as_of):
    """Customers left-joined to their text features: the run's encoder, reduction, topics."""
    from clvray.io import read_parquet, write_parquet
    from clvray.text.embed import embed_reviews
    from clvray.text.features import build_text_features

    assert run.text is not None
    text_cols = [c for c in run.features if c.startswith(TEXT_PREFIXES)]
    reviews_uri = join(out, "ingest", "reviews")
    if not storage.exists(reviews_uri):
        return customers.map_batches(
            lambda b: b.assign(**{c: np.nan for c in text_cols}), batch_format="pandas"
        )
    embeddings_uri = join(out, "text", "embeddings")
    write_parquet(
        embed_reviews(
            read_parquet(reviews_uri, storage),
            run.text.encoder,
            cfg.text,
            cutoff=as_of,
            storage=storage,
        ),
        embeddings_uri,
        storage,
    )
    embeddings = read_parquet(embeddings_uri, storage)
    text_ds = build_text_features(
        embeddings,
        customers,
        as_of,
        cfg.text,
        storage,
        join(out, "text", "features"),
        fitted_uri=run.text.reduction_uri,
    )
    parts = cfg.text.num_partitions
    if run.text.centroids is not None:
        from clvray.text.topics import assign_topics, customer_topic_shares

        shares = customer_topic_shares(
            assign_topics(embeddings, run.text.centroids), len(run.text.centroids), parts
        )
        text_ds = text_ds.join(
            shares, join_type="left_outer", num_partitions=parts, on=("customer_id",)
        )
    return customers.join(
        text_ds.select_columns(["customer_id", *text_cols]),
        join_type="left_outer",
        num_partitions=cfg.features.num_partitions,
        on=("customer_id",),
    ).materialize()
