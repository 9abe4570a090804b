"""An emulated Kubernetes cluster for tests: the one test-support module for the cluster.

There is no API server, Docker or kind on the build machines, so tests run against
`EsperEmulator`, a `kmock.KubernetesEmulator` subclass that mends what the operator relies on
(see /work/shared/FACTS.md for what stock kmock lacks). It is served over HTTP on 127.0.0.1 by
a background thread with its own event loop, so synchronous tests, a real `kopf run` process, the
real `kubectl` and the `kubernetes` client can all talk to it without blocking a test's loop.

Fixtures: put `pytest_plugins = ["tests.support.cluster"]` in tests/conftest.py, then::

    def test_x(cluster, kubelet, operator_process):
        cluster.create({"apiVersion": "esper.dev/v1alpha1", "kind": "Blueprint", ...})
        op = operator_process("esper_operator.main", env={"ESPER_STORE": "..."})
        wait_for(lambda: cluster.get("blueprints", "bp1")["status"].get("phase") == "Ready")
        cluster.kubectl("get", "bp")

Each emulator mend is commented with the Kubernetes behaviour it mirrors. Known gaps: strategic
merge patch and server-side apply are treated as JSON merge patches (lists are replaced); protobuf
is not spoken (415: `kubectl create ns x` fails, `kubectl create -f` works); garbage collection
and namespace deletion are synchronous; Foreground deletion acts like Background; no admission,
defaulting, schema validation or CEL rules; no pagination (`limit` is ignored); no periodic
watch bookmarks; watches forget events beyond the last `HISTORY` writes (410 Gone).
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import copy
import datetime
import json
import math
import os
import random
import re
import shutil
import signal
import string
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.parse
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiohttp.web
import jsonpatch
import kmock
import pytest
import urllib3
import yaml
from kmock._internal import rendering
from kmock._internal.k8s import KubernetesError

JSON = dict[str, Any]
T = TypeVar("T")

REPO_ROOT = Path(__file__).resolve().parents[2]
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


# --------------------------------------------------------------------------------------------
# Small helpers


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
    timeout: float = 10.0,
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
    predicate: Callable[[], T], timeout: float = 10.0, interval: float = 0.05, message: str = ""
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


# --------------------------------------------------------------------------------------------
# Selectors


@dataclass(frozen=True)
class Requirement:
    key: str
    op: str  # "=", "!=", "in", "notin", "exists", "!"
    values: frozenset[str] = frozenset()

    def matches(self, labels: Mapping[str, str]) -> bool:
        present = self.key in labels
        value = labels.get(self.key)
        if self.op == "=":
            return present and value in self.values
        if self.op == "in":
            return present and value in self.values
        if self.op in ("!=", "notin"):  # absent keys satisfy inequality, as in Kubernetes
            return not present or value not in self.values
        if self.op == "exists":
            return present
        return not present  # "!key"


_LABEL_REQ = re.compile(
    r"\s*(?:(?P<neg>!)\s*(?P<nkey>[\w./-]+)"
    r"|(?P<key>[\w./-]+)\s*(?:(?P<op>==|=|!=)\s*(?P<val>[\w.-]*)"
    r"|\s+(?P<setop>in|notin)\s*\((?P<set>[^)]*)\))?)\s*(?:,|$)"
)


def parse_label_selector(text: str | None) -> list[Requirement]:
    """Parse `a=b,c!=d,e in (x,y),f notin (z),g,!h` as the API server does; 400 on garbage."""
    reqs: list[Requirement] = []
    text = (text or "").strip()
    pos = 0
    while pos < len(text):
        m = _LABEL_REQ.match(text, pos)
        if not m or m.end() == pos:
            raise bad_request(f"unable to parse requirement: {text[pos:]!r} in labelSelector {text!r}")
        if m["nkey"]:
            reqs.append(Requirement(m["nkey"], "!"))
        elif m["op"]:
            reqs.append(Requirement(m["key"], "=" if m["op"] in ("=", "==") else "!=", frozenset([m["val"]])))
        elif m["setop"]:
            values = frozenset(v.strip() for v in m["set"].split(",") if v.strip())
            reqs.append(Requirement(m["key"], m["setop"], values))
        else:
            reqs.append(Requirement(m["key"], "exists"))
        pos = m.end()
    return reqs


def parse_field_selector(text: str | None, allowed: set[str]) -> list[tuple[str, bool, str]]:
    """`path=value,path!=value` -> [(path, equal, value)]; unknown paths are a 400 as in Kubernetes."""
    out = []
    for part in (text or "").split(","):
        if not part.strip():
            continue
        m = re.fullmatch(r"\s*([\w.\[\]'-]+)\s*(==|=|!=)\s*(.*?)\s*", part)
        if not m:
            raise bad_request(f"invalid selector: {part!r}")
        path, op, value = m.groups()
        if path not in allowed:
            raise bad_request(f"field label not supported: {path}")
        out.append((path, op != "!=", value))
    return out


def field_value(obj: Mapping[str, Any], path: str) -> str:
    """A selectable field's value as a string; absent fields read as "" (as the API server does)."""
    cur: Any = obj
    for part in path.split("."):
        cur = cur.get(part) if isinstance(cur, Mapping) else None
    if cur is None:
        return ""
    if isinstance(cur, bool):
        return "true" if cur else "false"
    return str(cur)


def jsonpath_values(obj: Any, path: str) -> list[Any]:
    """A tiny JSONPath for printer columns: `.a.b`, `.a[0]`, `.a[*].b`, `.a[?(@.type=="Ready")].status`."""
    tokens = re.findall(
        r"\.([\w-]+)|\[(\d+|\*)\]|\[\?\(@\.([\w-]+)\s*==\s*[\"']([^\"']*)[\"']\)\]",
        path.strip().lstrip("{").rstrip("}"),
    )
    current = [obj]
    for name, index, fkey, fval in tokens:
        nxt: list[Any] = []
        for item in current:
            if name and isinstance(item, Mapping) and name in item:
                nxt.append(item[name])
            elif index == "*" and isinstance(item, list):
                nxt.extend(item)
            elif index and isinstance(item, list) and int(index) < len(item):
                nxt.append(item[int(index)])
            elif fkey and isinstance(item, list):
                nxt.extend(x for x in item if isinstance(x, Mapping) and str(x.get(fkey)) == fval)
        current = nxt
    return current


# --------------------------------------------------------------------------------------------
# The emulator


@dataclass
class _Watcher:
    resource: kmock.resource
    namespace: str | None
    name: str | None
    labels: list[Requirement]
    fields: list[tuple[str, bool, str]]
    queue: asyncio.Queue[JSON | None]


@dataclass
class _Extras:
    """Per-resource facts a CRD declares that kmock's ResourceInfo has no place for."""

    printer_columns: list[JSON] = field(default_factory=list)
    selectable: set[str] = field(default_factory=set)
    custom: bool = False


