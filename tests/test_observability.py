"""Job metrics: recorded through `clvray.observability`, read back from the node's Prometheus
endpoint the way a scraper sees them."""

from __future__ import annotations

import time
import urllib.request
import uuid
from pathlib import Path

import pandas as pd
import pytest

from clvray import observability

# Ray exports every `metrics_report_interval_ms` (10 s by default); allow a few intervals.
EXPORT_WAIT_S = 60.0


def test_record_names_a_missing_or_unknown_tag():
    with pytest.raises(ValueError, match=r"missing \['table'\], unknown \['stage'\]"):
        observability.record("rows_read", 3, {"stage": "ingest"})
    with pytest.raises(KeyError, match="unknown metric 'rows_lost'"):
        observability.record("rows_lost", 3)
    with pytest.raises(ValueError, match="cannot go down"):
        observability.record("rows_read", -1, {"table": "transactions"})


def test_zero_counts_create_the_series_and_positive_counts_add(monkeypatch):
    """A table with nothing rejected must still export `rows_rejected` (at 0): Ray's
    `Counter.inc` refuses 0, so a zero goes through the counter's own recording step."""
    import ray

    class Recorded:
        def __init__(self):
            self.calls = []

        def inc(self, value, tags):
            self.calls.append(("inc", value, tags))

        def _record(self, value, tags):
            self.calls.append(("record", value, tags))

    metrics = {name: Recorded() for name in ("rows_read", "rows_accepted", "rows_rejected")}
    # Connected as far as `record` can tell, for this block only (not for the tier guard).
    with monkeypatch.context() as patch:
        patch.setattr(ray, "is_initialized", lambda: True)
        patch.setattr(observability, "_objects", metrics)
        counts = {"reviews": {"rows_in": 4, "rows_accepted": 4, "rows_rejected": 0}}
        observability.record_counts(counts)
    tags = {"table": "reviews"}
    assert metrics["rows_read"].calls == [("inc", 4.0, tags)]
    assert metrics["rows_rejected"].calls == [("record", 0.0, tags)]


def _samples(endpoints: list[str]) -> list:
    from prometheus_client.parser import text_string_to_metric_families

    out = []
    for url in endpoints:
        text = urllib.request.urlopen(url, timeout=10).read().decode()
        for family in text_string_to_metric_families(text):
            out.extend(family.samples)
    return out


def _value(samples: list, name: str, **labels: str) -> float | None:
    """Sum over Ray's per-process series (WorkerId) of `name` with `labels`; None if absent."""
    hits = [
        s.value
        for s in samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    ]
    return sum(hits) if hits else None


def _wait_for(endpoints: list[str], expected: dict[tuple, float]) -> dict[tuple, float | None]:
    """Scrape until every expected series holds its value or EXPORT_WAIT_S passes; returns
    the last values seen (the assertion compares them, so a miss shows what was there)."""
    deadline = time.monotonic() + EXPORT_WAIT_S
    while True:
        samples = _samples(endpoints)
        seen = {key: _value(samples, key[0], **dict(key[1:])) for key in expected}
        if seen == expected or time.monotonic() > deadline:
            return seen
        time.sleep(1.0)


class _CountingScorer:
    """Stands in for `clvray.score.Scorer`: counts customers inside a Ray Data actor."""

    def __init__(self, variant: str):
        self.variant = variant

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        observability.record("customers_scored", len(batch), {"variant": self.variant})
        return batch


