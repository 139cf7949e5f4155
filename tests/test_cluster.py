"""A local run.storage is refused where other processes cannot see it, before any work."""

from __future__ import annotations

import os

import pytest

from clvray.cluster import (
    JOB_ENV_VARS,
    SUBMITTED_JOB_ENV_VAR,
    StorageNotSharedError,
    require_shared_storage,
    set_job_environment,
)
from clvray.config import ConfigError, load_config


def _cfg(*overrides: str):
    return load_config(None, list(overrides))


@pytest.mark.parametrize(
    ("overrides", "environ", "nodes", "why"),
    [
        ((), {SUBMITTED_JOB_ENV_VAR: "{}", "RAY_ADDRESS": "127.0.0.1:6379"}, 1, "ray job submit"),
        ((), {"RAY_ADDRESS": "10.0.0.5:6379"}, 1, "joins the Ray cluster at '10.0.0.5:6379'"),
        (("ray.address=ray://head:10001",), {}, 1, "joins the Ray cluster at 'ray://head"),
        (("run.storage=/mnt/runs",), {}, 3, "connected to 3 nodes"),
    ],
)
def test_local_storage_is_refused_on_a_cluster(overrides, environ, nodes, why) -> None:
    with pytest.raises(StorageNotSharedError, match=why) as err:
        require_shared_storage(_cfg(*overrides), environ=environ, alive_nodes=nodes)
    assert "s3://" in str(err.value) and "is a local path" in str(err.value)
    assert isinstance(err.value, ConfigError)  # the job CLI prints it without a traceback


@pytest.mark.parametrize(
    ("overrides", "environ", "nodes"),
    [
        ((), {}, 1),  # a laptop: local Ray, one node
        ((), {"RAY_ADDRESS": "local"}, 1),
        (("run.storage=s3://bucket/runs",), {SUBMITTED_JOB_ENV_VAR: "{}"}, 5),
        (("ray.shared_local_storage=true",), {SUBMITTED_JOB_ENV_VAR: "{}"}, 1),
        (("ray.shared_local_storage=true", "run.storage=/nfs/runs"), {}, 4),
    ],
)
def test_local_storage_is_allowed_where_every_process_sees_it(overrides, environ, nodes) -> None:
    require_shared_storage(_cfg(*overrides), environ=environ, alive_nodes=nodes)


def test_the_refusal_comes_before_the_run_directory_exists(tmp_path, monkeypatch) -> None:
    """Through the job's own CLI: exit 2, the message, and nothing written."""
    import importlib.util

    from tests.conftest import REPO

    spec = importlib.util.spec_from_file_location("job_pipeline", REPO / "jobs" / "pipeline.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    monkeypatch.setenv(SUBMITTED_JOB_ENV_VAR, "{}")
    # main() defaults the job environment into os.environ: undone after the test.
    for name, value in JOB_ENV_VARS.items():
        monkeypatch.setenv(name, os.environ.get(name, value))
    # Under `ray job submit` connect_ray joins the job's cluster; there is none here, and the
    # check must refuse before anything touches Ray or storage.
    monkeypatch.setattr("clvray.pipeline.connect_ray", lambda cfg: None)
    storage = tmp_path / "runs"
    code = job.main(["--storage", str(storage), "--set", "data.synthetic.n_customers=10"])
    assert code == 2
    assert not storage.exists()


def test_job_environment_is_defaulted_not_forced() -> None:
    env = {"RAY_TRAIN_ENABLE_STATE_TRACKING": "0"}
    set_job_environment(env)
    assert env == {"RAY_TRAIN_ENABLE_STATE_TRACKING": "0"}  # the operator's choice stands
    env = {}
    set_job_environment(env)
    assert env == JOB_ENV_VARS
