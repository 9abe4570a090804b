"""The catalogue commands: query Kernels (in a store or a cluster), retry, roll back, collect garbage.

The earlier system kept a catalogue of kernels with their reports; here the catalogue is the Kernel
objects (what is asked for, by whom, in which phase) plus the store (the bundles). These commands read
both: filters go to the API server as label and field selectors where it can answer them.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from esper.artifact import bundle_size, parse_manifest
from esper.contracts.common import API_GROUP, API_VERSION, now_rfc3339
from esper.contracts.naming import ANNOTATION_RETRY, requester_label
from esper.sidecar.config import parse_selector
from esper.storage import Store

PHASES = ("Pending", "Compiling", "Ready", "Failed")
PLURAL = "kernels"


class CatalogueError(Exception):
    """Bad input or a request the cluster refused: the CLI prints it and exits 2."""


@dataclass(frozen=True)
class KernelQuery:
    """What `esper kernels` filters on; None or empty: anything."""

    blueprint: str | None = None
    template: str | None = None
    target: str | None = None
    phase: str | None = None
    min_speedup: float | None = None
    selector: str | None = None

    def __post_init__(self) -> None:
        if self.phase is not None and self.phase not in PHASES:
            raise CatalogueError(f"--phase must be one of {', '.join(PHASES)}, got {self.phase!r}")
        if self.min_speedup is not None and self.min_speedup < 0:
            raise CatalogueError(f"--min-speedup must be at least 0, got {self.min_speedup}")
        if self.selector:
            try:
                parse_selector(self.selector)
            except ValueError as exc:
                raise CatalogueError(f"--selector: {exc}") from None

    def label_selector(self) -> str:
        parts = [self.selector] if self.selector else []
        if self.blueprint:
            parts.append(requester_label(self.blueprint))
        return ",".join(parts)

    def field_selector(self) -> str:
        fields = {"spec.template": self.template, "spec.target": self.target, "status.phase": self.phase}
        return ",".join(f"{k}={v}" for k, v in fields.items() if v)

    def store_only(self) -> None:
        """A store holds bundles, not Kernels: refuse filters only a cluster can answer."""
        cluster_only = {"--blueprint": self.blueprint, "--template": self.template,
                        "--phase": self.phase, "--selector": self.selector}  # fmt: skip
        given = [flag for flag, value in cluster_only.items() if value]
        if given:
            raise CatalogueError(f"{', '.join(given)} need a cluster (--cluster): a store holds bundles only")

    def keeps_speedup(self, speedup: float | None) -> bool:
        return self.min_speedup is None or (speedup is not None and speedup >= self.min_speedup)


# ---- Kernels in a cluster -----------------------------------------------------------------------------


def kernel_row(obj: Mapping[str, Any]) -> dict[str, Any]:
    meta, spec, status = obj.get("metadata") or {}, obj.get("spec") or {}, obj.get("status") or {}
    report = status.get("report") or {}
    artifact = status.get("artifact") or {}
    return {
        "namespace": meta.get("namespace", ""),
        "name": meta.get("name", ""),
        "blueprints": [r.get("blueprint") for r in status.get("requesters") or []],
        "template": spec.get("template", ""),
        "target": spec.get("target", ""),
        "phase": status.get("phase") or "Pending",
        "reason": status.get("reason", ""),
        "speedup": report.get("speedup"),
        "size": artifact.get("size"),
        "key": spec.get("key", ""),
        "labels": meta.get("labels") or {},
        "createdAt": meta.get("creationTimestamp", ""),
    }


def list_cluster_kernels(api: Any, query: KernelQuery, namespace: str | None) -> list[dict[str, Any]]:
    """Kernels in `namespace` (None: all namespaces) matching the query, selectors answered server-side."""
    kwargs = {"label_selector": query.label_selector(), "field_selector": query.field_selector()}
    if namespace is None:
        resp = api.list_cluster_custom_object(API_GROUP, API_VERSION, PLURAL, **kwargs)
    else:
        resp = api.list_namespaced_custom_object(API_GROUP, API_VERSION, namespace, PLURAL, **kwargs)
    rows = [kernel_row(o) for o in resp.get("items") or []]
    return sorted(
        (r for r in rows if query.keeps_speedup(r["speedup"])), key=lambda r: (r["namespace"], r["name"])
    )


# ---- retry and rollback -------------------------------------------------------------------------------


def retry_kernels(api: Any, namespace: str, names: Iterable[str]) -> list[str]:
    """Ask the operator to compile Failed Kernels again (annotation esper.dev/retry); returns the names."""
    done = []
    token = now_rfc3339()
    for name in names:
        obj = api.get_namespaced_custom_object(API_GROUP, API_VERSION, namespace, PLURAL, name)
        phase = (obj.get("status") or {}).get("phase")
        if phase != "Failed":
            raise CatalogueError(
                f"Kernel {namespace}/{name} is {phase or 'Pending'}: only a Failed one is retried"
            )
        patch = {"metadata": {"annotations": {ANNOTATION_RETRY: token}}}
        api.patch_namespaced_custom_object(API_GROUP, API_VERSION, namespace, PLURAL, name, patch)
        done.append(name)
    return done


def rollback_patch(blueprint: Mapping[str, Any], kernels: list[Mapping[str, Any]]) -> dict[str, Any]:
    """The merge patch of a Blueprint's spec that asks for exactly these Kernels again.

    A Kernel keeps the expanded graph and compile options it was built from, and its key derives from
    them, so this spec plans the same Kernel names: the operator serves them at once (as
    `kubectl rollout undo` writes an old ReplicaSet's template back into a Deployment).
    """
    if not kernels:
        raise CatalogueError("that revision has no Kernels left")
    first = kernels[0]["spec"]
    for kernel in kernels[1:]:
        if kernel["spec"]["irDigest"] != first["irDigest"] or kernel["spec"]["compile"] != first["compile"]:
            raise CatalogueError("the Kernels of that revision disagree on their graph or compile options")
    return {
        "spec": {
            "template": None,
            "graph": first["graph"],
            "targets": [k["spec"]["target"] for k in kernels],
            "compile": first["compile"],
        }
    }


def rollback(api: Any, namespace: str, name: str, to_revision: int | None) -> int:
    """Point Blueprint `name` back at a revision from its history (default: the previous one)."""
    bp = api.get_namespaced_custom_object(API_GROUP, API_VERSION, namespace, "blueprints", name)
    history = (bp.get("status") or {}).get("history") or []
    if not history:
        raise CatalogueError(f"Blueprint {namespace}/{name} has no previous revision to roll back to")
    if to_revision is None:
        entry = history[0]
    else:
        found = [h for h in history if h.get("revision") == to_revision]
        if not found:
            kept = ", ".join(str(h.get("revision")) for h in history)
            raise CatalogueError(f"Blueprint {namespace}/{name} has no revision {to_revision} (kept: {kept})")
        entry = found[0]
    kernels = [
        api.get_namespaced_custom_object(API_GROUP, API_VERSION, namespace, PLURAL, k["name"])
        for k in entry.get("kernels") or []
    ]
    api.patch_namespaced_custom_object(
        API_GROUP, API_VERSION, namespace, "blueprints", name, rollback_patch(bp, kernels)
    )
    return int(entry["revision"])


# ---- garbage collection -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Orphan:
    key: str
    createdAt: str
    size: int


_DURATION = re.compile(r"^(\d+)([smhd])$")


def parse_age(text: str) -> dt.timedelta:
    """`90s`, `30m`, `6h`, `7d` -> timedelta; CatalogueError otherwise."""
    m = _DURATION.match(text.strip())
    if not m:
        raise CatalogueError(f"--min-age must be a number and a unit (s, m, h, d), such as 6h; got {text!r}")
    seconds = {"s": 1, "m": 60, "h": 3600, "d": 86400}[m[2]] * int(m[1])
    return dt.timedelta(seconds=seconds)


def referenced_keys(api: Any) -> set[str]:
    """Keys of every Kernel in every namespace, in any phase (a compiling one is writing its bundle)."""
    resp = api.list_cluster_custom_object(API_GROUP, API_VERSION, PLURAL)
    return {(o.get("spec") or {}).get("key", "") for o in resp.get("items") or []}


def find_orphans(
    store: Store, referenced: Callable[[], set[str]], min_age: dt.timedelta, now: dt.datetime | None = None
) -> list[Orphan]:
    """Complete bundles older than `min_age` that no Kernel references.

    Safe against a compile that is writing right now: a bundle is listed only once its manifest (written
    last) exists; its Kernel exists before its Job starts, so its key is referenced; a bundle written by
    hand or by a Kernel created after the listing is younger than `min_age`. The Kernels are listed
    after the store, so a Kernel created while the store is listed is seen.
    """
    now = now or dt.datetime.now(dt.UTC)
    keys = store.list_keys()
    used = referenced()
    out = []
    for key in keys:
        if key in used:
            continue
        data = store.read_manifest_bytes(key)
        manifest = parse_manifest(data, store.bundle_uri(key))
        created = dt.datetime.fromisoformat(manifest.createdAt.replace("Z", "+00:00"))
        if now - created >= min_age:
            out.append(Orphan(key, manifest.createdAt, bundle_size(manifest, data)))
    return out


def delete_orphans(store: Store, orphans: list[Orphan], referenced: Callable[[], set[str]]) -> list[str]:
    """Delete the orphans still unreferenced when re-checked just before deleting; returns their keys."""
    used = referenced()
    deleted = []
    for orphan in orphans:
        if orphan.key not in used and store.delete_bundle(orphan.key):
            deleted.append(orphan.key)
    return deleted
