"""The esper.dev/v1alpha1 resources and the types they share; the single source of the CRD schemas."""

from esper.contracts.blueprint import Blueprint, BlueprintSpec, BlueprintStatus, KernelRef
from esper.contracts.common import (
    API_GROUP,
    API_VERSION,
    GROUP_VERSION,
    ArtifactRef,
    CompileOptions,
    Condition,
    Toolchain,
    ValidationReport,
)
from esper.contracts.kernel import Kernel, KernelSpec, KernelStatus

__all__ = [
    "API_GROUP",
    "API_VERSION",
    "GROUP_VERSION",
    "ArtifactRef",
    "Blueprint",
    "BlueprintSpec",
    "BlueprintStatus",
    "CompileOptions",
    "Condition",
    "Kernel",
    "KernelRef",
    "KernelSpec",
    "KernelStatus",
    "Toolchain",
    "ValidationReport",
]
