"""The whole job over one run directory: the stage graph of `clvray.stages`, run by one runner.

`run_pipeline(cfg)` is what `jobs/pipeline.py` calls, on a laptop or through `ray job submit`;
`run_pipeline(cfg, until="features")` or `only=[...]` runs a slice of the graph. Every stage
reads and writes parquet under `<storage>/<run_id>/` and commits with a marker in
`_stages/`; a re-run skips every stage whose marker holds its fingerprint (its own config keys
and its inputs' fingerprints), so a changed key re-runs only what depends on it.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator

import pandas as pd

from clvray import observability
from clvray.cluster import require_shared_storage
from clvray.config import Config
from clvray.graph import Runner, format_plan, section_values
from clvray.resources import check_fits
from clvray.stages import build_stages
from clvray.storage import Storage, join
from clvray.synth import generate

log = logging.getLogger("clvray")


def connect_ray(cfg: Config) -> None:
    """Join the cluster named by `ray.address` or `RAY_ADDRESS` (set by `ray job submit`),
    else start a local Ray sized by `ray.num_cpus`. Workers' output stays in Ray's session
    logs (and the dashboard), not on the driver's terminal."""
    import ray

    if ray.is_initialized():
        return
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=False)
        return
    keep_idle_workers()
    kwargs: dict = {"include_dashboard": False, "log_to_driver": False}
    if cfg.ray.num_cpus:
        kwargs["num_cpus"] = cfg.ray.num_cpus
    if cfg.ray.object_store_memory_mb:
        kwargs["object_store_memory"] = cfg.ray.object_store_memory_mb * 1024**2
    ray.init(**kwargs)


IDLE_WORKERS = 8
"""Idle Ray workers a local node keeps (Ray's default: one per CPU)."""


