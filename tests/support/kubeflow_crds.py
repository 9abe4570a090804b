"""CRDs for Kubeflow's training kinds, for the real API server (`../shared/k8s`), built at test time.

The projects' own CRDs are not vendored here; these cover the fields Esper's injector and examples
use, with the **pod template schema of Kubernetes itself**: `PodTemplateSpec` v1.36 from the JSON
schemas `kubernetes-validate` ships, converted to a structural CRD schema (descriptions dropped,
nullable unions reduced to their type, int-or-string marked as such). So the server checks every field
of an injected sidecar (native-sidecar `restartPolicy`, probes, security context, projected token
volume) as it checks a Pod's, and strict field validation refuses any field a pod template does not
have.

- `pytorchjobs.kubeflow.org` v1 (Training Operator v1): `spec.pytorchReplicaSpecs.<Master|Worker>`
  = {replicas, restartPolicy, template}, `spec.nprocPerNode`, `spec.runPolicy` kept as an open object.
- `trainingruntimes.trainer.kubeflow.org` v1alpha1 (Trainer v2): `spec.mlPolicy` {numNodes, torch},
  `spec.template.spec.replicatedJobs[]` = {name, replicas, template: {metadata, spec: {template}}}
  (a JobSet's replicated Jobs, list-map keyed by name).
- `trainjobs.trainer.kubeflow.org` v1alpha1: `spec.runtimeRef` {name (required), apiGroup, kind},
  `spec.trainer` {image, command, args, env, numNodes, resourcesPerNode}.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import kubernetes_validate

K8S_SCHEMA_VERSION = "v1.36.0-local"
_OPEN = {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
_KEEP = ("format", "enum", "required", "x-kubernetes-list-type", "x-kubernetes-list-map-keys",
         "x-kubernetes-map-type")  # fmt: skip


@functools.cache
def _definitions() -> dict[str, Any]:
    root = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema" / K8S_SCHEMA_VERSION
    return json.loads((root / "_definitions.json").read_text())["$defs"]


def _structural(node: dict[str, Any], depth: int = 0) -> dict[str, Any]:
    """A Kubernetes JSON schema node -> a structural OpenAPI v3 CRD schema node."""
    if depth > 40:
        raise ValueError("schema nesting too deep (a recursive definition?)")
    if "$ref" in node:
        name = node["$ref"].rsplit("/", 1)[-1]
        return _structural(_definitions()[name], depth + 1)
    if "oneOf" in node:  # IntOrString and Quantity: string or number
        return {"x-kubernetes-int-or-string": True}
    out: dict[str, Any] = {}
    t = node.get("type")
    if isinstance(t, list):
        t = next(x for x in t if x != "null")
    if t is not None:
        out["type"] = t
    if "properties" in node:
        out["type"] = "object"
        out["properties"] = {k: _structural(v, depth + 1) for k, v in node["properties"].items()}
    if isinstance(node.get("additionalProperties"), dict):
        out["additionalProperties"] = _structural(node["additionalProperties"], depth + 1)
    if "items" in node:
        out["items"] = _structural(node["items"], depth + 1)
    for k in _KEEP:
        if k in node:
            out[k] = node[k]
    for key in out.get("x-kubernetes-list-map-keys", ()):
        # The API server wants a list-map key required or defaulted, as the built-in types do.
        item = out.get("items", {})
        if key not in item.get("required", ()) and key in item.get("properties", {}):
            item["properties"][key]["default"] = "TCP" if key == "protocol" else ""
    if out.get("type") == "object" and "properties" not in out and "additionalProperties" not in out:
        out["x-kubernetes-preserve-unknown-fields"] = True  # e.g. an empty emptyDir: {}
    return out


@functools.cache
def pod_template_schema() -> dict[str, Any]:
    """Kubernetes' PodTemplateSpec as a CRD schema; template metadata keeps labels and annotations."""
    spec = _structural({"$ref": "#/io.k8s.api.core.v1.PodSpec"})
    strings = {"type": "object", "additionalProperties": {"type": "string"}}
    meta = {"type": "object", "properties": {"labels": strings, "annotations": strings}}
    return {"type": "object", "properties": {"metadata": meta, "spec": spec}}


