"""Shared fixtures: one local Ray for the session, small synthetic data, a tiny encoder."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# Fail fast instead of retrying for minutes when a test breaks a task.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Keep idle Ray workers between operators (clvray.pipeline.keep_idle_workers), for the session's
# Ray and for every head or node a test starts (they inherit this environment).
from clvray.pipeline import keep_idle_workers  # noqa: E402

keep_idle_workers()
PLANTED_SECRET = "clvray-planted-3f9a1c7e"
# Dummy AWS credentials for moto's S3 server (tests/test_s3.py), set before the session's Ray
# starts: Ray workers get the environment the raylet had at ray.init, never later changes.
# Forced, not defaulted, so that no test can reach a real AWS account.
os.environ.update(
    AWS_ACCESS_KEY_ID="clvray-test-key",
    AWS_SECRET_ACCESS_KEY="clvray-test-secret",
    AWS_DEFAULT_REGION="us-east-1",
    MLFLOW_ALLOW_FILE_STORE="true",
    # A secret every process of the session holds and no output may contain
    # (tests/test_pipeline.py scans every file of the shared run for it and for the AWS key).
    CLVRAY_TEST_PLANTED_SECRET=PLANTED_SECRET,
)
for _name in ("AWS_SESSION_TOKEN", "AWS_PROFILE"):
    os.environ.pop(_name, None)


# --- tiers ---------------------------------------------------------------------------------------
# Derived from what a test uses, so no test has to remember its marker: `make test-fast` runs
# `-m "not integration and not e2e"`, the tier that needs no Ray.
# Fixtures that connect to or start Ray (directly or through another fixture: pytest's
# `fixturenames` is the whole closure). The `cluster` marker means a test starts Ray processes.
RAY_FIXTURES = frozenset({"ray_local", "ray_head"})
# Fixtures that run the job (jobs/pipeline.py or run_pipeline) from input files to a report.
E2E_FIXTURES = frozenset({"text_run", "pipeline_run", "trained_run", "s3_run", "ray_head"})


def tier_markers(fixturenames, marker_names) -> set[str]:
    """The tier markers a test gets from its fixture closure and its own markers."""
    used = set(fixturenames)
    tiers = set()
    if used & RAY_FIXTURES or "cluster" in marker_names:
        tiers.add("integration")
    if used & E2E_FIXTURES:
        tiers.add("e2e")
    return tiers


def pytest_collection_modifyitems(config, items):
    for item in items:
        names = {m.name for m in item.iter_markers()}
        for tier in sorted(tier_markers(getattr(item, "fixturenames", ()), names) - names):
            item.add_marker(getattr(pytest.mark, tier))


def _ray_up() -> bool:
    ray_mod = sys.modules.get("ray")
    return ray_mod is not None and ray_mod.is_initialized()


def _fail_if_ray_started_outside_the_ray_tiers(item, was_up: bool) -> None:
    """Keep the fast tier honest: a test outside the Ray tiers that leaves Ray running started
    it (in a fixture or in the test) without a Ray fixture saying so, which would make
    `make test-fast` slow and flaky."""
    tiers = {m.name for m in item.iter_markers()} & {"integration", "e2e"}
    if not tiers and not was_up and _ray_up():
        pytest.fail(
            f"{item.nodeid} started Ray without a Ray fixture: use `ray_local` (or add its "
            "fixture to RAY_FIXTURES in tests/conftest.py) so it is tiered as integration",
            pytrace=False,
        )


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
    was_up = _ray_up()
    result = yield
    _fail_if_ray_started_outside_the_ray_tiers(item, was_up)
    return result


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    was_up = _ray_up()
    result = yield
    _fail_if_ray_started_outside_the_ray_tiers(item, was_up)
    return result


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


# One end-to-end text run for the whole session: tests/test_pipeline.py asserts on what the job
# wrote, tests/test_serve.py loads it as a trained model. A full run costs minutes on 2 cores,
# so it is built once; a test that changes the run must put it back as it found it.
TEXT_RUN_CUSTOMERS = 300


def text_run_argv(storage, tiny_encoder: str, *extra: str) -> list[str]:
    return [
        "--config", "configs/demo.yaml",
        "--storage", str(storage),
        "--run-id", "e2e",
        "--set", f"data.synthetic.n_customers={TEXT_RUN_CUSTOMERS}",
        "--set", "data.synthetic.customers_per_task=150",
        "--set", "features.num_partitions=2",
        "--set", "train.num_boost_round=40",
        "--set", f"text.model={tiny_encoder}",
        "--set", "text.finetune.max_reviews=200",
        "--set", "text.finetune.cpus_per_worker=0.5",
        "--set", "text.num_partitions=2",
        "--set", "text.topics.n_topics=3",
        "--set", "text.topics.as_features=true",
        # the pretrained-encoder ablation adds five stages of the same code as the fine-tuned
        # variant's (tests/test_graph.py checks it is in the default graph)
        "--set", "text.pretrained_variant=false",
        *extra,
    ]  # fmt: skip


@pytest.fixture(scope="session")
def text_run(ray_local, tiny_encoder, tmp_path_factory):
    """(run directory, storage root, argv) of one small text run through jobs/pipeline.py:
    fine-tuned tiny BERT, embeddings of both encoders, topic shares and BG/NBD columns as
    features, three models (the ablation), scores, evaluation and report.
    `CLVRAY_TEXT_RUN` names an existing run directory built by this fixture (with the same
    tiny encoder path) to skip the run while iterating locally."""
    import jobs.pipeline as job

    reuse = os.environ.get("CLVRAY_TEXT_RUN")
    if reuse:
        storage = Path(reuse).parent
        return Path(reuse), storage, text_run_argv(storage, tiny_encoder)
    storage = tmp_path_factory.mktemp("text-run")
    argv = text_run_argv(storage, tiny_encoder)
    assert job.main(argv) == 0
    return storage / "e2e", storage, argv