class EsperEmulator(kmock.KubernetesEmulator):
    """kmock's emulator with the API-server semantics the operator relies on.

    Handles every resource request itself (stock kmock mutates objects before reactions and lacks
    uid/resourceVersion/generation, concurrency, selectors, status separation, PUT, GC). DSL
    reactions added by a test (`emulator["patch", kmock.resource(...)] << 500`) still take
    precedence, so faults can be injected; fallback reactions are replaced by `_dispatch`.
    """

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self._rv = 0
        self._uids: dict[str, tuple[kmock.resource, str | None, str]] = {}
        self._watchers: list[_Watcher] = []
        self._history: collections.deque[tuple[int, kmock.resource, JSON]] = collections.deque()
        self._compacted_rv = 0
        self._extras: dict[kmock.resource, _Extras] = collections.defaultdict(_Extras)
        self.pod_logs: dict[tuple[str, str], str] = {}
        self.internal_errors: list[str] = []

    # ---- request entry ------------------------------------------------------------------

    async def __call__(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        # Own request parsing: kmock's parser mis-reads `/api/v1/namespaces[/name]` (FACTS.md).
        body = await raw_request.read()
        try:
            request = self._parse_request(raw_request, body)
            self._requests.append(request)
            return await self._handle(request)
        except KubernetesError as exc:
            return await self._render_error(exc)
        except Exception as exc:  # a bug in the emulator: report it loudly to the client and tests
            self.internal_errors.append(traceback.format_exc())
            return await self._render_error(exc)

    def _parse_request(self, raw: aiohttp.web.BaseRequest, body: bytes) -> rendering.Request:
        text = body.decode("utf-8", "replace")
        data: Any = None
        ctype = raw.headers.get("Content-Type", "")
        if body and "protobuf" in ctype:
            # Protobuf is not spoken; client-go falls back to JSON on a 415 (kubectl 1.32 does not
            # for all verbs: use `kubectl create -f`/`apply -f` rather than `kubectl create ns x`).
            raise k8s_error(415, "UnsupportedMediaType", f"the emulator speaks JSON only, not {ctype}")
        if body:
            try:
                data = yaml.safe_load(text) if "yaml" in ctype else json.loads(text)
            except (ValueError, yaml.YAMLError) as exc:
                raise bad_request(f"cannot decode the request body: {exc}") from None
        group = version = plural = namespace = name = sub = None
        parts = [p for p in raw.path.split("/") if p]
        if parts[:1] == ["api"] and len(parts) >= 2:
            group, version, rest = "", parts[1], parts[2:]
        elif parts[:1] == ["apis"] and len(parts) >= 3:
            group, version, rest = parts[1], parts[2], parts[3:]
        elif parts[:1] == ["apis"] and len(parts) == 2:
            group, rest = parts[1], []
        else:
            rest = []
        # Mirrors apiserver's RequestInfoFactory: `namespaces/<ns>/<plural>...` is namespaced, while
        # `namespaces[/<name>[/status|finalize]]` addresses the Namespace objects themselves.
        if len(rest) >= 3 and rest[0] == "namespaces" and rest[2] not in ("status", "finalize"):
            namespace, rest = rest[1], rest[2:]
        if rest:
            plural = rest[0]
            name = rest[1] if len(rest) > 1 else None
            sub = "/".join(rest[2:]) or None
        resource = None if group is None else kmock.resource(group=group, version=version, plural=plural)
        method = raw.method.upper()
        action: kmock.action | None = None
        if resource is not None:
            if method == "GET":
                action = (
                    kmock.action.WATCH
                    if raw.query.get("watch") in ("true", "1")
                    else kmock.action.LIST
                    if name is None
                    else kmock.action.FETCH
                )
            elif method == "POST" and name is None:
                action = kmock.action.CREATE
            elif method == "PATCH":
                action = kmock.action.UPDATE
            elif method == "DELETE":
                action = kmock.action.DELETE
        return rendering.Request(
            id=len(self._requests),
            raw_request=raw,
            url=raw.url,
            method=method,
            params=dict(raw.query),
            headers=dict(raw.headers),
            cookies=dict(raw.cookies),
            body=body,
            text=text,
            data=data,
            action=action,
            resource=resource,
            namespace=namespace,
            name=name,
            subresource=sub,
        )

    async def _handle(self, request: rendering.Request) -> aiohttp.web.StreamResponse:
        if request.resource is None or request.resource.plural is None:
            return await kmock.RawHandler._handle(self, request)  # discovery & non-k8s paths
        # A test's own reactions win (fault injection); kmock's fallbacks are superseded by ours.
        user = [p for p in self._payloads if not (p.priorities and p.priorities[0] == -math.inf)]
        user.sort(key=lambda p: tuple(-x for x in p.priorities))
        for payload in user:
            if request in payload._source and not payload._disabled.is_set():
                try:
                    return await payload(request)
                except rendering.ReactionMismatchError:
                    payload._disabled.set()
                except NotImplementedError:
                    pass
        return await self._dispatch(request)

    async def _render_error(self, exc: Exception) -> aiohttp.web.StreamResponse:
        # A metav1.Status body, as clients (kubectl's IsNotFound, kopf's APIError) expect.
        if isinstance(exc, KubernetesError):
            code, reason, message, details = exc.status, exc.reason, exc.message, exc.details
        else:
            code, reason, message = 500, "InternalError", f"emulator bug: {exc!r}"
            details = {"causes": [{"message": traceback.format_exc()}]}
        body = {
            "apiVersion": "v1",
            "kind": "Status",
            "metadata": {},
            "status": "Failure",
            "code": code,
            "reason": reason,
            "message": message,
            "details": details or {},
        }
        return aiohttp.web.json_response(body, status=code)

    # ---- discovery (mended) -------------------------------------------------------------

    async def _serve_version(self, request: rendering.Request) -> rendering.Payload:
        # Core discovery must say groupVersion "v1", not "/v1" (kubectl hid pods/namespaces), and
        # subresources carry no short names or categories (kubectl saw duplicates).
        assert request.resource is not None
        group, version = request.resource.group, request.resource.version
        entries = []
        for res, info in sorted(self._resources.items(), key=lambda kv: str(kv[0].plural)):
            if res.group != group or res.version != version or not res.plural:
                continue
            kind = info.kind or res.plural.capitalize()
            entries.append(
                {
                    "name": res.plural,
                    "kind": kind,
                    "singularName": info.singular or kind.lower(),
                    "namespaced": bool(info.namespaced),
                    "verbs": sorted(info.verbs or STANDARD_VERBS),
                    "shortNames": sorted(info.shortnames),
                    "categories": sorted(info.categories),
                }
            )
            for sub in sorted(info.subresources):
                entries.append(
                    {
                        "name": f"{res.plural}/{sub}",
                        "kind": kind,
                        "singularName": "",
                        "namespaced": bool(info.namespaced),
                        "verbs": ["get", "patch", "update"],
                    }
                )
        if not entries and group != "":
            raise k8s_error(404, "NotFound", "the server could not find the requested resource")
        return {
            "apiVersion": "v1",
            "kind": "APIResourceList",
            "groupVersion": api_version_of(kmock.resource(group, version, "x")),
            "resources": entries,
        }

    # ---- resource registration ------------------------------------------------------------

    def register_crd(self, crd: Mapping[str, Any]) -> list[kmock.resource]:
        """Serve the resources a CustomResourceDefinition declares (served versions only)."""
        spec = crd["spec"]
        names = spec["names"]
        out = []
        for ver in spec.get("versions", []):
            if not ver.get("served", True):
                continue
            res = kmock.resource(spec["group"], ver["name"], names["plural"])
            subs = set((ver.get("subresources") or {}).keys())
            self._resources[res] = kmock.ResourceInfo(
                kind=names["kind"],
                singular=names.get("singular") or names["kind"].lower(),
                namespaced=spec.get("scope", "Namespaced") == "Namespaced",
                shortnames=names.get("shortNames", []),
                categories=names.get("categories", []),
                verbs=STANDARD_VERBS,
                subresources=subs,
            )
            extras = self._extras[res]
            extras.custom = True
            extras.printer_columns = list(ver.get("additionalPrinterColumns") or [])
            extras.selectable = {sf["jsonPath"].lstrip(".") for sf in ver.get("selectableFields") or []}
            out.append(res)
        return out

    def _unregister_crd(self, crd: Mapping[str, Any]) -> None:
        # Deleting a CRD deletes all its custom resources and stops serving the resource.
        spec = crd["spec"]
        for ver in spec.get("versions", []):
            res = kmock.resource(spec["group"], ver["name"], spec["names"]["plural"])
            for key in [k for k in self._objects if k[0] == res]:
                if not self._objects[key].deleted:
                    self._remove(key)
                del self._objects[key]
            self._resources.pop(res, None)
            self._extras.pop(res, None)

    def _info(self, res: kmock.resource) -> kmock.ResourceInfo:
        if res not in self._resources:
            raise k8s_error(404, "NotFound", "the server could not find the requested resource")
        return self._resources[res]

    # ---- store primitives (synchronous: atomic within the loop) ------------------------------

    def _live(self, key: tuple[kmock.resource, str | None, str]) -> JSON | None:
        obj = self._objects[key] if key in self._objects else None  # noqa: SIM401 - no .get()
        return None if obj is None or obj.deleted else copy.deepcopy(obj.raw)

    def _peek(self, key: tuple[kmock.resource, str | None, str]) -> JSON | None:
        """Like `_live` but without a copy: for read-only scans (GC) over many objects."""
        obj = self._objects[key] if key in self._objects else None  # noqa: SIM401 - no .get()
        return None if obj is None or obj.deleted else obj.raw

    def _next_rv(self) -> str:
        self._rv += 1  # one global counter, bumped on every write, like etcd's revision
        return str(self._rv)

    def _store(self, key: tuple[kmock.resource, str | None, str], obj: JSON, event: str) -> None:
        if key in self._objects:
            self._objects[key].create(copy.deepcopy(obj))
        else:
            self._objects[key] = copy.deepcopy(obj)
        self._uids[obj["metadata"]["uid"]] = key
        self._emit(key[0], event, obj)

    def _emit(self, res: kmock.resource, event_type: str, obj: JSON) -> None:
        event = {"type": event_type, "object": copy.deepcopy(obj)}
        if len(self._history) >= HISTORY:
            self._compacted_rv = self._history.popleft()[0]
        self._history.append((int(obj["metadata"]["resourceVersion"]), res, event))
        for watcher in list(self._watchers):
            if self._watch_matches(watcher, res, obj):
                watcher.queue.put_nowait(event)

    def _remove(self, key: tuple[kmock.resource, str | None, str]) -> JSON:
        """Remove an object for good, then let the garbage collector and namespace reaper act."""
        obj = self._live(key)
        assert obj is not None
        obj["metadata"]["resourceVersion"] = self._next_rv()
        self._objects[key].create(copy.deepcopy(obj))
        self._objects[key].delete()
        uid = obj["metadata"]["uid"]
        self._uids.pop(uid, None)
        self._emit(key[0], "DELETED", obj)
        if key[0] == CRD_RESOURCE:
            self._unregister_crd(obj)
        if key[0] == NAMESPACES:
            self._reap_namespace(obj["metadata"]["name"])
        self._collect_garbage(uid)
        if key[1] is not None:
            self._finish_namespace_if_empty(key[1])
        return obj

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

    # ---- watch matching & selectors -----------------------------------------------------------

    def _allowed_fields(self, res: kmock.resource) -> set[str]:
        extras = self._extras.get(res, _Extras())
        builtin = set() if extras.custom else BUILTIN_SELECTABLE.get(str(res.plural), set())
        return {"metadata.name", "metadata.namespace"} | extras.selectable | builtin

    @staticmethod
    def _selected(obj: JSON, labels: list[Requirement], fields: list[tuple[str, bool, str]]) -> bool:
        obj_labels = obj.get("metadata", {}).get("labels") or {}
        if not all(req.matches(obj_labels) for req in labels):
            return False
        return all((field_value(obj, path) == value) == equal for path, equal, value in fields)

    def _watch_matches(self, w: _Watcher, res: kmock.resource, obj: JSON) -> bool:
        meta = obj.get("metadata", {})
        return (
            res == w.resource
            and (w.namespace is None or meta.get("namespace") == w.namespace)
            and (w.name is None or meta.get("name") == w.name)
            and self._selected(obj, w.labels, w.fields)
        )

    # ---- dispatching -----------------------------------------------------------------------

    async def _dispatch(self, request: rendering.Request) -> aiohttp.web.StreamResponse:
        res = request.resource
        assert res is not None
        info = self._info(res)
        namespace = request.namespace if info.namespaced else None
        if request.subresource == "log" and res == kmock.resource("", "v1", "pods"):
            return self._serve_pod_log(request)
        if request.subresource and request.subresource not in info.subresources:
            raise k8s_error(404, "NotFound", "the server could not find the requested resource")
        method = request.method.upper() if isinstance(request.method, str) else str(request.method.value)
        if method == "GET" and request.params.get("watch") in ("true", "1"):
            return await self._serve_watch_stream(request, res, namespace)
        if method == "GET" and request.name is None:
            return self._respond(request, res, self._list(request, res, namespace))
        if method == "GET":
            obj = self._live((res, namespace, request.name))
            if obj is None:
                raise not_found(res, request.name)
            return self._respond(request, res, obj)
        if method == "POST" and request.name is None:
            return self._respond(request, res, self._create(request, res, info), status=201)
        if method in ("PUT", "PATCH") and request.name:
            return self._respond(request, res, self._update(request, res, info, namespace, method))
        if method == "DELETE" and request.name:
            return self._respond(request, res, self._serve_delete_one(request, res, namespace))
        if method == "DELETE":
            return self._respond(request, res, self._delete_collection(request, res, namespace))
        raise k8s_error(405, "MethodNotAllowed", f"the server does not allow this method on {qualified(res)}")

    def _respond(
        self, request: rendering.Request, res: kmock.resource, body: JSON, status: int = 200
    ) -> aiohttp.web.StreamResponse:
        if self._wants_table(request):
            body = self._table(request, res, body.get("items", [body]) if "items" in body else [body])
        return aiohttp.web.json_response(body, status=status)

    @staticmethod
    def _wants_table(request: rendering.Request) -> bool:
        accept = next((v for k, v in request.headers.items() if k.lower() == "accept"), "")
        return "as=Table" in accept

    def _list(self, request: rendering.Request, res: kmock.resource, namespace: str | None) -> JSON:
        labels = parse_label_selector(request.params.get("labelSelector"))
        fields = parse_field_selector(request.params.get("fieldSelector"), self._allowed_fields(res))
        items = []
        for key in sorted((k for k in self._objects if k[0] == res), key=lambda k: (k[1] or "", k[2])):
            obj = self._live(key)
            if obj is None or (namespace is not None and key[1] != namespace):
                continue
            if self._selected(obj, labels, fields):
                items.append(obj)
        info = self._resources[res]
        # Lists carry kind/apiVersion (kubectl failed with "Object 'Kind' is missing" without them).
        return {
            "apiVersion": api_version_of(res),
            "kind": f"{info.kind}List",
            "metadata": {"resourceVersion": str(self._rv)},
            "items": items,
        }

    # ---- tables (kubectl get) ----------------------------------------------------------------

    def _table(self, request: rendering.Request, res: kmock.resource, objs: list[JSON]) -> JSON:
        # `Accept: application/json;as=Table;g=meta.k8s.io;v=v1`: the server renders the columns,
        # from a CRD's additionalPrinterColumns (Name + Age when it declares none).
        extras = self._extras.get(res, _Extras())
        columns = extras.printer_columns or [
            {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}
        ]
        defs = [
            {
                "name": "Name",
                "type": "string",
                "format": "name",
                "priority": 0,
                "description": "Name must be unique within a namespace.",
            }
        ]
        defs += [
            {
                "name": c["name"],
                "type": c.get("type", "string"),
                "format": c.get("format", ""),
                "priority": c.get("priority", 0),
                "description": c.get("description", ""),
            }
            for c in columns
        ]
        include = request.params.get("includeObject", "Metadata")
        rows = []
        for obj in objs:
            cells: list[Any] = [obj["metadata"]["name"]]
            for col in columns:
                values = jsonpath_values(obj, col["jsonPath"])
                value = values[0] if values else None
                if value is not None and col.get("type") == "date":
                    value = human_age(value)
                elif isinstance(value, dict | list):
                    value = json.dumps(value)
                cells.append(value)
            row: JSON = {"cells": cells}
            if include == "Object":
                row["object"] = obj
            elif include != "None":
                row["object"] = {
                    "kind": "PartialObjectMetadata",
                    "apiVersion": "meta.k8s.io/v1",
                    "metadata": obj["metadata"],
                }
            rows.append(row)
        return {
            "kind": "Table",
            "apiVersion": "meta.k8s.io/v1",
            "metadata": {"resourceVersion": str(self._rv)},
            "columnDefinitions": defs,
            "rows": rows,
        }

    # ---- create --------------------------------------------------------------------------------

    def _create(self, request: rendering.Request, res: kmock.resource, info: kmock.ResourceInfo) -> JSON:
        if not isinstance(request.data, dict):
            raise bad_request("the body of a create must be a JSON object")
        obj = copy.deepcopy(request.data)
        meta = obj.setdefault("metadata", {})
        namespace: str | None = None
        if info.namespaced:
            # The namespace comes from the URL; a different one in the body is a 400.
            body_ns = meta.get("namespace")
            if request.namespace and body_ns and body_ns != request.namespace:
                raise bad_request(
                    "the namespace of the provided object does not match the namespace sent on the request"
                )
            namespace = request.namespace or body_ns or "default"
            ns = self._live((NAMESPACES, None, namespace))
            if ns is None:
                raise not_found(NAMESPACES, namespace)
            if ns["metadata"].get("deletionTimestamp"):
                raise k8s_error(
                    403,
                    "Forbidden",
                    f"unable to create new content in namespace {namespace} because it is being terminated",
                )
            meta["namespace"] = namespace
        else:
            meta.pop("namespace", None)
        if not meta.get("name") and meta.get("generateName"):
            suffix = "".join(random.choices(string.ascii_lowercase + string.digits, k=5))
            meta["name"] = meta["generateName"] + suffix
        name = meta.get("name")
        if not name:
            raise invalid(res, None, "metadata.name: Required value: name or generateName is required")
        key = (res, namespace, name)
        if self._live(key) is not None:
            raise k8s_error(
                409,
                "AlreadyExists",
                f'{qualified(res)} "{name}" already exists',
                {"name": name, "group": res.group, "kind": res.plural},
            )
        for ref in meta.get("ownerReferences") or []:
            missing = [f for f in ("apiVersion", "kind", "name", "uid") if not ref.get(f)]
            if missing:
                raise invalid(res, name, f"metadata.ownerReferences: Invalid value: missing {missing}")
        obj["apiVersion"], obj["kind"] = api_version_of(res), info.kind
        for ro in ("deletionTimestamp", "deletionGracePeriodSeconds", "managedFields", "selfLink"):
            meta.pop(ro, None)
        meta.update(uid=str(uuid.uuid4()), generation=1, creationTimestamp=now_iso())
        if "status" in info.subresources:
            obj.pop("status", None)  # with a status subresource, status is ignored on create
        if res == NAMESPACES:
            obj["status"] = {"phase": "Active"}
        if res == CRD_RESOURCE:
            self._validate_crd(obj)
        if request.params.get("dryRun"):
            return obj
        meta["resourceVersion"] = self._next_rv()
        if res == CRD_RESOURCE:
            obj["status"] = self._crd_status(obj)
            self.register_crd(obj)
        self._store(key, obj, "ADDED")
        return obj

    @staticmethod
    def _validate_crd(crd: JSON) -> None:
        spec = crd.get("spec", {})
        names = spec.get("names", {})
        expected = f"{names.get('plural')}.{spec.get('group')}"
        if crd["metadata"]["name"] != expected:
            raise invalid(
                CRD_RESOURCE,
                crd["metadata"]["name"],
                f'metadata.name: must be spec.names.plural+"."+spec.group ({expected})',
            )

    @staticmethod
    def _crd_status(crd: JSON) -> JSON:
        # The apiextensions controller accepts the names and marks the CRD Established at once.
        ts = now_iso()
        conditions = [
            {"type": t, "status": "True", "reason": r, "message": "", "lastTransitionTime": ts}
            for t, r in (("NamesAccepted", "NoConflicts"), ("Established", "InitialNamesAccepted"))
        ]
        return {
            "acceptedNames": crd["spec"]["names"],
            "conditions": conditions,
            "storedVersions": [v["name"] for v in crd["spec"].get("versions", []) if v.get("storage")],
        }

    # ---- update: PUT and PATCH, main endpoint and /status ---------------------------------------

    def _update(
        self,
        request: rendering.Request,
        res: kmock.resource,
        info: kmock.ResourceInfo,
        namespace: str | None,
        method: str,
    ) -> JSON:
        key = (res, namespace, request.name or "")
        old = self._live(key)
        if old is None:
            raise not_found(res, request.name)
        current_rv = old["metadata"]["resourceVersion"]
        new = self._apply_body(request, res, old, method)
        meta = new.setdefault("metadata", {})
        # Optimistic concurrency: a write carrying a stale resourceVersion is a 409 Conflict.
        sent_rv = meta.get("resourceVersion")
        if sent_rv not in (None, "") and str(sent_rv) != current_rv:
            raise conflict(res, key[2])
        if method == "PUT" and meta.get("name") not in (None, key[2]):
            raise bad_request("the name of the object does not match the name on the URL")
        if request.subresource == "status":
            # /status changes only status; everything else is taken from the stored object.
            result = copy.deepcopy(old)
            if "status" in new:
                result["status"] = new["status"]
            else:
                result.pop("status", None)
            new = result
        elif "status" in info.subresources:
            # The main endpoint ignores status when a status subresource exists.
            if "status" in old:
                new["status"] = old["status"]
            else:
                new.pop("status", None)
        meta = new["metadata"]
        # Immutable and system-owned metadata survive any write.
        for ro in (
            "uid",
            "creationTimestamp",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
            "namespace",
            "name",
            "generation",
        ):
            if ro in old["metadata"]:
                meta[ro] = old["metadata"][ro]
            else:
                meta.pop(ro, None)
        new["apiVersion"], new["kind"] = old["apiVersion"], old["kind"]
        if old["metadata"].get("deletionTimestamp"):
            added = set(meta.get("finalizers") or []) - set(old["metadata"].get("finalizers") or [])
            if added:
                raise invalid(
                    res,
                    key[2],
                    f"metadata.finalizers: Forbidden: no new finalizers can be added "
                    f"if the object is being deleted, found new finalizers {sorted(added)}",
                )
        meta["resourceVersion"] = current_rv
        if new == old:
            return old  # a no-op write bumps nothing and notifies no one

        # generation counts changes of the desired state: anything but metadata and status.
        def desired(o: JSON) -> JSON:
            return {k: v for k, v in o.items() if k not in ("metadata", "status")}

        if desired(new) != desired(old):
            meta["generation"] = int(old["metadata"].get("generation", 1)) + 1
        if request.params.get("dryRun"):
            return new
        meta["resourceVersion"] = self._next_rv()
        if res == CRD_RESOURCE:
            self.register_crd(new)
        self._store(key, new, "MODIFIED")
        if meta.get("deletionTimestamp") and not meta.get("finalizers"):
            return self._remove(key)  # the last finalizer is gone: the object goes
        return new

    def _apply_body(self, request: rendering.Request, res: kmock.resource, old: JSON, method: str) -> JSON:
        data = request.data
        if method == "PUT":
            if not isinstance(data, dict):
                raise bad_request("the body of a replace must be a JSON object")
            return copy.deepcopy(data)
        ctype = next((v for k, v in request.headers.items() if k.lower() == "content-type"), "")
        if "json-patch" in ctype:
            if not isinstance(data, list):
                raise bad_request("a JSON patch must be a list of operations")
            try:
                return jsonpatch.apply_patch(old, data, in_place=False)
            except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as exc:
                # A failed `test` op (kopf's resourceVersion guard) is a 422, as in Kubernetes.
                raise invalid(res, request.name, f"the server rejected our request: {exc}") from None
        if not isinstance(data, dict):
            raise bad_request("a merge patch must be a JSON object")
        # merge-patch, strategic-merge-patch and apply-patch are all merged as RFC 7386 merge
        # patches: lists are replaced, `$patch` directives dropped (an approximation, see module doc).
        return _merge_patch(old, _strip_directives(data))

    # ---- delete ------------------------------------------------------------------------------

    def _serve_delete_one(
        self, request: rendering.Request, res: kmock.resource, namespace: str | None
    ) -> JSON:
        key = (res, namespace, request.name or "")
        obj = self._live(key)
        if obj is None:
            raise not_found(res, request.name)
        options = request.data if isinstance(request.data, dict) else {}
        pre = options.get("preconditions") or {}
        if pre.get("uid") and pre["uid"] != obj["metadata"]["uid"]:
            raise conflict(res, key[2])
        if pre.get("resourceVersion") and pre["resourceVersion"] != obj["metadata"]["resourceVersion"]:
            raise conflict(res, key[2])
        if request.params.get("dryRun") or options.get("dryRun"):
            return obj
        return self._delete(key, self._policy(request, res, options))

    @staticmethod
    def _policy(request: rendering.Request, res: kmock.resource, options: Mapping[str, Any]) -> str:
        policy = options.get("propagationPolicy") or request.params.get("propagationPolicy")
        if policy:
            return str(policy)
        if options.get("orphanDependents") is True:
            return "Orphan"
        # batch/v1 Jobs (like ReplicaSets) default to orphaning their Pods when no policy is sent:
        # a classic leak with `delete_namespaced_job(name, ns)`. kubectl always sends Background.
        return "Orphan" if res == kmock.resource("batch", "v1", "jobs") else "Background"

    def _delete_collection(
        self, request: rendering.Request, res: kmock.resource, namespace: str | None
    ) -> JSON:
        listing = self._list(request, res, namespace)
        options = request.data if isinstance(request.data, dict) else {}
        policy = self._policy(request, res, options)
        for obj in listing["items"]:
            key = (
                res,
                obj["metadata"].get("namespace")
                if namespace is not None or self._resources[res].namespaced
                else None,
                obj["metadata"]["name"],
            )
            if self._live(key) is not None:
                self._delete(key, policy)
        return listing

    # ---- watch --------------------------------------------------------------------------------

    async def _serve_watch_stream(
        self, request: rendering.Request, res: kmock.resource, namespace: str | None
    ) -> aiohttp.web.StreamResponse:
        params = request.params
        fields = parse_field_selector(params.get("fieldSelector"), self._allowed_fields(res))
        name = request.name
        watcher = _Watcher(
            res, namespace, name, parse_label_selector(params.get("labelSelector")), fields, asyncio.Queue()
        )
        table = self._wants_table(request)
        since = params.get("resourceVersion") or "0"
        initial: list[JSON] = []
        # Snapshot and subscription happen atomically (no await in between): no event is lost.
        if since == "0" or params.get("sendInitialEvents") == "true":
            # No resourceVersion (or "0"): synthetic ADDED events for the current state first.
            for key in sorted((k for k in self._objects if k[0] == res), key=lambda k: (k[1] or "", k[2])):
                obj = self._live(key)
                if obj is not None and self._watch_matches(watcher, res, obj):
                    initial.append({"type": "ADDED", "object": obj})
            if params.get("sendInitialEvents") == "true" and params.get("allowWatchBookmarks") == "true":
                initial.append(
                    {
                        "type": "BOOKMARK",
                        "object": {
                            "kind": self._resources[res].kind,
                            "apiVersion": api_version_of(res),
                            "metadata": {
                                "resourceVersion": str(self._rv),
                                "annotations": {"k8s.io/initial-events-end": "true"},
                            },
                        },
                    }
                )
        else:
            # With a resourceVersion: replay only the later events; too old a version is 410 Gone.
            try:
                since_int = int(since)
            except ValueError:
                raise bad_request(f"invalid resourceVersion {since!r}") from None
            if since_int < self._compacted_rv:
                initial.append(
                    {
                        "type": "ERROR",
                        "object": {
                            "apiVersion": "v1",
                            "kind": "Status",
                            "status": "Failure",
                            "code": 410,
                            "reason": "Expired",
                            "message": f"too old resource version: {since_int} ({self._compacted_rv})",
                        },
                    }
                )
                watcher = None  # type: ignore[assignment]
            else:
                initial = [
                    ev
                    for rv, r, ev in self._history
                    if rv > since_int and self._watch_matches(watcher, r, ev["object"])
                ]
        if watcher is not None:
            self._watchers.append(watcher)
        # A JSON content type: kubectl's `get -w` refuses a stream without one.
        response = aiohttp.web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
        raw = request._raw_request
        assert raw is not None
        await response.prepare(raw)
        timeout = float(params.get("timeoutSeconds") or 0) or None
        try:
            async with asyncio.timeout(timeout):
                for event in initial:
                    await response.write(self._encode_event(request, res, event, table))
                while watcher is not None:
                    try:
                        event = await asyncio.wait_for(watcher.queue.get(), 1.0)
                    except TimeoutError:
                        if raw.transport is None or raw.transport.is_closing():
                            break  # the client went away
                        continue
                    if event is None:
                        break  # the emulator is shutting down
                    await response.write(self._encode_event(request, res, event, table))
        except (TimeoutError, ConnectionError):
            pass  # timeoutSeconds elapsed (the server closes the stream) or the client left
        finally:
            if watcher is not None and watcher in self._watchers:
                self._watchers.remove(watcher)
        with contextlib.suppress(ConnectionError, RuntimeError):
            await response.write_eof()
        return response

    def _encode_event(
        self, request: rendering.Request, res: kmock.resource, event: JSON, table: bool
    ) -> bytes:
        if table and event["type"] in ("ADDED", "MODIFIED", "DELETED"):
            event = {"type": event["type"], "object": self._table(request, res, [event["object"]])}
        return json.dumps(event).encode() + b"\n"

    def close_watches(self) -> None:
        """End every open watch stream (at shutdown), as an API server restart would."""
        for watcher in list(self._watchers):
            watcher.queue.put_nowait(None)

    # ---- pods/log ------------------------------------------------------------------------------

    def _serve_pod_log(self, request: rendering.Request) -> aiohttp.web.StreamResponse:
        key = (kmock.resource("", "v1", "pods"), request.namespace, request.name or "")
        if self._live(key) is None:
            raise not_found(key[0], request.name)
        text = self.pod_logs.get((request.namespace or "", request.name or ""), "")
        tail = request.params.get("tailLines")
        if tail:
            text = "".join(text.splitlines(keepends=True)[-int(tail) :])
        return aiohttp.web.Response(text=text, content_type="text/plain")


def _strip_directives(patch: Any) -> Any:
    if isinstance(patch, dict):
        return {k: _strip_directives(v) for k, v in patch.items() if not k.startswith("$")}
    return patch


def _merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch: null deletes, objects merge, everything else replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = _merge_patch(result.get(key), value)
    return result


# --------------------------------------------------------------------------------------------
# Esper's CRDs (used when crds/*.yaml is not there yet)


def _fallback_crd(kind: str, plural: str, short: str, columns: list[JSON], selectable: list[str]) -> JSON:
    version: JSON = {
        "name": "v1alpha1",
        "served": True,
        "storage": True,
        "subresources": {"status": {}},
        "additionalPrinterColumns": columns,
        "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}},
    }
    if selectable:
        version["selectableFields"] = [{"jsonPath": p} for p in selectable]
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.esper.dev"},
        "spec": {
            "group": "esper.dev",
            "scope": "Namespaced",
            "names": {
                "kind": kind,
                "listKind": f"{kind}List",
                "plural": plural,
                "singular": kind.lower(),
                "shortNames": [short],
                "categories": ["esper"],
            },
            "versions": [version],
        },
    }


