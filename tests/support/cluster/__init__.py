"""The test cluster: an emulated Kubernetes API, optionally beside a real API server.

There is no kube-apiserver, Docker or kind on the build machines, so tests run against
`EsperEmulator` (emulator.py), a `kmock.KubernetesEmulator` subclass that mends what the operator
relies on (/work/shared/FACTS.md lists what stock kmock lacks). It is served over HTTP on
127.0.0.1 by a background thread with its own event loop (server.py), so synchronous tests, a real
`kopf run` process, the real `kubectl` and the `kubernetes` client all talk to it without
blocking a test's loop.

Backends (`ESPER_CLUSTER_BACKEND`; unset: the real server for tests marked `prefer_real` where
one is found, the emulator for the rest):

- `emulator`: everything emulated; fresh per test.
- `real`: a real API server (realapi.py) started once per session. With apiextensions-apiserver
  (`ESPER_REAL_APISERVER`, default `../shared/k8s`) the cluster is hybrid: Blueprints, Kernels
  and CRDs live on the real server, built-in kinds on the emulator, one endpoint before both
  (front.py). With `KUBEBUILDER_ASSETS` (kube-apiserver + etcd) everything is real. Garbage
  collection by ownerReferences comes from the harness (gc.py), standing in for
  kube-controller-manager. Tests marked `real_api` use `real_cluster` and always run hybrid/real.

Modules: base (timestamps, polling, API errors), selectors (label/field selectors, server-side
tables), gc (garbage collection), emulator, client (REST), kubectl, server (the running cluster,
operator processes), kubelet (runs Jobs' pods as local processes), realapi, front.

Fixtures: `pytest_plugins = ["tests.support.cluster"]` in tests/conftest.py, then::

    def test_x(cluster, kubelet, operator_process):
        cluster.create({"apiVersion": "esper.dev/v1alpha1", "kind": "Blueprint", ...})
        op = operator_process("esper_operator.handlers", env={...})
        wait_for(lambda: cluster.get("blueprints", "bp1")["status"].get("phase") == "Ready")
        cluster.kubectl("get", "bp")

Each emulator mend is commented with the Kubernetes behaviour it mirrors. Known gaps: strategic
merge patch and server-side apply are treated as JSON merge patches (lists are replaced); protobuf
is not spoken (415: `kubectl create ns x` fails, `kubectl create -f` works); garbage collection
and namespace deletion are synchronous; Foreground deletion acts like Background; no admission,
defaulting, schema validation or CEL rules (the real server has them all); no pagination (`limit`
is ignored); no periodic watch bookmarks; watches forget events beyond the last `HISTORY`
writes (410 Gone).
"""

from __future__ import annotations

import base64
import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from .base import JSON, REPO_ROOT, async_wait_for, now_iso, wait_for
from .client import ApiError, ResourceRef, RestClient
from .emulator import EsperEmulator, esper_crds
from .kubectl import Kubectl, KubectlError
from .realapi import RealApiServer, locate_real_apiserver
from .server import Cluster, OperatorProcess

BACKENDS = ("emulator", "real")


def cluster_backend() -> str | None:
    """`ESPER_CLUSTER_BACKEND`: the backend asked for (`emulator` or `real`), None when unset."""
    backend = os.environ.get("ESPER_CLUSTER_BACKEND") or None
    if backend is not None and backend not in BACKENDS:
        raise pytest.UsageError(f"ESPER_CLUSTER_BACKEND={backend!r}: expected one of {', '.join(BACKENDS)}")
    return backend


def wants_real_server(backend: str | None, prefers_real: bool, located: object, required: bool) -> bool:
    """Whether a `cluster` runs on the real API server.

    An explicit backend decides. Unset, tests marked `prefer_real` take the real server where this
    machine has one (or where `ESPER_REQUIRE_REAL_APISERVER` demands it, so a missing one fails
    instead of quietly falling back); everything else stays on the fresh-per-test emulator.
    """
    if backend is not None:
        return backend == "real"
    if not prefers_real:
        return False
    return required or not isinstance(located, str)


# --------------------------------------------------------------------------------------------
# Fixtures (imported by tests/conftest.py)


@contextlib.contextmanager
def running_cluster(workdir: Path | None = None, **kwargs: Any) -> Iterator[Cluster]:
    cluster = Cluster(workdir, **kwargs).start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def real_apiserver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealApiServer]:
    """The real API server, started once per session; skips where this machine has none."""
    located = locate_real_apiserver()
    if isinstance(located, str):
        if os.environ.get("ESPER_REQUIRE_REAL_APISERVER"):
            pytest.fail(f"ESPER_REQUIRE_REAL_APISERVER is set, but {located}")
        pytest.skip(located)
    server = RealApiServer(located, tmp_path_factory.mktemp("real-apiserver")).start()
    try:
        yield server
    finally:
        server.stop()


def _cluster(workdir: Path, real: RealApiServer | None) -> Iterator[Cluster]:
    with running_cluster(workdir, real=real) as c:
        yield c
        errors = c.internal_errors()
        assert not errors, "the test cluster hit internal errors:\n" + "\n".join(errors)


@pytest.fixture
def cluster(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A fresh cluster per test: namespace `default`, Esper's CRDs, kubeconfig, kubectl.

    Emulated, or on the real API server (hybrid where only apiextensions-apiserver is available)
    when `ESPER_CLUSTER_BACKEND=real` or, with the variable unset, for tests marked `prefer_real`
    where a server is found; the real server's objects are removed after each test.
    """
    prefers_real = request.node.get_closest_marker("prefer_real") is not None
    located = locate_real_apiserver() if prefers_real and cluster_backend() is None else None
    required = bool(os.environ.get("ESPER_REQUIRE_REAL_APISERVER"))
    use_real = wants_real_server(cluster_backend(), prefers_real, located, required)
    real = request.getfixturevalue("real_apiserver") if use_real else None
    yield from _cluster(tmp_path_factory.mktemp("cluster"), real)


@pytest.fixture
def real_cluster(
    real_apiserver: RealApiServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    """A cluster on the real API server whatever the backend setting (for `real_api` tests)."""
    yield from _cluster(tmp_path_factory.mktemp("real-cluster"), real_apiserver)


@pytest.fixture(scope="session")
def session_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """One cluster shared by a session (faster; tests must use their own namespaces/names)."""
    with running_cluster(tmp_path_factory.mktemp("session-cluster")) as c:
        yield c


@pytest.fixture
def kubelet(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A FakeKubelet running Jobs of `cluster` as local processes (see kubelet.py)."""
    from tests.support.cluster.kubelet import FakeKubelet

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


__all__ = [
    "JSON",
    "REPO_ROOT",
    "ApiError",
    "Cluster",
    "EsperEmulator",
    "Kubectl",
    "KubectlError",
    "OperatorProcess",
    "RealApiServer",
    "ResourceRef",
    "RestClient",
    "async_wait_for",
    "b64",
    "cluster",
    "cluster_backend",
    "esper_crds",
    "kubelet",
    "now_iso",
    "operator_process",
    "real_apiserver",
    "real_cluster",
    "running_cluster",
    "session_cluster",
    "wait_for",
]
