"""Operator configuration from the environment (set by the Helm chart), validated at start-up.

A bad value stops the operator with a message naming the variable, rather than producing Jobs that
fail later on a node.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from esper.envconfig import ConfigError, env_names, read_env, read_setting
from esper.storage import open_store
from esper.targets import X86_64_V4_FLAGS

PREFIX = "ESPER_"
# Node Feature Discovery's labels for x86-64-v4 (AVX-512 F, BW, CD, DQ, VL), what cpu-avx512 kernels need.
AVX512_NODE_LABELS = {
    f"feature.node.kubernetes.io/cpu-cpuid.{flag.upper()}": "true" for flag in X86_64_V4_FLAGS
}
__all__ = ["ConfigError", "OperatorConfig"]


class OperatorConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    store_uri: str = Field(description="Where compile Jobs write bundles: s3://bucket/prefix.")
    s3_endpoint: str = Field(default="", description="S3 endpoint URL for Jobs (MinIO, moto); empty: AWS.")
    s3_secret: str = Field(default="", description="Secret with AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY.")
    s3_region: str = Field(default="us-east-1")
    compile_namespace: str = Field(
        default="",
        max_length=63,
        description="Where compile Jobs run (and their Secrets live); empty: the operator's own namespace.",
    )
    signing_secret: str = Field(
        default="", description="Secret whose `signing.key` signs bundles; mounted into compile Pods only."
    )
    compile_image: str = Field(default="ghcr.io/esper-dev/esper:0.1.0")
    compile_command: list[str] = Field(default_factory=lambda: ["python", "-m", "esper.tezzeret"])
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    torch_version: str = Field(default="2.13.0", description="torch in the compile image; part of keys.")
    gpu_resource: str = Field(default="nvidia.com/gpu")
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[dict[str, Any]] = Field(default_factory=list)
    gpu_node_selector: dict[str, str] = Field(default_factory=dict)
    gpu_tolerations: list[dict[str, Any]] = Field(default_factory=list)
    avx512_node_selector: dict[str, str] = Field(
        default_factory=lambda: dict(AVX512_NODE_LABELS),
        description="Node labels for cpu-avx512 compile Jobs (validated and benchmarked on such a CPU).",
    )
    priority_class: str = ""
    service_account: str = Field(default="", description="ServiceAccount of compile Pods (no token).")
    cpu_request: str = "1"
    memory_request: str = "2Gi"
    memory_limit: str = "8Gi"
    backoff_limit: int = Field(default=3, ge=0, le=20)
    active_deadline_seconds: int = Field(default=1800, ge=30)
    ttl_seconds_after_finished: int = Field(default=3600, ge=0)
    kueue_queue: str = ""
    retention: Literal["keep", "delete"] = Field(default="keep", description="Artifacts of deleted Kernels.")
    verify_artifacts: bool = Field(default=True, description="Check a Job's manifest sha256 in the store.")
    metrics_port: int = Field(default=8000, ge=0, le=65535)
    retry_limit: int = Field(
        default=2,
        ge=0,
        le=20,
        description="New compile Jobs after a transient failure (evicted, OOM, deadline).",
    )
    retry_base_seconds: float = Field(default=30.0, gt=0, description="First retry back-off (doubles).")
    retry_max_seconds: float = Field(default=900.0, gt=0, description="Longest retry back-off.")
    max_concurrent_jobs: int = Field(
        default=0, ge=0, description="Compile Jobs running at once (0: no cap); others wait Queued."
    )
    queue_seconds: float = Field(
        default=5.0, gt=0, description="How often waiting Kernels (queued, backing off) are looked at."
    )
    resync_seconds: float = Field(
        default=300.0, gt=0, description="Every Blueprint is reconciled this often."
    )
    retry_seconds: float = Field(default=10.0, gt=0, description="A failed handler is retried this often.")
    api_timeout_seconds: float = Field(
        default=30.0, gt=0, description="Each API request; a hung server fails the handler, which is retried."
    )

    def job_namespace(self) -> str:
        """The compile namespace: configured, else the operator's own (POD_NAMESPACE, the
        ServiceAccount's namespace file), else "default"."""
        if self.compile_namespace:
            return self.compile_namespace
        from esper.sidecar.config import default_namespace

        return default_namespace()

    @field_validator("store_uri")
    @classmethod
    def _store(cls, value: str) -> str:
        open_store(value)  # raises ValueError with the reason
        return value

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> OperatorConfig:
        """Every ESPER_<FIELD> variable; ConfigError naming each one at fault."""
        return read_env(cls, env_names(cls, PREFIX), what="operator", env=env)

    @classmethod
    def setting_from_env(cls, field: str, env: Mapping[str, str] | None = None) -> Any:
        """One setting, read as from_env reads it, for handler options fixed at import."""
        return read_setting(cls, field, env_names(cls, PREFIX), what="operator", env=env)