def esper_crds(crd_dir: Path | None = REPO_ROOT / "crds") -> list[JSON]:
    """The CRDs from `crds/*.yaml` when generated, else minimal stand-ins with the same names."""
    found = []
    if crd_dir is not None and crd_dir.is_dir():
        for path in sorted(crd_dir.glob("*.yaml")):
            found += [
                d
                for d in yaml.safe_load_all(path.read_text())
                if d and d.get("kind") == "CustomResourceDefinition"
            ]
    plurals = {d["spec"]["names"]["plural"] for d in found}
    age = {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}
    if "blueprints" not in plurals:
        found.append(
            _fallback_crd(
                "Blueprint",
                "blueprints",
                "bp",
                [
                    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
                    {"name": "Kernels", "type": "string", "jsonPath": ".status.kernelsSummary"},
                    age,
                ],
                [],
            )
        )
    if "kernels" not in plurals:
        found.append(
            _fallback_crd(
                "Kernel",
                "kernels",
                "kn",
                [
                    {"name": "Blueprint", "type": "string", "jsonPath": ".spec.blueprint"},
                    {"name": "Target", "type": "string", "jsonPath": ".spec.target"},
                    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
                    age,
                ],
                [".spec.blueprint", ".spec.target"],
            )
        )
    return found


# --------------------------------------------------------------------------------------------
# A small synchronous REST client (also what FakeKubelet uses)


