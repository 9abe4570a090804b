"""EsperEmulator: kmock's Kubernetes emulator with the API-server semantics the operator relies on."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import copy
import json
import math
import random
import string
import traceback
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp.web
import jsonpatch
import kmock
import yaml
from kmock._internal import rendering
from kmock._internal.k8s import KubernetesError

from ..merge_patch import merge_patch
from .base import (
    BUILTIN_SELECTABLE,
    CRD_RESOURCE,
    HISTORY,
    JSON,
    NAMESPACES,
    REPO_ROOT,
    STANDARD_VERBS,
    api_version_of,
    bad_request,
    conflict,
    invalid,
    k8s_error,
    not_found,
    now_iso,
    qualified,
)
from .gc import GarbageCollectorMixin
from .selectors import (
    Requirement,
    TablesMixin,
    _Extras,
    field_value,
    parse_field_selector,
    parse_label_selector,
)

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


class EsperEmulator(GarbageCollectorMixin, TablesMixin, kmock.KubernetesEmulator):
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
        # Also called by close_watches: the hybrid front ends the watches it proxies to the real server.
        self.watch_closers: list[Callable[[], None]] = []

    # ---- request log ---------------------------------------------------------------------

    WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})

    def request_count(self) -> int:
        return len(self._requests)

    def writes(self, since: int = 0) -> list[tuple[str, str, str, str | None]]:
        """Writes served since request number `since`: (method, plural[/subresource], namespace, name)."""
        out = []
        for r in list(self._requests)[since:]:
            method = str(r.method.value if r.method is not None else "").upper()
            if method in self.WRITE_METHODS and r.resource is not None:
                plural = r.resource.plural or "?"
                what = f"{plural}/{r.subresource}" if r.subresource else plural
                out.append((method, what, r.namespace or "", r.name))
        return out

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
        return merge_patch(old, _strip_directives(data))

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
        timeout = float(params.get("timeoutSeconds") or 0) or None
        try:
            await response.prepare(raw)  # in the try: a client may leave before the headers go out
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
        for close in list(self.watch_closers):
            close()

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
