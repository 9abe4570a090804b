"""The running cluster (the emulator served by a background thread, optionally behind a routing front
before a real API server) and a real operator process."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import aiohttp.test_utils
import kmock
import yaml

from .base import JSON, REPO_ROOT, T, wait_for
from .client import ResourceRef, RestClient
from .emulator import EsperEmulator, esper_crds
from .front import RoutingFront
from .gc import HarnessGarbageCollector
from .kubectl import Kubectl
from .realapi import RealApiServer


class Cluster:
    """An `EsperEmulator` served on 127.0.0.1 by a background thread with its own event loop.

    With `real` (a started `RealApiServer`) the cluster is hybrid: `url` is a routing front that
    sends Esper's kinds, CRDs and OpenAPI to the real server and the rest to the emulator (see
    `front.py`), and the harness garbage collector stands in for kube-controller-manager's. With a
    full kube-apiserver every request goes to it (the emulator then only resolves resource names).

    `url`, `kubeconfig_path`, `kubectl`, `api_client()`, and REST shortcuts (`get`, `list`,
    `create`, `patch`, `delete`, `replace`) that raise `ApiError`. Start with `start()` or `with`.
    """

    def __init__(
        self,
        workdir: Path | None = None,
        *,
        crds: Sequence[Mapping[str, Any]] | None = None,
        namespaces: Sequence[str] = ("default",),
        real: RealApiServer | None = None,
    ) -> None:
        self.real = real
        self.backend = "emulator" if real is None else "full" if real.full else "hybrid"
        self._front: RoutingFront | None = None
        self._gc: HarnessGarbageCollector | None = None
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
                    front_server = None
                    if self.real is not None:
                        front_server = await self._start_front(emulator, self.url)
                        self.url = str(front_server.make_url("")).rstrip("/")
                    ready.set()
                    await self._stop.wait()
                    if self._gc is not None:
                        await self._gc.stop()
                    emulator.close_watches()
                    await asyncio.sleep(0)  # let the watch handlers see their end-of-stream
                    if front_server is not None and self._front is not None:
                        await self._front.close()
                        await front_server.close()
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
        if self.real is not None:
            self._start_gc()
        return self

    async def _start_front(self, emulator: EsperEmulator, emulator_url: str) -> Any:
        assert self.real is not None and self.real.endpoint is not None
        self._front = RoutingFront(
            emulator_url,
            self.real.endpoint.url,
            self.real.endpoint.ssl_context(),
            route_all=self.real.full,
            on_error=emulator.internal_errors.append,
        )
        await self._front.start()
        emulator.watch_closers.append(self._front.close_watches)
        server = aiohttp.test_utils.RawTestServer(self._front, host="127.0.0.1", port=0)
        await server.start_server()
        return server

    def _start_gc(self) -> None:
        """Garbage collection for the real server's objects (it runs no controllers)."""
        assert self.real is not None and self.real.endpoint is not None and self._loop is not None
        watched = self.real.esper_resources()
        if self.real.full:
            watched += ["/apis/batch/v1/jobs", "/api/v1/pods"]
        self._gc = HarnessGarbageCollector(
            aiohttp.ClientSession,
            self.real.endpoint.url,
            self.real.endpoint.ssl_context(),
            watched,
            None if self.real.full else self.emulator,
            self.emulator.internal_errors.append,
        )
        asyncio.run_coroutine_threadsafe(self._gc.start(), self._loop).result(30)

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(30)
        if self.rest is not None:
            self.rest.close()
        if self.real is not None:
            self.real.reset()  # the server outlives this cluster: the next test starts empty
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
        """Create (or replace) a CRD object through the API; returns once its resources are served."""
        if isinstance(crd, Path):
            crd = yaml.safe_load(crd.read_text())
        assert self.rest is not None
        current = self.get("customresourcedefinitions", crd["metadata"]["name"], namespace=None)
        if current is None:
            created = self.rest.create(crd)
        else:
            body = dict(
                crd, metadata=dict(crd["metadata"], resourceVersion=current["metadata"]["resourceVersion"])
            )
            created = self.rest.replace(body)
        if self.real is not None:
            # Served by the real server once Established; the emulator learns the names only, so
            # `resolve` (and with it the REST shortcuts) knows `bp`, `Kernel` and the rest.
            created = self.real.wait_established(crd["metadata"]["name"])
            self.register_crd(crd)
        return created

    def ensure_namespace(self, name: str) -> JSON:
        existing = self.get("namespaces", name, namespace=None)
        if existing is not None:
            return existing
        return self.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})

    def set_pod_log(self, namespace: str, name: str, text: str) -> None:
        """What `kubectl logs` / `read_namespaced_pod_log` return for a pod (FakeKubelet fills it)."""
        self.call(lambda e: e.pod_logs.__setitem__((namespace, name), text))

    def internal_errors(self) -> list[str]:
        """Tracebacks of emulator, routing-front or harness-GC bugs hit so far (the fixture asserts none)."""
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