class ApiError(Exception):
    """A non-2xx answer from the API, with its metav1.Status body."""

    def __init__(self, status: int, body: Any) -> None:
        self.status = status
        self.body = body
        self.reason = body.get("reason") if isinstance(body, dict) else None
        super().__init__(f"HTTP {status}: {body.get('message') if isinstance(body, dict) else body}")


@dataclass(frozen=True)
class ResourceRef:
    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool

    @property
    def api_version(self) -> str:
        return self.version if not self.group else f"{self.group}/{self.version}"

    def path(self, namespace: str | None = None, name: str | None = None, sub: str | None = None) -> str:
        base = "/api/v1" if not self.group else f"/apis/{self.group}/{self.version}"
        if self.namespaced and namespace:
            base += f"/namespaces/{namespace}"
        base += f"/{self.plural}"
        if name:
            base += f"/{name}"
        if sub:
            base += f"/{sub}"
        return base


class RestClient:
    """JSON over HTTP to the emulator; thread-safe (urllib3 pool). Raises ApiError on failure."""

    def __init__(self, url: str, resolve: Callable[[str], ResourceRef]) -> None:
        self.url = url.rstrip("/")
        self.resolve = resolve
        self.http = urllib3.PoolManager(maxsize=8, timeout=urllib3.Timeout(connect=5, read=30))

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        params: Mapping[str, Any] | None = None,
        content_type: str = "application/json",
    ) -> Any:
        query = "?" + urllib.parse.urlencode({k: v for k, v in (params or {}).items() if v is not None})
        data = None if body is None else json.dumps(body).encode()
        rsp = self.http.request(
            method,
            self.url + path + (query if len(query) > 1 else ""),
            body=data,
            headers={"Content-Type": content_type, "Accept": "application/json"},
        )
        try:
            parsed = json.loads(rsp.data) if rsp.data else None
        except ValueError:
            parsed = rsp.data.decode("utf-8", "replace")
        if rsp.status >= 400:
            raise ApiError(rsp.status, parsed)
        return parsed

    # Resource-level helpers: `resource` is a plural, kind, short name or "group/version/plural".
    def get(self, resource: str, name: str, namespace: str | None = "default") -> JSON | None:
        """The object, or None when it does not exist."""
        ref = self.resolve(resource)
        try:
            return self.request("GET", ref.path(namespace, name))
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    def list(
        self,
        resource: str,
        namespace: str | None = None,
        *,
        label_selector: str | None = None,
        field_selector: str | None = None,
    ) -> list[JSON]:
        ref = self.resolve(resource)
        return self.request(
            "GET",
            ref.path(namespace),
            params={"labelSelector": label_selector, "fieldSelector": field_selector},
        )["items"]

    def create(self, obj: Mapping[str, Any], namespace: str | None = None) -> JSON:
        ref = self.resolve_obj(obj)
        ns = namespace or obj.get("metadata", {}).get("namespace") or "default"
        return self.request("POST", ref.path(ns), obj)

    def replace(self, obj: Mapping[str, Any], *, status: bool = False) -> JSON:
        ref = self.resolve_obj(obj)
        meta = obj["metadata"]
        return self.request(
            "PUT", ref.path(meta.get("namespace", "default"), meta["name"], "status" if status else None), obj
        )

    def patch(
        self,
        resource: str,
        name: str,
        patch: Any,
        namespace: str | None = "default",
        *,
        status: bool = False,
        patch_type: str = "merge",
    ) -> JSON:
        ref = self.resolve(resource)
        ctype = {
            "merge": "application/merge-patch+json",
            "json": "application/json-patch+json",
            "strategic": "application/strategic-merge-patch+json",
        }[patch_type]
        return self.request(
            "PATCH", ref.path(namespace, name, "status" if status else None), patch, content_type=ctype
        )

    def delete(
        self,
        resource: str,
        name: str,
        namespace: str | None = "default",
        *,
        propagation: str | None = "Background",
        missing_ok: bool = False,
    ) -> JSON | None:
        ref = self.resolve(resource)
        body = {"kind": "DeleteOptions", "apiVersion": "v1"}
        if propagation:
            body["propagationPolicy"] = propagation
        try:
            return self.request("DELETE", ref.path(namespace, name), body)
        except ApiError as exc:
            if missing_ok and exc.status == 404:
                return None
            raise

    def resolve_obj(self, obj: Mapping[str, Any]) -> ResourceRef:
        api_version, kind = obj["apiVersion"], obj["kind"]
        return self.resolve(f"{kind}.{api_version}")

    def close(self) -> None:
        self.http.clear()


