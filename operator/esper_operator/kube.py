"""The few Kubernetes API calls the operator makes, as dicts, off the event loop.

The official client is synchronous; each call runs in a worker thread so a slow API server never stalls
kopf's event loop. Conflicts and absences become exceptions and None, which is all the callers branch on.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

from kubernetes import client, config
from kubernetes.client.rest import ApiException

from esper.contracts import API_GROUP, API_VERSION

Body = dict[str, Any]


class Conflict(Exception):
    """HTTP 409: the object exists already, or changed since it was read."""


def load_client_config() -> client.ApiClient:
    """In a cluster, the ServiceAccount; elsewhere the kubeconfig (as kubectl would)."""
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return client.ApiClient()


class Kube:
    """Thin async facade over the typed client for Blueprints, Kernels, Jobs and Pods."""

    def __init__(self, api_client: client.ApiClient | None = None, *, timeout: float = 30.0) -> None:
        self.api_client = api_client or load_client_config()
        self.timeout = timeout  # per request: a hung API server fails the handler, which kopf retries
        self.custom = client.CustomObjectsApi(self.api_client)
        self.batch = client.BatchV1Api(self.api_client)
        self.core = client.CoreV1Api(self.api_client)

    async def _call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run one client call off the event loop; the client's results are loosely typed JSON."""
        kwargs.setdefault("_request_timeout", self.timeout)
        try:
            return await asyncio.to_thread(fn, *args, **kwargs)
        except ApiException as exc:
            if exc.status == 409:
                raise Conflict(exc.reason or "conflict") from exc
            raise

    async def _maybe(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return await self._call(fn, *args, **kwargs)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    @staticmethod
    def _json(response: Any) -> Body:
        """Raw JSON: the typed models reject objects that omit fields they deem required."""
        return json.loads(response.data)

    # --- esper.dev custom resources ---------------------------------------------------------------

    async def get(self, plural: str, namespace: str, name: str) -> Body | None:
        return await self._maybe(
            self.custom.get_namespaced_custom_object, API_GROUP, API_VERSION, namespace, plural, name
        )

    async def create(self, plural: str, namespace: str, body: Body) -> Body:
        return await self._call(
            self.custom.create_namespaced_custom_object, API_GROUP, API_VERSION, namespace, plural, body
        )

    async def patch(self, plural: str, namespace: str, name: str, patch: Body) -> Body | None:
        """JSON merge patch of the main resource; a resourceVersion in it makes the write conditional."""
        return await self._maybe(
            self.custom.patch_namespaced_custom_object,
            API_GROUP,
            API_VERSION,
            namespace,
            plural,
            name,
            patch,
            _content_type="application/merge-patch+json",
        )

    async def patch_status(self, plural: str, namespace: str, name: str, status: Body) -> Body | None:
        return await self._maybe(
            self.custom.patch_namespaced_custom_object_status,
            API_GROUP,
            API_VERSION,
            namespace,
            plural,
            name,
            {"status": status},
            _content_type="application/merge-patch+json",
        )

    async def list_all(self, plural: str, fallback_namespace: str) -> list[Body]:
        """Every object of `plural` in every namespace; in a namespace-scoped install (no cluster-wide
        list right, HTTP 403) those of `fallback_namespace`, the one namespace there is."""
        try:
            listed = await self._call(
                self.custom.list_cluster_custom_object, API_GROUP, API_VERSION, plural, _preload_content=False
            )
        except ApiException as exc:
            if exc.status != 403:
                raise
            listed = await self._call(
                self.custom.list_namespaced_custom_object,
                API_GROUP,
                API_VERSION,
                fallback_namespace,
                plural,
                _preload_content=False,
            )
        return list(self._json(listed).get("items") or [])

    async def delete(self, plural: str, namespace: str, name: str) -> None:
        await self._maybe(
            self.custom.delete_namespaced_custom_object, API_GROUP, API_VERSION, namespace, plural, name
        )

    # --- Jobs and Pods --------------------------------------------------------------------------

    async def get_job(self, namespace: str, name: str) -> Body | None:
        job = await self._maybe(self.batch.read_namespaced_job, name, namespace, _preload_content=False)
        return None if job is None else self._json(job)

    async def create_job(self, namespace: str, body: Body) -> Body:
        return self._json(
            await self._call(self.batch.create_namespaced_job, namespace, body, _preload_content=False)
        )

    async def delete_job(self, namespace: str, name: str) -> None:
        await self._maybe(self.batch.delete_namespaced_job, name, namespace, propagation_policy="Background")

    async def active_jobs(self, namespace: str, label_selector: str) -> int:
        """Jobs in `namespace` with these labels that have not finished."""
        jobs = await self._call(
            self.batch.list_namespaced_job, namespace, label_selector=label_selector, _preload_content=False
        )
        finished = ("Complete", "Failed")
        return sum(
            1
            for job in self._json(jobs).get("items") or []
            if not any(
                c.get("type") in finished and c.get("status") == "True"
                for c in (job.get("status") or {}).get("conditions") or []
            )
        )

    async def job_pods(self, namespace: str, job_name: str) -> list[Body]:
        pods = await self._call(
            self.core.list_namespaced_pod,
            namespace,
            label_selector=f"job-name={job_name}",
            _preload_content=False,
        )
        return list(self._json(pods).get("items") or [])
