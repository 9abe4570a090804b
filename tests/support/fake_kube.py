"""An in-memory API server behind the interface of `esper_operator.kube.Kube`, for unit tests.

It answers as `Kube` does: None for a missing object (HTTP 404), `Conflict` for a create of an
existing name or a write whose resourceVersion is stale (HTTP 409). Writes get what the API server
gives them: a uid and creationTimestamp on create, a new resourceVersion on every change, generation
1 on create and +1 when anything outside metadata and status changes. Patches are JSON merge patches
(RFC 7386), as `Kube.patch` sends them; the main resource ignores status and the status subresource
ignores all else. Delete honours finalizers (a deletionTimestamp, then gone when the last finalizer is
removed). Objects go in and out as deep copies, so a caller cannot change what is stored.

Every write made through the `Kube` interface is recorded in `writes` (verb, plural, name, body) and
every read in `reads` (each is a round trip to the API server). What the cluster itself does (the Job
controller finishing a Job, a Pod appearing) goes through `put` and `set_status`, not recorded.
"""

from __future__ import annotations

import copy
import datetime as dt
import random
import uuid
from dataclasses import dataclass, field

from esper_operator.kube import Body, Conflict
from tests.support.merge_patch import merge_patch

STATUS_PLURALS = frozenset({"blueprints", "kernels", "jobs"})
"""Resources with a status subresource: their create and main-resource patches ignore `status`."""


@dataclass(frozen=True)
class Write:
    """One write the code under test sent: verb, plural, namespace, name and the body as sent."""

    verb: str
    plural: str
    namespace: str
    name: str
    body: Body = field(default_factory=dict)  # empty for a delete


def _selector(selector: str) -> dict[str, str]:
    """An equality-based label selector (`a=b,c=d`), the only kind `Kube` sends."""
    pairs = [term.split("=", 1) for term in selector.split(",") if term]
    if any(len(p) != 2 for p in pairs):
        raise ValueError(f"unsupported label selector {selector!r}: only key=value terms")
    return {k: v for k, v in pairs}


def _check_names(*names: object) -> None:
    """The client refuses a name or namespace that is not a string (a pydantic ValidationError, a
    ValueError); an empty one would address the collection instead, which no caller means."""
    for name in names:
        if not isinstance(name, str) or not name:
            raise ValueError(f"a name or namespace must be a non-empty string, got {name!r}")


def _finished(job: Body) -> bool:
    conditions = (job.get("status") or {}).get("conditions") or []
    return any(c.get("type") in ("Complete", "Failed") and c.get("status") == "True" for c in conditions)