# --------------------------------------------------------------------------------------------
# The running cluster: emulator + server in a background thread, kubeconfig, kubectl


KUBECTL = shutil.which("kubectl") or "/usr/bin/kubectl"


class KubectlError(subprocess.CalledProcessError):
    """A failed kubectl command; its message carries stdout and stderr."""

    def __str__(self) -> str:
        return f"{super().__str__()}\nstdout: {self.stdout}\nstderr: {self.stderr}"


class Kubectl:
    """The real kubectl against the emulator: a private kubeconfig and discovery cache.

    `--validate=false` is added to apply/create/replace (the emulator serves no OpenAPI).
    Raises `KubectlError` (a CalledProcessError whose message has stdout/stderr) unless check=False.
    """

    def __init__(self, kubeconfig: Path, cache_dir: Path, binary: str = KUBECTL) -> None:
        self.kubeconfig = kubeconfig
        self.cache_dir = cache_dir
        self.binary = binary

    def command(self, *args: str) -> list[str]:
        args_list = list(args)
        if (
            args_list
            and args_list[0] in ("apply", "create", "replace")
            and not any(a.startswith("--validate") for a in args_list)
        ):
            args_list.append("--validate=false")
        return [self.binary, f"--kubeconfig={self.kubeconfig}", *args_list]

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k != "KUBECONFIG"}
        env.update(KUBECACHEDIR=str(self.cache_dir), HOME=str(self.cache_dir))
        return env

    def __call__(
        self, *args: str, input: str | None = None, check: bool = True, timeout: float = 30
    ) -> subprocess.CompletedProcess[str]:
        cmd = self.command(*args)
        proc = subprocess.run(
            cmd, input=input, capture_output=True, text=True, timeout=timeout, env=self.env()
        )
        if check and proc.returncode != 0:
            raise KubectlError(proc.returncode, cmd, proc.stdout, proc.stderr)
        return proc

    def apply(
        self, manifest: str | Path | Mapping[str, Any] | Sequence[Mapping[str, Any]], *args: str
    ) -> subprocess.CompletedProcess[str]:
        """`kubectl apply -f` a file, a YAML string or objects."""
        if isinstance(manifest, Path):
            return self("apply", "-f", str(manifest), *args)
        text = (
            manifest
            if isinstance(manifest, str)
            else yaml.safe_dump_all([manifest] if isinstance(manifest, Mapping) else list(manifest))
        )
        return self("apply", "-f", "-", *args, input=text)

    def get_json(self, *args: str) -> Any:
        return json.loads(self("get", *args, "-o", "json").stdout)

    def popen(self, *args: str, stdout: Any = subprocess.PIPE) -> subprocess.Popen[str]:
        """A long-running kubectl (e.g. `get -w`): stop it with `.terminate()`."""
        return subprocess.Popen(
            self.command(*args), stdout=stdout, stderr=subprocess.PIPE, text=True, env=self.env()
        )


