"""The deployment files: `cluster.yaml` (Ray cluster launcher, AWS) and `deploy/rayjob.yaml`
(KubeRay), and the `ray job submit` command the docs give.

`cluster.yaml` goes through the steps `ray up` takes before it calls AWS: Ray's
`prepare_config` (merge with the AWS defaults) and `validate_config` (the JSON schema in
`ray/autoscaler/ray-schema.json` plus its own checks), as Ray's `test_autoscaler_yaml.py` does
for its example configs. No network, no cloud, no Ray processes: seconds.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import re
import shlex
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray
import yaml
from packaging.requirements import Requirement
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.runtime_env import RuntimeEnv

from clvray.config import load_config

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    tomllib = pytest.importorskip("tomli")

REPO = Path(__file__).resolve().parents[1]
CLUSTER_YAML = REPO / "cluster.yaml"
RAYJOB_YAML = REPO / "deploy" / "rayjob.yaml"
# The "Run on a cluster" guide (README.md is the one copy; docs/CLUSTER.md was merged into it).
DOC_FILES = [REPO / "README.md"]

REQUIRED_EXCLUDES = {".git", ".venv", "runs", "data"}
TOKEN_PATH_IN_CONTAINER = "/home/ray/.ray/auth_token"
# Credentials have no place in a deploy file: instance roles / IRSA give S3 access, and the Ray
# token travels as a file (cluster launcher) or a generated Secret (KubeRay).
SECRET_PATTERNS = [
    r"\bA[SK]IA[0-9A-Z]{16}\b",  # AWS access key ids
    r"(?i)aws_access_key_id",
    r"(?i)aws_secret_access_key",
    r"(?i)aws_session_token",
    r"-----BEGIN [A-Z ]*PRIVATE KEY-----",
]


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def validate_cluster_config(config: dict) -> dict:
    """What `ray up` does to a cluster config before any cloud call; raises on a bad one."""
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


@pytest.fixture(scope="module")
def cluster() -> dict:
    return load_yaml(CLUSTER_YAML)


@pytest.fixture(scope="module")
def rayjob() -> dict:
    return load_yaml(RAYJOB_YAML)


@pytest.fixture(scope="module")
def rayjob_runtime_env(rayjob: dict) -> dict:
    return yaml.safe_load(rayjob["spec"]["runtimeEnvYAML"])


def pyproject_gpu_requirements() -> list[Requirement]:
    """What `pip install .[gpu]` asks for: the dependencies plus the `gpu` extra."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    lines = project["dependencies"] + project["optional-dependencies"]["gpu"]
    return [Requirement(line) for line in lines]


def check_mirrors_pyproject(deploy_reqs: list[Requirement], *, ray_pinned: bool) -> None:
    """A deploy file's package list must ask for what pyproject.toml does: same names and
    extras, same version ranges, or a pin (==) inside the range. `ray` is pinned to the local
    version (cluster launcher) or absent (KubeRay runtime env: the image provides it)."""
    deploy = {r.name.lower(): r for r in deploy_reqs}
    assert len(deploy) == len(deploy_reqs), "a package is listed twice"
    wanted = {r.name.lower(): r for r in pyproject_gpu_requirements()}
    if not ray_pinned:
        assert "ray" not in deploy, "never install ray through the runtime env"
        wanted.pop("ray")
    assert set(deploy) == set(wanted), (
        f"missing {sorted(set(wanted) - set(deploy))}, extra {sorted(set(deploy) - set(wanted))}"
    )
    assert "xgboost-cpu" not in deploy, "GPU nodes need the full xgboost wheel"
    for name, want in wanted.items():
        got = deploy[name]
        assert want.extras <= got.extras, f"{name}: extras {got.extras} lack {want.extras}"
        pins = [s for s in got.specifier if s.operator == "=="]
        if pins:
            assert want.specifier.contains(pins[0].version, prereleases=True), (
                f"{name}=={pins[0].version} is outside pyproject's {want.specifier}"
            )
        else:
            assert got.specifier == want.specifier, f"{name}: {got.specifier} != {want.specifier}"
    assert str(deploy["torch"].specifier).startswith("=="), "pin torch: one CUDA build everywhere"
    if ray_pinned:
        assert str(deploy["ray"].specifier) == f"=={ray.__version__}"


def pip_install_requirements(command: str) -> list[Requirement]:
    tokens = shlex.split(command)
    assert tokens[:2] == ["pip", "install"], command
    return [Requirement(t) for t in tokens[2:] if not t.startswith("-")]


