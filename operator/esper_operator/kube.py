"""The few Kubernetes API calls the operator makes, as dicts, on kopf's event loop.

Requests go out through aiohttp (kopf's own HTTP client), not the official client: that one is
synchronous, so every call took a worker thread, and its generated layers (argument validation,
serialisation) cost more CPU than the request itself; under a burst of Blueprints the operator is
CPU-bound. Where the API server is and how to authenticate still come from the official client's
configuration (in a cluster the ServiceAccount, elsewhere the kubeconfig, as kubectl would), so
certificates, CA bundles, tokens and their refresh behave as before. Conflicts and absences become
`Conflict` and None, which is all the callers branch on; other failures raise `ApiError`.
"""

from __future__ import annotations

import json
import ssl
from typing import Any
from urllib.parse import quote

import aiohttp
from kubernetes import client, config

from esper import __version__
from esper.contracts import API_GROUP, API_VERSION

Body = dict[str, Any]
MERGE_PATCH = "application/merge-patch+json"
CUSTOM_API, BATCH_API, CORE_API = f"/apis/{API_GROUP}/{API_VERSION}", "/apis/batch/v1", "/api/v1"
USER_AGENT = f"esper-operator/{__version__}"  # the operator's own requests, told apart in API audit logs


class ApiError(Exception):
    """An API request the server refused or failed; `status` is its HTTP status."""

    status = 0

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        if status is not None:
            self.status = status


class Conflict(ApiError):
    """HTTP 409: the object exists already, or changed since it was read."""

    status = 409


def load_client_config() -> client.Configuration:
    """In a cluster, the ServiceAccount; elsewhere the kubeconfig (as kubectl would)."""
    configuration = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=configuration)
    except config.ConfigException:
        config.load_kube_config(client_configuration=configuration)
    return configuration


def ssl_context(configuration: client.Configuration) -> ssl.SSLContext | None:
    """TLS as the configuration says: its CA (file or data), its client certificate, or no checks."""
    if not configuration.host.startswith("https:"):
        return None
    context = ssl.create_default_context(
        cafile=configuration.ssl_ca_cert or None, cadata=configuration.ca_cert_data or None
    )
    if configuration.cert_file:
        context.load_cert_chain(configuration.cert_file, configuration.key_file or None)
    if not configuration.verify_ssl:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def _path(api: str, plural: str, namespace: str | None = None, name: str | None = None) -> str:
    """A resource's path under `api`: namespaced where `namespace` is given, one object where `name` is."""
    path = api if namespace is None else f"{api}/namespaces/{quote(namespace, safe='')}"
    path += f"/{plural}"
    return path if name is None else f"{path}/{quote(name, safe='')}"


def _message(text: str) -> str:
    """The `message` of a Kubernetes Status body, else the body's start."""
    try:
        return str(json.loads(text).get("message") or text)[:500]
    except (ValueError, AttributeError):
        return text[:500]