class Cluster:
    """An `EsperEmulator` served on 127.0.0.1 by a background thread with its own event loop.

    `url`, `kubeconfig_path`, `kubectl`, `api_client()`, and REST shortcuts (`get`, `list`,
    `create`, `patch`, `delete`, `replace`) that raise `ApiError`. Start with `start()` or `with`.
    """

    def __init__(
        self,
        workdir: Path | None = None,
        *,
        crds: Sequence[Mapping[str, Any]] | None = None,
        namespaces: Sequence[str] = ("default",),
    ) -> None:
        self._own_dir = workdir is None
        self.workdir = Path(tempfile.mkdtemp(prefix="esper-cluster-")) if workdir is None else workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._crds = list(esper_crds() if crds is None else crds)
        self._namespaces = list(namespaces)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop: asyncio.Event | None = None
        self._emulator: EsperEmulator | None = None
        self.url = ""
        self.kubeconfig_path = self.workdir / "kubeconfig"
        self.kubectl = Kubectl(self.kubeconfig_path, self.workdir / "kubecache")
        self.rest: RestClient | None = None

    # ---- lifecycle ----------------------------------------------------------------------

    def start(self) -> Cluster:
        ready = threading.Event()
        failure: list[BaseException] = []

        async def main() -> None:
            try:
                self._stop = asyncio.Event()
                emulator = EsperEmulator()
                emulator.resources.load_bundled()
                async with emulator, kmock.Server(emulator, host="127.0.0.1", port=0) as server:
                    self._emulator = emulator
                    self.url = f"http://127.0.0.1:{server.port}"
                    ready.set()
                    await self._stop.wait()
                    emulator.close_watches()
                    await asyncio.sleep(0)  # let the watch handlers see their end-of-stream
            except BaseException as exc:
                failure.append(exc)
                ready.set()
                raise

        def run() -> None:
            self._loop = asyncio.new_event_loop()
            try:
                self._loop.run_until_complete(main())
            finally:
                self._loop.close()

        self._thread = threading.Thread(target=run, name="k8s-emulator", daemon=True)
        self._thread.start()
        if not ready.wait(30) or failure:
            raise RuntimeError(f"the emulator did not start: {failure!r}")
        self._write_kubeconfig()
        self.rest = RestClient(self.url, self.resolve)
        for ns in self._namespaces:
            self.ensure_namespace(ns)
        for crd in self._crds:
            self.apply_crd(crd)
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(30)
        if self.rest is not None:
            self.rest.close()
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Cluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _write_kubeconfig(self) -> None:
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "preferences": {},
            "clusters": [{"name": "emulator", "cluster": {"server": self.url}}],
            "users": [{"name": "tester", "user": {}}],
            "contexts": [
                {
                    "name": "emulator",
                    "context": {"cluster": "emulator", "user": "tester", "namespace": "default"},
                }
            ],
            "current-context": "emulator",
        }
        self.kubeconfig_path.write_text(yaml.safe_dump(config))

    # ---- thread-safe access to the emulator -----------------------------------------------

    @property
    def emulator(self) -> EsperEmulator:
        """The emulator itself (runs in another thread: read it via `call`, mutate via the API)."""
        assert self._emulator is not None, "the cluster is not started"
        return self._emulator

    def call(self, fn: Callable[[EsperEmulator], T], timeout: float = 10) -> T:
        """Run `fn(emulator)` inside the emulator's loop and return its result (thread-safe)."""
        assert self._loop is not None

        async def run() -> T:
            return fn(self.emulator)

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(timeout)

    def register_crd(self, crd: Mapping[str, Any]) -> None:
        """Serve a CRD's resources without creating the CRD object (see `apply_crd`)."""
        self.call(lambda e: e.register_crd(crd))

    def apply_crd(self, crd: Mapping[str, Any] | Path) -> JSON:
        """Create (or replace) a CRD object through the API; its resources are served at once."""
        if isinstance(crd, Path):
            crd = yaml.safe_load(crd.read_text())
        assert self.rest is not None
        current = self.get("customresourcedefinitions", crd["metadata"]["name"], namespace=None)
        if current is None:
            return self.rest.create(crd)
        body = dict(
            crd, metadata=dict(crd["metadata"], resourceVersion=current["metadata"]["resourceVersion"])
        )
        return self.rest.replace(body)

    def ensure_namespace(self, name: str) -> JSON:
        existing = self.get("namespaces", name, namespace=None)
        if existing is not None:
            return existing
        return self.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})

    def set_pod_log(self, namespace: str, name: str, text: str) -> None:
        """What `kubectl logs` / `read_namespaced_pod_log` return for a pod (FakeKubelet fills it)."""
        self.call(lambda e: e.pod_logs.__setitem__((namespace, name), text))

    def internal_errors(self) -> list[str]:
        """Tracebacks of emulator bugs hit so far (tests may assert this is empty)."""
        return self.call(lambda e: list(e.internal_errors))

    def resolve(self, name: str) -> ResourceRef:
        """`blueprints`, `bp`, `Blueprint`, `jobs.batch`, `Job.batch/v1`, `batch/v1/jobs` -> ResourceRef."""
        return self.call(lambda e: _resolve(e, name))

    # ---- clients -------------------------------------------------------------------------

    def api_client(self) -> Any:
        """A `kubernetes.client.ApiClient` configured from this kubeconfig (never from $KUBECONFIG)."""
        import kubernetes

        return kubernetes.config.new_client_from_config(config_file=str(self.kubeconfig_path))

    def env(self) -> dict[str, str]:
        """Environment for a subprocess that should talk to this cluster (kopf, the CLI)."""
        return {"KUBECONFIG": str(self.kubeconfig_path)}

    # REST shortcuts (see RestClient for signatures).
    def get(self, resource: str, name: str, namespace: str | None = "default") -> JSON | None:
        assert self.rest is not None
        return self.rest.get(resource, name, namespace)

    def list(
        self,
        resource: str,
        namespace: str | None = None,
        *,
        label_selector: str | None = None,
        field_selector: str | None = None,
    ) -> list[JSON]:
        assert self.rest is not None
        return self.rest.list(
            resource, namespace, label_selector=label_selector, field_selector=field_selector
        )

    def create(self, obj: Mapping[str, Any], namespace: str | None = None) -> JSON:
        assert self.rest is not None
        return self.rest.create(obj, namespace)

    def replace(self, obj: Mapping[str, Any], *, status: bool = False) -> JSON:
        assert self.rest is not None
        return self.rest.replace(obj, status=status)

    def patch(
        self,
        resource: str,
        name: str,
        patch: Any,
        namespace: str | None = "default",
        *,
        status: bool = False,
        patch_type: str = "merge",
    ) -> JSON:
        assert self.rest is not None
        return self.rest.patch(resource, name, patch, namespace, status=status, patch_type=patch_type)

    def delete(
        self,
        resource: str,
        name: str,
        namespace: str | None = "default",
        *,
        propagation: str | None = "Background",
        missing_ok: bool = False,
    ) -> JSON | None:
        assert self.rest is not None
        return self.rest.delete(resource, name, namespace, propagation=propagation, missing_ok=missing_ok)