def _crd(group: str, version: str, kind: str, plural: str, spec: dict[str, Any]) -> dict[str, Any]:
    schema = {
        "type": "object",
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": spec,
            "status": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
        },
    }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{group}"},
        "spec": {
            "group": group,
            "names": {"kind": kind, "listKind": f"{kind}List", "plural": plural, "singular": kind.lower()},
            "scope": "Namespaced",
            "versions": [{"name": version, "served": True, "storage": True,
                          "schema": {"openAPIV3Schema": schema}, "subresources": {"status": {}}}],
        },
    }  # fmt: skip


def _env() -> dict[str, Any]:
    return {"type": "array", "items": _structural({"$ref": "#/io.k8s.api.core.v1.EnvVar"}),
            "x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]}  # fmt: skip


def pytorchjob_crd() -> dict[str, Any]:
    replica = {
        "type": "object",
        "properties": {
            "replicas": {"type": "integer", "format": "int32"},
            "restartPolicy": {"type": "string", "enum": ["Always", "OnFailure", "Never", "ExitCode"]},
            "template": pod_template_schema(),
        },
    }
    spec = {
        "type": "object",
        "required": ["pytorchReplicaSpecs"],
        "properties": {
            "nprocPerNode": {"type": "string"},
            "pytorchReplicaSpecs": {"type": "object", "additionalProperties": replica},
            "runPolicy": _OPEN,
        },
    }
    return _crd("kubeflow.org", "v1", "PyTorchJob", "pytorchjobs", spec)


def trainingruntime_crd() -> dict[str, Any]:
    job = {
        "type": "object",
        "required": ["name"],
        "properties": {
            "name": {"type": "string"},
            "replicas": {"type": "integer", "format": "int32"},
            "dependsOn": {"type": "array", "items": _OPEN},
            "template": {
                "type": "object",
                "properties": {
                    "metadata": pod_template_schema()["properties"]["metadata"],
                    "spec": {"type": "object", "properties": {"template": pod_template_schema()}},
                },
            },
        },
    }
    spec = {
        "type": "object",
        "properties": {
            "mlPolicy": {
                "type": "object",
                "properties": {
                    "numNodes": {"type": "integer", "format": "int32"},
                    "torch": {"type": "object",
                              "properties": {"numProcPerNode": {"x-kubernetes-int-or-string": True}}},
                },
            },
            "template": {
                "type": "object",
                "properties": {
                    "spec": {
                        "type": "object",
                        "properties": {
                            "replicatedJobs": {"type": "array", "items": job, "x-kubernetes-list-type": "map",
                                               "x-kubernetes-list-map-keys": ["name"]},
                        },
                    },
                },
            },
        },
    }  # fmt: skip
    return _crd("trainer.kubeflow.org", "v1alpha1", "TrainingRuntime", "trainingruntimes", spec)


def trainjob_crd() -> dict[str, Any]:
    spec = {
        "type": "object",
        "required": ["runtimeRef"],
        "properties": {
            "runtimeRef": {
                "type": "object",
                "required": ["name"],
                "properties": {
                    "name": {"type": "string"},
                    "apiGroup": {"type": "string"},
                    "kind": {"type": "string", "enum": ["TrainingRuntime", "ClusterTrainingRuntime"]},
                },
            },
            "trainer": {
                "type": "object",
                "properties": {
                    "image": {"type": "string"},
                    "command": {"type": "array", "items": {"type": "string"}},
                    "args": {"type": "array", "items": {"type": "string"}},
                    "env": _env(),
                    "numNodes": {"type": "integer", "format": "int32"},
                    "resourcesPerNode": _structural({"$ref": "#/io.k8s.api.core.v1.ResourceRequirements"}),
                },
            },
        },
    }  # fmt: skip
    return _crd("trainer.kubeflow.org", "v1alpha1", "TrainJob", "trainjobs", spec)


def all_crds() -> list[dict[str, Any]]:
    return [pytorchjob_crd(), trainingruntime_crd(), trainjob_crd()]
