"""Offline validation of KubeRay resources: the v1.7.0 CRD schemas applied as the API server would
with `kubectl --validate=strict`, and the rules the operator checks in its controller.

The CRDs come from MISTRAL_QA_KUBERAY_CRDS (default ../shared/kuberay/crds beside the repository).
As their README.txt says, a plain JSON-schema check needs three adjustments: required fields that
have a default are not required (the API server fills defaults first), nulls are dropped, and
`additionalProperties: false` goes wherever properties are listed (unknown fields are errors)
except under x-kubernetes-preserve-unknown-fields. CEL rules (x-kubernetes-validations) are not
evaluated; operator_errors() covers the operator's checks these manifests could break.
"""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CRDS = Path(os.environ.get("MISTRAL_QA_KUBERAY_CRDS") or ROOT.parent / "shared" / "kuberay" / "crds")
CRD_FILES = {
    "RayCluster": "ray.io_rayclusters.yaml",
    "RayJob": "ray.io_rayjobs.yaml",
    "RayService": "ray.io_rayservices.yaml",
}
load = functools.partial(yaml.load, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # the CRDs are 1 MB each


def strict(schema):
    """A CRD schema as `kubectl --validate=strict` applies it: unknown fields rejected where the
    schema lists properties (unless x-kubernetes-preserve-unknown-fields), and required fields that
    have a default not required (the API server fills defaults before validating)."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key in ("properties", "patternProperties"):
        if key in schema:
            out[key] = {name: strict(sub) for name, sub in schema[key].items()}
    for key in ("items", "additionalProperties", "not", "allOf", "anyOf", "oneOf"):
        if isinstance(schema.get(key), dict | list):
            out[key] = strict(schema[key])
    if "properties" in schema:
        if "additionalProperties" not in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
        if "required" in schema:
            out["required"] = [r for r in schema["required"] if "default" not in schema["properties"].get(r, {})]
    return out


@functools.cache
def validator(kind: str) -> jsonschema.Draft4Validator:
    path = CRDS / CRD_FILES[kind]
    if not path.is_file():
        pytest.fail(f"KubeRay CRD {path} not found: set MISTRAL_QA_KUBERAY_CRDS to the folder of the v1.7.0 CRDs")
    crd = load(path.read_text())
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    return jsonschema.Draft4Validator(strict(version["schema"]["openAPIV3Schema"]))


def drop_nulls(value):
    if isinstance(value, dict):
        return {k: drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [drop_nulls(v) for v in value]
    return value


def schema_errors(doc: dict) -> list[str]:
    if doc.get("apiVersion") != "ray.io/v1" or doc.get("kind") not in CRD_FILES:
        return [f"apiVersion/kind {doc.get('apiVersion')}/{doc.get('kind')} is not a ray.io/v1 KubeRay kind"]
    errors = validator(doc["kind"]).iter_errors(drop_nulls(doc))
    return [f"{'.'.join(map(str, e.absolute_path)) or '(top)'}: {e.message[:200]}" for e in errors]


def cluster_spec(doc: dict) -> dict:
    return {
        "RayCluster": lambda s: s,
        "RayJob": lambda s: s["rayClusterSpec"],
        "RayService": lambda s: s["rayClusterConfig"],
    }[doc["kind"]](doc["spec"])


def operator_errors(doc: dict) -> list[str]:
    """Rules KubeRay checks in its controller (utils/validation.go), not in the CRD schema."""
    errors, name, spec = [], doc["metadata"]["name"], doc["spec"]
    limit = 53 if doc["kind"] == "RayCluster" else 47
    if len(name) > limit or not re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name):
        errors.append(f"name {name!r}: DNS-1035 label of at most {limit} characters")
    if doc["kind"] == "RayJob":
        if spec.get("submissionMode", "K8sJobMode") not in ("K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"):
            errors.append(f"submissionMode {spec['submissionMode']!r}")
        if spec.get("ttlSecondsAfterFinished", 0) > 0 and not spec.get("shutdownAfterJobFinishes"):
            errors.append("ttlSecondsAfterFinished needs shutdownAfterJobFinishes: true")
        for key in ("activeDeadlineSeconds", "preRunningDeadlineSeconds"):
            if key in spec and spec[key] <= 0:
                errors.append(f"{key} must be > 0")
    for group in cluster_spec(doc).get("workerGroupSpecs", []):
        lo, hi = group.get("minReplicas", 0), group.get("maxReplicas", 2**31 - 1)
        if not lo <= group.get("replicas", lo) <= hi:
            errors.append(f"group {group['groupName']}: needs minReplicas <= replicas <= maxReplicas")
    for group in [cluster_spec(doc)["headGroupSpec"], *cluster_spec(doc).get("workerGroupSpecs", [])]:
        both = {"num-cpus": "CPU", "num-gpus": "GPU"}.items()
        if any(p in group.get("rayStartParams", {}) and r in group.get("resources", {}) for p, r in both):
            errors.append("num-cpus/num-gpus set in both rayStartParams and resources")
    return errors


# ---------------------------------------------------------------- the validator's own checks


MINIMAL_JOB = """
apiVersion: ray.io/v1
kind: RayJob
metadata: {name: sample}
spec:
  entrypoint: python job.py
  shutdownAfterJobFinishes: true
  ttlSecondsAfterFinished: 60
  rayClusterSpec:
    rayVersion: "2.60.0"
    headGroupSpec:
      rayStartParams: {}
      template:
        spec:
          containers:
            - name: ray-head
              image: rayproject/ray:2.60.0
              resources: {limits: {cpu: 1, memory: 2G}}
    workerGroupSpecs:
      - groupName: cpu
        template:
          spec:
            containers: [{name: ray-worker, image: "rayproject/ray:2.60.0"}]
"""


def test_a_kuberay_style_sample_validates():
    """Like KubeRay's own samples: integer quantities, no min/maxReplicas (required, but defaulted)."""
    doc = yaml.safe_load(MINIMAL_JOB)
    assert schema_errors(doc) == [] and operator_errors(doc) == []


def test_unknown_fields_and_wrong_types_are_errors_everywhere():
    doc = yaml.safe_load(MINIMAL_JOB)
    doc["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["imagePullPolicy"] = 3
    doc["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replica"] = 1
    doc["spec"]["suspend"] = None  # dropped, as the API server drops nulls
    errors = schema_errors(doc)
    assert (
        len(errors) == 2
        and "'replica' was unexpected" in " ".join(errors)
        and "not of type 'string'" in " ".join(errors)
    )


def test_preserve_unknown_fields_and_explicit_additional_properties_are_kept():
    schema = strict(
        {
            "type": "object",
            "properties": {
                "free": {"type": "object", "properties": {"a": {}}, "x-kubernetes-preserve-unknown-fields": True},
                "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                "fixed": {"type": "object", "properties": {"n": {"type": "integer", "default": 1}}, "required": ["n"]},
            },
        }
    )
    jsonschema.validate({"free": {"b": 1}, "labels": {"x": "y"}, "fixed": {}}, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"fixed": {"m": 1}}, schema)


def test_operator_rules():
    doc = yaml.safe_load(MINIMAL_JOB)
    doc["metadata"]["name"] = "Sample_Job"
    doc["spec"]["shutdownAfterJobFinishes"] = False
    doc["spec"]["activeDeadlineSeconds"] = 0
    doc["spec"]["rayClusterSpec"]["workerGroupSpecs"][0].update(minReplicas=3, maxReplicas=1)
    doc["spec"]["rayClusterSpec"]["headGroupSpec"].update(rayStartParams={"num-cpus": "0"}, resources={"CPU": "0"})
    assert len(operator_errors(doc)) == 5
