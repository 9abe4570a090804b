"""The CRDs are generated from the models, structural, and current."""

from __future__ import annotations

from typing import Any

import yaml

from esper.contracts import crd


def _walk(node: Any, path: str = ""):
    if isinstance(node, dict):
        yield path, node
        for key, value in node.items():
            yield from _walk(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _walk(value, f"{path}[{i}]")


def test_files_on_disk_match_the_models() -> None:
    assert crd.main(["--check"]) == 0


def test_schemas_are_structural() -> None:
    for text in crd.render_all().values():
        doc = yaml.safe_load(text)
        schema = doc["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
        for path, node in _walk(schema):
            for banned in ("$ref", "anyOf", "oneOf", "allOf", "const", "$defs", "title"):
                assert banned not in node, f"{banned} at {path}"
            if "properties" in node:
                assert "additionalProperties" not in node, path
            if "properties" in node or "items" in node:
                assert node.get("type") in ("object", "array"), path
        props = schema["properties"]["spec"]["properties"]
        for name, sub in props.items():
            assert sub.get("description"), f"spec.{name} lacks a description"


def test_kernel_crd_guards_users() -> None:
    doc = crd.kernel_crd()
    version = doc["spec"]["versions"][0]
    spec = version["schema"]["openAPIV3Schema"]["properties"]["spec"]
    assert {"rule": "self == oldSelf", "message": "Kernel spec is immutable"} in spec[
        "x-kubernetes-validations"
    ]
    assert version["selectableFields"] == [{"jsonPath": ".spec.blueprint"}, {"jsonPath": ".spec.target"}]
    assert version["subresources"] == {"status": {}}
    assert [c["name"] for c in version["additionalPrinterColumns"]][:5] == [
        "Blueprint",
        "Target",
        "Phase",
        "Speedup",
        "Age",
    ]
    assert doc["spec"]["names"]["categories"] == ["esper"]


def test_blueprint_crd_rules() -> None:
    version = crd.blueprint_crd()["spec"]["versions"][0]
    spec = version["schema"]["openAPIV3Schema"]["properties"]["spec"]
    rules = [r["rule"] for r in spec["x-kubernetes-validations"]]
    assert "has(self.template) != has(self.graph)" in rules
    targets = spec["properties"]["targets"]
    assert (
        targets["minItems"] == 1 and targets["maxItems"] == 8 and targets["x-kubernetes-list-type"] == "set"
    )
    assert [c["name"] for c in version["additionalPrinterColumns"]] == ["Phase", "Kernels", "Age", "Digest"]
