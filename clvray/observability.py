"""Job metrics on each Ray node's Prometheus endpoint, through `ray.util.metrics`.

Every Ray process exports what it records to its node's metrics agent, which serves it at
`http://<node>:<MetricsExportPort>/metrics` (`metrics_endpoints()` lists them; Prometheus finds
them through Ray's service-discovery file, see Ray's "Collecting and monitoring metrics").
Names get Ray's `ray_` prefix and counters a `_total` suffix, e.g.
`ray_clvray_rows_read_total{table="transactions"}`; every series also carries Ray's own labels
(`WorkerId`, `SessionName`, ...), so sum over `WorkerId` to get a job-wide figure.

| name (as recorded)               | kind      | tags      | recorded where                   |
|----------------------------------|-----------|-----------|----------------------------------|
| `clvray_rows_read`               | counter   | `table`   | driver, from ingest's counts     |
| `clvray_rows_accepted`           | counter   | `table`   | driver, from ingest's counts     |
| `clvray_rows_rejected`           | counter   | `table`   | driver, from ingest's counts     |
| `clvray_reviews_embedded`        | counter   | `encoder` | embedding actors, per batch      |
|                                  |           |           | (`finetuned` or `pretrained`)    |
| `clvray_customers_scored`        | counter   | `variant` | scoring actors, per batch        |
| `clvray_stage_seconds`           | counter   | `stage`   | driver, `Run.timed`              |
| `clvray_stage_duration_seconds`  | histogram | `stage`   | driver, `Run.timed`              |

Where rows are counted: ingest already counts its tables exactly (from the written files'
footers), so the driver records those totals once; counting again inside the validation tasks
would cost a pass and over-count when Ray retries a task. Scoring and embedding count inside
their actors instead: the counters then move while a long stage runs (progress on a
dashboard) at the cost of one in-process add per batch, and a retried batch counts twice, so
read them as progress, not as the audited total (`metrics.json` holds that).
Ingest's three counters are recorded for every table, zeros included: a table with nothing
rejected shows `ray_clvray_rows_rejected_total{table=...} 0`, not a missing series (which an
alert or a dashboard cannot tell from a job that never ran). A stage skipped on a re-run
records nothing. A stage's wall time goes to two series: the
counter `clvray_stage_seconds` holds the exact seconds (`increase()` over a run's window gives
that run's time), the histogram its distribution over runs (`_count` and buckets exact; its
`_sum` is only approximate, because Ray's agent rebuilds each observation from its bucket's
midpoint). No gauges: Ray's agent drops a gauge value not set again within two export
intervals, which a one-off duration never is.

`log_to_mlflow` records a finished run (config as params, metrics.json's numbers as metrics,
config, metrics, models and report as artifacts) in MLflow when `tracking.mlflow_uri` is set.

Nothing here touches Ray or MLflow at import: metric objects are made on first use in each
process, and recording outside a connected Ray process does nothing (plain unit tests of the
transforms, e.g. a `Scorer` called on a DataFrame).
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

PREFIX = "clvray_"
STAGE_BUCKETS_S = [1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0]


@dataclass(frozen=True)
class MetricSpec:
    kind: str  # "counter" or "histogram" (no gauges: see the module docstring)
    description: str
    tag_keys: tuple[str, ...] = ()


METRICS: dict[str, MetricSpec] = {
    "rows_read": MetricSpec("counter", "Input rows read by ingest", ("table",)),
    "rows_accepted": MetricSpec("counter", "Input rows that met the data contract", ("table",)),
    "rows_rejected": MetricSpec("counter", "Input rows written to rejects/", ("table",)),
    "reviews_embedded": MetricSpec("counter", "Reviews run through an encoder", ("encoder",)),
    "customers_scored": MetricSpec("counter", "Customers scored", ("variant",)),
    "stage_seconds": MetricSpec("counter", "Wall seconds spent in a job stage", ("stage",)),
    "stage_duration_seconds": MetricSpec("histogram", "Wall time of a job stage", ("stage",)),
}

_objects: dict[str, Any] = {}
_lock = threading.Lock()


def _metric(name: str):
    """The `ray.util.metrics` object for `name`, made once per process."""
    with _lock:
        if name not in _objects:
            from ray.util import metrics

            spec = METRICS[name]
            full = PREFIX + name
            obj: Any
            if spec.kind == "counter":
                obj = metrics.Counter(full, spec.description, spec.tag_keys)
            else:
                obj = metrics.Histogram(full, spec.description, STAGE_BUCKETS_S, spec.tag_keys)
            _objects[name] = obj
        return _objects[name]


def record(name: str, value: float, tags: dict[str, str] | None = None) -> None:
    """Add `value` to counter `name`, or observe it on histogram `name`.

    `name` is a key of `METRICS` and `tags` must give every one of its tag keys (a ValueError
    names the missing ones). A zero on a counter makes its series exist at 0 (it adds nothing
    to a sum); a negative counter value is a ValueError.
    Does nothing when this process is not connected to Ray.
    """
    spec = METRICS.get(name)
    if spec is None:
        raise KeyError(f"unknown metric {name!r}; known: {sorted(METRICS)}")
    tags = {k: str(v) for k, v in (tags or {}).items()}
    missing = [k for k in spec.tag_keys if k not in tags]
    extra = [k for k in tags if k not in spec.tag_keys]
    if missing or extra:
        raise ValueError(
            f"metric {name!r} takes tags {list(spec.tag_keys)}; missing {missing}, unknown {extra}"
        )
    value = float(value)
    if spec.kind == "counter" and value < 0:
        raise ValueError(f"counter {name!r} cannot go down (got {value})")
    import ray

    if not ray.is_initialized():
        return
    obj = _metric(name)
    if spec.kind == "counter" and value == 0:
        # Counter.inc refuses 0; its own recording step takes it and creates the series.
        obj._record(0.0, tags=tags)
    elif spec.kind == "counter":
        obj.inc(value, tags=tags)
    else:
        obj.observe(value, tags=tags)


def record_counts(counts: dict[str, dict]) -> None:
    """Rows read / accepted / rejected per table, from ingest's `{table: counts}`; zeros are
    exported as zeros."""
    for table, c in counts.items():
        tags = {"table": table}
        record("rows_read", c["rows_in"], tags)
        record("rows_accepted", c["rows_accepted"], tags)
        record("rows_rejected", c["rows_rejected"], tags)


def record_reviews_embedded(n_reviews: int, fine_tuned: bool) -> None:
    """Reviews one embedding batch encoded, tagged by encoder kind (`finetuned` for a model
    with a fine-tuned head, else `pretrained`): the two embedding passes of a run."""
    record("reviews_embedded", n_reviews, {"encoder": "finetuned" if fine_tuned else "pretrained"})


def record_stage(stage: str, seconds: float) -> None:
    """`stage`'s wall time, exact on the counter and bucketed on the histogram (stage names
    as in metrics.json's `timings_s`)."""
    record("stage_seconds", seconds, {"stage": stage})
    record("stage_duration_seconds", seconds, {"stage": stage})


