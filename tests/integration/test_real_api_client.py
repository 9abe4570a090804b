"""The operator's API client on the real API server: TLS with the kubeconfig's client certificate, the
server's own answers (409 with its message, 404, 422 from admission), label selectors, the status
subresource. The integration tests around the operator reach the server through the harness's plain-HTTP
front; this is the client as a cluster serves it."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from kubernetes import client, config

from esper_operator.kube import ApiError, Conflict, Kube
from tests.support.cluster import Cluster
from tests.support.cluster.realapi import RealApiServer

pytestmark = [pytest.mark.real_api, pytest.mark.cluster]


def blueprint(name: str, labels: dict[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": "esper.dev/v1alpha1",
        "kind": "Blueprint",
        "metadata": {"name": name, "namespace": "default", "labels": labels},
        "spec": {"template": {"name": "residual-mlp", "params": {"features": 16}}, "targets": ["cpu"]},
    }


def test_the_client_speaks_tls_and_reads_the_servers_answers(
    real_apiserver: RealApiServer, real_cluster: Cluster
) -> None:
    configuration = client.Configuration()
    config.load_kube_config(config_file=str(real_apiserver.kubeconfig), client_configuration=configuration)
    assert configuration.host.startswith("https://") and configuration.cert_file  # the real thing

    async def calls() -> None:
        kube = Kube(configuration, timeout=30)
        try:
            made = await kube.create("blueprints", "default", blueprint("tls-a", {"team": "a"}))
            assert made["metadata"]["uid"]
            await kube.create("blueprints", "default", blueprint("tls-b", {"team": "b"}))
            with pytest.raises(Conflict, match=r'blueprints\.esper\.dev "tls-a" already exists'):
                await kube.create("blueprints", "default", blueprint("tls-a", {"team": "a"}))
            with pytest.raises(ApiError) as refused:
                await kube.create("blueprints", "default", blueprint("tls-c", {"team": "not a label value!"}))
            assert refused.value.status == 422 and "metadata.labels" in str(refused.value)
            assert [b["metadata"]["name"] for b in await kube.list_in("blueprints", "default", "team=a")] == [
                "tls-a"
            ]
            patched = await kube.patch_status("blueprints", "default", "tls-a", {"phase": "Pending"})
            assert patched is not None and patched["status"]["phase"] == "Pending"
            got = await kube.get("blueprints", "default", "tls-a")
            assert got is not None and got["status"]["phase"] == "Pending"
            assert await kube.get("blueprints", "default", "no-such") is None
            assert await kube.patch_status("blueprints", "default", "no-such", {"phase": "Pending"}) is None
            await kube.delete("blueprints", "default", "tls-a")
            assert await kube.get("blueprints", "default", "tls-a") is None
        finally:
            await kube.close()

    asyncio.run(calls())
