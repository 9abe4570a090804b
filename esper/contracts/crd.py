"""Generate the CustomResourceDefinitions from the pydantic models: `python -m esper.contracts.crd`.

Pydantic's JSON schema is not a *structural* schema: it uses `$ref`, `anyOf` with `null` for optional
fields, `const`, 2020-12 style exclusive bounds and `additionalProperties` beside `properties`. The
functions here rewrite it into what the API server accepts, then add what only a CRD has: the status
subresource, printer columns, CEL rules, selectable fields. `--check` fails when the files on disk
differ from the models (CI runs it), so the CRDs are never edited by hand.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from esper.blueprint.opdef import MAX_DIM
from esper.contracts.blueprint import BlueprintSpec, BlueprintStatus
from esper.contracts.common import API_GROUP, API_VERSION
from esper.contracts.kernel import KernelSpec, KernelStatus

Schema = dict[str, Any]

_KEEP = {
    "type",
    "description",
    "properties",
    "required",
    "items",
    "enum",
    "pattern",
    "minLength",
    "maxLength",
    "minItems",
    "maxItems",
    "maxProperties",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "format",
    "default",
    "x-kubernetes-preserve-unknown-fields",
    "x-kubernetes-int-or-string",
    "x-kubernetes-validations",
    "x-kubernetes-list-type",
}


def _resolve(node: Schema, defs: dict[str, Schema]) -> Schema:
    if "$ref" in node:
        target = defs[node["$ref"].rsplit("/", 1)[-1]]
        merged = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
        return _resolve(merged, defs)
    return node


def structural(node: Schema, defs: dict[str, Schema]) -> Schema:
    """Rewrite one pydantic JSON-schema node into a structural OpenAPI v3 schema node."""
    node = _resolve(node, defs)
    description = node.get("description")
    variants = node.get("anyOf") or node.get("oneOf")
    if variants:
        variants = [_resolve(v, defs) for v in variants if v.get("type") != "null"]
        types = {v.get("type") for v in variants}
        if len(variants) == 1:
            only = {**variants[0], **({"description": description} if description else {})}
            out: Schema = structural(only, defs)
            out.pop("default", None)
            return out
        if types <= {"integer", "string"}:
            out = {"x-kubernetes-int-or-string": True}
            strings = [
                e for v in variants if v.get("type") == "string" for e in v.get("enum", [v.get("const")])
            ]
            ints = [v for v in variants if v.get("type") == "integer"]
            rules = []
            if strings and ints:
                allowed = ", ".join(repr(s) for s in strings)
                low, high = ints[0].get("minimum"), ints[0].get("maximum")
                bounds = "".join(
                    f" && self {op} {bound}" for op, bound in ((">=", low), ("<=", high)) if bound is not None
                )
                what = f"an integer from {low} to {high}" if None not in (low, high) else "an integer"
                rules.append(
                    {
                        "rule": f"self in [{allowed}] || (type(self) == int{bounds})",
                        "message": f"must be {what} or one of {allowed}",
                    }
                )
            if rules:
                out["x-kubernetes-validations"] = rules
            if description:
                out["description"] = description
            return out
        raise ValueError(f"cannot express a union of {sorted(map(str, types))} structurally")
    out = {}
    if "const" in node:
        out["enum"] = [node["const"]]
        out["type"] = node.get("type", "string")
    for key, value in node.items():
        if key not in _KEEP:
            continue
        if key == "properties":
            out["properties"] = {name: structural(sub, defs) for name, sub in value.items()}
        elif key == "items":
            out["items"] = structural(value, defs)
        elif key == "exclusiveMinimum":
            out["minimum"], out["exclusiveMinimum"] = value, True
        elif key == "exclusiveMaximum":
            out["maximum"], out["exclusiveMaximum"] = value, True
        elif key == "default" and isinstance(value, dict | list):
            continue  # object defaults would need pruning rules of their own; the operator fills them
        else:
            out[key] = value
    if node.get("type") == "object" and "properties" not in node:
        out["x-kubernetes-preserve-unknown-fields"] = True
    if "type" not in out and "x-kubernetes-int-or-string" not in out:
        if "properties" in out:
            out["type"] = "object"
        elif "enum" in out:
            out["type"] = "string"
        else:  # Any: an arbitrary JSON value (op params)
            out["x-kubernetes-preserve-unknown-fields"] = True
    return out


def model_schema(model: type[BaseModel]) -> Schema:
    raw = model.model_json_schema(by_alias=True, mode="validation")
    return structural(raw, raw.get("$defs", {}))


def _printer(name: str, type_: str, path: str, *, priority: int = 0, description: str = "") -> Schema:
    column: Schema = {"name": name, "type": type_, "jsonPath": path}
    if priority:
        column["priority"] = priority
    if description:
        column["description"] = description
    return column


def _crd(
    *,
    kind: str,
    plural: str,
    short: list[str],
    spec: Schema,
    status: Schema,
    columns: list[Schema],
    description: str,
    selectable: list[str] | None = None,
) -> Schema:
    version: Schema = {
        "name": API_VERSION,
        "served": True,
        "storage": True,
        "subresources": {"status": {}},
        "additionalPrinterColumns": columns,
        "schema": {
            "openAPIV3Schema": {
                "type": "object",
                "description": description,
                "required": ["spec"],
                "properties": {
                    "apiVersion": {"type": "string", "description": "esper.dev/v1alpha1"},
                    "kind": {"type": "string", "description": kind},
                    "metadata": {"type": "object"},
                    "spec": spec,
                    "status": status,
                },
            }
        },
    }
    if selectable:
        version["selectableFields"] = [{"jsonPath": path} for path in selectable]
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{plural}.{API_GROUP}",
            "labels": {"app.kubernetes.io/name": "esper", "app.kubernetes.io/part-of": "esper"},
        },
        "spec": {
            "group": API_GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": kind,
                "listKind": f"{kind}List",
                "plural": plural,
                "singular": kind.lower(),
                "shortNames": short,
                "categories": ["esper"],
            },
            "versions": [version],
        },
    }


def _check_shapes(graph: Schema) -> None:
    """Shapes as `esper.blueprint.validate` reads them: 'batch' once and first, sizes 1..MAX_DIM.

    Without these rules the server stores `[64, batch, 0, -3]` and only the operator refuses it.
    """
    shape = graph["properties"]["inputs"]["items"]["properties"]["shape"]
    dim = shape["items"]
    dim["x-kubernetes-validations"] = [
        {
            "rule": f"self == 'batch' || (type(self) == int && self >= 1 && self <= {MAX_DIM})",
            "message": f"must be 'batch' or a size from 1 to {MAX_DIM}",
        }
    ]
    shape["x-kubernetes-validations"] = [
        {"rule": "self[0] == 'batch'", "message": "the first dimension must be 'batch'"},
        {
            "rule": "self.filter(d, d == 'batch').size() <= 1",
            "message": "'batch' may only be the first dimension",
        },
    ]


def blueprint_crd() -> Schema:
    spec = model_schema(BlueprintSpec)
    spec["x-kubernetes-validations"] = [
        {"rule": "has(self.template) != has(self.graph)", "message": "give exactly one of template or graph"},
    ]
    # Uniqueness is the server's own list-type check and emptiness its minItems: no CEL rule repeats
    # them (one mistake, one message). The default is the model's, so an omitted list reads the same.
    targets = spec["properties"]["targets"]
    targets["x-kubernetes-list-type"] = "set"
    targets["default"] = BlueprintSpec.model_fields["targets"].get_default(call_default_factory=True)
    _check_shapes(spec["properties"]["graph"])
    columns = [
        _printer("Phase", "string", ".status.phase", description="Derived from validation and Kernels."),
        _printer("Kernels", "string", ".status.kernelsSummary", description="Ready/total Kernels."),
        _printer("Serving", "string", ".status.servingSummary", description="Targets served/total."),
        _printer("Template", "string", ".spec.template.name"),
        _printer("Age", "date", ".metadata.creationTimestamp"),
        _printer("Revision", "integer", ".status.revision", priority=1),
        _printer("Digest", "string", ".status.digest", priority=1, description="IR digest."),
    ]
    return _crd(
        kind="Blueprint",
        plural="blueprints",
        short=["bp"],
        spec=spec,
        status=model_schema(BlueprintStatus),
        columns=columns,
        description="A neural module description that Esper compiles into Kernels, one per target.",
        selectable=[".spec.template.name", ".status.phase"],
    )


def kernel_crd() -> Schema:
    spec = model_schema(KernelSpec)
    spec["x-kubernetes-validations"] = [{"rule": "self == oldSelf", "message": "Kernel spec is immutable"}]
    _check_shapes(spec["properties"]["graph"])
    columns = [
        _printer("Blueprint", "string", ".status.requestedBy", description="Every Blueprint using it."),
        _printer("Target", "string", ".spec.target"),
        _printer("Phase", "string", ".status.phase"),
        _printer("Speedup", "number", ".status.report.speedup", description="Compiled over eager."),
        _printer("Age", "date", ".metadata.creationTimestamp"),
        _printer("Template", "string", ".spec.template", priority=1),
        _printer("Reason", "string", ".status.reason", priority=1),
        _printer("Size", "integer", ".status.artifact.size", priority=1, description="Bundle bytes."),
        _printer("Key", "string", ".spec.key", priority=1),
    ]
    return _crd(
        kind="Kernel",
        plural="kernels",
        short=["kn"],
        spec=spec,
        status=model_schema(KernelStatus),
        columns=columns,
        description="One compiled artifact of a Blueprint's graph for one target, stored in S3.",
        selectable=[".spec.blueprint", ".spec.target", ".spec.template", ".status.phase"],
    )


def render_all() -> dict[str, str]:
    """File name -> YAML text for every CRD."""
    header = "# Generated by `python -m esper.contracts.crd` from esper/contracts: do not edit.\n"
    out = {}
    for crd in (blueprint_crd(), kernel_crd()):
        text = yaml.safe_dump(crd, sort_keys=False, width=100)
        out[f"{crd['metadata']['name']}.yaml"] = header + text
    return out


ROOT = Path(__file__).resolve().parents[2]
DESTINATIONS = (ROOT / "crds", ROOT / "charts" / "esper" / "crds")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the files differ from the models")
    args = parser.parse_args(argv)
    stale = []
    for dest in DESTINATIONS:
        for name, text in render_all().items():
            path = dest / name
            current = path.read_text() if path.exists() else None
            if current == text:
                continue
            if args.check:
                stale.append(str(path.relative_to(ROOT)))
            else:
                dest.mkdir(parents=True, exist_ok=True)
                path.write_text(text)
                print(f"wrote {path.relative_to(ROOT)}")
    if stale:
        print("CRDs are stale, run `make crds`: " + ", ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