def metrics_endpoints() -> list[str]:
    """`http://host:port/metrics` of every alive node's metrics agent (needs Ray connected)."""
    import ray

    return [
        f"http://{n['NodeManagerAddress']}:{n['MetricsExportPort']}/metrics"
        for n in ray.nodes()
        if n.get("Alive") and n.get("MetricsExportPort")
    ]


# --- MLflow tracking -----------------------------------------------------------------------

# MLflow names allow letters, digits and `_ - . / : space`; anything else becomes `_`.
_MLFLOW_NAME = re.compile(r"[^\w\-./: ]")
_MLFLOW_MAX_KEY = 250
_MLFLOW_MAX_PARAM_VALUE = 6000
ARTIFACT_FILES = ("config.yaml", "metrics.json")
ARTIFACT_FOLDERS = ("models", "report")


def _flatten(tree: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _flatten(value, f"{prefix}{key}.")
    else:
        yield prefix.rstrip("."), tree


def _mlflow_key(key: str) -> str:
    return _MLFLOW_NAME.sub("_", key)[:_MLFLOW_MAX_KEY]


def config_params(cfg) -> dict[str, str]:
    """The resolved config as MLflow params: dotted keys, JSON-encoded values, with the same
    redaction as the run's config.yaml (credentials in URLs and query strings)."""
    from clvray.config import redact

    out = {}
    for key, value in _flatten(redact(cfg.model_dump(mode="json"))):
        text = value if isinstance(value, str) else json.dumps(value)
        out[_mlflow_key(key)] = text[:_MLFLOW_MAX_PARAM_VALUE]
    return out


def numeric_metrics(metrics: dict) -> dict[str, float]:
    """The finite numbers of metrics.json as MLflow metrics, dotted keys.

    Models come first-level (`gbm_behavioural.value.normalized_gini`, not `models.`...);
    `ablation` repeats model metrics and is left out. Booleans, strings and nulls are not
    metrics (the config params and the metrics.json artifact hold them).
    """
    tree = {k: v for k, v in metrics.items() if k not in ("models", "ablation")}
    tree = {**metrics.get("models", {}), **tree}
    out = {}
    for key, value in _flatten(tree):
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if math.isfinite(value):
            out[_mlflow_key(key)] = float(value)
    return out


def log_to_mlflow(run_dir: str, cfg, metrics: dict, storage, tracking_uri: str) -> str:
    """Log one finished job run to MLflow; returns the MLflow run id.

    Params: the resolved config, flattened. Metrics: `numeric_metrics(metrics)`. Tags: the
    run directory and config fingerprint. Artifacts: config.yaml, metrics.json, models/ and
    report/ as present under `run_dir` (local or s3://; copied through a local temp folder,
    so they should stay small: boosters and a report, never row-level data). Every call
    makes a new MLflow run in experiment `cfg.tracking.experiment`. Needs `mlflow-skinny`
    (or `mlflow`), imported only here.
    """
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param

    from clvray.storage import join

    client = MlflowClient(tracking_uri=tracking_uri)
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    experiment_id = (
        experiment.experiment_id
        if experiment is not None
        else client.create_experiment(cfg.tracking.experiment)
    )
    run_name = run_dir.rstrip("/").rsplit("/", 1)[-1]
    tags = {
        "clvray.run_dir": run_dir,
        "clvray.fingerprint": cfg.fingerprint(),
        "clvray.source": cfg.data.source,
    }
    run_id = client.create_run(experiment_id, run_name=run_name, tags=tags).info.run_id
    try:
        now_ms = int(time.time() * 1000)
        params = [Param(k, v) for k, v in config_params(cfg).items()]
        values = [Metric(k, v, now_ms, 0) for k, v in numeric_metrics(metrics).items()]
        # log_batch takes at most 100 params and 1000 metrics per call
        for i in range(0, len(params), 100):
            client.log_batch(run_id, params=params[i : i + 100])
        for i in range(0, len(values), 1000):
            client.log_batch(run_id, metrics=values[i : i + 1000])
        with tempfile.TemporaryDirectory(prefix="clvray-mlflow-") as tmp:
            for name in ARTIFACT_FILES:
                uri = join(run_dir, name)
                if storage.exists(uri):
                    local = os.path.join(tmp, name)
                    with open(local, "wb") as f:
                        f.write(storage.read_bytes(uri))
                    client.log_artifact(run_id, local)
            for name in ARTIFACT_FOLDERS:
                uri = join(run_dir, name)
                if storage.list_files(uri):
                    local = os.path.join(tmp, name)
                    storage.download_dir(uri, local)
                    client.log_artifacts(run_id, local, artifact_path=name)
    except BaseException:
        client.set_terminated(run_id, status="FAILED")
        raise
    client.set_terminated(run_id, status="FINISHED")
    return run_id
