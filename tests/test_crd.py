"""Every KubeRay manifest in deploy/ against the real CRD schemas (../shared/schemas/kuberay/).

As the schemas' README says: the manifest is validated with JSON Schema against the CRD
version matching its apiVersion (types, enums, required fields), and then walked against the
schema's `properties`, because Kubernetes also rejects a field the schema does not declare
(strict validation in `kubectl apply`) unless `x-kubernetes-preserve-unknown-fields` is set.
A misspelt field therefore fails here, not on the cluster. Every KubeRay release in the
schemas folder is checked: the manifests claim to work from the oldest one on.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import jsonschema
import pytest
import yaml

from tests.conftest import REPO

SCHEMAS = REPO.parent / "shared" / "schemas" / "kuberay"
CRD_FILES = {
    "RayJob": "ray.io_rayjobs.yaml",
    "RayService": "ray.io_rayservices.yaml",
    "RayCluster": "ray.io_rayclusters.yaml",
}
RELEASES = sorted(p.name for p in SCHEMAS.glob("v*")) if SCHEMAS.is_dir() else []


def kuberay_manifests() -> list[Path]:
    """deploy/*.yaml files that are KubeRay custom resources (apiVersion ray.io/...)."""
    out = []
    for path in sorted((REPO / "deploy").glob("*.yaml")):
        doc = yaml.safe_load(path.read_text())
        if isinstance(doc, dict) and str(doc.get("apiVersion", "")).startswith("ray.io/"):
            out.append(path)
    return out


@functools.cache
def crd_schema(release: str, kind: str, api_version: str) -> dict:
    """The CRD's schema for `api_version`, parsed once per session (a CRD file is megabytes of
    YAML: parsing it per test cost ~10 s each); callers only read it."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    crd = yaml.load((SCHEMAS / release / CRD_FILES[kind]).read_text(), Loader=loader)
    version = api_version.split("/", 1)[1]
    for v in crd["spec"]["versions"]:
        if v["name"] == version:
            return v["schema"]["openAPIV3Schema"]
    raise AssertionError(f"{CRD_FILES[kind]} ({release}) has no version {version}")


def undeclared_fields(value, schema: dict, path: str = "") -> list[str]:
    """Paths of the fields in `value` that `schema` does not declare (Kubernetes' strict
    field validation), following properties, additionalProperties and items."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    out: list[str] = []
    if isinstance(value, dict):
        props = schema.get("properties")
        extra = schema.get("additionalProperties")
        if props is None and not isinstance(extra, dict):
            # An object declared without properties (metadata, free-form): nothing to walk.
            return []
        for key, item in value.items():
            if props is not None and key in props:
                out += undeclared_fields(item, props[key], f"{path}.{key}")
            elif isinstance(extra, dict):
                out += undeclared_fields(item, extra, f"{path}.{key}")
            else:
                out.append(f"{path}.{key}")
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            out += undeclared_fields(item, schema["items"], f"{path}[{i}]")
    return out


def validate_manifest(doc: dict, release: str) -> None:
    """Raise jsonschema.ValidationError (schema rules) or ValueError (undeclared fields)."""
    schema = crd_schema(release, doc["kind"], doc["apiVersion"])
    jsonschema.Draft7Validator(schema).validate(doc)
    unknown = undeclared_fields(doc, schema)
    if unknown:
        raise ValueError(f"fields not declared by the {doc['kind']} CRD ({release}): {unknown}")


@pytest.fixture(scope="module", autouse=True)
def _schemas_present():
    if not RELEASES:
        pytest.skip(f"KubeRay CRD schemas not found at {SCHEMAS} (see its README)")


def test_deploy_holds_the_rayjob_and_the_rayservice():
    kinds = {yaml.safe_load(p.read_text())["kind"] for p in kuberay_manifests()}
    assert {"RayJob", "RayService"} <= kinds


@pytest.mark.parametrize("release", RELEASES)
@pytest.mark.parametrize("path", kuberay_manifests(), ids=lambda p: p.name)
def test_manifest_is_valid_against_the_crd(path, release):
    validate_manifest(yaml.safe_load(path.read_text()), release)


def _cluster(doc: dict) -> dict:
    spec = doc["spec"]
    return spec.get("rayClusterSpec") or spec["rayClusterConfig"]


def _gpu_pod(doc: dict) -> dict:
    groups = _cluster(doc)["workerGroupSpecs"]
    return next(g for g in groups if g["groupName"] == "gpu")["template"]


@pytest.mark.parametrize("path", kuberay_manifests(), ids=lambda p: p.name)
@pytest.mark.parametrize(
    "mutate, error",
    [
        # misspelt field deep in the pod template
        (lambda d: _gpu_pod(d)["spec"].update(toleration=[]), ValueError),
        # misspelt field at the top of the spec
        (lambda d: d["spec"].update(shutdownAfterJobFinish=True), ValueError),
        # wrong types
        (lambda d: _cluster(d).update(rayVersion=2.6), jsonschema.ValidationError),
        (
            lambda d: _gpu_pod(d)["spec"]["containers"][0].update(ports="8000"),
            jsonschema.ValidationError,
        ),
        # a required field missing (a container's name)
        (lambda d: _gpu_pod(d)["spec"]["containers"][0].pop("name"), jsonschema.ValidationError),
        # not in an enum
        (
            lambda d: _cluster(d)["autoscalerOptions"].update(upscalingMode="Fast"),
            jsonschema.ValidationError,
        ),
        (lambda d: _cluster(d)["authOptions"].update(mode="password"), jsonschema.ValidationError),
    ],
    ids=[
        "misspelt-pod-field",
        "misspelt-spec-field",
        "type",
        "type-deep",
        "required",
        "enum",
        "enum-auth",
    ],
)
def test_a_broken_manifest_fails(path, mutate, error):
    doc = copy.deepcopy(yaml.safe_load(path.read_text()))
    mutate(doc)
    for release in RELEASES:
        with pytest.raises(error):
            validate_manifest(doc, release)


def test_rayservice_runs_the_serve_config_from_a_model_run_on_s3():
    """deploy/rayservice.yaml embeds deploy/serve.yaml's applications, which Ray Serve's own
    schema and clvray's settings accept, with the model run on S3."""
    from ray.serve.schema import ServeDeploySchema

    from clvray.serve import ServeSettings

    service = yaml.safe_load((REPO / "deploy" / "rayservice.yaml").read_text())
    embedded = yaml.safe_load(service["spec"]["serveConfigV2"])
    serve_yaml = yaml.safe_load((REPO / "deploy" / "serve.yaml").read_text())
    assert embedded["applications"] == serve_yaml["applications"]
    for config in (embedded, serve_yaml):
        ServeDeploySchema.model_validate(config)
    (app,) = embedded["applications"]
    assert app["import_path"] == "clvray.serve:build_app"
    settings = ServeSettings.model_validate(app["args"])
    assert settings.model_run.startswith("s3://")
    assert app["runtime_env"]["working_dir"].startswith("s3://")
