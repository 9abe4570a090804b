"""The Kernel resource (esper.dev/v1alpha1): one compiled artifact of a graph for one target."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from esper.blueprint.ir import Graph
from esper.contracts.blueprint import KernelPhase, TargetName
from esper.contracts.common import (
    GROUP_VERSION,
    ArtifactRef,
    CompileOptions,
    Condition,
    Model,
    Toolchain,
    ValidationReport,
)


class KernelSpec(Model):
    """What this Kernel is; immutable, and its key derives from it."""

    blueprint: str = Field(
        max_length=253,
        description="The Blueprint that first asked for this Kernel (status.requesters lists all of them).",
    )
    template: str = Field(
        default="",
        max_length=64,
        description="The template the graph was expanded from, as first asked for; empty for a graph.",
    )
    target: TargetName
    key: str = Field(pattern=r"^[0-9a-f]{64}$", description="Content-derived kernel key (sha256).")
    irDigest: str = Field(pattern=r"^[0-9a-f]{64}$", description="sha256 of the canonical expanded graph.")
    graph: Graph = Field(description="The expanded graph, defaults filled in.")
    compile: CompileOptions = Field(default_factory=CompileOptions, description="Compile options.")
    toolchain: Toolchain = Field(description="The toolchain the Kernel is compiled with.")


KernelRole = Literal["serving", "candidate", "retained"]


class Requester(Model):
    """A Blueprint that uses this Kernel, and how."""

    blueprint: str = Field(max_length=253, description="The Blueprint's name.")
    role: KernelRole = Field(
        description="serving: the Blueprint serves it; candidate: its current revision, not yet "
        "served; retained: kept in its history for rollback."
    )


class KernelStatus(Model):
    """Observed state, written by the operator from the compile Job."""

    phase: KernelPhase = Field(default="Pending", description="Pending, Compiling, Ready or Failed.")
    jobName: str = Field(default="", max_length=63, description="The compile Job.")
    jobNamespace: str = Field(default="", max_length=63, description="Where the compile Job runs.")
    jobUid: str = Field(
        default="",
        max_length=64,
        description="uid of the compile Job the operator created: results are accepted from its Pods only.",
    )
    artifact: ArtifactRef | None = Field(default=None, description="The bundle, once Ready.")
    toolchain: Toolchain | None = Field(default=None, description="What the Job reports it built with.")
    compileSeconds: float = Field(default=0.0, ge=0, description="Wall time of the compile Job's work.")
    report: ValidationReport | None = Field(default=None, description="Validation and benchmark.")
    reason: str = Field(default="", max_length=128, description="CamelCase reason of the phase.")
    message: str = Field(default="", max_length=32768, description="Human-readable detail.")
    observedGeneration: int = Field(default=0, ge=0, description="The generation last reconciled.")
    conditions: list[Condition] = Field(default_factory=list, max_length=16, description="Conditions.")
    requesters: list[Requester] = Field(
        default_factory=list, max_length=1024, description="Every Blueprint that uses this Kernel."
    )
    requestedBy: str = Field(
        default="", max_length=256, description="The requesters' names, comma-separated (cut), for kubectl."
    )
    attempts: int = Field(default=0, ge=0, description="Compile Jobs run for this Kernel so far.")
    retryAt: str = Field(default="", max_length=64, description="When a transient failure is retried.")
    retryBase: int = Field(default=0, ge=0, description="attempts when the user last asked for a retry.")
    retryToken: str = Field(
        default="", max_length=253, description="The last esper.dev/retry annotation acted on."
    )


class Kernel(Model):
    """A Kernel object as stored by the API server."""

    apiVersion: Literal["esper.dev/v1alpha1"] = GROUP_VERSION
    kind: Literal["Kernel"] = "Kernel"
    metadata: dict = Field(default_factory=dict)
    spec: KernelSpec
    status: KernelStatus | None = None
