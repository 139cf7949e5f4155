"""What the job checks and sets because it may run on a cluster rather than a laptop.

- `JOB_ENV_VARS`: environment every clvray job runs with, in the driver and in Ray's workers.
  The deploy files (`cluster.yaml`, `deploy/rayjob.yaml`) and the README's `ray job submit`
  commands set the same variables in the job's runtime env (tests/test_deploy.py checks).
- `require_shared_storage`: refuses a local `run.storage` where other processes cannot see it
  (other nodes, or Ray's scratch copy of the working directory under `ray job submit`), before
  any work is done.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, MutableMapping

from clvray.config import Config, ConfigError

JOB_ENV_VARS = {
    # Ray Train runs (fine-tuning, XGBoost) appear on the dashboard's "Train" page only with
    # state tracking on; Ray decides it in the process that calls `trainer.fit()`.
    "RAY_TRAIN_ENABLE_STATE_TRACKING": "1",
}
# Set by Ray's job supervisor in the environment of every `ray job submit` entry point.
SUBMITTED_JOB_ENV_VAR = "RAY_JOB_CONFIG_JSON_ENV_VAR"
LOCAL_ADDRESSES = {"", "local"}


class StorageNotSharedError(ConfigError):
    """A local `run.storage` on a cluster or under `ray job submit`."""


def set_job_environment(environ: MutableMapping[str, str] | None = None) -> None:
    """Default `JOB_ENV_VARS` into `environ` (the process environment), keeping values the
    operator set. Call before Ray starts, so a local Ray's workers inherit them too."""
    environ = os.environ if environ is None else environ
    for name, value in JOB_ENV_VARS.items():
        environ.setdefault(name, value)


def _alive_nodes() -> int:
    import ray

    if not ray.is_initialized():
        return 1
    return sum(1 for node in ray.nodes() if node.get("Alive"))


def require_shared_storage(
    cfg: Config, environ: Mapping[str, str] | None = None, alive_nodes: int | None = None
) -> None:
    """Raise `StorageNotSharedError` when `cfg.run.storage` is a local path and the job is
    submitted with `ray job submit`, joins an existing cluster (`ray.address` or
    `RAY_ADDRESS`), or is connected to more than one node; unless `ray.shared_local_storage`
    says every node sees that path.

    Why: under `ray job submit` a relative path lands in Ray's scratch copy of the working
    directory, deleted after the job; on several nodes each writes its own local disk. An
    autoscaling cluster starts with the head alone, so the node count cannot be the only test.
    `environ` defaults to the process environment; `alive_nodes` to `ray.nodes()` when Ray
    is connected. Cheap: one GCS call at most.
    """
    storage = cfg.run.storage
    if "://" in storage or cfg.ray.shared_local_storage:
        return
    environ = os.environ if environ is None else environ
    address = cfg.ray.address or environ.get("RAY_ADDRESS") or ""
    if SUBMITTED_JOB_ENV_VAR in environ:
        where = "the job was submitted with `ray job submit`"
    elif address not in LOCAL_ADDRESSES:
        where = f"the job joins the Ray cluster at {address!r}"
    else:
        nodes = _alive_nodes() if alive_nodes is None else alive_nodes
        if nodes <= 1:
            return
        where = f"Ray is connected to {nodes} nodes"
    raise StorageNotSharedError(
        f"run.storage {storage!r} is a local path, but {where}: other nodes would not see it "
        "and Ray deletes the job's copy of the working directory when the job ends. Use "
        "shared storage: --storage s3://BUCKET/PREFIX (or --set run.storage=s3://...). If "
        "every node mounts that path (one machine, or a shared file system), set "
        "ray.shared_local_storage=true."
    )
