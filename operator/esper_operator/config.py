"""Operator configuration from the environment (set by the Helm chart), validated at start-up.

A bad value stops the operator with a message naming the variable, rather than producing Jobs that
fail later on a node.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from esper.storage import open_store

PREFIX = "ESPER_"


class ConfigError(ValueError):
    """The operator's environment is invalid."""


class OperatorConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    store_uri: str = Field(description="Where compile Jobs write bundles: s3://bucket/prefix.")
    s3_endpoint: str = Field(default="", description="S3 endpoint URL for Jobs (MinIO, moto); empty: AWS.")
    s3_secret: str = Field(default="", description="Secret with AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY.")
    s3_region: str = Field(default="us-east-1")
    compile_image: str = Field(default="ghcr.io/esper-dev/esper:0.1.0")
    compile_command: list[str] = Field(default_factory=lambda: ["python", "-m", "esper.tezzeret"])
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    torch_version: str = Field(default="2.13.0", description="torch in the compile image; part of keys.")
    gpu_resource: str = Field(default="nvidia.com/gpu")
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[dict[str, Any]] = Field(default_factory=list)
    gpu_node_selector: dict[str, str] = Field(default_factory=dict)
    gpu_tolerations: list[dict[str, Any]] = Field(default_factory=list)
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

    @field_validator("store_uri")
    @classmethod
    def _store(cls, value: str) -> str:
        open_store(value)  # raises ValueError with the reason
        return value

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> OperatorConfig:
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for name, field in cls.model_fields.items():
            var = PREFIX + name.upper()
            if var not in env:
                continue
            raw = env[var]
            annotation = str(field.annotation)
            if raw.strip().startswith(("[", "{")) or "dict" in annotation or "list" in annotation:
                try:
                    values[name] = json.loads(raw)
                except json.JSONDecodeError as exc:
                    raise ConfigError(f"{var}: not valid JSON ({exc.msg})") from None
            else:
                values[name] = raw
        try:
            return cls(**values)
        except ValidationError as exc:
            lines = []
            for err in exc.errors():
                var = PREFIX + str(err["loc"][0]).upper() if err["loc"] else "config"
                lines.append(f"{var}: {err['msg']}")
            raise ConfigError("invalid operator configuration:\n" + "\n".join(lines)) from None
