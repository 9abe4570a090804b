"""The operator's API client: paths, headers, auth and error mapping, against a local HTTP server."""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from kubernetes import client

from esper_operator.kube import USER_AGENT, ApiError, Conflict, Kube, ssl_context

Seen = list[dict[str, Any]]
Handler = Callable[[web.Request], Awaitable[web.Response]]


def status_body(code: int, message: str) -> web.Response:
    body = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": message, "code": code}
    return web.json_response(body, status=code)


async def serve(
    handler: Handler, test: Callable[[Kube, Seen], Awaitable[None]], proxied: str | None = None, **config: Any
) -> Seen:
    """Run `test` with a Kube pointed at a local server whose answers come from `handler`; with
    `proxied`, a Kube pointed at that address, the local server as its proxy."""
    seen: Seen = []

    async def record(request: web.Request) -> web.Response:
        body = await request.text()
        seen.append(
            {
                "method": request.method,
                "path": request.path,
                "raw_path": request.raw_path,
                "query": dict(request.query),
                "headers": dict(request.headers),
                "body": json.loads(body) if body else None,
            }
        )
        return await handler(request)

    server = web.Server(record)
    runner = web.ServerRunner(server)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    local = f"http://127.0.0.1:{port}"
    configuration = client.Configuration(host=proxied or local)
    configuration.proxy = local if proxied else None
    for key, value in config.items():
        setattr(configuration, key, value)
    kube = Kube(configuration, timeout=5)
    try:
        await test(kube, seen)
    finally:
        await kube.close()
        await runner.cleanup()
    return seen


def run(
    handler: Handler, test: Callable[[Kube, Seen], Awaitable[None]], proxied: str | None = None, **config: Any
) -> Seen:
    return asyncio.run(serve(handler, test, proxied, **config))


async def echo(request: web.Request) -> web.Response:
    body = await request.text()
    return web.json_response({"echo": json.loads(body) if body else None, "items": []})


def test_paths_verbs_and_content_types() -> None:
    async def calls(kube: Kube, seen: Seen) -> None:
        await kube.get("kernels", "team-a", "k1")
        await kube.create("kernels", "team-a", {"metadata": {"name": "k1"}})
        await kube.patch("kernels", "team-a", "k1", {"metadata": {"labels": {"a": "b"}}})
        await kube.patch_status("blueprints", "team-a", "bp", {"phase": "Ready"})
        await kube.delete("kernels", "team-a", "k1")
        await kube.get_job("esper", "j1")
        await kube.create_job("esper", {"metadata": {"name": "j1"}})
        await kube.delete_job("esper", "j1")
        await kube.job_pods("esper", "j1")

    seen = run(echo, calls)
    crd = "/apis/esper.dev/v1alpha1/namespaces/team-a"
    assert [(s["method"], s["path"]) for s in seen] == [
        ("GET", f"{crd}/kernels/k1"),
        ("POST", f"{crd}/kernels"),
        ("PATCH", f"{crd}/kernels/k1"),
        ("PATCH", f"{crd}/blueprints/bp/status"),
        ("DELETE", f"{crd}/kernels/k1"),
        ("GET", "/apis/batch/v1/namespaces/esper/jobs/j1"),
        ("POST", "/apis/batch/v1/namespaces/esper/jobs"),
        ("DELETE", "/apis/batch/v1/namespaces/esper/jobs/j1"),
        ("GET", "/api/v1/namespaces/esper/pods"),
    ]
    assert seen[1]["headers"]["Content-Type"] == "application/json"
    assert seen[1]["body"] == {"metadata": {"name": "k1"}}
    assert seen[2]["headers"]["Content-Type"] == "application/merge-patch+json"
    assert seen[3]["body"] == {"status": {"phase": "Ready"}}
    assert seen[7]["query"] == {"propagationPolicy": "Background"}  # the Job's Pods go with it
    assert seen[8]["query"] == {"labelSelector": "job-name=j1"}
    assert all(s["headers"]["User-Agent"] == USER_AGENT for s in seen)
    assert "Authorization" not in seen[0]["headers"]  # none configured


def test_names_are_escaped_in_paths() -> None:
    async def calls(kube: Kube, seen: Seen) -> None:
        await kube.get("kernels", "ns", "a/b?c")

    assert run(echo, calls)[0]["raw_path"] == "/apis/esper.dev/v1alpha1/namespaces/ns/kernels/a%2Fb%3Fc"


