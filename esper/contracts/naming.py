"""Kubernetes names derived from a kernel key: deterministic, so that retries and restarts adopt."""

from __future__ import annotations

import hashlib
import re

KEY_PREFIX_LEN = 16

MANAGED_BY = "app.kubernetes.io/managed-by"
OPERATOR_NAME = "esper-operator"
LABEL_KERNEL = "esper.dev/kernel"
LABEL_TARGET = "esper.dev/target"
LABEL_IR_DIGEST = "esper.dev/ir-digest"
LABEL_TEMPLATE = "esper.dev/template"
REQUESTER_PREFIX = "blueprint.esper.dev"
"""A Kernel carries `blueprint.esper.dev/<blueprint>: <role>` for every Blueprint that uses it."""
FINALIZER = "esper.dev/finalizer"
"""The operator's finalizer on Blueprints and Kernels (kopf's, under Esper's prefix)."""
ANNOTATION_RETRY = "esper.dev/retry"
"""Set (to any new value) on a Failed Kernel to compile it again: `esper retry`."""


def kernel_name(target: str, key: str) -> str:
    """`cpu-3fa9c1e2b4d05a77`: readable, unique per key, a valid DNS-1123 label."""
    return f"{target}-{key[:KEY_PREFIX_LEN]}"


def job_name(target: str, key: str) -> str:
    """The compile Job of a kernel; at most 63 characters so its Pods' job-name label is valid."""
    return f"tezzeret-{kernel_name(target, key)}"


MAX_NAME = 253
"""Longest object name (a DNS-1123 subdomain)."""
MAX_LABEL_VALUE = 63
_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


def name_problem(name: object) -> str | None:
    """Why `name` is not a valid object name (as the API server checks it: a DNS-1123 subdomain)."""
    if not isinstance(name, str):
        return None if name is None else "must be a string"
    if not name:
        return "must not be empty"
    if len(name) > MAX_NAME:
        return f"at most {MAX_NAME} characters, got {len(name):,}"
    if not _SUBDOMAIN.match(name):
        hint = " (names are lowercase)" if name.lower() != name else ""
        return (
            "must be lowercase letters, digits, '-' and '.', starting and ending with a letter or digit"
            + hint
        )
    return None


def label_value(name: str) -> str:
    """`name` as a label value: itself when it fits 63 characters, else a prefix and a hash of the whole.

    Object names may have 253 characters; label values only 63. The hash keeps two long names that
    share a prefix apart, and the result is deterministic, so selectors can be computed from the name.
    """
    if len(name) <= MAX_LABEL_VALUE and _LABEL_VALUE.match(name):
        return name
    tail = hashlib.sha256(name.encode()).hexdigest()[:10]
    head = re.sub(r"[^A-Za-z0-9_.-]", "-", name[: MAX_LABEL_VALUE - len(tail) - 1]).rstrip("-_.")
    head = head.lstrip("-_.")
    return f"{head}-{tail}" if head else tail


def requester_label(blueprint: str) -> str:
    """The label key naming one requester: `blueprint.esper.dev/<name>`, long names hashed to 63."""
    return f"{REQUESTER_PREFIX}/{label_value(blueprint)}"


def serving_selector(blueprint: str) -> str:
    """The label selector of the Kernels a Blueprint serves (one per target): for the sidecar."""
    return f"{requester_label(blueprint)}=serving"


_LABEL_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_LABEL_TEXT = "letters, digits, '-', '_' and '.', starting and ending with a letter or digit"


def label_value_problem(value: str) -> str | None:
    """Why `value` is not a valid label value (at most 63 characters, may be empty)."""
    if len(value) > MAX_LABEL_VALUE:
        return f"at most {MAX_LABEL_VALUE} characters, got {len(value):,}"
    return None if _LABEL_VALUE.match(value) else f"must be {_LABEL_TEXT}"


def label_key_problem(key: str) -> str | None:
    """Why `key` is not a valid label or annotation key: `[prefix/]name`, prefix a DNS subdomain."""
    prefix, _, name = key.rpartition("/")
    if "/" in key and (why := name_problem(prefix)) is not None:
        return f"the prefix {why}"
    if not name or len(name) > MAX_LABEL_VALUE:
        return f"the name must have 1 to {MAX_LABEL_VALUE} characters"
    return None if _LABEL_NAME.match(name) else f"the name must be {_LABEL_TEXT}"
