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
    assert version["selectableFields"] == [
        {"jsonPath": p} for p in (".spec.blueprint", ".spec.target", ".spec.template", ".status.phase")
    ]
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
    assert [c["name"] for c in version["additionalPrinterColumns"]] == [
        "Phase", "Kernels", "Serving", "Template", "Age", "Revision", "Digest",
    ]  # fmt: skip
    assert version["selectableFields"] == [{"jsonPath": ".spec.template.name"}, {"jsonPath": ".status.phase"}]
    history = spec["properties"]["historyLimit"]
    assert (history["default"], history["minimum"], history["maximum"]) == (3, 0, 10)


def test_blueprint_targets_default_to_the_model_and_carry_no_duplicate_rules() -> None:
    from esper.contracts.blueprint import BlueprintSpec

    spec = crd.blueprint_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    targets = spec["properties"]["targets"]
    assert targets["default"] == BlueprintSpec(template={"name": "mlp"}).targets == ["cpu"]
    # minItems and the set list type are the server's own checks: a CEL rule would repeat their error.
    assert "x-kubernetes-validations" not in targets


def test_shape_rules_in_both_crds() -> None:
    for doc in (crd.blueprint_crd(), crd.kernel_crd()):
        spec = doc["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
        shape = spec["properties"]["graph"]["properties"]["inputs"]["items"]["properties"]["shape"]
        assert [r["message"] for r in shape["x-kubernetes-validations"]] == [
            "the first dimension must be 'batch'",
            "'batch' may only be the first dimension",
        ]
        (dim_rule,) = shape["items"]["x-kubernetes-validations"]
        assert dim_rule["message"] == "must be 'batch' or a size from 1 to 65536"
