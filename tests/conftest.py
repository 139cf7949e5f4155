"""Shared fixtures: one local Ray for the session, small synthetic data, a tiny encoder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# Fail fast instead of retrying for minutes when a test breaks a task.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Dummy AWS credentials for moto's S3 server (tests/test_s3.py), set before the session's Ray
# starts: Ray workers get the environment the raylet had at ray.init, never later changes.
# Forced, not defaulted, so that no test can reach a real AWS account.
os.environ.update(
    AWS_ACCESS_KEY_ID="clvray-test-key",
    AWS_SECRET_ACCESS_KEY="clvray-test-secret",
    AWS_DEFAULT_REGION="us-east-1",
    MLFLOW_ALLOW_FILE_STORE="true",
)
for _name in ("AWS_SESSION_TOKEN", "AWS_PROFILE"):
    os.environ.pop(_name, None)


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray with 2 CPUs and a small object store, shared by every integration test."""
    import ray

    if not ray.is_initialized():
        ray.init(
            address="local",  # never join a cluster someone else started on this machine
            num_cpus=2,
            object_store_memory=400 * 1024**2,
            include_dashboard=False,
            log_to_driver=False,
            runtime_env={"env_vars": {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}},
        )
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    yield ray


@pytest.fixture(scope="session")
def tiny_encoder(tmp_path_factory) -> str:
    """A tiny real BERT (32 wide, 2 layers) whose vocabulary is every synthetic review word."""
    from clvray.synth import vocabulary
    from clvray.text.encoder import build_tiny_encoder

    return build_tiny_encoder(tmp_path_factory.mktemp("tiny-encoder"), vocabulary())