def _resolve(emulator: EsperEmulator, name: str) -> ResourceRef:
    group = version = None
    if name.count("/") == 2:  # group/version/plural (core: "/v1/pods" or "v1/pods")
        group, version, name = name.split("/")
    elif "." in name:
        name, rest = name.split(".", 1)
        if "/" in rest:
            group, version = rest.rsplit("/", 1)
        elif rest.startswith("v") and rest[1:2].isdigit():
            group, version = "", rest
        else:
            group = rest
    wanted = name.lower()
    candidates = []
    for res, info in emulator.resources.items():
        if (group is not None and res.group != group) or (version is not None and res.version != version):
            continue
        names = {str(res.plural), (info.kind or "").lower(), (info.singular or "").lower(), *info.shortnames}
        if wanted in names:
            candidates.append((res, info))
    if not candidates:
        raise KeyError(f"no resource named {name!r} in the emulator")
    # Prefer core, then Esper's group, then anything else (as kubectl's discovery priority would).
    candidates.sort(key=lambda ri: (ri[0].group != "", ri[0].group != "esper.dev", str(ri[0].group)))
    res, info = candidates[0]
    return ResourceRef(
        str(res.group), str(res.version), str(res.plural), info.kind or "", bool(info.namespaced)
    )


# --------------------------------------------------------------------------------------------
# A real operator process


