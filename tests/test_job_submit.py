"""`ray job submit`, the real CLI, against a Ray head started by the test on 127.0.0.1."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest

from tests.conftest import REPO

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

EXCLUDES = [".git", ".venv", "runs", "data", "**/__pycache__", ".pytest_cache", ".ruff_cache"]


def _free_ports(n: int) -> list[int]:
    """`n` distinct free ports: every socket stays bound until all are chosen (one at a time,
    the OS can hand the same port out twice, and Ray refuses a head whose components share one)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]


def _head_processes(temp_dir: str, gcs_address: str) -> list[psutil.Process]:
    """Every process of the head started with `temp_dir`: those whose command line names its
    temp dir or GCS address (gcs_server, raylet, dashboard and its agents, log monitor, the
    Ray client server), and all their descendants (workers, the job's driver)."""
    roots = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        names_head = temp_dir in cmdline or re.search(rf"{re.escape(gcs_address)}(?!\d)", cmdline)
        if proc.pid != os.getpid() and names_head:
            roots.append(proc)
    found = {p.pid: p for p in roots}
    for proc in roots:
        with contextlib.suppress(psutil.Error):
            found.update({c.pid: c for c in proc.children(recursive=True)})
    return list(found.values())


def _stop(processes: list[psutil.Process], timeout_s: float = 15) -> list[psutil.Process]:
    """SIGTERM each process by PID, SIGKILL what is left after `timeout_s`; returns the
    processes still alive after that (none expected)."""
    for proc in processes:
        with contextlib.suppress(psutil.Error):
            proc.terminate()
    _, alive = psutil.wait_procs(processes, timeout=timeout_s)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    _, alive = psutil.wait_procs(alive, timeout=5)
    return alive


@pytest.fixture(scope="module")
def ray_head():
    """A separate Ray head (token auth on) on free ports, shared by this module's tests, so the
    session's own local Ray keeps running; afterwards every process it started is stopped by
    PID."""
    temp_dir = tempfile.mkdtemp(prefix="rjs", dir="/tmp")
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "RAY_AUTH_MODE": "token", "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    port, dash, listen, grpc, metrics, runtime_env, client = _free_ports(7)
    gcs_address = f"127.0.0.1:{port}"
    # The session's own local Ray (other tests) already holds the default agent ports; a head
    # whose dashboard agent cannot bind them never gets an agent ("No available agent").
    agent_ports = [
        f"--dashboard-agent-listen-port={listen}",
        f"--dashboard-agent-grpc-port={grpc}",
        f"--metrics-export-port={metrics}",
        f"--runtime-env-agent-port={runtime_env}",
        f"--ray-client-server-port={client}",
    ]
    try:
        started = subprocess.run(
            [
                str(bin_dir / "ray"), "start", "--head", "--node-ip-address=127.0.0.1",
                f"--port={port}", f"--dashboard-port={dash}", "--dashboard-host=127.0.0.1",
                "--include-dashboard=true", "--num-cpus=2", f"--temp-dir={temp_dir}",
                "--disable-usage-stats", *agent_ports,
            ],
            env=env, capture_output=True, text=True, timeout=180,
        )  # fmt: skip
        assert started.returncode == 0, started.stdout[-2000:] + started.stderr[-3000:]
        yield f"http://127.0.0.1:{dash}", env
    finally:
        started = _head_processes(temp_dir, gcs_address)
        left = _stop(started)
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not left, f"head processes survived SIGKILL: {left}"
        assert not _head_processes(temp_dir, gcs_address), "a head process was missed"


def _submit(address: str, env: dict, submission_id: str, entrypoint: list[str]):
    """`ray job submit` of this repository as the working dir; retried while the head's job
    agent is not up yet (a 500 "No available agent": no job was created)."""
    ray = str(Path(sys.executable).parent / "ray")
    submit = [
        ray, "job", "submit", "--address", address, "--submission-id", submission_id,
        "--working-dir", str(REPO),
        "--runtime-env-json", json.dumps({"excludes": EXCLUDES, "env_vars": {"RAY_DATA_DISABLE_PROGRESS_BARS": "1"}}),
        "--", *entrypoint,
    ]  # fmt: skip
    deadline = time.monotonic() + 120
    while True:
        done = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=900)
        if "No available agent" not in done.stderr or time.monotonic() > deadline:
            return done
        time.sleep(3)


