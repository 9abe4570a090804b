"""Garbage collection by ownerReferences and namespace reaping, as kube-controller-manager does.

`GarbageCollectorMixin` is the emulator's own (synchronous, inside its loop);
`HarnessGarbageCollector` does the same for objects on a real API server, which runs no controllers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import kmock

from .base import JSON, NAMESPACES, now_iso


class GarbageCollectorMixin:
    """The emulator's garbage collector and namespace controller (part of EsperEmulator)."""

    def _collect_garbage(self, owner_uid: str) -> None:
        # Garbage collector: a dependent whose owners are all gone is deleted (background policy,
        # honouring its finalizers); one with surviving owners only loses the dangling references.
        # Synchronous here; asynchronous (but prompt) in a real cluster.
        for key in list(self._objects):
            peek = self._peek(key)
            refs = (peek or {}).get("metadata", {}).get("ownerReferences") or []
            if not any(ref.get("uid") == owner_uid for ref in refs):
                continue
            obj = self._live(key)
            assert obj is not None
            alive = [ref for ref in refs if ref.get("uid") in self._uids]
            if not alive:
                self._delete(key, policy="Background")
            else:
                obj["metadata"]["ownerReferences"] = alive
                obj["metadata"]["resourceVersion"] = self._next_rv()
                self._store(key, obj, "MODIFIED")

    def _orphan_dependents(self, owner_uid: str) -> None:
        for key in list(self._objects):
            refs = (self._peek(key) or {}).get("metadata", {}).get("ownerReferences") or []
            obj = self._live(key) if any(ref.get("uid") == owner_uid for ref in refs) else None
            if obj is not None:
                obj["metadata"]["ownerReferences"] = [r for r in refs if r.get("uid") != owner_uid] or None
                if obj["metadata"]["ownerReferences"] is None:
                    del obj["metadata"]["ownerReferences"]
                obj["metadata"]["resourceVersion"] = self._next_rv()
                self._store(key, obj, "MODIFIED")

    def _reap_namespace(self, namespace: str) -> None:
        for key in list(self._objects):
            if key[1] == namespace and self._peek(key) is not None:
                self._delete(key, policy="Background")

    def _finish_namespace_if_empty(self, namespace: str) -> None:
        # The namespace controller removes a Terminating namespace once it holds no objects.
        ns_key = (NAMESPACES, None, namespace)
        ns = self._live(ns_key)
        if ns is None or not ns["metadata"].get("deletionTimestamp"):
            return
        if any(k[1] == namespace and self._peek(k) is not None for k in self._objects):
            return
        self._remove(ns_key)

    def _delete(self, key: tuple[kmock.resource, str | None, str], policy: str) -> JSON:
        obj = self._live(key)
        assert obj is not None
        meta = obj["metadata"]
        if meta.get("deletionTimestamp"):
            return obj  # already terminating: nothing more to do
        if policy == "Orphan":
            self._orphan_dependents(meta["uid"])
        if key[0] == NAMESPACES:
            # A namespace goes Terminating while its contents are deleted.
            meta["deletionTimestamp"] = now_iso()
            obj.setdefault("status", {})["phase"] = "Terminating"
            meta["resourceVersion"] = self._next_rv()
            self._store(key, obj, "MODIFIED")
            self._reap_namespace(meta["name"])
            self._finish_namespace_if_empty(meta["name"])
            return self._live(key) or obj
        if meta.get("finalizers"):
            # Finalizers block removal: the object is only marked, controllers then clear them.
            meta["deletionTimestamp"] = now_iso()
            meta["deletionGracePeriodSeconds"] = 0
            meta["resourceVersion"] = self._next_rv()
            self._store(key, obj, "MODIFIED")
            return obj
        return self._remove(key)


