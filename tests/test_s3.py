"""End to end on S3: moto's S3 server on 127.0.0.1, inputs in a bucket, every output in the bucket.

Credentials come only from the standard AWS environment. Ray workers take their environment
from the raylet, which copies the driver's at `ray.init`, so the variables must be set before
the session's Ray starts (tests/conftest.py sets them at import; `aws_env` below covers a run
of this file alone). The server records the access key of every request, so a Ray task that
talks to S3 without the credentials (an unsigned request, which moto would accept) fails the
test instead of passing here and failing on real S3.
"""

from __future__ import annotations

import os
import threading

import pytest

from tests.conftest import REPO

AWS_TEST_ENV = {
    "AWS_ACCESS_KEY_ID": "clvray-test-key",
    "AWS_SECRET_ACCESS_KEY": "clvray-test-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
}
BUCKET = "clvray-test"
N_CUSTOMERS = 300


class _AccessKeyRecorder:
    """WSGI middleware: remembers the access key that signed each request ('' when unsigned)."""

    def __init__(self, app):
        self.app = app
        self.keys: list[str] = []
        self._lock = threading.Lock()

    def __call__(self, environ, start_response):
        auth = environ.get("HTTP_AUTHORIZATION", "")
        key = auth.split("Credential=", 1)[1].split("/", 1)[0] if "Credential=" in auth else ""
        with self._lock:
            self.keys.append(key)
        return self.app(environ, start_response)


@pytest.fixture(scope="session", autouse=True)
def aws_env():
    """The AWS variables every process of the test talks to S3 with; set here when this file
    runs alone (before `ray_local` starts), else already set by conftest."""
    for key, value in AWS_TEST_ENV.items():
        os.environ.setdefault(key, value)
    return os.environ["AWS_ACCESS_KEY_ID"]


@pytest.fixture(scope="module")
def s3_server(aws_env, ray_local):
    """(endpoint_url, recorder) of a moto S3 server on a free port, with the bucket created."""
    import boto3
    from moto.server import ThreadedMotoServer

    @ray_local.remote(num_cpus=0)
    def worker_key() -> str | None:
        return os.environ.get("AWS_ACCESS_KEY_ID")

    if ray_local.get(worker_key.remote()) != aws_env:
        pytest.fail(
            "Ray workers lack AWS_ACCESS_KEY_ID: the session's Ray started before the AWS test "
            "environment was set (set it at import in tests/conftest.py)"
        )
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    recorder = _AccessKeyRecorder(server._server.app)  # werkzeug serves `server.app`
    server._server.app = recorder
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=BUCKET)
    yield endpoint, recorder
    server.stop()


def _keys(endpoint: str, prefix: str) -> list[str]:
    import boto3

    pages = (
        boto3.client("s3", endpoint_url=endpoint)
        .get_paginator("list_objects_v2")
        .paginate(Bucket=BUCKET, Prefix=prefix)
    )
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


@pytest.fixture(scope="module")
def s3_run(s3_server, tmp_path_factory):
    """The job entry point with inputs read from and every output written to the bucket,
    run from an empty working directory."""
    import jobs.pipeline as job
    from clvray.config import SyntheticSection
    from clvray.storage import Storage
    from clvray.synth import generate

    endpoint, recorder = s3_server
    synthetic = SyntheticSection(n_customers=N_CUSTOMERS, customers_per_task=150)
    generate(synthetic, f"s3://{BUCKET}/input", Storage(endpoint_url=endpoint))
    argv = [
        "--config", str(REPO / "configs" / "demo.yaml"),
        "--storage", f"s3://{BUCKET}/runs",
        "--run-id", "s3e2e",
        "--set", f"s3.endpoint_url={endpoint}",
        "--set", "data.source=synthetic",
        "--set", f"data.transactions=s3://{BUCKET}/input/transactions",
        "--set", f"data.reviews=s3://{BUCKET}/input/reviews",
        "--set", f"data.synthetic.n_customers={N_CUSTOMERS}",
        "--set", "text.enabled=false",
        "--set", "features.num_partitions=2",
        "--set", "train.num_boost_round=30",
    ]  # fmt: skip
    cwd = tmp_path_factory.mktemp("cwd")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(cwd)
        assert job.main(argv) == 0
    return endpoint, recorder, cwd


@pytest.mark.slow
def test_every_output_is_in_the_bucket(s3_run):
    import boto3

    endpoint, _, _ = s3_run
    keys = set(_keys(endpoint, "runs/s3e2e/"))
    run = "runs/s3e2e"
    assert f"{run}/metrics.json" in keys
    assert f"{run}/config.yaml" in keys
    assert f"{run}/models/gbm_behavioural/meta.json" in keys
    assert any(k.startswith(f"{run}/scores/") and k.endswith(".parquet") for k in keys)
    assert any(k.startswith(f"{run}/ingest/transactions/") and k.endswith(".parquet") for k in keys)
    # Ray Train's own checkpoint (the boosters as trained), not only the copy under models/
    assert any(
        k.startswith(f"{run}/ray_train/") and "/checkpoint_" in k and k.endswith("value.ubj")
        for k in keys
    ), sorted(k for k in keys if "ray_train" in k)

    s3 = boto3.client("s3", endpoint_url=endpoint)
    import json

    metrics = json.loads(s3.get_object(Bucket=BUCKET, Key=f"{run}/metrics.json")["Body"].read())
    assert metrics["run_dir"] == f"s3://{BUCKET}/{run}"
    tx = metrics["counts"]["transactions"]
    assert tx["rows_in"] == tx["rows_accepted"] + tx["rows_rejected"] > 0
    assert metrics["population"]["customers"] > 0
    config = s3.get_object(Bucket=BUCKET, Key=f"{run}/config.yaml")["Body"].read().decode()
    assert f"transactions: s3://{BUCKET}/input/transactions" in config


