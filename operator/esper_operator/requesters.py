"""Which Blueprints use a Kernel, and how: ownerReferences, one label per requester, status.requesters.

The owner references keep a shared Kernel alive while any Blueprint uses it (and delete it with the
last); the label `blueprint.esper.dev/<blueprint>: <role>` lets `kubectl get kernels -l` and the
sidecar's selector find every Kernel a Blueprint uses, shared or not; `status.requesters` names them in
full (label keys hash long names).
"""

from __future__ import annotations

from typing import Any

from esper.contracts.naming import REQUESTER_PREFIX, requester_label
from esper_operator.faults import crash_point
from esper_operator.kube import Body, Conflict, Kube

RETRIES = 8
SUMMARY_MAX = 256


def requesters_of(kernel: Body) -> list[dict[str, str]]:
    """status.requesters as the Kernel's metadata says: owners of kind Blueprint with their label."""
    labels = kernel["metadata"].get("labels") or {}
    out = []
    for owner in kernel["metadata"].get("ownerReferences") or []:
        if owner.get("kind") == "Blueprint":
            role = labels.get(requester_label(owner["name"])) or "candidate"
            out.append({"blueprint": owner["name"], "role": role})
    return sorted(out, key=lambda r: r["blueprint"])


def summary(requesters: list[dict[str, str]]) -> str:
    text = ",".join(r["blueprint"] for r in requesters)
    return text if len(text) <= SUMMARY_MAX else text[: SUMMARY_MAX - 3] + "..."


async def set_role(
    kube: Kube, namespace: str, name: str, owner: Body, role: str | None, known: Body | None = None
) -> Body | None:
    """Make `owner` (a Blueprint's ownerReference) hold Kernel `name` in `role`, or let go of it (None).

    A Kernel left without owners is deleted. Conditional on the resourceVersion, retried on conflict.
    `known`: the Kernel as this pass just read or wrote it, used instead of reading it again (a stale
    one only costs a conflict and a read). Returns the Kernel as written (None when gone).
    """
    key = requester_label(owner["name"])
    for _ in range(RETRIES):
        kernel, known = known or await kube.get("kernels", namespace, name), None
        if kernel is None:
            return None
        meta = kernel["metadata"]
        owners = meta.get("ownerReferences") or []
        others = [o for o in owners if o.get("uid") != owner["uid"]]
        labels = meta.get("labels") or {}
        if role is None and len(others) < len(owners):
            crash_point("kernel-release")
        if role is None and not others:
            await kube.delete("kernels", namespace, name)
            return None
        wanted_owners = others if role is None else owners if len(others) < len(owners) else [*owners, owner]
        stale = _stale_labels(labels, others if role is None else wanted_owners)
        if role is None:
            stale[key] = None
        label_patch: dict[str, Any] = {**stale} if role is None else {**stale, key: role}
        changes_labels = any(labels.get(k) != v for k, v in label_patch.items())
        if wanted_owners == owners and not changes_labels:
            return await _sync_status(kube, kernel)
        patch = {
            "metadata": {
                "resourceVersion": meta["resourceVersion"],
                "ownerReferences": wanted_owners,
                "labels": label_patch,
            }
        }
        try:
            patched = await kube.patch("kernels", namespace, name, patch)
        except Conflict:
            continue
        return None if patched is None else await _sync_status(kube, patched)
    raise RuntimeError(f"could not update the requesters of Kernel {name}: too many conflicts; will retry")


def _stale_labels(labels: dict[str, str], owners: list[Body]) -> dict[str, None]:
    """Requester labels of Blueprints that no longer own the Kernel (say, released by an older operator)."""
    live = {requester_label(o["name"]) for o in owners if o.get("kind") == "Blueprint"}
    return {k: None for k in labels if k.startswith(REQUESTER_PREFIX + "/") and k not in live}


def requesters_status(kernel: Body) -> dict[str, Any]:
    """The status fields naming the Kernel's requesters, as its metadata says."""
    requesters = requesters_of(kernel)
    return {"requesters": requesters, "requestedBy": summary(requesters)}


async def _sync_status(kube: Kube, kernel: Body) -> Body:
    wanted = requesters_status(kernel)
    status = kernel.get("status") or {}
    if all(status.get(k) == v for k, v in wanted.items()):
        return kernel
    meta = kernel["metadata"]
    return await kube.patch_status("kernels", meta["namespace"], meta["name"], wanted) or kernel
