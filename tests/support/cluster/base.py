"""Shared pieces of the test cluster: JSON type, repo paths, timestamps, polling, API errors."""

from __future__ import annotations

import asyncio
import datetime
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import kmock
from kmock._internal.k8s import KubernetesError

JSON = dict[str, Any]
T = TypeVar("T")

REPO_ROOT = Path(__file__).resolve().parents[3]
CRD_RESOURCE = kmock.resource("apiextensions.k8s.io", "v1", "customresourcedefinitions")
NAMESPACES = kmock.resource("", "v1", "namespaces")
STANDARD_VERBS = ("create", "delete", "deletecollection", "get", "list", "patch", "update", "watch")
HISTORY = 20_000  # watch-cache size: older resourceVersions get 410 Gone, as etcd compaction does

# Field selectors a real API server accepts besides metadata.name/metadata.namespace (built-ins).
BUILTIN_SELECTABLE: dict[str, set[str]] = {
    "pods": {
        "spec.nodeName",
        "spec.restartPolicy",
        "spec.schedulerName",
        "spec.serviceAccountName",
        "status.phase",
        "status.podIP",
        "status.nominatedNodeName",
    },
    "events": {
        "involvedObject.kind",
        "involvedObject.namespace",
        "involvedObject.name",
        "involvedObject.uid",
        "involvedObject.apiVersion",
        "involvedObject.resourceVersion",
        "involvedObject.fieldPath",
        "reason",
        "reportingComponent",
        "source",
        "type",
    },
    "jobs": {"status.successful"},
    "secrets": {"type"},
    "namespaces": {"status.phase"},
}


def now_iso() -> str:
    """RFC 3339 with second precision, as the API server writes timestamps."""
    return datetime.datetime.now(tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_iso(ts: str) -> datetime.datetime:
    return datetime.datetime.strptime(ts, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.UTC)


def human_age(ts: str | None) -> str:
    """kubectl's HumanDuration, shortened: what the server puts into `date` table cells."""
    if not ts:
        return "<unknown>"
    seconds = int((datetime.datetime.now(tz=datetime.UTC) - parse_iso(ts)).total_seconds())
    if seconds < 120:
        return f"{max(seconds, 0)}s"
    if seconds < 600:
        return f"{seconds // 60}m{seconds % 60}s"
    if seconds < 3 * 3600:
        return f"{seconds // 60}m"
    if seconds < 48 * 3600:
        return f"{seconds // 3600}h"
    return f"{seconds // 86400}d"


def wait_for(
    predicate: Callable[[], T],
    timeout: float = 30.0,  # a hang guard: generous, so a loaded machine is not a failure
    interval: float = 0.05,
    message: str | Callable[[], str] = "",
) -> T:
    """Poll `predicate` until it returns a truthy value and return that value.

    Exceptions raised by the predicate count as "not yet" (the object may not exist yet); the
    last one is reported on timeout. Use this instead of sleeping: it is both faster and safer.
    """
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = predicate()
            if last:
                return last
        except Exception as exc:  # "not yet"; reported on timeout
            last = exc
        if time.monotonic() >= deadline:
            text = message() if callable(message) else message
            raise TimeoutError(f"condition not met within {timeout}s: {text} (last: {last!r})")
        time.sleep(interval)


async def async_wait_for(
    predicate: Callable[[], T], timeout: float = 30.0, interval: float = 0.05, message: str = ""
) -> T:
    """`wait_for` for async tests: polls in a thread so the test's loop keeps running."""
    return await asyncio.to_thread(wait_for, predicate, timeout, interval, message)


def api_version_of(res: kmock.resource) -> str:
    return res.version if not res.group else f"{res.group}/{res.version}"


def qualified(res: kmock.resource) -> str:
    """`blueprints.esper.dev` / `pods`: how the API server names a resource in messages."""
    return f"{res.plural}.{res.group}" if res.group else str(res.plural)


def k8s_error(code: int, reason: str, message: str, details: JSON | None = None) -> KubernetesError:
    return KubernetesError(status=code, reason=reason, message=message, details=details or {})


def not_found(res: kmock.resource, name: str | None) -> KubernetesError:
    return k8s_error(
        404,
        "NotFound",
        f'{qualified(res)} "{name}" not found',
        {"name": name, "group": res.group, "kind": res.plural},
    )


def conflict(res: kmock.resource, name: str) -> KubernetesError:
    return k8s_error(
        409,
        "Conflict",
        f'Operation cannot be fulfilled on {qualified(res)} "{name}": the object '
        "has been modified; please apply your changes to the latest version and try again",
        {"name": name, "group": res.group, "kind": res.plural},
    )


def invalid(res: kmock.resource, name: str | None, message: str) -> KubernetesError:
    return k8s_error(
        422,
        "Invalid",
        f'{qualified(res)} "{name}" is invalid: {message}',
        {"name": name, "group": res.group, "kind": res.plural},
    )


def bad_request(message: str) -> KubernetesError:
    return k8s_error(400, "BadRequest", message)
