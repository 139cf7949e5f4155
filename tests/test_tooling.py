"""The install lock, the lint hooks and the test tiers agree with what they claim to cover."""

from __future__ import annotations

import re
import sys

import pytest
import yaml
from packaging.requirements import Requirement

from tests.conftest import REPO, tier_markers

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

LOCKED_EXTRAS = ("cpu", "test", "tracking")  # what `make setup` installs; see Makefile


def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def _lock() -> dict[str, str]:
    """{normalized name: pinned version} of requirements.lock."""
    pins = {}
    for line in (REPO / "requirements.lock").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        req = Requirement(line)
        (spec,) = req.specifier
        assert spec.operator == "==", f"not pinned: {line}"
        pins[_norm(req.name)] = spec.version
    return pins


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_lock_pins_every_requirement_inside_its_range() -> None:
    project = _pyproject()["project"]
    wanted = [Requirement(r) for r in project["dependencies"]]
    for extra in LOCKED_EXTRAS:
        wanted += [Requirement(r) for r in project["optional-dependencies"][extra]]
    pins = _lock()
    for req in wanted:
        if req.name == "torch":
            continue  # installed by TORCH_SPEC, not from the lock
        name = _norm(req.name)
        assert name in pins, f"{req.name} is in pyproject.toml but not in requirements.lock"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"{req.name}=={pins[name]} in the lock is outside pyproject's {req.specifier}: "
            "run `make lock`"
        )


def test_lock_is_the_cpu_environment_without_torch() -> None:
    pins = _lock()
    assert "torch" not in pins, "torch comes from TORCH_SPEC (CPU build), never the lock"
    assert not [n for n in pins if n.startswith("nvidia-")], "CUDA packages in the CPU lock"
    assert "xgboost" not in pins and "xgboost-cpu" in pins
    # torch's own dependencies are locked (pip installs torch with --no-deps)
    assert {"sympy", "networkx", "filelock", "jinja2"} <= set(pins)


def test_lock_ray_is_the_cluster_image_ray() -> None:
    cluster = yaml.safe_load((REPO / "cluster.yaml").read_text())
    image_version = cluster["docker"]["image"].split(":")[1].split("-")[0]
    assert _lock()["ray"] == image_version


def test_pre_commit_runs_the_make_lint_commands() -> None:
    """Same tools, same arguments: pre-commit passes the changed files where `make lint`
    passes `.` (ruff), and both check the whole package with mypy."""
    config = yaml.safe_load((REPO / ".pre-commit-config.yaml").read_text())
    hooks = [
        h["entry"].replace(" --force-exclude", "") for r in config["repos"] for h in r["hooks"]
    ]
    lint = (REPO / "Makefile").read_text().split("\nlint:", 1)[1].split("\n\n", 1)[0]
    recipe = [
        line.strip().replace("$(BIN)/", ".venv/bin/").removesuffix(" .")
        for line in lint.splitlines()[1:]
    ]
    assert (
        hooks
        == recipe
        == [
            ".venv/bin/ruff check",
            ".venv/bin/ruff format --check",
            ".venv/bin/mypy clvray",
        ]
    )


@pytest.mark.parametrize(
    ("fixtures", "markers", "tiers"),
    [
        ((), (), set()),
        (("tmp_path", "tiny_encoder"), (), set()),
        (("ray_local", "tmp_path"), ("slow",), {"integration"}),
        (("pipeline_run", "ray_local", "tiny_encoder"), (), {"integration", "e2e"}),
        (("ray_head", "tmp_path"), ("cluster",), {"integration", "e2e"}),
        (("tmp_path",), ("cluster",), {"integration"}),
    ],
)
def test_tiers_follow_the_fixtures(fixtures, markers, tiers) -> None:
    assert tier_markers(fixtures, set(markers)) == tiers


@pytest.mark.parametrize(
    "doc", ["README.md", "deploy/README.md", "cluster.yaml", "deploy/rayjob.yaml", "Makefile"]
)
def test_repository_paths_named_in_the_docs_exist(doc) -> None:
    """One source of truth: a doc that names a file of this repository names one that exists
    (docs/CLUSTER.md was merged into README.md; nothing may point at it)."""
    text = (REPO / doc).read_text()
    named = set(
        re.findall(
            r"(?<![\w/~.<:-])((?:\.\./)?[\w-]+(?:/[\w.-]+)+\.(?:md|ya?ml|py|txt|lock|toml))\b", text
        )
    )
    # relative to the doc's folder (`../README.md`) or, as the docs write them, to the root
    here = (REPO / doc).parent
    missing = sorted(p for p in named if not ((here / p).exists() or (REPO / p).exists()))
    assert not missing, f"{doc} names files that do not exist: {missing}"
