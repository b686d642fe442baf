"""Every ``cluster/*.yaml`` is what KubeRay accepts and authenticates.

Checked against KubeRay's own CRDs (``tests/assets/kuberay``: ``ray.io_rayjobs.yaml`` and
``ray.io_rayclusters.yaml`` of KubeRay v1.7.0, commit 59d663ae, gzipped): every field titok sets exists
there with its type and enum, required fields are present, and unknown fields are errors (the API
server would drop them silently). Then KubeRay's rules for token auth (``validation.go``,
``SetContainerTokenAuthEnvVars``): ``authOptions.mode: token`` needs ``rayVersion`` >= 2.52.0, and the
operator then gives the token to the head, every worker and the job's submitter pod, skipping any
container that sets ``RAY_AUTH_MODE`` itself.
"""

from __future__ import annotations

import functools
import gzip
import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CRDS = REPO / "tests" / "assets" / "kuberay"
MANIFESTS = sorted((REPO / "cluster").glob("*.yaml"))


@functools.lru_cache
def _schema(kind: str) -> dict:
    crd = yaml.safe_load(gzip.decompress((CRDS / f"ray.io_{kind.lower()}s.yaml.gz").read_bytes()))
    assert crd["spec"]["names"]["kind"] == kind
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    return version["schema"]["openAPIV3Schema"]


_TYPES = {"string": str, "boolean": bool, "array": list, "object": dict, "number": (int, float)}


def schema_problems(value, schema: dict, path: str = "") -> list[str]:
    """Where ``value`` breaks an OpenAPI v3 structural schema as Kubernetes reads it."""
    if "anyOf" in schema:
        options = [schema_problems(value, option, path) for option in schema["anyOf"]]
        return [] if any(not p for p in options) else [f"{path}: {value!r} matches none of {schema['anyOf']}"]
    if schema.get("x-kubernetes-int-or-string"):
        return [] if isinstance(value, (int, str)) and not isinstance(value, bool) else [f"{path}: not an int or string"]
    kind = schema.get("type")
    if kind == "integer":
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = kind is None or (isinstance(value, _TYPES[kind]) and not (kind == "number" and isinstance(value, bool)))
    if not ok:
        return [f"{path}: {value!r} is not {kind}"]
    if "enum" in schema and value not in schema["enum"]:
        return [f"{path}: {value!r} is not one of {schema['enum']}"]
    problems = []
    if isinstance(value, dict):
        problems += [f"{path}.{name}: required" for name in schema.get("required", []) if name not in value]
        for key, item in value.items():
            if key in schema.get("properties", {}):
                problems += schema_problems(item, schema["properties"][key], f"{path}.{key}")
            elif isinstance(schema.get("additionalProperties"), dict):
                problems += schema_problems(item, schema["additionalProperties"], f"{path}.{key}")
            elif not schema.get("x-kubernetes-preserve-unknown-fields") and path != ".metadata":  # ObjectMeta: no schema
                problems.append(f"{path}.{key}: unknown field")
    if isinstance(value, list):
        for i, item in enumerate(value):
            problems += schema_problems(item, schema.get("items", {}), f"{path}[{i}]")
    return problems


def test_every_cluster_manifest_is_checked():
    assert {p.name for p in MANIFESTS} == {"kuberay-raycluster.yaml", "kuberay-rayjob-llama70b.yaml",
                                           "kuberay-rayjob-zoo.yaml"}


@pytest.mark.parametrize("manifest", MANIFESTS, ids=lambda p: p.name)
def test_a_cluster_manifest_is_what_kuberays_crd_accepts(manifest):
    resource = yaml.safe_load(manifest.read_text())
    assert resource["apiVersion"] == "ray.io/v1" and resource["kind"] in ("RayJob", "RayCluster")
    assert schema_problems(resource, _schema(resource["kind"])) == []


def test_the_schema_check_finds_what_kuberay_would_refuse_or_drop():
    """The checker itself: a misspelt field, a wrong type, a bad enum and a missing required field."""
    import copy

    schema = copy.deepcopy(_schema("RayJob"))
    job = yaml.safe_load((REPO / "cluster" / "kuberay-rayjob-zoo.yaml").read_text())
    spec = job["spec"]["rayClusterSpec"]
    spec["authOptions"]["mode"] = "tokens"
    spec["rayVersoin"] = "2.60.0"
    spec["workerGroupSpecs"][0]["replicas"] = "1"
    del spec["headGroupSpec"]["template"]["spec"]["containers"][0]["name"]
    problems = schema_problems(job, schema)
    assert len(problems) == 4, problems
    assert any("authOptions.mode: 'tokens' is not one of" in p for p in problems)
    assert any(p.endswith("rayVersoin: unknown field") for p in problems)
    assert any("replicas: '1' is not integer" in p for p in problems)
    assert any(p.endswith("containers[0].name: required") for p in problems)


def _ray_pin() -> str:
    text = (REPO / "cluster" / "requirements-gpu.txt").read_text()
    return re.search(r"^ray\[[^\]]*\]==([\d.]+)", text, flags=re.MULTILINE).group(1)


def _pods(cluster_spec: dict, job_spec: dict | None) -> dict[str, dict]:
    pods = {"head": cluster_spec["headGroupSpec"]["template"]}
    pods |= {f"worker group {g['groupName']}": g["template"] for g in cluster_spec.get("workerGroupSpecs", [])}
    if job_spec is not None and job_spec.get("submissionMode", "K8sJobMode") == "K8sJobMode":
        pods["submitter"] = job_spec.get("submitterPodTemplate", {})  # KubeRay's default submitter if absent
    return pods


@pytest.mark.parametrize("manifest", MANIFESTS, ids=lambda p: p.name)
def test_every_pod_that_talks_to_ray_gets_the_token(manifest):
    """KubeRay's rule: with authOptions.mode token (Ray >= 2.52.0) the operator sets RAY_AUTH_MODE and
    RAY_AUTH_TOKEN (from secretName) on every Ray container and on the submitter, except where a
    container sets RAY_AUTH_MODE itself; the Ray version is the image's (requirements-gpu.txt)."""
    resource = yaml.safe_load(manifest.read_text())
    job = resource["spec"] if resource["kind"] == "RayJob" else None
    cluster = job["rayClusterSpec"] if job else resource["spec"]
    assert cluster.get("rayVersion") == _ray_pin()
    assert tuple(int(x) for x in cluster["rayVersion"].split(".")) >= (2, 52, 0)
    auth = cluster.get("authOptions", {})
    assert auth.get("mode") == "token" and auth.get("secretName") == "titok-ray-token"
    assert "kubectl create secret generic titok-ray-token" in manifest.read_text()  # the file says how to make it
    for name, pod in _pods(cluster, job).items():
        for container in pod.get("spec", {}).get("containers", []):
            own = {e["name"]: e for e in container.get("env", [])}
            assert "RAY_AUTH_MODE" not in own and "RAY_AUTH_TOKEN" not in own, \
                f"{name}: a hand-set token env stops KubeRay from setting its own ({manifest.name})"