def test_job_submit_succeeds_and_writes_its_stages(ray_head, tmp_path):
    """The submission path (working dir, runtime env, token auth, output streamed back, files on
    storage both sides see) on a slice of the graph; whole runs are tests/test_pipeline.py's."""
    address, env = ray_head
    ray = str(Path(sys.executable).parent / "ray")
    done = _submit(address, env, "clvray-test", [
        "python", "jobs/pipeline.py", "--config", "configs/demo.yaml",
        "--storage", str(tmp_path), "--run-id", "submitted",
        # One machine: the head and the test share tmp_path (on a real cluster: s3://).
        "--set", "ray.shared_local_storage=true",
        "--set", "text.enabled=false", "--set", "data.synthetic.n_customers=300",
        "--set", "features.num_partitions=2", "--until", "features",
    ])  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    status = subprocess.run(
        [ray, "job", "status", "--address", address, "clvray-test"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert re.search(r"Job 'clvray-test' succeeded", re.sub(r"\x1b\[[0-9;]*m", "", status.stdout))
    run_dir = tmp_path / "submitted"
    for stage in ("ingest", "features"):
        assert json.loads((run_dir / "_stages" / f"{stage}.json").read_text())["fingerprint"]
    assert not (run_dir / "_stages" / "train").exists()  # `--until features` stopped there
    customers = pd.read_parquet(run_dir / "features" / "customers")
    assert len(customers) == customers["customer_id"].nunique() > 0
    assert "run directory:" in done.stdout  # the job's own output streamed back


def test_score_job_submitted_reproduces_the_training_scores(ray_head, text_run, tmp_path):
    """jobs/score.py through `ray job submit`, with the session's text run as the model run, as
    of its cutoff: the fine-tuned encoder, the text reduction, the boosters and the segment
    edges applied on the head's own workers give the training run's scores. With another seed
    than the training run's (7, not 0): scoring does not depend on it."""
    import numpy as np

    address, env = ray_head
    run_dir, storage, _ = text_run
    metrics = json.loads((run_dir / "metrics.json").read_text())
    (data,) = list((storage / "_synthetic").iterdir())
    done = _submit(address, env, "clvray-score", [
        "python", "jobs/score.py", "--model-run", str(run_dir), "--as-of", metrics["cutoff"],
        "--storage", str(tmp_path), "--run-id", "submitted-score",
        "--set", "ray.shared_local_storage=true", "--set", "run.seed=7",
        "--set", "data.source=contract_parquet",
        "--set", f"data.transactions={data / 'transactions'}",
        "--set", f"data.reviews={data / 'reviews'}",
        "--set", "features.num_partitions=2", "--set", "text.num_partitions=2",
        "--set", "text.embed.max_actors=1",
    ])  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((tmp_path / "submitted-score" / "score.json").read_text())
    scored = pd.read_parquet(summary["scores"]).set_index("customer_id").sort_index()
    trained = (
        pd.read_parquet(run_dir / "scores" / metrics["primary_model"])
        .set_index("customer_id")
        .sort_index()
    )
    assert list(scored.index) == list(trained.index)
    for column in ("future_value_pred", "value_p10", "value_p90", "churn_prob"):
        np.testing.assert_allclose(scored[column], trained[column], rtol=1e-6, atol=1e-9)
    assert (scored["value_segment"] == trained["value_segment"]).all()


@pytest.mark.parametrize(
    "client_env",
    [
        # token mode on, but another cluster's token: the head must refuse it
        {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 32},
        # a client that sends no token at all
        {"RAY_AUTH_MODE": "disabled"},
    ],
    ids=["wrong-token", "no-token"],
)
def test_job_api_refuses_a_client_without_the_token(ray_head, client_env):
    address, env = ray_head
    ray = str(Path(sys.executable).parent / "ray")
    # A home without ~/.ray/auth_token, so only what client_env says reaches the head.
    client = {**env, "HOME": tempfile.mkdtemp(), **client_env}
    client.pop("RAY_AUTH_TOKEN_PATH", None)
    out = subprocess.run(
        [ray, "job", "list", "--address", address],
        env=client,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode != 0
    # Refused by the head for authentication, not failing for another reason (no agent yet,
    # connection refused, a client-side config error).
    assert "AuthenticationError" in out.stderr, out.stdout[-2000:] + out.stderr[-3000:]