class Kube:
    """Thin async facade over the API server for Blueprints, Kernels, Jobs and Pods."""

    def __init__(self, configuration: client.Configuration | None = None, *, timeout: float = 30.0) -> None:
        self.configuration = configuration or load_client_config()
        self.timeout = timeout  # per request: a hung API server fails the handler, which kopf retries
        self.base = self.configuration.host.rstrip("/")
        self._ssl = ssl_context(self.configuration)
        self._session: aiohttp.ClientSession | None = None

    def _headers(self, content_type: str | None) -> dict[str, str]:
        headers = {"Accept": "application/json", "User-Agent": USER_AGENT}
        if content_type:
            headers["Content-Type"] = content_type
        # Asked per request: a projected ServiceAccount token is re-read when it rotates.
        settings: Any = self.configuration.auth_settings()  # TypedDict values, read as plain dicts
        for auth in settings.values():
            if auth.get("in") == "header" and auth.get("value"):
                headers[auth["key"]] = auth["value"]
        return headers

    async def _request(
        self,
        method: str,
        path: str,
        *,
        body: Body | None = None,
        params: dict[str, str] | None = None,
        content_type: str | None = None,
    ) -> Body:
        if self._session is None or self._session.closed:  # made on the loop that uses it
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=self._ssl if self._ssl is not None else True),
                timeout=aiohttp.ClientTimeout(total=self.timeout),
            )
        data = None if body is None else json.dumps(body)
        headers = self._headers(content_type or ("application/json" if data is not None else None))
        server_hostname = self.configuration.tls_server_name or None
        async with self._session.request(
            method,
            self.base + path,
            data=data,
            params=params,
            headers=headers,
            server_hostname=server_hostname,
            proxy=self.configuration.proxy or None,  # a kubeconfig's proxy-url
        ) as response:
            text = await response.text()
            if response.status < 300:
                return json.loads(text) if text else {}
            error = Conflict if response.status == 409 else ApiError
            raise error(f"{method} {path}: HTTP {response.status}: {_message(text)}", response.status)

    async def _items(self, path: str, label_selector: str | None = None) -> list[Body]:
        """The items of a list request, filtered by `label_selector` where one is given."""
        params = None if label_selector is None else {"labelSelector": label_selector}
        return list((await self._request("GET", path, params=params)).get("items") or [])

    async def _maybe(self, method: str, path: str, **kwargs: Any) -> Body | None:
        try:
            return await self._request(method, path, **kwargs)
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    # --- esper.dev custom resources ---------------------------------------------------------------

    @staticmethod
    def _custom(plural: str, namespace: str | None = None, name: str | None = None) -> str:
        return _path(CUSTOM_API, plural, namespace, name)

    async def get(self, plural: str, namespace: str, name: str) -> Body | None:
        return await self._maybe("GET", self._custom(plural, namespace, name))

    async def create(self, plural: str, namespace: str, body: Body) -> Body:
        return await self._request("POST", self._custom(plural, namespace), body=body)

    async def patch(self, plural: str, namespace: str, name: str, patch: Body) -> Body | None:
        """JSON merge patch of the main resource; a resourceVersion in it makes the write conditional."""
        return await self._maybe(
            "PATCH", self._custom(plural, namespace, name), body=patch, content_type=MERGE_PATCH
        )

    async def patch_status(self, plural: str, namespace: str, name: str, status: Body) -> Body | None:
        path = self._custom(plural, namespace, name) + "/status"
        return await self._maybe("PATCH", path, body={"status": status}, content_type=MERGE_PATCH)

    async def list_all(self, plural: str, fallback_namespace: str) -> list[Body]:
        """Every object of `plural` in every namespace; in a namespace-scoped install (no cluster-wide
        list right, HTTP 403) those of `fallback_namespace`, the one namespace there is."""
        try:
            return await self._items(self._custom(plural))
        except ApiError as exc:
            if exc.status != 403:
                raise
            return await self._items(self._custom(plural, fallback_namespace))

    async def list_in(self, plural: str, namespace: str, label_selector: str) -> list[Body]:
        """The objects of `plural` in `namespace` that match `label_selector`."""
        return await self._items(self._custom(plural, namespace), label_selector)

    async def delete(self, plural: str, namespace: str, name: str) -> None:
        await self._maybe("DELETE", self._custom(plural, namespace, name))

    # --- Jobs and Pods --------------------------------------------------------------------------

    @staticmethod
    def _jobs(namespace: str, name: str | None = None) -> str:
        return _path(BATCH_API, "jobs", namespace, name)

    async def get_job(self, namespace: str, name: str) -> Body | None:
        return await self._maybe("GET", self._jobs(namespace, name))

    async def create_job(self, namespace: str, body: Body) -> Body:
        return await self._request("POST", self._jobs(namespace), body=body)

    async def delete_job(self, namespace: str, name: str) -> None:
        # Background propagation: the Job's Pods go too (the API's default for Jobs leaves them).
        await self._maybe("DELETE", self._jobs(namespace, name), params={"propagationPolicy": "Background"})

    async def active_jobs(self, namespace: str, label_selector: str) -> int:
        """Jobs in `namespace` with these labels that have not finished."""
        finished = ("Complete", "Failed")
        return sum(
            1
            for job in await self._items(self._jobs(namespace), label_selector)
            if not any(
                c.get("type") in finished and c.get("status") == "True"
                for c in (job.get("status") or {}).get("conditions") or []
            )
        )

    async def job_pods(self, namespace: str, job_name: str) -> list[Body]:
        return await self._items(_path(CORE_API, "pods", namespace), f"job-name={job_name}")