class FakeKube:
    """`esper_operator.kube.Kube`'s methods over dicts in memory (blueprints, kernels, jobs, pods)."""

    def __init__(self, *, cluster_list_forbidden: bool = False, seed: int = 0) -> None:
        self.objects: dict[tuple[str, str, str], Body] = {}  # (plural, namespace, name) -> object
        self.writes: list[Write] = []
        self.reads: list[Write] = []  # get, list and job_pods calls, without a body
        self.cluster_list_forbidden = cluster_list_forbidden  # list_all then sees one namespace, as Kube
        self._revision = 0
        self._uids = random.Random(seed)

    # --- what the API server does on its own ---------------------------------------------------------

    def _next_revision(self) -> str:
        self._revision += 1
        return str(self._revision)

    def _new_uid(self) -> str:
        return str(uuid.UUID(int=self._uids.getrandbits(128), version=4))

    def _store_new(self, plural: str, namespace: str, body: Body, *, keep_status: bool) -> Body:
        _check_names(namespace)
        name = (body.get("metadata") or {}).get("name")
        if not name:
            raise ValueError(f"{plural} in {namespace}: metadata.name is required")
        if (plural, namespace, name) in self.objects:
            raise Conflict(f'{plural} "{name}" already exists')
        obj = copy.deepcopy(body)
        if not keep_status and plural in STATUS_PLURALS:
            obj.pop("status", None)
        meta = obj.setdefault("metadata", {})
        meta["namespace"] = namespace
        meta.setdefault("uid", self._new_uid())
        meta.setdefault("creationTimestamp", dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"))
        meta["generation"] = int(meta.get("generation") or 1) if keep_status else 1
        meta["resourceVersion"] = self._next_revision()
        self.objects[(plural, namespace, name)] = obj
        return copy.deepcopy(obj)

    def _update(self, plural: str, namespace: str, name: str, new: Body) -> Body:
        """Store `new` in place of the object; bump resourceVersion (and generation) if it changed;
        remove an object being deleted once its last finalizer is gone."""
        old = self.objects[(plural, namespace, name)]
        if new == old:
            return copy.deepcopy(old)
        meta = new["metadata"]
        outside = ("metadata", "status")
        if {k: v for k, v in new.items() if k not in outside} != {
            k: v for k, v in old.items() if k not in outside
        }:
            meta["generation"] = int(old["metadata"].get("generation") or 1) + 1
        meta["resourceVersion"] = self._next_revision()
        if meta.get("deletionTimestamp") and not meta.get("finalizers"):
            del self.objects[(plural, namespace, name)]
        else:
            self.objects[(plural, namespace, name)] = new
        return copy.deepcopy(new)

    def put(self, plural: str, namespace: str, body: Body) -> Body:
        """Store an object as another client or controller left it (status and generation included);
        not recorded. An existing one of that name is replaced, keeping its uid unless the body has one."""
        name = body["metadata"]["name"]
        old = self.objects.pop((plural, namespace, name), None)
        body = copy.deepcopy(body)
        if old is not None and "uid" not in body["metadata"]:
            body["metadata"]["uid"] = old["metadata"]["uid"]
        return self._store_new(plural, namespace, body, keep_status=True)

    def set_status(self, plural: str, namespace: str, name: str, status: Body) -> Body:
        """Replace an object's status as its controller would (the Job controller); not recorded."""
        old = self.objects[(plural, namespace, name)]
        return self._update(plural, namespace, name, {**copy.deepcopy(old), "status": copy.deepcopy(status)})

    def peek(self, plural: str, namespace: str, name: str) -> Body | None:
        """The stored object (a copy), without a recorded read."""
        obj = self.objects.get((plural, namespace, name))
        return None if obj is None else copy.deepcopy(obj)

    def names(self, plural: str, namespace: str | None = None) -> list[str]:
        """The names stored under `plural` (in `namespace`, or in any), sorted."""
        return sorted(n for p, ns, n in self.objects if p == plural and namespace in (None, ns))

    def written(self, verb: str | None = None, plural: str | None = None) -> list[Write]:
        """The recorded writes, filtered by verb and plural."""
        return [w for w in self.writes if verb in (None, w.verb) and plural in (None, w.plural)]

    # --- Kube's interface ----------------------------------------------------------------------------

    async def get(self, plural: str, namespace: str, name: str) -> Body | None:
        _check_names(namespace, name)
        self.reads.append(Write("get", plural, namespace, name))
        return self.peek(plural, namespace, name)

    async def create(self, plural: str, namespace: str, body: Body) -> Body:
        self.writes.append(Write("create", plural, namespace, body["metadata"]["name"], copy.deepcopy(body)))
        return self._store_new(plural, namespace, body, keep_status=False)

    async def patch(self, plural: str, namespace: str, name: str, patch: Body) -> Body | None:
        """Merge patch of the main resource; a resourceVersion in the patch must match (else Conflict)."""
        _check_names(namespace, name)
        self.writes.append(Write("patch", plural, namespace, name, copy.deepcopy(patch)))
        old = self.objects.get((plural, namespace, name))
        if old is None:
            return None
        wanted = (patch.get("metadata") or {}).get("resourceVersion")
        if wanted is not None and wanted != old["metadata"]["resourceVersion"]:
            raise Conflict("the object has been modified; please apply your changes to the latest version")
        main = {k: v for k, v in patch.items() if k != "status"} if plural in STATUS_PLURALS else patch
        new = merge_patch(old, main)
        for fixed in ("uid", "namespace", "name", "creationTimestamp", "generation", "deletionTimestamp"):
            if fixed in old["metadata"]:
                new["metadata"][fixed] = old["metadata"][fixed]
        return self._update(plural, namespace, name, new)

    async def patch_status(self, plural: str, namespace: str, name: str, status: Body) -> Body | None:
        _check_names(namespace, name)
        self.writes.append(Write("patch_status", plural, namespace, name, copy.deepcopy(status)))
        old = self.objects.get((plural, namespace, name))
        if old is None:
            return None
        new = copy.deepcopy(old)
        new["status"] = merge_patch(old.get("status"), status)
        if not new["status"]:
            del new["status"]
        return self._update(plural, namespace, name, new)

    async def list_all(self, plural: str, fallback_namespace: str) -> list[Body]:
        self.reads.append(Write("list", plural, fallback_namespace, ""))
        namespace = fallback_namespace if self.cluster_list_forbidden else None
        return [
            copy.deepcopy(obj)
            for (p, ns, _), obj in sorted(self.objects.items())
            if p == plural and namespace in (None, ns)
        ]

    async def list_in(self, plural: str, namespace: str, label_selector: str) -> list[Body]:
        """Equality selectors only (`a=b,c=d`), as the operator uses them."""
        self.reads.append(Write("list", plural, namespace, label_selector))
        wanted = dict(term.split("=", 1) for term in label_selector.split(",") if term)
        return [
            copy.deepcopy(obj)
            for (p, ns, _), obj in sorted(self.objects.items())
            if p == plural
            and ns == namespace
            and all(((obj.get("metadata") or {}).get("labels") or {}).get(k) == v for k, v in wanted.items())
        ]

    async def delete(self, plural: str, namespace: str, name: str) -> None:
        _check_names(namespace, name)
        self.writes.append(Write("delete", plural, namespace, name))
        self._delete(plural, namespace, name)

    def _delete(self, plural: str, namespace: str, name: str) -> None:
        obj = self.objects.get((plural, namespace, name))
        if obj is None:
            return
        if not obj["metadata"].get("finalizers"):
            del self.objects[(plural, namespace, name)]
        elif not obj["metadata"].get("deletionTimestamp"):
            new = copy.deepcopy(obj)
            new["metadata"]["deletionTimestamp"] = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            self._update(plural, namespace, name, new)

    async def get_job(self, namespace: str, name: str) -> Body | None:
        _check_names(namespace, name)
        self.reads.append(Write("get", "jobs", namespace, name))
        return self.peek("jobs", namespace, name)

    async def create_job(self, namespace: str, body: Body) -> Body:
        self.writes.append(Write("create", "jobs", namespace, body["metadata"]["name"], copy.deepcopy(body)))
        return self._store_new("jobs", namespace, body, keep_status=False)

    async def delete_job(self, namespace: str, name: str) -> None:
        """Delete the Job; its Pods go with it (propagation Background: the garbage collector's work)."""
        _check_names(namespace, name)
        self.writes.append(Write("delete", "jobs", namespace, name))
        job = self.objects.get(("jobs", namespace, name))
        if job is None:
            return
        self._delete("jobs", namespace, name)
        uid = job["metadata"]["uid"]
        for p, ns, pod in list(self.objects):
            owners = self.objects[(p, ns, pod)]["metadata"].get("ownerReferences") or []
            if p == "pods" and ns == namespace and any(o.get("uid") == uid for o in owners):
                self._delete("pods", ns, pod)

    async def active_jobs(self, namespace: str, label_selector: str) -> int:
        _check_names(namespace)
        self.reads.append(Write("list", "jobs", namespace, label_selector))
        wanted = _selector(label_selector)
        return sum(
            1
            for (p, ns, _), job in self.objects.items()
            if p == "jobs"
            and ns == namespace
            and all((job["metadata"].get("labels") or {}).get(k) == v for k, v in wanted.items())
            and not _finished(job)
        )

    async def job_pods(self, namespace: str, job_name: str) -> list[Body]:
        _check_names(namespace, job_name)
        self.reads.append(Write("list", "pods", namespace, job_name))
        return [
            copy.deepcopy(obj)
            for (p, ns, _), obj in sorted(self.objects.items())
            if p == "pods"
            and ns == namespace
            and (obj["metadata"].get("labels") or {}).get("job-name") == job_name
        ]
