"""The whole job, stage by stage, over one run directory.

`run_pipeline(cfg)` is what `jobs/pipeline.py` calls, on a laptop or through `ray job submit`.
Each stage reads and writes parquet under `<storage>/<run_id>/`, and writes
`<stage>/_SUCCESS.json` holding the config fingerprint when it finishes; a re-run with the
same resolved config skips every stage whose marker matches.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pandas as pd

from clvray import btyd, observability
from clvray import evaluate as evaluation
from clvray.config import Config
from clvray.features import FEATURES, build_features, categorical_columns, resolve_cutoff
from clvray.ingest import ingest
from clvray.io import read_parquet, write_parquet
from clvray.report import write_report
from clvray.score import fit_segment_edges, score_customers
from clvray.storage import Storage, join
from clvray.synth import generate
from clvray.train import train_models

log = logging.getLogger("clvray")
REPORT_SAMPLE_ROWS = 2000

BEHAVIOURAL = "gbm_behavioural"
TEXT_FINETUNED = "gbm_text_finetuned"
TEXT_PREFIXES = ("txt_", "topic_share_")


def connect_ray(cfg: Config) -> None:
    """Join the cluster named by `ray.address` or `RAY_ADDRESS` (set by `ray job submit`),
    else start a local Ray sized by `ray.num_cpus`."""
    import ray

    if ray.is_initialized():
        return
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    kwargs: dict = {"include_dashboard": False}
    if cfg.ray.num_cpus:
        kwargs["num_cpus"] = cfg.ray.num_cpus
    if cfg.ray.object_store_memory_mb:
        kwargs["object_store_memory"] = cfg.ray.object_store_memory_mb * 1024**2
    ray.init(**kwargs)


@dataclass
class Run:
    cfg: Config
    storage: Storage
    run_dir: str
    fingerprint: str
    timings: dict[str, float] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)

    def done(self, stage: str) -> bool:
        marker = join(self.run_dir, stage, "_SUCCESS.json")
        return (
            self.storage.exists(marker)
            and self.storage.read_json(marker).get("fingerprint") == self.fingerprint
        )

    def mark(self, stage: str, info: dict | None = None) -> None:
        self.storage.write_json(
            join(self.run_dir, stage, "_SUCCESS.json"),
            {"fingerprint": self.fingerprint, **(info or {})},
        )

    def info(self, stage: str) -> dict:
        return self.storage.read_json(join(self.run_dir, stage, "_SUCCESS.json"))

    @contextlib.contextmanager
    def timed(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        log.info("stage %s: start", stage)
        yield
        self.timings[stage] = round(time.perf_counter() - start, 2)
        observability.record_stage(stage, self.timings[stage])
        log.info("stage %s: %.1fs", stage, self.timings[stage])


def absolute_paths(cfg: Config) -> Config:
    """Local paths made absolute on the driver: Ray workers run in other directories."""

    def fix(path: str | None) -> str | None:
        if path is None or "://" in path or path.startswith("packaged:"):
            return path
        return (
            os.path.abspath(path)
            if os.path.isabs(path) or os.path.exists(path) or path == cfg.run.storage
            else path
        )

    data = cfg.data.model_copy(
        update={k: fix(getattr(cfg.data, k)) for k in ("transactions", "reviews", "customers")}
    )
    text = cfg.text.model_copy(update={"model": fix(cfg.text.model)})
    run = cfg.run.model_copy(update={"storage": fix(cfg.run.storage)})
    return cfg.model_copy(update={"data": data, "text": text, "run": run})


def prepare_run(cfg: Config) -> Run:
    storage = Storage(cfg.s3.endpoint_url, cfg.s3.region)
    fingerprint = cfg.fingerprint()
    run_id = cfg.run.run_id or f"{cfg.data.source}-{fingerprint}"
    run_dir = join(cfg.run.storage, run_id)
    storage.makedirs(run_dir)
    storage.write_text(join(run_dir, "config.yaml"), cfg.to_yaml())
    return Run(cfg, storage, run_dir, fingerprint)


def _ensure_synthetic(run: Run) -> Config:
    """Generate the synthetic input once per synthetic config, beside the runs, and point
    the data section at it (the written config.yaml records the resolved paths)."""
    cfg = run.cfg
    if cfg.data.source != "synthetic" or cfg.data.transactions:
        return cfg
    import hashlib

    key = hashlib.sha256(cfg.data.synthetic.model_dump_json().encode()).hexdigest()[:10]
    data_dir = join(cfg.run.storage, "_synthetic", key)
    marker = join(data_dir, "_SUCCESS.json")
    if not run.storage.exists(marker):
        with run.timed("generate"):
            counts = generate(cfg.data.synthetic, data_dir, run.storage)
        run.storage.write_json(marker, counts)
    data = cfg.data.model_copy(
        update={
            "transactions": join(data_dir, "transactions"),
            "reviews": join(data_dir, "reviews"),
        }
    )
    return cfg.model_copy(update={"data": data})


def run_pipeline(cfg: Config, ingest_from: str | None = None) -> dict:
    """Run every stage; returns the metrics written to `<run_dir>/metrics.json`.

    `ingest_from`: another run directory whose ingest output this run shares instead of
    ingesting again (the backtest's cutoffs, `clvray.backtest.share_ingest`)."""
    connect_ray(cfg)
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = (
        os.environ.get("RAY_DATA_DISABLE_PROGRESS_BARS") != "1"
    )
    run = prepare_run(absolute_paths(cfg))
    cfg = _ensure_synthetic(run)
    run.cfg = cfg
    storage, run_dir = run.storage, run.run_dir

    if run.done("ingest"):
        run.skipped.append("ingest")
    elif ingest_from is not None:
        from clvray.backtest import share_ingest

        counts = share_ingest(storage, ingest_from, run_dir)
        run.mark("ingest", {"counts": counts, "shared_from": ingest_from})
        run.skipped.append("ingest")
    else:
        with run.timed("ingest"):
            counts = ingest(cfg, storage, run_dir)
            observability.record_counts(counts)
        run.mark("ingest", {"counts": counts})
    counts = run.info("ingest")["counts"]

    cutoff = resolve_cutoff(cfg, storage, run_dir)
    if run.done("features"):
        run.skipped.append("features")
    else:
        with run.timed("features"):
            build_features(cfg, storage, run_dir, cutoff)
        run.mark("features", {"cutoff": cutoff.isoformat()})
    customers = read_parquet(join(run_dir, "features", "customers"), storage).materialize()
    n_customers = customers.count()

    # BG/NBD + Gamma-Gamma on the train customers: the baseline, and optionally GBM features.
    btyd_dir = join(run_dir, "btyd")
    if run.done("btyd"):
        run.skipped.append("btyd")
    else:
        with run.timed("btyd"):
            n_train = customers.filter(expr="split == 'train'").count()
            try:
                btyd.fit_train_btyd(customers, n_train, storage, btyd_dir)
                run.mark("btyd")
            except Exception as exc:  # a baseline that cannot be fitted is reported, not fatal
                log.warning("BG/NBD + Gamma-Gamma could not be fitted: %s", exc)
                run.mark("btyd", {"error": f"{type(exc).__name__}: {exc}"})
    btyd_error = run.info("btyd").get("error")
    btyd_fit = None if btyd_error else btyd.load(storage, btyd_dir)
    # Customer attributes (`cat_*`, from the customers table) are XGBoost categoricals.
    base_features = list(FEATURES) + categorical_columns(customers.columns())
    if cfg.features.btyd_features and btyd_fit is not None:
        customers = customers.map_batches(
            btyd.btyd_columns,
            fn_kwargs={"fit": btyd_fit, "horizon_days": cfg.features.horizon_days},
            batch_format="pandas",
        ).materialize()
        base_features += btyd.BTYD_FEATURES

    variants: dict[str, list[str]] = {BEHAVIOURAL: base_features}
    fused: dict[str, object] = {BEHAVIOURAL: customers}
    if cfg.text.enabled and "reviews" in counts:
        from clvray import textpath

        for variant, text_uri in textpath.run_text_stages(run, customers, cutoff).items():
            stage = f"fuse/{variant}"
            uri = join(run_dir, "fuse", variant)
            text_ds = read_parquet(text_uri, storage)
            if _topic_features(run, variant):
                topic_ds = read_parquet(join(textpath.topics_dir(run_dir), "customers"), storage)
                text_ds = text_ds.join(
                    topic_ds,
                    join_type="left_outer",
                    num_partitions=cfg.features.num_partitions,
                    on=("customer_id",),
                )
            if not run.done(stage):
                with run.timed(stage):
                    joined = customers.join(
                        text_ds,
                        join_type="left_outer",
                        num_partitions=cfg.features.num_partitions,
                        on=("customer_id",),
                    )
                    write_parquet(joined, uri, storage)
                run.mark(stage)
            fused[variant] = read_parquet(uri, storage).materialize()
            text_cols = [c for c in fused[variant].columns() if c.startswith(TEXT_PREFIXES)]
            variants[variant] = base_features + text_cols

    for variant, features in variants.items():
        stage = f"models/{variant}"
        if run.done(stage):
            run.skipped.append(stage)
            continue
        with run.timed(f"train/{variant}"):
            train_models(
                fused[variant], features, cfg.train, storage, run_dir, variant, seed=cfg.run.seed
            )
        run.mark(stage)

    primary = TEXT_FINETUNED if TEXT_FINETUNED in variants else list(variants)[-1]
    model_uri = join(run_dir, "models", primary)
    if run.done("scores"):
        run.skipped.append("scores")
    else:
        with run.timed("score"):
            fit_segment_edges(fused[primary], model_uri, storage, cfg.score.n_segments, n_customers)
            score_customers(fused[primary], model_uri, cfg.score, storage, run_dir)
        run.mark("scores", {"model": primary})

    with run.timed("evaluate"):
        metrics, test_frame = evaluation.evaluate(
            run, fused, primary, cutoff, counts, btyd_fit=btyd_fit, btyd_error=btyd_error
        )
    if run.done("text/topics"):
        with run.timed("topics/profile"):
            metrics["topics"] = _topics_summary(run)
    metrics["timings_s"] = {**_previous_timings(run), **run.timings}
    metrics["cluster"] = _cluster_resources()
    metrics["skipped_stages"] = run.skipped
    storage.write_json(join(run_dir, "metrics.json"), metrics)
    with run.timed("report"):
        scores = read_parquet(join(run_dir, "scores"), storage)
        segments = summarize_segments(scores)
        sample = scores.random_sample(
            min(1.0, REPORT_SAMPLE_ROWS / max(n_customers, 1)), seed=0
        ).to_pandas()
        metrics["report"] = write_report(metrics, sample, test_frame, segments, run_dir, storage)
    storage.write_json(join(run_dir, "metrics.json"), metrics)
    if cfg.tracking.mlflow_uri:
        observability.log_to_mlflow(run_dir, cfg, metrics, storage, cfg.tracking.mlflow_uri)
    return metrics


def _previous_timings(run: Run) -> dict[str, float]:
    """Stage seconds of an earlier run of the same run directory, for the stages skipped now,
    so metrics.json keeps what every stage cost when it ran."""
    uri = join(run.run_dir, "metrics.json")
    if not run.storage.exists(uri):
        return {}
    try:
        return dict(run.storage.read_json(uri).get("timings_s") or {})
    except ValueError:
        return {}


def _cluster_resources() -> dict:
    """CPUs, GPUs and nodes the run had: stage timings mean little without them."""
    import ray

    res = ray.cluster_resources()
    return {
        "CPU": res.get("CPU", 0.0),
        "GPU": res.get("GPU", 0.0),
        "nodes": sum(1 for n in ray.nodes() if n.get("Alive")),
    }


def _topic_features(run: Run, variant: str) -> bool:
    topics = run.cfg.text.topics
    return (
        topics.enabled
        and topics.as_features
        and run.done("text/topics")
        and run.info("text/topics")["variant"] == variant
    )


def _topics_summary(run: Run) -> dict:
    """Each topic's words, size and over-representation among predicted churners and the top
    value segment (one row per topic reaches the driver)."""
    from clvray.text.topics import topic_profile
    from clvray.textpath import topics_dir

    info = run.info("text/topics")
    names = {int(k): v for k, v in info["words"].items()}
    rows = topic_profile(
        read_parquet(join(topics_dir(run.run_dir), "assignments"), run.storage),
        read_parquet(join(run.run_dir, "scores"), run.storage),
        names,
        top_segment=run.cfg.score.n_segments,
        num_partitions=run.cfg.features.num_partitions,
    )
    return {"variant": info["variant"], "churn_threshold": 0.5, "topics": rows}


def summarize_segments(scores) -> pd.DataFrame:
    """Customers, share of predicted value and mean churn probability per value segment
    (a Ray Data groupby: one row per segment reaches the driver)."""
    from ray.data.aggregate import Count, Mean, Sum

    agg = (
        scores.groupby("value_segment")
        .aggregate(
            Count(alias_name="customers"),
            Sum("future_value_pred", alias_name="value"),
            Mean("churn_prob", alias_name="churn_rate"),
        )
        .to_pandas()
    )
    total = agg["value"].sum()
    agg["share_of_predicted_value"] = agg["value"] / total if total else 0.0
    return agg.sort_values("value_segment").reset_index(drop=True)


def headline(metrics: dict) -> pd.DataFrame:
    """One row per model: the numbers a user looks at first."""
    rows = []
    for name, m in metrics["models"].items():
        rows.append(
            {
                "model": name,
                "normalized_gini": m.get("value", {}).get("normalized_gini"),
                "spearman": m.get("value", {}).get("spearman"),
                "decile_mape": m.get("value", {}).get("decile_mape"),
                "churn_roc_auc": m.get("churn", {}).get("roc_auc"),
                "interval_coverage": m.get("interval_coverage"),
            }
        )
    return pd.DataFrame(rows).set_index("model")
