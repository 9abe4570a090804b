"""Every CEL rule of the CRDs, evaluated: one value it must admit and one it must refuse.

Kubernetes evaluates `x-kubernetes-validations` with cel-go; here a CEL implementation from PyPI
(`common-expression-language`, with the same heterogeneous equality) evaluates each rule as generated
from the models and as written to crds/. The cases are keyed by where a rule sits and what it says, not
by its text: a rule whose logic changes (inverted, loosened) while its message stays is caught by its
cases, and a new rule without cases fails `test_every_rule_has_cases`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cel
import pytest
import yaml

from esper.contracts.crd import blueprint_crd, kernel_crd

CRDS = Path(__file__).resolve().parents[2] / "crds"
Rule = tuple[str, str, str]  # (kind, schema path, message)

SPEC_GRAPH = {"inputs": [{"name": "x", "shape": ["batch", 4]}], "nodes": [], "outputs": ["x"]}
TEMPLATE = {"name": "mlp", "params": {"features": 4}}

# (variables the rule must admit, variables it must refuse), per rule.
CASES: dict[Rule, tuple[list[dict[str, Any]], list[dict[str, Any]]]] = {
    ("Blueprint", "spec", "give exactly one of template or graph"): (
        [{"self": {"template": TEMPLATE}}, {"self": {"graph": SPEC_GRAPH, "targets": ["cpu"]}}],
        [{"self": {"template": TEMPLATE, "graph": SPEC_GRAPH}}, {"self": {"targets": ["cpu"]}}],
    ),
    ("Kernel", "spec", "Kernel spec is immutable"): (
        [{"self": {"key": "a", "target": "cpu"}, "oldSelf": {"key": "a", "target": "cpu"}}],
        [
            {"self": {"key": "b", "target": "cpu"}, "oldSelf": {"key": "a", "target": "cpu"}},
            {
                "self": {"key": "a", "target": "cpu", "blueprint": "x"},
                "oldSelf": {"key": "a", "target": "cpu"},
            },
        ],
    ),
}
for _kind in ("Blueprint", "Kernel"):
    CASES[(_kind, "spec.graph.inputs[].shape[]", "must be 'batch' or a size from 1 to 65536")] = (
        [{"self": "batch"}, {"self": 1}, {"self": 64}, {"self": 65536}],
        [{"self": 0}, {"self": -3}, {"self": 65537}, {"self": "Batch"}, {"self": "64"}, {"self": ""}],
    )
    CASES[(_kind, "spec.graph.inputs[].shape", "the first dimension must be 'batch'")] = (
        [{"self": ["batch"]}, {"self": ["batch", 4, 8]}],
        [{"self": [4, "batch"]}, {"self": [64]}],
    )
    CASES[(_kind, "spec.graph.inputs[].shape", "'batch' may only be the first dimension")] = (
        [{"self": ["batch", 4]}, {"self": [4, 8]}],
        [{"self": ["batch", 4, "batch"]}, {"self": ["batch", "batch"]}],
    )


def _rules(crd: dict[str, Any]) -> dict[Rule, str]:
    """(kind, path, message) -> rule text, for every x-kubernetes-validations entry of every version."""
    kind = crd["spec"]["names"]["kind"]
    out: dict[Rule, str] = {}

    def walk(node: Any, path: str) -> None:
        if not isinstance(node, dict):
            return
        for rule in node.get("x-kubernetes-validations", []):
            where = (kind, path, rule["message"])
            assert out.setdefault(where, rule["rule"]) == rule["rule"], f"two rules at {where}"
        for name, child in (node.get("properties") or {}).items():
            walk(child, f"{path}.{name}" if path else name)
        walk(node.get("items"), f"{path}[]")
        walk(node.get("additionalProperties"), f"{path}{{}}")

    for version in crd["spec"]["versions"]:
        walk(version["schema"]["openAPIV3Schema"], "")
    return out


def _generated() -> dict[Rule, str]:
    return {**_rules(blueprint_crd()), **_rules(kernel_crd())}


def test_the_files_carry_the_generated_rules() -> None:
    on_disk: dict[Rule, str] = {}
    for path in sorted(CRDS.glob("*.yaml")):
        on_disk.update(_rules(yaml.safe_load(path.read_text())))
    assert on_disk == _generated()


def test_every_rule_has_cases() -> None:
    assert set(_generated()) == set(CASES)


@pytest.mark.parametrize("where", sorted(CASES), ids=lambda w: f"{w[0]}:{w[1]}:{w[2]}")
def test_rule_admits_and_refuses(where: Rule) -> None:
    rule = _generated().get(where)
    if rule is None:
        pytest.fail(f"no rule at {where}")
    admitted, refused = CASES[where]
    program = cel.compile(rule)
    for variables in admitted:
        assert program.execute(variables) is True, (rule, variables)
    for variables in refused:
        assert program.execute(variables) is False, (rule, variables)
