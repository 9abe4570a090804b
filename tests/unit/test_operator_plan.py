"""Planning Kernels from Blueprints, and deriving statuses: pure functions, no cluster."""

from __future__ import annotations

import pytest

from esper.blueprint import BlueprintInvalid
from esper.contracts.naming import job_name, kernel_name
from esper_operator.plan import plan_blueprint
from esper_operator.status import blueprint_phase, blueprint_status, invalid_status, set_condition

TEMPLATE = {"template": {"name": "residual-mlp", "params": {"features": 16, "hidden": 32}}}


def test_identical_specs_plan_identical_kernels_under_any_blueprint_name() -> None:
    a = plan_blueprint("a", {**TEMPLATE, "targets": ["cpu"]}, torch_version="2.13.0")
    b = plan_blueprint("b", {**TEMPLATE, "targets": ["cpu"]}, torch_version="2.13.0")
    assert [k.name for k in a.kernels] == [k.name for k in b.kernels]
    assert a.kernels[0].spec.key == b.kernels[0].spec.key
    assert a.kernels[0].spec.blueprint == "a"


def test_key_changes_with_target_options_and_toolchain() -> None:
    base = plan_blueprint("a", {**TEMPLATE, "targets": ["cpu", "cuda-sm90"]}, torch_version="2.13.0")
    keys = {k.spec.key for k in base.kernels}
    assert len(keys) == 2
    other_opts = plan_blueprint("a", {**TEMPLATE, "compile": {"initSeed": 1}}, torch_version="2.13.0")
    other_torch = plan_blueprint("a", TEMPLATE, torch_version="2.14.0")
    assert other_opts.kernels[0].spec.key not in keys
    assert other_torch.kernels[0].spec.key != other_opts.kernels[0].spec.key
    assert other_torch.kernels[0].spec.key not in keys


def test_names_are_valid_kubernetes_names() -> None:
    key = "0123456789abcdef" * 4
    assert kernel_name("cuda-sm90a", key) == "cuda-sm90a-0123456789abcdef"
    assert len(job_name("cuda-sm100", key)) <= 63


@pytest.mark.parametrize(
    ("spec", "path"),
    [
        ({"template": {"name": "nope"}}, "spec.template.name"),
        ({**TEMPLATE, "targets": []}, "spec.targets"),
        ({**TEMPLATE, "targets": ["cpu", "cpu"]}, "spec.targets[1]"),
        ({**TEMPLATE, "targets": ["cuda-sm99"]}, "spec.targets[0]"),
        ({**TEMPLATE, "targets": ["tpu"]}, "spec.targets[0]"),
        ({**TEMPLATE, "compile": {"maxBatch": 0}}, "spec.compile.maxBatch"),
        ({**TEMPLATE, "extra": 1}, "spec.extra"),
        ({}, "spec"),
    ],
)
def test_invalid_specs_name_the_field(spec: dict, path: str) -> None:
    with pytest.raises(BlueprintInvalid) as info:
        plan_blueprint("x", spec, torch_version="2.13.0")
    assert any(p.path == path for p in info.value.problems), str(info.value)


def test_blueprint_phase_derivation() -> None:
    assert blueprint_phase([]) == "Pending"
    assert blueprint_phase(["Ready", "Ready"]) == "Ready"
    assert blueprint_phase(["Ready", "Compiling"]) == "Compiling"
    assert blueprint_phase(["Ready", "Failed", "Compiling"]) == "Failed"
    assert blueprint_phase(["Pending", "Ready"]) == "Pending"


def test_blueprint_status_summarises_kernels() -> None:
    kernels = [
        {"target": "cpu", "name": "k1", "phase": "Ready"},
        {"target": "cuda-sm90", "name": "k2", "phase": "Compiling"},
    ]
    status = blueprint_status(previous={}, digest="d", kernels=kernels, generation=3)
    assert status["kernelsSummary"] == "1/2" and status["phase"] == "Compiling"
    ready = {c["type"]: c for c in status["conditions"]}["Ready"]
    assert ready["status"] == "False" and ready["observedGeneration"] == 3
    assert status["observedGeneration"] == 3


def test_condition_time_moves_only_on_flip() -> None:
    first = set_condition([], "Ready", False, "Compiling")
    first[0]["lastTransitionTime"] = "2000-01-01T00:00:00Z"
    same = set_condition(first, "Ready", False, "StillCompiling")
    assert same[0]["lastTransitionTime"] == "2000-01-01T00:00:00Z" and same[0]["reason"] == "StillCompiling"
    flipped = set_condition(same, "Ready", True, "Compiled")
    assert flipped[0]["lastTransitionTime"] != "2000-01-01T00:00:00Z"


def test_invalid_status_carries_the_problems() -> None:
    status = invalid_status(previous={}, message="spec.x: bad", generation=2)
    valid = {c["type"]: c for c in status["conditions"]}["Valid"]
    assert status["phase"] == "Invalid" and valid["status"] == "False" and valid["message"] == "spec.x: bad"