def keep_idle_workers(n: int = IDLE_WORKERS) -> None:
    """Before a local Ray starts: keep up to `n` idle worker processes instead of one per CPU.

    Every stage starts tasks at fractional CPUs and actors; on a small node Ray's default kept
    two idle workers, killed the rest a second after they idled and started new ones for the
    next operator, each paying Python's and Ray Data's imports again (one ad-hoc pair of runs on
    2 busy cores, not a benchmark: 405 s with the default, 192 s with 8). A cluster's nodes
    read the same variable from their environment.

    The raylet warns on the driver's terminal ("N PYTHON worker processes have been started
    ... 4x the maximum expected startup concurrency") once the workers alive reach 4x its
    startup concurrency, which is the CPU count: on 2 CPUs, 8 workers, so keeping 8 idle
    crossed it by design. The startup concurrency is raised to `n // 2` with them."""
    os.environ.setdefault("RAY_num_workers_soft_limit", str(n))
    os.environ.setdefault("RAY_worker_maximum_startup_concurrency", str(max(2, n // 2)))


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


def synthetic_dir(cfg: Config) -> str:
    """Where the synthetic input of this synthetic config lives (shared by its runs)."""
    key = hashlib.sha256(cfg.data.synthetic.model_dump_json().encode()).hexdigest()[:10]
    return join(cfg.run.storage, "_synthetic", key)


def resolve_inputs(cfg: Config) -> Config:
    """Absolute local paths, and a synthetic source pointed at its generated tables."""
    cfg = absolute_paths(cfg)
    if cfg.data.source != "synthetic" or cfg.data.transactions:
        return cfg
    data_dir = synthetic_dir(cfg)
    data = cfg.data.model_copy(
        update={
            "transactions": join(data_dir, "transactions"),
            "reviews": join(data_dir, "reviews"),
        }
    )
    return cfg.model_copy(update={"data": data})


def ensure_synthetic(cfg: Config, storage: Storage) -> None:
    """Generate the synthetic input once per synthetic config, beside the runs."""
    if cfg.data.source != "synthetic":
        return
    data_dir = synthetic_dir(cfg)
    marker = join(data_dir, "_SUCCESS.json")
    if storage.exists(marker):
        return
    start = time.perf_counter()
    log.info("generate: synthetic data for %d customers", cfg.data.synthetic.n_customers)
    counts = generate(cfg.data.synthetic, data_dir, storage)
    storage.write_json(marker, counts)
    log.info("generate: finished in %.1fs", time.perf_counter() - start)


def default_run_id(cfg: Config) -> str:
    """`<source>-<hash of the input data's config>`: runs over the same data share a folder,
    so a changed key re-runs only the stages that depend on it."""
    text = repr(sorted(section_values(cfg, ["data", "ingest"]).items()))
    return f"{cfg.data.source}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"


def open_run(cfg: Config) -> tuple[Config, Storage, str, Runner]:
    """The resolved config, storage, run directory and the runner over its stage graph.
    Starts no Ray and writes nothing."""
    cfg = resolve_inputs(cfg)
    storage = Storage(cfg.s3.endpoint_url, cfg.s3.region)
    run_dir = join(cfg.run.storage, cfg.run.run_id or default_run_id(cfg))
    stages = build_stages(cfg, has_reviews=cfg.data.reviews is not None)
    return cfg, storage, run_dir, Runner(stages, cfg, storage, run_dir)


def plan(cfg: Config, until: str | None = None, only: Iterable[str] | None = None) -> str:
    """The stage graph and what a run with `cfg` would run, as text (`--plan`)."""
    _, _, run_dir, runner = open_run(cfg)
    return format_plan(runner.plan(until, only), run_dir)


@contextlib.contextmanager
def native_stderr_to(path: str) -> Iterator[None]:
    """Send what native code writes to this process's stderr (file descriptor 2) to `path`,
    while Python's `sys.stderr` (progress bars, clvray's stage lines, tracebacks) still
    reaches the terminal.

    Ray's C++ core worker in the driver writes its errors straight to descriptor 2, past
    Python logging: in Ray 2.60 every Ray Data actor pool makes it print one line about
    "constructor arguments in the object store and max_restarts > 0" (ray#53727). When
    `sys.stderr` writes to descriptor 2 it is swapped for a stream on a copy of the
    original descriptor, and logging handlers that wrote to it follow; a `sys.stderr` that
    writes elsewhere (a test's capture) is left alone."""
    sys.stderr.flush()
    terminal_fd = os.dup(2)
    log_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log_fd, 2)
    os.close(log_fd)
    old = sys.stderr
    try:
        swap = old.fileno() == 2
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is an OSError
        swap = False
    terminal = None
    moved: list[logging.StreamHandler] = []
    if swap:
        terminal = os.fdopen(
            os.dup(terminal_fd), "w", buffering=1,
            encoding=getattr(old, "encoding", None) or "utf-8", errors="backslashreplace",
        )  # fmt: skip
        sys.stderr = terminal
        loggers = [logging.getLogger()] + [
            v for v in logging.root.manager.loggerDict.values() if isinstance(v, logging.Logger)
        ]
        for logger in loggers:
            for h in logger.handlers:
                if type(h) is logging.StreamHandler and h.stream is old:
                    h.setStream(terminal)
                    moved.append(h)
    try:
        yield
    finally:
        if terminal is not None:
            terminal.flush()
            for h in moved:
                h.setStream(old)
            sys.stderr = old
            terminal.close()
        os.dup2(terminal_fd, 2)
        os.close(terminal_fd)


@contextlib.contextmanager
def ray_logs_to(path: str) -> Iterator[None]:
    """Send the driver's Ray log records (Ray Core, Data, Train) and what its native code
    writes to stderr (`native_stderr_to`) to `path` instead of the terminal, for the duration
    of a run; Ray Data's progress bars still draw on stderr."""
    # Ray Data and Ray Train attach their console handlers when imported: import them first.
    import ray.data
    import ray.train  # noqa: F401

    os.makedirs(os.path.dirname(path), exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    removed: list[tuple[logging.Logger, logging.Handler]] = []
    names = ["ray"] + [n for n in logging.root.manager.loggerDict if n.startswith("ray.")]
    for name in names:
        logger = logging.getLogger(name)
        for h in list(logger.handlers):
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
                logger.removeHandler(h)
                removed.append((logger, h))
    ray_logger = logging.getLogger("ray")
    ray_logger.addHandler(handler)
    # Library warnings (pandas, transformers, torch) go to the same file, not the terminal.
    warnings_logger = logging.getLogger("py.warnings")
    warnings_propagate = warnings_logger.propagate
    warnings_logger.addHandler(handler)
    warnings_logger.propagate = False
    logging.captureWarnings(True)
    try:
        with native_stderr_to(path):
            yield
    finally:
        logging.captureWarnings(False)
        warnings_logger.removeHandler(handler)
        warnings_logger.propagate = warnings_propagate
        ray_logger.removeHandler(handler)
        handler.close()
        for logger, h in removed:
            logger.addHandler(h)


def run_pipeline(
    cfg: Config,
    until: str | None = None,
    only: Iterable[str] | None = None,
    ingest_from: str | None = None,
) -> dict:
    """Run the stage graph (all of it, what `until` needs, or the stages in `only`).

    Returns the run's metrics (also written to `<run_dir>/metrics.json`) once `evaluate` has
    run; for a slice that stops earlier, `run_dir`, `ran_stages`, `skipped_stages` and
    `timings_s`. `ingest_from`: another run directory over the same data and ingest config
    whose ingest output and marker this run shares instead of ingesting again (the backtest's
    cutoffs). Ray's log records go to `<run_dir>/logs/ray.log` (local storage) or a local
    temporary file copied there (S3).
    """
    cfg, storage, run_dir, runner = open_run(cfg)
    require_shared_storage(cfg)  # refused before anything is written (submitted job, cluster)
    local = "://" not in run_dir
    log_file = (
        join(run_dir, "logs", "ray.log")
        if local
        else os.path.join(tempfile.mkdtemp(prefix="clvray-logs-"), "ray.log")
    )
    with ray_logs_to(log_file):
        connect_ray(cfg)
        require_shared_storage(cfg)  # a local folder on a cluster would be lost: refuse first
        check_fits(cfg)  # a worker or actor count that would wait forever fails before work
        import ray.data

        ray.data.DataContext.get_current().enable_progress_bars = (
            os.environ.get("RAY_DATA_DISABLE_PROGRESS_BARS") != "1"
        )
        storage.makedirs(run_dir)
        storage.write_text(join(run_dir, "config.yaml"), cfg.to_yaml())
        log.info("run directory %s (Ray's logs: %s)", run_dir, log_file)
        ensure_synthetic(cfg, storage)
        if ingest_from is not None and not runner.done("ingest"):
            # Another run over the same data (a backtest's other cutoff) already ingested it.
            from clvray.backtest import share_ingest

            share_ingest(storage, ingest_from, run_dir)
        result = runner.run(until=until, only=only)
        out: dict = {
            "run_dir": run_dir,
            "ran_stages": result.ran,
            "skipped_stages": result.skipped,
            "timings_s": runner.timings(),
        }
        if runner.done("evaluate"):
            metrics = storage.read_json(join(run_dir, "evaluate", "metrics.json"))
            out = {**metrics, **out, "cluster": _cluster_resources()}
            embedded = embed_counts(runner)
            if embedded:
                out["embedding"] = embedded
            if runner.done("report"):
                out["report"] = runner.marker("report")["report"]  # type: ignore[index]
            storage.write_json(join(run_dir, "metrics.json"), out)
            if cfg.tracking.mlflow_uri:
                observability.log_to_mlflow(run_dir, cfg, out, storage, cfg.tracking.mlflow_uri)
    if not local:
        with open(log_file, "rb") as f:
            storage.write_bytes(join(run_dir, "logs", "ray.log"), f.read())
    return out


EMBED_COUNTS = ("reviews_embedded", "reviews_truncated", "max_length_tokens")


def embed_counts(runner) -> dict[str, dict]:
    """Per embedding stage: reviews embedded, and how many were cut to the length limit."""
    out = {}
    for stage in runner.stages:
        marker = runner.marker(stage.name) if stage.name.endswith("/embed") else None
        if marker and marker.get("fingerprint") == runner.fingerprints[stage.name]:
            out[stage.name] = {k: marker[k] for k in EMBED_COUNTS if k in marker}
    return out


def _cluster_resources() -> dict:
    """CPUs, GPUs and nodes the run had: stage timings mean little without them."""
    import ray

    res = ray.cluster_resources()
    return {
        "CPU": res.get("CPU", 0.0),
        "GPU": res.get("GPU", 0.0),
        "nodes": sum(1 for n in ray.nodes() if n.get("Alive")),
    }


def summarize_segments(scores) -> pd.DataFrame:
    """Customers, share of predicted value and mean churn probability per value segment
    (a Ray Data groupby: one row per segment reaches the driver)."""
    from ray.data.aggregate import Count, Mean, Sum

    agg = (
        scores.groupby("value_segment", num_partitions=1)  # n_segments keys
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
