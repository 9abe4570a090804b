"""A small synchronous REST client for the test cluster (also what FakeKubelet uses)."""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import urllib3

from .base import JSON


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
    """JSON over HTTP to the test cluster; thread-safe (urllib3 pool). Raises ApiError on failure."""

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
