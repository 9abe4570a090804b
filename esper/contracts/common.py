"""Types shared by the Blueprint and Kernel resources, the compiler and the artifact format."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from esper.blueprint.opdef import FieldError

API_GROUP = "esper.dev"
API_VERSION = "v1alpha1"
# Spelled out so the models' `apiVersion: Literal[...]` defaults type-check; kept equal to the parts.
GROUP_VERSION: Final = "esper.dev/v1alpha1"
assert f"{API_GROUP}/{API_VERSION}" == GROUP_VERSION


class Model(BaseModel):
    """Base of every contract: unknown fields are errors, camelCase on the wire, no coercion (`"512"` or
    `true` is no integer: the API server's schema would refuse them too)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, strict=True, allow_inf_nan=False)


class Condition(Model):
    """The Kubernetes condition convention (metav1.Condition)."""

    type: str = Field(max_length=316, description="Condition type, e.g. Ready or Valid.")
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    reason: str = Field(
        default="", max_length=1024, description="One CamelCase word for the last transition."
    )
    message: str = Field(default="", max_length=32768, description="Human-readable detail.")
    lastTransitionTime: str = Field(
        default="", max_length=64, description="When status last changed (RFC 3339)."
    )
    observedGeneration: int = Field(
        default=0, ge=0, description="metadata.generation this condition was computed from."
    )


def now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


MAX_BATCH = 65536
BatchSize = Annotated[int, Field(ge=1, le=MAX_BATCH)]


class CompileOptions(Model):
    """Options of a compile; all of them are part of the kernel key."""

    maxBatch: BatchSize = Field(default=1024, description="Largest batch size the compiled kernel accepts.")
    initSeed: int = Field(
        default=0, ge=0, le=2**31 - 1, description="Random seed of the kernel's initial parameters."
    )
    validateBatches: list[BatchSize] = Field(
        default_factory=lambda: [1, 7, 32],
        min_length=1,
        max_length=8,
        description="Batch sizes at which compiled outputs and gradients are checked against eager.",
    )
    benchmarkBatches: list[BatchSize] = Field(
        default_factory=lambda: [8, 32, 128],
        min_length=1,
        max_length=8,
        description="Batch sizes at which eager and compiled latency are measured.",
    )

    @model_validator(mode="after")
    def _within_max_batch(self) -> CompileOptions:
        for name in ("validateBatches", "benchmarkBatches"):
            if name not in self.model_fields_set:
                continue  # the defaults are cut to maxBatch by the compiler
            for i, batch in enumerate(getattr(self, name)):
                if batch > self.maxBatch:
                    raise FieldError((name, i), f"{batch} is above maxBatch ({self.maxBatch})")
        return self


class Toolchain(Model):
    """What built a kernel; part of its identity."""

    torch: str = Field(max_length=64, description="torch version of the compiler, e.g. 2.13.0.")
    capability: str = Field(max_length=64, description="Device capability compiled for: cpu-avx2, sm90, ...")
    python: str = Field(default="", max_length=32, description="Python version of the compiler.")


class ArtifactRef(Model):
    """Where a kernel bundle lives and how to know it."""

    uri: str = Field(max_length=2048, description="Store URI of the bundle (s3://bucket/prefix/kernels/KEY).")
    sha256: str = Field(
        pattern=r"^[0-9a-f]{64}$", description="sha256 of the bundle's manifest.json: its identity."
    )
    size: int = Field(ge=0, description="Total size of the bundle's files in bytes.")


class ValidationReport(Model):
    """Numerical validation against eager and the benchmark, as measured by the compile Job."""

    tolerance: float = Field(ge=0, description="Allowed absolute error for the dtype.")
    maxAbsError: float = Field(ge=0, description="Largest forward error against eager, all batches.")
    maxGradError: float = Field(default=0.0, ge=0, description="Largest gradient error against eager.")
    eagerMicros: float = Field(ge=0, description="Median eager forward latency (µs), largest batch.")
    compiledMicros: float = Field(ge=0, description="Median compiled forward latency (µs), largest batch.")
    speedup: float = Field(
        ge=0, description="Geometric mean over benchmark batches of eager/compiled forward latency."
    )
    trainSpeedup: float = Field(
        default=0.0,
        ge=0,
        description="Geometric mean of eager/compiled forward+backward latency, the training packages "
        "called directly; a trainer's call through autograd adds a fixed per-call cost (docs/kasmina.md).",
    )
