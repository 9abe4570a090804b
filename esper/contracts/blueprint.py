"""The Blueprint resource (esper.dev/v1alpha1): an architecture and the targets to compile it for."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from esper.blueprint.ir import Graph, TemplateRef
from esper.blueprint.opdef import FieldError
from esper.contracts.common import GROUP_VERSION, CompileOptions, Condition, Model

TARGET_PATTERN = r"^(cpu|cpu-avx512|cuda-sm[0-9]{2,3}a?)$"
TARGET_TEXT = "is not a target: use 'cpu', 'cpu-avx512' or 'cuda-smNN', such as 'cuda-sm90'"
TargetName = Annotated[
    str,
    Field(
        pattern=TARGET_PATTERN,
        max_length=16,
        description="cpu (AVX2, any x86-64-v3 node), cpu-avx512 (AVX-512 nodes only) or cuda-smNN.",
    ),
]

BlueprintPhase = Literal["Pending", "Compiling", "Ready", "Failed", "Invalid"]
KernelPhase = Literal["Pending", "Compiling", "Ready", "Failed"]


class BlueprintSpec(Model):
    """What to build: exactly one of `template` or `graph`, for one or more targets."""

    template: TemplateRef | None = Field(default=None, description="A named template and its parameters.")
    graph: Graph | None = Field(default=None, description="An explicit graph.")
    targets: list[TargetName] = Field(
        default_factory=lambda: ["cpu"],
        min_length=1,
        max_length=8,
        description="Targets to compile for, unique: cpu, cuda-sm80, cuda-sm90, ...",
    )
    compile: CompileOptions = Field(default_factory=CompileOptions, description="Compile options.")
    historyLimit: int = Field(
        default=3,
        ge=0,
        le=10,
        description="Previous revisions whose Kernels are kept for rollback (as a Deployment's "
        "revisionHistoryLimit).",
    )

    @field_validator("targets")
    @classmethod
    def _unique(cls, targets: list[str]) -> list[str]:
        for i, target in enumerate(targets):
            if target in targets[:i]:
                raise FieldError(i, f"duplicate target '{target}'")
        return targets

    @model_validator(mode="after")
    def _check(self) -> BlueprintSpec:
        if (self.template is None) == (self.graph is None):
            raise ValueError("give exactly one of 'template' or 'graph'")
        return self


class KernelRef(Model):
    """One Kernel of a Blueprint, as its status lists it."""

    target: str = Field(max_length=16, description="The target.")
    name: str = Field(max_length=253, description="The Kernel's name.")
    phase: KernelPhase = Field(description="The Kernel's phase.")


class RevisionKernel(Model):
    """A Kernel of a recorded revision: enough to find it and to roll back to it."""

    target: str = Field(max_length=16, description="The target.")
    name: str = Field(max_length=253, description="The Kernel's name.")


class Revision(Model):
    """A previous revision of the Blueprint whose Kernels are kept (newest first in status.history)."""

    revision: int = Field(ge=1, description="The revision number.")
    digest: str = Field(default="", max_length=64, description="IR digest of that revision.")
    kernels: list[RevisionKernel] = Field(default_factory=list, max_length=8, description="Its Kernels.")


class OperatorState(Model):
    """The operator's own bookkeeping on a Blueprint: not an API, read by nothing else."""

    lastHandledConfiguration: str = Field(
        default="",
        description="The spec, labels and annotations the operator last acted on (JSON): an edit is told "
        "from a restart by comparing with it. Kept in the status, which the operator writes anyway.",
    )


class BlueprintStatus(Model):
    """Observed state, written by the operator."""

    phase: BlueprintPhase = Field(default="Pending", description="Derived from the Kernels and validation.")
    digest: str = Field(default="", max_length=64, description="sha256 of the canonical expanded graph.")
    kernels: list[KernelRef] = Field(default_factory=list, max_length=8, description="Kernel per target.")
    kernelsReady: int = Field(default=0, ge=0, description="Number of Ready Kernels.")
    kernelsTotal: int = Field(default=0, ge=0, description="Number of targets.")
    kernelsSummary: str = Field(default="", max_length=16, description="ready/total, for kubectl.")
    revision: int = Field(default=0, ge=0, description="The current revision: +1 per change of Kernels.")
    serving: list[KernelRef] = Field(
        default_factory=list,
        max_length=8,
        description="The Ready Kernel served per target: the current revision's once Ready, until then "
        "the last Ready one (keep-last-good).",
    )
    servingSummary: str = Field(default="", max_length=16, description="served/targets, for kubectl.")
    history: list[Revision] = Field(
        default_factory=list, max_length=10, description="Previous revisions kept, newest first."
    )
    message: str = Field(default="", max_length=32768, description="Why the phase is what it is.")
    observedGeneration: int = Field(default=0, ge=0, description="The generation last reconciled.")
    conditions: list[Condition] = Field(default_factory=list, max_length=16, description="Conditions.")
    operatorState: OperatorState | None = Field(default=None, description="The operator's bookkeeping.")


class Blueprint(Model):
    """A Blueprint object as stored by the API server."""

    apiVersion: Literal["esper.dev/v1alpha1"] = GROUP_VERSION
    kind: Literal["Blueprint"] = "Blueprint"
    metadata: dict = Field(default_factory=dict)
    spec: BlueprintSpec
    status: BlueprintStatus | None = None
