"""Blueprint and Kernel statuses as whole documents, written out by hand."""

from __future__ import annotations

import re
from typing import Any

import pytest

from esper_operator.status import (
    blueprint_phase,
    blueprint_status,
    invalid_status,
    kernel_status,
    set_condition,
)

T0 = "2000-01-01T00:00:00Z"
RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")


def _cond(
    type_: str, status: str, reason: str, message: str = "", gen: int = 0, t: str = T0
) -> dict[str, Any]:
    return {"type": type_, "status": status, "reason": reason, "message": message,
            "lastTransitionTime": t, "observedGeneration": gen}  # fmt: skip


def _times(conditions: list[dict[str, Any]]) -> list[str]:
    return [c["lastTransitionTime"] for c in conditions]


@pytest.mark.parametrize(
    ("phases", "phase"),
    [
        ([], "Pending"),
        (["Ready"], "Ready"),
        (["Ready", "Ready", "Ready"], "Ready"),
        (["Pending"], "Pending"),
        (["Compiling", "Pending"], "Compiling"),
        (["Ready", "Pending"], "Pending"),
        (["Failed"], "Failed"),
        (["Ready", "Ready", "Failed"], "Failed"),  # any failure wins, wherever it is
        (["Failed", "Ready"], "Failed"),
    ],
)
def test_blueprint_phase(phases: list[str], phase: str) -> None:
    assert blueprint_phase(phases) == phase


def test_set_condition_keeps_the_others_and_replaces_its_own() -> None:
    others = [_cond("Valid", "True", "Validated"), _cond("Ready", "False", "Compiling")]
    out = set_condition(others, "Ready", False, "StillCompiling", "m", generation=4)
    assert out == [_cond("Valid", "True", "Validated"), _cond("Ready", "False", "StillCompiling", "m", 4)]
    assert others[1]["reason"] == "Compiling"  # the input is not changed
    flipped = set_condition(out, "Ready", True, "Compiled", generation=5)
    assert flipped[-1]["status"] == "True" and RFC3339.match(flipped[-1]["lastTransitionTime"])
    assert flipped[-1]["lastTransitionTime"] != T0 and flipped[0] == _cond("Valid", "True", "Validated")
    new = set_condition([], "Valid", True, "Validated")
    assert new[0]["status"] == "True" and RFC3339.match(new[0]["lastTransitionTime"])


def test_a_condition_message_is_capped_at_32_kib() -> None:
    out = set_condition([], "Ready", False, "Failed", "x" * 40000)
    assert out[0]["message"] == "x" * 32768


def test_blueprint_status_document() -> None:
    kernels = [
        {"target": "cpu", "name": "k1", "phase": "Ready"},
        {"target": "cuda-sm90", "name": "k2", "phase": "Failed"},
        {"target": "cuda-sm80", "name": "k3", "phase": "Failed"},
    ]
    previous = {"conditions": [_cond("Valid", "True", "Validated"), _cond("Ready", "False", "Compiling")]}
    status = blueprint_status(previous=previous, digest="d1", kernels=kernels, generation=7)
    assert status == {
        "phase": "Failed",
        "digest": "d1",
        "kernels": kernels,
        "kernelsReady": 1,
        "kernelsTotal": 3,
        "kernelsSummary": "1/3",
        "message": "Kernel(s) failed: k2, k3",
        "observedGeneration": 7,
        "conditions": [
            _cond("Valid", "True", "Validated", "", 7),
            _cond("Ready", "False", "Failed", "Kernel(s) failed: k2, k3", 7),
        ],
    }


@pytest.mark.parametrize(
    ("phases", "message", "ready_status"),
    [
        (["Ready", "Ready"], "all 2 Kernel(s) Ready", "True"),
        (["Ready", "Compiling"], "1/2 Kernel(s) Ready", "False"),
        (["Pending", "Pending"], "0/2 Kernel(s) Ready", "False"),
    ],
)
def test_blueprint_status_message(phases: list[str], message: str, ready_status: str) -> None:
    kernels = [{"target": "cpu", "name": f"k{i}", "phase": p} for i, p in enumerate(phases)]
    status = blueprint_status(previous={}, digest="d", kernels=kernels, generation=1)
    ready = {c["type"]: c for c in status["conditions"]}["Ready"]
    assert (status["message"], ready["message"], ready["status"]) == (message, message, ready_status)
    assert ready["reason"] == status["phase"]


def test_invalid_status_document() -> None:
    previous = {
        "conditions": [_cond("Valid", "False", "InvalidSpec", "old"), _cond("Ready", "False", "Invalid")]
    }
    status = invalid_status(previous=previous, message="spec.x: bad" + "y" * 40000, generation=2)
    capped = ("spec.x: bad" + "y" * 40000)[:32768]
    assert status == {
        "phase": "Invalid",
        "digest": "",
        "kernels": [],
        "kernelsReady": 0,
        "kernelsTotal": 0,
        "kernelsSummary": "0/0",
        "message": capped,
        "observedGeneration": 2,
        "conditions": [
            _cond("Valid", "False", "InvalidSpec", capped, 2),
            _cond("Ready", "False", "Invalid", "the spec is invalid", 2),
        ],
    }


def test_kernel_status_document() -> None:
    previous = {"conditions": [_cond("Ready", "False", "Compiling", gen=1)]}
    status = kernel_status(
        previous, phase="Failed", reason="OOMKilled", message="m" * 40000, generation=3, job="j"
    )
    assert status == {
        "phase": "Failed",
        "reason": "OOMKilled",
        "message": "m" * 32768,
        "observedGeneration": 3,
        "conditions": [_cond("Ready", "False", "OOMKilled", "m" * 32768, 3)],
        "job": "j",
    }
    ready = kernel_status(previous, phase="Ready", reason="Compiled")
    assert ready["conditions"][0]["status"] == "True" and ready["observedGeneration"] == 1
    assert ready["message"] == "" and _times(ready["conditions"]) != [T0]