def test_metrics_reach_the_prometheus_endpoint(ray_local):
    import ray.data

    endpoints = observability.metrics_endpoints()
    assert endpoints, "no node exports metrics"
    # Counters are cumulative for the Ray session, so this test's series get their own tags.
    run = uuid.uuid4().hex[:8]
    table, stage, variant = f"transactions-{run}", f"train/{run}", f"gbm-{run}"
    clean = f"reviews-{run}"  # nothing rejected: the series must exist, at 0

    observability.record_counts(
        {
            table: {"rows_in": 120, "rows_accepted": 117, "rows_rejected": 3},
            clean: {"rows_in": 40, "rows_accepted": 40, "rows_rejected": 0},
        }
    )
    observability.record_stage(stage, 2.5)
    observability.record_stage(stage, 40.0)
    ray.data.range(250, override_num_blocks=5).map_batches(
        _CountingScorer,
        fn_constructor_kwargs={"variant": variant},
        batch_size=50,
        batch_format="pandas",
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=1),
    ).materialize()

    expected = {
        ("ray_clvray_rows_read_total", ("table", table)): 120.0,
        ("ray_clvray_rows_accepted_total", ("table", table)): 117.0,
        ("ray_clvray_rows_rejected_total", ("table", table)): 3.0,
        ("ray_clvray_rows_read_total", ("table", clean)): 40.0,
        ("ray_clvray_rows_rejected_total", ("table", clean)): 0.0,
        ("ray_clvray_stage_seconds_total", ("stage", stage)): 42.5,
        ("ray_clvray_stage_duration_seconds_count", ("stage", stage)): 2.0,
        ("ray_clvray_stage_duration_seconds_bucket", ("stage", stage), ("le", "5.0")): 1.0,
        # counted inside the actor, which Ray Data has stopped by now
        ("ray_clvray_customers_scored_total", ("variant", variant)): 250.0,
    }
    assert _wait_for(endpoints, expected) == expected


def test_embedding_batches_count_their_reviews(tiny_encoder, monkeypatch):
    """`ReviewEncoder` (the embedding actors' callable) records every review it encodes."""
    import pyarrow as pa

    from clvray.contract import TS
    from clvray.text.embed import ReviewEncoder
    from clvray.text.tokens import tokenize_reviews

    calls = []
    monkeypatch.setattr(observability, "record", lambda *args: calls.append(args))
    reviews = pa.table(
        {
            "customer_id": ["c1", "c1", "c2"],
            "review_id": ["r1", "r2", "r3"],
            "ts": pa.array([0, 1, 2], pa.int64()).cast(TS),
            "text": ["great value", "arrived broken", ""],
        }
    )
    encoder = ReviewEncoder(tiny_encoder)
    out = encoder(tokenize_reviews(reviews, tiny_encoder, None, 16))
    out = encoder(tokenize_reviews(reviews.slice(0, 2), tiny_encoder, None, 16))
    assert out.num_rows == 2
    assert calls == [
        ("reviews_embedded", 3, {"encoder": "pretrained"}),  # tiny_encoder has no fine-tuned head
        ("reviews_embedded", 2, {"encoder": "pretrained"}),
    ]


# --- MLflow ----------------------------------------------------------------------------------

METRICS = {
    "run_dir": "unused",
    "cutoff": "2023-10-01T00:00:00+00:00",
    "horizon_days": 90,
    "counts": {"transactions": {"rows_in": 120, "rows_accepted": 117, "rows_rejected": 3}},
    "models": {
        "gbm_behavioural": {
            "value": {"normalized_gini": 0.42, "spearman": float("nan")},
            "churn": {"roc_auc": 0.8},
        },
        "bgnbd_gamma_gamma": {"error": "ValueError: no repeat buyers"},
    },
    "ablation": {"gbm_behavioural": {"normalized_gini": 0.42}},
    "timings_s": {"train/gbm_behavioural": 12.5},
    "skipped_stages": [],
    "report": {"written": True},
}


def test_numeric_metrics_are_flat_finite_and_models_first_level():
    assert observability.numeric_metrics(METRICS) == {
        "horizon_days": 90.0,
        "counts.transactions.rows_in": 120.0,
        "counts.transactions.rows_accepted": 117.0,
        "counts.transactions.rows_rejected": 3.0,
        "gbm_behavioural.value.normalized_gini": 0.42,
        "gbm_behavioural.churn.roc_auc": 0.8,
        "timings_s.train/gbm_behavioural": 12.5,
    }