class HarnessGarbageCollector:
    """Garbage collection by ownerReferences for objects on the real API server.

    Stands in for kube-controller-manager's garbage collector, which the real server here does not
    run (apiextensions-apiserver and a bare kube-apiserver serve objects, no controllers). It watches
    `watched` API paths (Esper's kinds; on a full server also Jobs and Pods) across namespaces; when an
    owner disappears it deletes the dependents left without a living owner (background propagation,
    finalizers honoured by the server), trims dangling references from the others, and lets the
    emulator collect its own dependents (a Job owned by a Blueprint on the real server). Prompt, but
    asynchronous, like the real one: tests poll for the outcome.
    """

    def __init__(
        self,
        session_factory: Callable[[], Any],
        base_url: str,
        ssl: Any,
        watched: Sequence[str],
        emulator: Any | None,
        on_error: Callable[[str], None],
    ) -> None:
        self.session_factory = session_factory
        self.base_url = base_url.rstrip("/")
        self.ssl = ssl
        self.watched = list(watched)
        self.emulator = emulator
        self.on_error = on_error
        self.alive: dict[str, tuple[str, JSON]] = {}  # uid -> (collection path, object)
        self._tasks: list[asyncio.Task[None]] = []
        self._session: Any = None
        self._stopping = False

    async def start(self) -> None:
        self._session = self.session_factory()
        for path in self.watched:
            rv = await self._list(path)  # before returning: owners created later are seen by the watch
            self._tasks.append(asyncio.create_task(self._watch_forever(path, rv)))

    async def stop(self) -> None:
        self._stopping = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._session is not None:
            await self._session.close()

    async def _request(
        self, method: str, path: str, body: Any = None, ctype: str = "application/json"
    ) -> Any:
        async with self._session.request(
            method,
            self.base_url + path,
            data=None if body is None else json.dumps(body),
            headers={"Content-Type": ctype, "Accept": "application/json"},
            ssl=self.ssl,
        ) as rsp:
            text = await rsp.text()
            if rsp.status in (404, 409):  # gone already, or a newer object of that name: not ours
                return None
            if rsp.status >= 400:
                raise RuntimeError(f"{method} {path}: HTTP {rsp.status}: {text}")
            return json.loads(text) if text else None

    async def _list(self, path: str) -> str:
        listing = await self._request("GET", path) or {"items": [], "metadata": {}}
        seen = set()
        for obj in listing["items"]:
            uid = obj["metadata"]["uid"]
            seen.add(uid)
            self.alive[uid] = (path, obj)
        for uid in [u for u, (p, _) in self.alive.items() if p == path and u not in seen]:
            await self._owner_gone(uid)  # deleted while no watch was open
        return str(listing["metadata"].get("resourceVersion", ""))

    async def _watch_forever(self, path: str, rv: str) -> None:
        while not self._stopping:
            try:
                url = f"{self.base_url}{path}?watch=1&allowWatchBookmarks=true&resourceVersion={rv}"
                async with self._session.get(
                    url, ssl=self.ssl, headers={"Accept": "application/json"}
                ) as rsp:
                    if rsp.status != 200:
                        rv = await self._list(path)
                        continue
                    async for line in rsp.content:
                        if not line.strip():
                            continue
                        event = json.loads(line)
                        obj = event["object"]
                        if event["type"] == "ERROR":  # 410 Gone: re-list from now
                            break
                        rv = obj.get("metadata", {}).get("resourceVersion", rv)
                        if event["type"] in ("ADDED", "MODIFIED"):
                            self.alive[obj["metadata"]["uid"]] = (path, obj)
                        elif event["type"] == "DELETED":
                            await self._owner_gone(obj["metadata"]["uid"])
                rv = await self._list(path)
            except asyncio.CancelledError:
                raise
            except Exception:
                if self._stopping:
                    return
                self.on_error("harness garbage collector:\n" + traceback.format_exc())
                await asyncio.sleep(0.2)
                with contextlib.suppress(Exception):
                    rv = await self._list(path)

    def _owner_alive(self, uid: str) -> bool:
        if uid in self.alive:
            return True
        return self.emulator is not None and uid in self.emulator._uids

    async def _owner_gone(self, uid: str) -> None:
        self.alive.pop(uid, None)
        if self.emulator is not None:
            self.emulator._collect_garbage(uid)
        for dep_uid, (path, obj) in list(self.alive.items()):
            refs = obj["metadata"].get("ownerReferences") or []
            if not any(r.get("uid") == uid for r in refs):
                continue
            meta = obj["metadata"]
            one = path.rsplit("/", 1)
            item = f"{one[0]}/namespaces/{meta['namespace']}/{one[1]}/{meta['name']}"
            remaining = [r for r in refs if self._owner_alive(r.get("uid", ""))]
            if remaining:
                patch = {"metadata": {"ownerReferences": remaining, "uid": dep_uid}}
                await self._request("PATCH", item, patch, "application/merge-patch+json")
            else:
                body = {"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Background"}
                body["preconditions"] = {"uid": dep_uid}  # never a newer object of the same name
                await self._request("DELETE", item, body)