def test_404_is_none_409_is_conflict_other_errors_say_what_failed() -> None:
    codes = iter([404, 409, 500, 404, 409])

    async def answer(request: web.Request) -> web.Response:
        code = next(codes)
        return status_body(code, f"said {code}")

    async def calls(kube: Kube, seen: Seen) -> None:
        assert await kube.get("kernels", "ns", "gone") is None
        with pytest.raises(Conflict, match="said 409"):
            await kube.create("kernels", "ns", {"metadata": {"name": "k"}})
        with pytest.raises(ApiError, match=r"PATCH .*/kernels/k/status: HTTP 500: said 500") as exc:
            await kube.patch_status("kernels", "ns", "k", {})
        assert exc.value.status == 500 and not isinstance(exc.value, Conflict)
        await kube.delete_job("ns", "gone")  # already gone: nothing to do
        with pytest.raises(Conflict):
            await kube.patch("kernels", "ns", "k", {"metadata": {"resourceVersion": "1"}})

    run(answer, calls)


def test_a_non_json_error_body_is_quoted_not_parsed() -> None:
    async def answer(request: web.Request) -> web.Response:
        return web.Response(status=502, text="<html>bad gateway</html>")

    async def calls(kube: Kube, seen: Seen) -> None:
        with pytest.raises(ApiError, match="HTTP 502: <html>bad gateway</html>"):
            await kube.get("kernels", "ns", "k")

    run(answer, calls)


def test_listing_every_namespace_falls_back_to_one_when_forbidden() -> None:
    async def answer(request: web.Request) -> web.Response:
        if "/namespaces/" not in request.path:
            return status_body(403, "cannot list kernels at the cluster scope")
        return web.json_response({"items": [{"metadata": {"name": "k1"}}]})

    async def calls(kube: Kube, seen: Seen) -> None:
        assert await kube.list_all("kernels", "esper") == [{"metadata": {"name": "k1"}}]

    seen = run(answer, calls)
    assert [s["path"] for s in seen] == [
        "/apis/esper.dev/v1alpha1/kernels",
        "/apis/esper.dev/v1alpha1/namespaces/esper/kernels",
    ]


def test_active_jobs_counts_the_unfinished() -> None:
    def job(*conditions: tuple[str, str]) -> dict[str, Any]:
        return {"status": {"conditions": [{"type": t, "status": s} for t, s in conditions]}}

    jobs = [job(), job(("Complete", "True")), job(("Failed", "True")), job(("Failed", "False")), {}]

    async def answer(request: web.Request) -> web.Response:
        return web.json_response({"items": jobs})

    async def calls(kube: Kube, seen: Seen) -> None:
        assert await kube.active_jobs("esper", "app=x") == 3

    assert run(answer, calls)[0]["query"] == {"labelSelector": "app=x"}


def test_the_bearer_token_is_asked_for_on_each_request() -> None:
    tokens = iter(["first", "second"])

    def refresh(configuration: client.Configuration) -> None:
        configuration.api_key["authorization"] = next(tokens)

    async def calls(kube: Kube, seen: Seen) -> None:
        await kube.get("kernels", "ns", "a")
        await kube.get("kernels", "ns", "b")

    seen = run(
        echo,
        calls,
        api_key={"authorization": "unused"},
        api_key_prefix={"authorization": "Bearer"},
        refresh_api_key_hook=refresh,
    )
    assert [s["headers"]["Authorization"] for s in seen] == ["Bearer first", "Bearer second"]


def test_tls_follows_the_configuration(tmp_path: Path) -> None:
    assert ssl_context(client.Configuration(host="http://127.0.0.1:1")) is None
    verified = ssl_context(client.Configuration(host="https://127.0.0.1:1"))
    assert verified is not None and verified.verify_mode == ssl.CERT_REQUIRED and verified.check_hostname
    insecure = client.Configuration(host="https://127.0.0.1:1")
    insecure.verify_ssl = False
    unverified = ssl_context(insecure)
    assert (
        unverified is not None and unverified.verify_mode == ssl.CERT_NONE and not unverified.check_hostname
    )
    missing = client.Configuration(host="https://127.0.0.1:1")
    missing.ssl_ca_cert = str(tmp_path / "no-such-ca.crt")
    with pytest.raises(FileNotFoundError):
        ssl_context(missing)


def test_a_configured_proxy_carries_the_requests() -> None:
    """A kubeconfig's proxy-url: the request goes to the proxy, naming the API server in full."""
    api = "http://kubernetes.invalid:6443"

    async def proxy(request: web.Request) -> web.Response:
        return web.json_response({"via": "proxy"})

    async def calls(kube: Kube, seen: Seen) -> None:
        assert await kube.get("kernels", "ns", "k") == {"via": "proxy"}

    seen = run(proxy, calls, proxied=api)
    assert seen[0]["headers"]["Host"] == "kubernetes.invalid:6443"