def load_job_cli():
    spec = importlib.util.spec_from_file_location(
        "clvray_job_pipeline", REPO / "jobs" / "pipeline.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def config_from_entrypoint(entrypoint: list[str]):
    """Parse an entry point with the job's own CLI and build its config, as the job would."""
    assert entrypoint[:2] == ["python", "jobs/pipeline.py"], entrypoint
    args = load_job_cli().parse_args(entrypoint[2:])
    assert args.config, "the entry point must name a config file"
    assert (REPO / args.config).is_file(), f"{args.config} is not in the repository"
    overrides = list(args.overrides)
    if args.storage:
        overrides.append(f"run.storage={args.storage}")
    return load_config(REPO / args.config, overrides)


def documented_submit_commands() -> list[list[str]]:
    """Every `ray job submit` command in the docs' shell blocks, as argv lists."""
    commands = []
    for path in DOC_FILES:
        if not path.is_file():
            continue
        for language, block in re.findall(r"```(\w*)\n(.*?)```", path.read_text(), re.S):
            if language not in {"", "bash", "sh", "shell", "console"}:
                continue
            for line in block.replace("\\\n", " ").splitlines():
                if "ray job submit" not in line:
                    continue
                tokens = shlex.split(line, comments=True)
                for i in range(len(tokens) - 2):
                    if tokens[i : i + 3] == ["ray", "job", "submit"]:
                        commands.append(tokens[i:])
                        break
    return commands


# --- cluster.yaml: Ray's own validation --------------------------------------------------------


def test_cluster_yaml_passes_ray_validation(cluster):
    prepared = validate_cluster_config(cluster)
    assert prepared["head_node_type"] == "head"
    assert set(prepared["available_node_types"]) == {"head", "cpu_worker", "gpu_worker"}
    # prepare_config merged the shared setup into the head's and the workers' steps.
    assert (
        prepared["head_setup_commands"][: len(cluster["setup_commands"])]
        == cluster["setup_commands"]
    )


@pytest.mark.parametrize(
    ("old", "new", "error"),
    [
        ("\nmax_workers: 28\n", "\nmax_worker: 28\n", "'max_worker' was unexpected"),
        (
            "\nidle_timeout_minutes:",
            "\nidle_timeout_minute:",
            "'idle_timeout_minute' was unexpected",
        ),
        (
            "\nhead_start_ray_commands:",
            "\nhead_start_commands:",
            "'head_start_commands' was unexpected",
        ),
        (
            "    min_workers: 0\n    max_workers: 8",
            "    min_worker: 0\n    max_workers: 8",
            "'min_worker' was unexpected",
        ),
        (
            "  pull_before_run: true",
            "  pull_before_runs: true",
            "'pull_before_runs' was unexpected",
        ),
        ('resources: {"CPU": 0}', 'resources: {"CPU": "0"}', "is not of type 'integer'"),
    ],
    ids=[
        "max_worker",
        "idle_timeout_minute",
        "head_start_commands",
        "node_min_worker",
        "docker_key",
        "cpu_as_string",
    ],
)
def test_typo_in_cluster_yaml_fails_validation(tmp_path, old, new, error):
    text = CLUSTER_YAML.read_text()
    assert text.count(old) == 1, f"the test's anchor {old!r} is not unique in cluster.yaml"
    broken = tmp_path / "cluster.yaml"
    broken.write_text(text.replace(old, new))
    with pytest.raises(jsonschema.ValidationError, match=re.escape(error)):
        validate_cluster_config(load_yaml(broken))


def test_more_min_workers_than_max_workers_fails_validation(cluster):
    broken = copy.deepcopy(cluster)
    broken["available_node_types"]["gpu_worker"]["min_workers"] = broken["max_workers"] + 1
    with pytest.raises(ValueError, match="smaller than the sum of `min_workers`"):
        validate_cluster_config(broken)


# --- cluster.yaml: shape, cost and security ----------------------------------------------------


def test_head_runs_no_tasks_and_is_on_demand(cluster):
    head = cluster["available_node_types"][cluster["head_node_type"]]
    assert head["resources"] == {"CPU": 0}
    assert "InstanceMarketOptions" not in head["node_config"], "a reclaimed head loses the cluster"


@pytest.mark.parametrize("node_type", ["cpu_worker", "gpu_worker"])
def test_workers_scale_from_zero_on_spot(cluster, node_type):
    spec = cluster["available_node_types"][node_type]
    assert spec["min_workers"] == 0
    assert spec["max_workers"] >= 1
    assert spec["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot"


def test_cluster_can_reach_every_node_type_max_and_idles_down(cluster):
    workers = [
        t
        for name, t in cluster["available_node_types"].items()
        if name != cluster["head_node_type"]
    ]
    assert cluster["max_workers"] >= sum(t["max_workers"] for t in workers)
    assert 0 < cluster["idle_timeout_minutes"] <= 30


def test_gpu_workers_are_gpu_instances_with_the_gpu_visible(cluster):
    gpu = cluster["available_node_types"]["gpu_worker"]
    assert re.match(r"^(g4dn|g5|g6|g6e|p3|p4d|p5)\.", gpu["node_config"]["InstanceType"])
    assert "--gpus all" in gpu["docker"]["worker_run_options"]


def test_image_is_the_local_ray_version_and_not_ray_ml(cluster):
    images = [cluster["docker"]["image"]]
    images += [
        t.get("docker", {}).get("worker_image") for t in cluster["available_node_types"].values()
    ]
    for image in filter(None, images):
        assert "ray-ml" not in image and not image.endswith(":latest")
        # The laptop's `ray job submit` and the cluster must run the same Ray.
        assert image.startswith(f"rayproject/ray:{ray.__version__}-py3"), image
        assert image.endswith(("-gpu", "-cu121", "-cu124", "-cu128")), "GPU nodes need a CUDA image"


def test_setup_installs_the_gpu_builds_of_the_package_dependencies(cluster):
    (command,) = cluster["setup_commands"]
    check_mirrors_pyproject(pip_install_requirements(command), ray_pinned=True)
    assert "download.pytorch.org/whl/cpu" not in command


def test_token_auth_on_every_node_and_token_from_the_laptop(cluster):
    assert "-e RAY_AUTH_MODE=token" in cluster["docker"]["run_options"]
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = [c for c in cluster[key] if "ray start" in c]
        assert start and all("RAY_AUTH_MODE=token ray start" in c for c in start), key
    every_string = json.dumps(cluster)
    assert "RAY_AUTH_MODE=disabled" not in every_string
    assert cluster["file_mounts"][TOKEN_PATH_IN_CONTAINER] == "~/.ray/auth_token"


def test_no_port_is_opened_to_the_internet(cluster):
    rules = cluster["provider"].get("security_group", {}).get("IpPermissions", [])
    for rule in rules:
        cidrs = [r.get("CidrIp") for r in rule.get("IpRanges", [])]
        cidrs += [r.get("CidrIpv6") for r in rule.get("Ipv6Ranges", [])]
        assert not {"0.0.0.0/0", "::/0"} & set(cidrs), rule
        assert not rule.get("FromPort", 0) <= 8265 <= rule.get("ToPort", -1), (
            "dashboard port opened"
        )
    for spec in cluster["available_node_types"].values():
        assert spec["node_config"].get("AssociatePublicIpAddress") is not True


def test_nodes_get_s3_through_instance_roles_not_keys(cluster):
    assert "aws_credentials" not in cluster["provider"]
    for name, spec in cluster["available_node_types"].items():
        assert spec["node_config"].get("IamInstanceProfile"), f"{name} has no instance profile"
    assert cluster["provider"]["region"] in " ".join(cluster["docker"]["run_options"])


@pytest.mark.parametrize("path", [CLUSTER_YAML, RAYJOB_YAML], ids=["cluster.yaml", "rayjob.yaml"])
def test_no_credentials_in_deploy_files(path):
    text = path.read_text()
    for pattern in SECRET_PATTERNS:
        assert not re.search(pattern, text), f"{path.name} matches {pattern}"


# --- deploy/rayjob.yaml ------------------------------------------------------------------------


def test_rayjob_is_a_self_cleaning_ray_io_v1_job(rayjob):
    assert rayjob["apiVersion"] == "ray.io/v1"
    assert rayjob["kind"] == "RayJob"
    spec = rayjob["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] > 0
    assert spec["activeDeadlineSeconds"] > 0
    cluster_spec = spec["rayClusterSpec"]
    assert cluster_spec["rayVersion"] == ray.__version__
    assert cluster_spec["authOptions"]["mode"] == "token"
    assert cluster_spec["enableInTreeAutoscaling"] is True
    assert cluster_spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"


def rayjob_containers(rayjob: dict) -> dict[str, list[dict]]:
    cluster_spec = rayjob["spec"]["rayClusterSpec"]
    groups = {"head": cluster_spec["headGroupSpec"]}
    groups.update({g["groupName"]: g for g in cluster_spec["workerGroupSpecs"]})
    return {name: g["template"]["spec"]["containers"] for name, g in groups.items()}


def test_rayjob_has_cpu_and_gpu_worker_groups_from_zero(rayjob):
    groups = rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    gpus = {
        g["groupName"]: g["template"]["spec"]["containers"][0]["resources"]["limits"].get(
            "nvidia.com/gpu", 0
        )
        for g in groups
    }
    assert sorted(gpus.values())[0] == 0, "no CPU-only worker group"
    assert sorted(gpus.values())[-1] >= 1, "no worker group requests nvidia.com/gpu"
    for group in groups:
        assert group["minReplicas"] == 0 and group["maxReplicas"] >= 1
        resources = group["template"]["spec"]["containers"][0]["resources"]
        # Kubernetes needs GPU requests equal to limits; keep both explicit.
        assert resources["requests"].get("nvidia.com/gpu", 0) == resources["limits"].get(
            "nvidia.com/gpu", 0
        )


def test_rayjob_images_match_cluster_yaml_and_local_ray(rayjob, cluster):
    for group, containers in rayjob_containers(rayjob).items():
        for container in containers:
            assert container["image"] == cluster["docker"]["image"], group
            assert not any(
                e["name"] == "RAY_AUTH_TOKEN" and "value" in e for e in container.get("env", [])
            )


def test_rayjob_runtime_env_is_valid_for_ray(rayjob_runtime_env):
    assert set(rayjob_runtime_env) <= RuntimeEnv.known_fields
    RuntimeEnv(**rayjob_runtime_env)  # Ray's own checks: URI format, env var types, pip spec
    assert set(rayjob_runtime_env["excludes"]) >= REQUIRED_EXCLUDES
    assert rayjob_runtime_env["working_dir"].endswith(".zip")


def test_rayjob_pip_packages_mirror_pyproject(rayjob_runtime_env):
    packages = rayjob_runtime_env["pip"]["packages"]
    check_mirrors_pyproject([Requirement(p) for p in packages], ray_pinned=False)


def test_rayjob_and_cluster_yaml_pin_the_same_torch(rayjob_runtime_env, cluster):
    (command,) = cluster["setup_commands"]
    cluster_torch = next(r for r in pip_install_requirements(command) if r.name == "torch")
    job_torch = next(
        Requirement(p) for p in rayjob_runtime_env["pip"]["packages"] if p.startswith("torch")
    )
    assert cluster_torch.specifier == job_torch.specifier


def test_rayjob_entrypoint_is_a_valid_pipeline_command(rayjob):
    cfg = config_from_entrypoint(shlex.split(rayjob["spec"]["entrypoint"]))
    assert cfg.run.storage.startswith("s3://")
    assert cfg.text.finetune.use_gpu is True
    assert cfg.text.embed.num_gpus_per_actor > 0


# --- the documented `ray job submit` ----------------------------------------------------------


def test_documented_submit_commands_match_the_rayjob(rayjob_runtime_env):
    commands = documented_submit_commands()
    assert commands, (
        f"no `ray job submit` command in {[str(p.relative_to(REPO)) for p in DOC_FILES]}"
    )
    for argv in commands:
        options, entrypoint = argv[: argv.index("--")], argv[argv.index("--") + 1 :]
        assert options[options.index("--address") + 1] == "http://127.0.0.1:8265"
        assert options[options.index("--working-dir") + 1] == "."
        runtime_env = json.loads(options[options.index("--runtime-env-json") + 1])
        RuntimeEnv(**{**runtime_env, "working_dir": "."})
        assert set(runtime_env["excludes"]) == set(rayjob_runtime_env["excludes"])
        assert set(runtime_env["excludes"]) >= REQUIRED_EXCLUDES
        assert runtime_env.get("env_vars") == rayjob_runtime_env.get("env_vars")
        cfg = config_from_entrypoint(entrypoint)
        assert cfg.run.storage.startswith("s3://"), "a cluster run needs storage all nodes share"


def test_every_job_runtime_env_sets_the_job_environment(rayjob_runtime_env, cluster):
    """Ray Train's dashboard page needs RAY_TRAIN_ENABLE_STATE_TRACKING=1 wherever the job runs."""
    from clvray.cluster import JOB_ENV_VARS

    assert JOB_ENV_VARS["RAY_TRAIN_ENABLE_STATE_TRACKING"] == "1"
    assert JOB_ENV_VARS.items() <= rayjob_runtime_env["env_vars"].items()
    for argv in documented_submit_commands():
        runtime_env = json.loads(argv[argv.index("--runtime-env-json") + 1])
        assert JOB_ENV_VARS.items() <= runtime_env["env_vars"].items()
    run_options = cluster["docker"]["run_options"]
    for name, value in JOB_ENV_VARS.items():
        assert f"-e {name}={value}" in run_options
