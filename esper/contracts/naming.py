"""Kubernetes names derived from a kernel key: deterministic, so that retries and restarts adopt."""

from __future__ import annotations

KEY_PREFIX_LEN = 16

MANAGED_BY = "app.kubernetes.io/managed-by"
OPERATOR_NAME = "esper-operator"
LABEL_KERNEL = "esper.dev/kernel"
LABEL_TARGET = "esper.dev/target"
LABEL_BLUEPRINT = "esper.dev/blueprint"
LABEL_IR_DIGEST = "esper.dev/ir-digest"


def kernel_name(target: str, key: str) -> str:
    """`cpu-3fa9c1e2b4d05a77`: readable, unique per key, a valid DNS-1123 label."""
    return f"{target}-{key[:KEY_PREFIX_LEN]}"


def job_name(target: str, key: str) -> str:
    """The compile Job of a kernel; at most 63 characters so its Pods' job-name label is valid."""
    return f"tezzeret-{kernel_name(target, key)}"
