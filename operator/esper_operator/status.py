"""Status derivation: conditions kept to the Kubernetes convention, phases derived, never stored apart."""

from __future__ import annotations

from typing import Any, Literal

from esper.contracts import Condition
from esper.contracts.common import now_rfc3339

KERNEL_PHASE_ORDER = ("Failed", "Compiling", "Pending", "Ready")


def set_condition(
    conditions: list[dict[str, Any]],
    type_: str,
    status: bool,
    reason: str,
    message: str = "",
    generation: int = 0,
) -> list[dict[str, Any]]:
    """Return conditions with `type_` set; lastTransitionTime moves only when the status flips."""
    value: Literal["True", "False"] = "True" if status else "False"
    previous = next((c for c in conditions if c.get("type") == type_), None)
    since = previous.get("lastTransitionTime") if previous and previous.get("status") == value else None
    condition = Condition(
        type=type_,
        status=value,
        reason=reason,
        message=message[:32768],
        lastTransitionTime=since or now_rfc3339(),
        observedGeneration=generation,
    ).model_dump()
    return [c for c in conditions if c.get("type") != type_] + [condition]


def blueprint_phase(kernel_phases: list[str]) -> str:
    """Failed if any Kernel failed; Ready when all are; Compiling while any compiles; else Pending."""
    if not kernel_phases:
        return "Pending"
    if "Failed" in kernel_phases:
        return "Failed"
    if all(p == "Ready" for p in kernel_phases):
        return "Ready"
    if "Compiling" in kernel_phases:
        return "Compiling"
    return "Pending"


def blueprint_status(
    *,
    previous: dict[str, Any],
    digest: str,
    kernels: list[dict[str, str]],
    generation: int,
) -> dict[str, Any]:
    """The Blueprint's status from its Kernels (each: target, name, phase)."""
    phases = [k["phase"] for k in kernels]
    phase = blueprint_phase(phases)
    ready = phases.count("Ready")
    conditions = list(previous.get("conditions") or [])
    conditions = set_condition(conditions, "Valid", True, "Validated", "", generation)
    failed = [k["name"] for k in kernels if k["phase"] == "Failed"]
    if phase == "Ready":
        message = f"all {len(kernels)} Kernel(s) Ready"
    elif failed:
        message = "Kernel(s) failed: " + ", ".join(failed)
    else:
        message = f"{ready}/{len(kernels)} Kernel(s) Ready"
    conditions = set_condition(conditions, "Ready", phase == "Ready", phase, message, generation)
    return {
        "phase": phase,
        "digest": digest,
        "kernels": kernels,
        "kernelsReady": ready,
        "kernelsTotal": len(kernels),
        "kernelsSummary": f"{ready}/{len(kernels)}",
        "message": message,
        "observedGeneration": generation,
        "conditions": conditions,
    }


def invalid_status(*, previous: dict[str, Any], message: str, generation: int) -> dict[str, Any]:
    conditions = list(previous.get("conditions") or [])
    conditions = set_condition(conditions, "Valid", False, "InvalidSpec", message, generation)
    conditions = set_condition(conditions, "Ready", False, "Invalid", "the spec is invalid", generation)
    return {
        "phase": "Invalid",
        "digest": "",
        "kernels": [],
        "kernelsReady": 0,
        "kernelsTotal": 0,
        "kernelsSummary": "0/0",
        "message": message[:32768],
        "observedGeneration": generation,
        "conditions": conditions,
    }


def kernel_status(
    previous: dict[str, Any],
    *,
    phase: str,
    reason: str,
    message: str = "",
    generation: int = 1,
    **fields: Any,
) -> dict[str, Any]:
    """A Kernel status patch: phase, reason, message, the Ready condition and any extra fields."""
    conditions = set_condition(
        list(previous.get("conditions") or []), "Ready", phase == "Ready", reason, message, generation
    )
    return {
        "phase": phase,
        "reason": reason,
        "message": message[:32768],
        "observedGeneration": generation,
        "conditions": conditions,
        **fields,
    }