def test_tracking_settings_leave_the_fingerprint_alone():
    from clvray.config import load_config

    plain = load_config(None, [])
    tracked = load_config(None, ["tracking.mlflow_uri=http://mlflow:5000"])
    assert tracked.tracking.mlflow_uri == "http://mlflow:5000"
    assert plain.fingerprint() == tracked.fingerprint()


def test_log_to_mlflow_records_params_metrics_and_artifacts(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow import MlflowClient

    from clvray.config import load_config
    from clvray.storage import Storage, join

    # MLflow 3 keeps the file store for local use behind this switch.
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    cfg = load_config(None, ["train.max_depth=4", "tracking.experiment=clvray-test"])
    storage = Storage()
    run_dir = str(tmp_path / "runs" / "r1")
    storage.write_text(join(run_dir, "config.yaml"), cfg.to_yaml())
    storage.write_json(join(run_dir, "metrics.json"), METRICS)
    storage.write_json(join(run_dir, "models", "gbm_behavioural", "meta.json"), {"features": []})
    storage.write_bytes(join(run_dir, "models", "gbm_behavioural", "value.ubj"), b"\x00booster")
    uri = (tmp_path / "mlruns").as_uri()

    run_id = observability.log_to_mlflow(run_dir, cfg, METRICS, storage, uri)

    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "r1"
    assert client.get_experiment(run.info.experiment_id).name == "clvray-test"
    assert run.data.params["train.max_depth"] == "4"
    assert run.data.params["train.quantiles"] == "[0.1, 0.5, 0.9]"
    assert run.data.params["tracking.mlflow_uri"] == "null"
    assert run.data.metrics["gbm_behavioural.value.normalized_gini"] == 0.42
    assert run.data.metrics["counts.transactions.rows_rejected"] == 3.0
    assert run.data.tags["clvray.fingerprint"] == cfg.fingerprint()
    top = {a.path for a in client.list_artifacts(run_id)}
    assert top == {"config.yaml", "metrics.json", "models"}  # no report/ in this run
    model_files = {a.path for a in client.list_artifacts(run_id, "models/gbm_behavioural")}
    assert model_files == {"models/gbm_behavioural/meta.json", "models/gbm_behavioural/value.ubj"}
    local = client.download_artifacts(run_id, "models/gbm_behavioural/value.ubj", str(tmp_path))
    assert Path(local).read_bytes() == b"\x00booster"


def test_native_stderr_goes_to_the_log_and_python_stderr_to_the_terminal(tmp_path):
    """Ray's C++ core worker writes to descriptor 2 directly: inside `native_stderr_to` that
    lands in the log file, while `sys.stderr` and a logging handler on it (clvray's stage
    lines) still reach the process's real stderr, in a process of its own."""
    import subprocess
    import sys

    code = (
        "import logging, os, sys\n"
        "from clvray.pipeline import native_stderr_to\n"
        "logging.basicConfig(level=logging.INFO, format='%(message)s')\n"
        "with native_stderr_to(sys.argv[1]):\n"
        "    os.write(2, b'native line\\n')\n"
        "    logging.getLogger('clvray').info('stage line')\n"
        "    print('python line', file=sys.stderr)\n"
        "os.write(2, b'after\\n')\n"
        "logging.getLogger('clvray').info('stage line after')\n"
    )
    log = tmp_path / "ray.log"
    log.write_text("before\n")
    done = subprocess.run(
        [sys.executable, "-c", code, str(log)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert log.read_text() == "before\nnative line\n"
    assert done.stderr == "stage line\npython line\nafter\nstage line after\n"


def test_native_stderr_leaves_a_captured_sys_stderr_alone(tmp_path, capsys):
    import os
    import sys

    from clvray.pipeline import native_stderr_to

    log = tmp_path / "ray.log"
    with native_stderr_to(str(log)):
        os.write(2, b"native\n")
        print("python", file=sys.stderr)
    assert log.read_text() == "native\n"
    assert capsys.readouterr().err == "python\n"