@pytest.mark.slow
def test_nothing_is_written_locally(s3_run):
    _, _, cwd = s3_run
    assert list(cwd.iterdir()) == []
    assert not (REPO / "runs" / "s3e2e").exists()


@pytest.mark.slow
def test_every_s3_request_carries_the_environment_credentials(s3_run, aws_env):
    """Driver, Ray Data tasks, Ray Train workers and scoring actors all signed with the AWS
    environment's key; an unsigned request would mean a process without credentials."""
    _, recorder, _ = s3_run
    assert len(recorder.keys) > 50
    assert set(recorder.keys) == {aws_env}


@pytest.mark.slow
def test_mlflow_takes_its_artifacts_from_the_bucket(s3_run, tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow import MlflowClient

    from clvray.config import load_config
    from clvray.observability import log_to_mlflow
    from clvray.storage import Storage

    endpoint, _, _ = s3_run
    storage = Storage(endpoint_url=endpoint)
    run_dir = f"s3://{BUCKET}/runs/s3e2e"
    cfg = load_config(None, [f"s3.endpoint_url={endpoint}"])
    metrics = storage.read_json(f"{run_dir}/metrics.json")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = (tmp_path / "mlruns").as_uri()

    run_id = log_to_mlflow(run_dir, cfg, metrics, storage, uri)

    client = MlflowClient(tracking_uri=uri)
    logged = client.get_run(run_id).data.metrics
    gini = metrics["models"]["gbm_behavioural"]["value"]["normalized_gini"]
    assert logged["gbm_behavioural.value.normalized_gini"] == pytest.approx(gini)
    files = {a.path for a in client.list_artifacts(run_id, "models/gbm_behavioural")}
    assert "models/gbm_behavioural/meta.json" in files
    assert "models/gbm_behavioural/value.ubj" in files


@pytest.mark.slow
def test_score_job_on_s3_reproduces_the_training_scores(s3_run, tmp_path, monkeypatch):
    """jobs/score.py with the model run, the snapshot and the output all in the bucket, as of
    the training cutoff: the same customers get the training run's own scores (one feature
    code, one fitted state, no refit), and nothing is written locally."""
    import numpy as np
    import pyarrow.parquet as pq

    import jobs.score as job
    from clvray.storage import Storage

    endpoint, _, _ = s3_run
    storage = Storage(endpoint_url=endpoint)
    model_run = f"s3://{BUCKET}/runs/s3e2e"
    metrics = storage.read_json(f"{model_run}/metrics.json")
    monkeypatch.chdir(tmp_path)
    argv = [
        "--model-run", model_run, "--as-of", metrics["cutoff"],
        "--storage", f"s3://{BUCKET}/scoring", "--run-id", "at-cutoff",
        "--set", f"s3.endpoint_url={endpoint}",
        "--set", "data.source=contract_parquet",
        "--set", f"data.transactions=s3://{BUCKET}/input/transactions",
        "--set", f"data.reviews=s3://{BUCKET}/input/reviews",
        "--set", "features.num_partitions=2",
    ]  # fmt: skip
    assert job.main(argv) == 0
    assert list(tmp_path.iterdir()) == []
    summary = storage.read_json(f"s3://{BUCKET}/scoring/at-cutoff/score.json")
    assert summary["scores"].startswith(f"s3://{BUCKET}/scoring/at-cutoff/")

    def table(uri):
        fs, path = storage.filesystem(uri)
        frame = pq.read_table(path, filesystem=fs).to_pandas()
        return frame.sort_values("customer_id").set_index("customer_id")

    scored = table(summary["scores"])
    trained = table(f"{model_run}/scores/{metrics['primary_model']}")
    assert list(scored.index) == list(trained.index)  # the same population
    assert (scored["model_run"] == model_run).all()
    for column in ("future_value_pred", "value_p10", "value_p50", "value_p90", "churn_prob"):
        np.testing.assert_allclose(scored[column], trained[column], rtol=1e-6, atol=1e-9)
    assert (scored["value_segment"] == trained["value_segment"]).all()


@pytest.mark.parametrize(
    ("endpoint_url", "override", "scheme"),
    [
        ("http://127.0.0.1:9000", "127.0.0.1:9000", "http"),
        ("https://s3.example.com/", "s3.example.com", "https"),
        ("minio:9000", "minio:9000", "https"),
        ("localhost:9000", "localhost:9000", "https"),
    ],
)
def test_endpoint_url_gives_pyarrow_host_and_scheme(endpoint_url, override, scheme):
    from clvray.storage import Storage

    fs, path = Storage(endpoint_url=endpoint_url).filesystem("s3://bucket/runs/")
    options = fs.__reduce__()[1][0]  # the options pyarrow pickles the filesystem with
    assert (options["endpoint_override"], options["scheme"]) == (override, scheme)
    assert path == "bucket/runs"


def test_endpoint_url_with_another_scheme_is_refused():
    from clvray.storage import Storage

    with pytest.raises(ValueError, match="expected http"):
        Storage(endpoint_url="ftp://minio:9000").filesystem("s3://bucket/runs")