class OperatorProcess:
    """`python -m kopf run -A --standalone <target>` against a cluster, logs to a file.

    `target` is a path to a .py file or a module name. Start/stop/restart at will; `stop()`
    sends SIGTERM, then SIGKILL after `grace` seconds. `log()` returns everything logged so far.
    """

    def __init__(
        self,
        target: str | Path,
        cluster: Cluster,
        log_path: Path,
        *,
        env: Mapping[str, str] | None = None,
        args: Sequence[str] = (),
        namespace: str | None = None,
    ) -> None:
        self.target = target
        self.cluster = cluster
        self.log_path = log_path
        self.extra_env = dict(env or {})
        self.args = list(args)
        self.namespace = namespace
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "kopf", "run", "--standalone"]
        cmd += ["--namespace", self.namespace] if self.namespace else ["-A"]
        cmd += self.args
        target = str(self.target)
        cmd += [target] if target.endswith(".py") else ["-m", target]
        return cmd

    def start(self) -> OperatorProcess:
        if self.running:
            raise RuntimeError("the operator is already running")
        env = {k: v for k, v in os.environ.items() if k != "KUBECONFIG"}
        env.update(self.cluster.env(), PYTHONUNBUFFERED="1")
        env.update(self.extra_env)
        self.starts += 1
        with self.log_path.open("ab") as log:
            log.write(f"--- start #{self.starts}: {' '.join(self.command())}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                self.command(),
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=str(REPO_ROOT),
                start_new_session=True,
            )
        return self

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, grace: float = 10) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        return self.proc.returncode

    def restart(self, grace: float = 10) -> OperatorProcess:
        self.stop(grace)
        return self.start()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_for_log(self, text: str | re.Pattern[str], timeout: float = 20) -> str:
        """Wait until the log contains `text` (a substring or regex); fails early if the process died."""

        def seen() -> bool:
            log = self.log()
            found = re.search(text, log) if isinstance(text, re.Pattern) else text in log
            if not found and not self.running:
                raise AssertionError(
                    f"the operator exited ({self.proc and self.proc.returncode}):\n{log[-4000:]}"
                )
            return bool(found)

        wait_for(seen, timeout, 0.1, message=lambda: f"{text!r} in the operator log:\n{self.log()[-4000:]}")
        return self.log()

    def __enter__(self) -> OperatorProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --------------------------------------------------------------------------------------------
# Fixtures (imported by tests/conftest.py)


@contextlib.contextmanager
def running_cluster(workdir: Path | None = None, **kwargs: Any) -> Iterator[Cluster]:
    cluster = Cluster(workdir, **kwargs).start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A fresh emulated cluster per test: namespace `default`, Esper's CRDs, kubeconfig, kubectl."""
    with running_cluster(tmp_path_factory.mktemp("cluster")) as c:
        yield c
        errors = c.internal_errors()
        assert not errors, "the emulator hit internal errors:\n" + "\n".join(errors)


@pytest.fixture(scope="session")
def session_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """One cluster shared by a session (faster; tests must use their own namespaces/names)."""
    with running_cluster(tmp_path_factory.mktemp("session-cluster")) as c:
        yield c


@pytest.fixture
def kubelet(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A FakeKubelet running Jobs of `cluster` as local processes (see tests/support/kubelet.py)."""
    from tests.support.kubelet import FakeKubelet

    kl = FakeKubelet(cluster, workdir=tmp_path_factory.mktemp("kubelet"))
    kl.start()
    try:
        yield kl
    finally:
        kl.stop()
    assert not kl.errors, f"the fake kubelet hit errors: {kl.errors}"


@pytest.fixture
def operator_process(cluster: Cluster, tmp_path: Path) -> Iterator[Callable[..., OperatorProcess]]:
    """A factory: `operator_process(target, env={...})` -> a started OperatorProcess, stopped after."""
    started: list[OperatorProcess] = []

    def make(target: str | Path, **kwargs: Any) -> OperatorProcess:
        op = OperatorProcess(target, cluster, tmp_path / f"operator-{len(started)}.log", **kwargs)
        started.append(op)
        return op.start()

    yield make
    for op in started:
        op.stop()


def b64(text: str) -> str:
    """Base64 for Secret `data`."""
    return base64.b64encode(text.encode()).decode()
