"""What a Blueprint asks for: one Kernel per target, named by its content-derived key (pure, no I/O)."""

from __future__ import annotations

from dataclasses import dataclass

from esper.artifact import kernel_key
from esper.contracts import KernelSpec, Toolchain
from esper.contracts.naming import job_name, kernel_name
from esper.contracts.validation import validate_blueprint_spec
from esper.targets import Target


@dataclass(frozen=True)
class PlannedKernel:
    name: str
    job_name: str
    spec: KernelSpec


@dataclass(frozen=True)
class Plan:
    digest: str
    kernels: list[PlannedKernel]
    history_limit: int = 3


def plan_blueprint(name: str, raw_spec: dict, *, torch_version: str) -> Plan:
    """Validate a Blueprint spec deeply and derive its Kernels. Raises BlueprintInvalid."""
    checked = validate_blueprint_spec(raw_spec)
    kernels = []
    for target_name in checked.spec.targets:
        target = Target.parse(target_name)
        toolchain = Toolchain(torch=torch_version, capability=target.capability)
        key = kernel_key(checked.digest, target.name, checked.spec.compile, toolchain)
        kernel_spec = KernelSpec(
            blueprint=name,
            target=target.name,
            key=key,
            template=checked.spec.template.name if checked.spec.template else "",
            irDigest=checked.digest,
            graph=checked.graph,
            compile=checked.spec.compile,
            toolchain=toolchain,
        )
        kernels.append(PlannedKernel(kernel_name(target.name, key), job_name(target.name, key), kernel_spec))
    return Plan(digest=checked.digest, kernels=kernels, history_limit=checked.spec.historyLimit)
