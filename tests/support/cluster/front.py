"""The hybrid cluster's single endpoint: a routing front before the real API server and the emulator.

Esper's kinds (`/apis/esper.dev/...`), CRDs (`/apis/apiextensions.k8s.io/...`) and OpenAPI
(`/openapi/...`, which `kubectl explain` and `kubectl apply`'s validation read) go to the real
server with the harness's client certificate; everything else (`/api`, Jobs, Pods, Events, Secrets,
Namespaces) goes to the emulator. `GET /apis` is answered from both, merged, in the form asked for:
the legacy `APIGroupList` or aggregated discovery (`apidiscovery.k8s.io/v2`, what kubectl asks for
first). With a full kube-apiserver (`route_all=True`) every request goes to it unchanged.

Two traps this avoids: a forwarded body gets no Content-Type the client did not send (aiohttp would add
`application/octet-stream`, which the server answers with 415), and watch streams are relayed chunk
by chunk (never buffered), so kopf, the sidecar and `kubectl get -w` see events as they happen.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import traceback
from collections.abc import Callable
from typing import Any

import aiohttp
import aiohttp.web

from .base import JSON

REAL_PREFIXES = ("/apis/esper.dev", "/apis/apiextensions.k8s.io", "/openapi/")
V2_DISCOVERY = "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList"
# Request headers relayed to a backend; the rest (Host, Content-Length, encodings) are per hop.
FORWARDED = ("Accept", "Content-Type", "User-Agent")


def is_real_path(path: str) -> bool:
    return any(path == p.rstrip("/") or path.startswith(p.rstrip("/") + "/") for p in REAL_PREFIXES)


class RoutingFront:
    """An aiohttp low-level handler: `await front(request)` relays it to the backend that owns it."""

    def __init__(
        self,
        emulator_url: str,
        real_url: str,
        real_ssl: Any,
        *,
        route_all: bool = False,
        on_error: Callable[[str], None] = lambda text: None,
    ) -> None:
        self.emulator_url = emulator_url.rstrip("/")
        self.real_url = real_url.rstrip("/")
        self.real_ssl = real_ssl
        self.route_all = route_all
        self.on_error = on_error
        self._session: aiohttp.ClientSession | None = None
        self._watches: set[aiohttp.ClientResponse] = set()

    async def start(self) -> None:
        # No total timeout: watches stay open as long as the client keeps them.
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=None)
        self._session = aiohttp.ClientSession(timeout=timeout, auto_decompress=True)

    async def close(self) -> None:
        self.close_watches()
        if self._session is not None:
            await self._session.close()

    def close_watches(self) -> None:
        """End every relayed watch, as an API server restart would (clients then re-list)."""
        for upstream in list(self._watches):
            upstream.close()

    # ---- request entry --------------------------------------------------------------------

    async def __call__(self, request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        try:
            if not self.route_all and request.method == "GET" and request.path.rstrip("/") == "/apis":
                return await self._merged_groups(request)
            real = self.route_all or is_real_path(request.path)
            return await self._relay(request, real)
        except Exception:
            text = traceback.format_exc()
            self.on_error(f"routing front: {request.method} {request.path_qs}\n{text}")
            body = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 502, "message": text}
            return aiohttp.web.json_response(body, status=502)

    async def _upstream(
        self, method: str, real: bool, path_qs: str, headers: dict[str, str], body: bytes | None
    ) -> aiohttp.ClientResponse:
        assert self._session is not None
        base = self.real_url if real else self.emulator_url
        return await self._session.request(
            method,
            base + path_qs,
            data=body if body else None,
            headers=headers,
            # Only what the client sent: an added `application/octet-stream` gets a 415.
            skip_auto_headers=() if "Content-Type" in headers else ("Content-Type",),
            ssl=self.real_ssl if real else None,
            allow_redirects=False,
        )

    async def _relay(self, request: aiohttp.web.BaseRequest, real: bool) -> aiohttp.web.StreamResponse:
        headers = {k: request.headers[k] for k in FORWARDED if k in request.headers}
        body = await request.read()
        upstream = await self._upstream(request.method, real, request.path_qs, headers, body)
        watching = request.query.get("watch") in ("true", "1")
        try:
            if not watching:
                data = await upstream.read()
                response = aiohttp.web.Response(
                    body=data,
                    status=upstream.status,
                    headers={"Content-Type": upstream.headers.get("Content-Type", "application/json")},
                )
                for warning in upstream.headers.getall("Warning", []):  # kubectl prints these
                    response.headers.add("Warning", warning)
                return response
            self._watches.add(upstream)
            response = aiohttp.web.StreamResponse(
                status=upstream.status,
                headers={"Content-Type": upstream.headers.get("Content-Type", "application/json")},
            )
            await response.prepare(request)
            with contextlib.suppress(aiohttp.ClientError, ConnectionError, asyncio.CancelledError):
                async for chunk in upstream.content.iter_any():
                    await response.write(chunk)
            with contextlib.suppress(ConnectionError, RuntimeError):
                await response.write_eof()
            return response
        finally:
            self._watches.discard(upstream)
            upstream.release()

    # ---- discovery -------------------------------------------------------------------------

    async def _get_json(self, real: bool, path: str, accept: str) -> tuple[str, Any]:
        upstream = await self._upstream("GET", real, path, {"Accept": accept}, None)
        async with upstream:
            text = await upstream.text()
            if upstream.status != 200:
                raise RuntimeError(f"GET {path} from the {'real server' if real else 'emulator'}: {text}")
            return upstream.headers.get("Content-Type", ""), json.loads(text)

    async def _merged_groups(self, request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        """`/apis` from both backends: the real server's groups plus the emulator's others."""
        accept = request.headers.get("Accept", "")
        _, emulated = await self._get_json(False, "/apis", "application/json")
        others = [g for g in emulated.get("groups", []) if not is_real_path(f"/apis/{g['name']}")]
        if "apidiscovery.k8s.io" in accept and "v=v2" in accept:
            ctype, real = await self._get_json(True, "/apis", V2_DISCOVERY)
            if "apidiscovery.k8s.io" in ctype:
                real["items"] = list(real.get("items", [])) + [await self._v2_group(g) for g in others]
                return aiohttp.web.Response(
                    text=json.dumps(real), headers={"Content-Type": V2_DISCOVERY}, status=200
                )
        _, real = await self._get_json(True, "/apis", "application/json")
        merged = dict(real, groups=list(real.get("groups", [])) + others)
        return aiohttp.web.json_response(merged)

    async def _v2_group(self, group: JSON) -> JSON:
        """An emulator group (legacy form) as an `APIGroupDiscovery` entry of aggregated discovery."""
        versions = []
        for gv in group.get("versions", []):
            _, listing = await self._get_json(False, f"/apis/{gv['groupVersion']}", "application/json")
            resources: dict[str, JSON] = {}
            subresources: dict[str, list[JSON]] = {}
            for res in listing.get("resources", []):
                kind = {"group": group["name"], "version": gv["version"], "kind": res.get("kind", "")}
                if "/" in res["name"]:
                    parent, sub = res["name"].split("/", 1)
                    subresources.setdefault(parent, []).append(
                        {"subresource": sub, "responseKind": kind, "verbs": res.get("verbs", [])}
                    )
                    continue
                entry: JSON = {
                    "resource": res["name"],
                    "responseKind": kind,
                    "scope": "Namespaced" if res.get("namespaced") else "Cluster",
                    "singularResource": res.get("singularName", ""),
                    "verbs": res.get("verbs", []),
                }
                for key in ("shortNames", "categories"):
                    if res.get(key):
                        entry[key] = res[key]
                resources[res["name"]] = entry
            for parent, subs in subresources.items():
                if parent in resources:
                    resources[parent]["subresources"] = subs
            versions.append(
                {"version": gv["version"], "resources": list(resources.values()), "freshness": "Current"}
            )
        return {"metadata": {"name": group["name"]}, "versions": versions}
