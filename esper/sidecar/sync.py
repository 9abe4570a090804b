"""The Kasmina sync sidecar: keep a shared volume in step with the Kernels a pod asked for.

Level-triggered: a watcher thread keeps `observed` (the wanted Kernel objects) current by list + watch;
`reconcile()` compares what should be installed (Ready Kernels with an artifact) with what is, and acts.
The watch only wakes the reconciler, so a lost event, an S3 outage or a restart cannot leave the volume
wrong for longer than one pass. Downloads run in a small pool, each Kernel with its own capped,
jittered backoff, so one bad bundle or a slow store never holds the others back. If the API server is
unreachable, whatever is installed stays installed and served.

RBAC: the pod's ServiceAccount needs only get/list/watch on kernels.esper.dev in its namespace
(the chart's `esper-kernel-reader` ClusterRole, bound with a RoleBinding).
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import signal
import threading
import time
import uuid
from collections.abc import Callable, Collection, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from esper.artifact import ArtifactError, verify_bundle
from esper.contracts.common import API_GROUP, API_VERSION, ArtifactRef
from esper.envconfig import ConfigError
from esper.sidecar.config import (
    SyncConfig,
    default_namespace,
    parse_selector,
    selector_matches,
)
from esper.sidecar.index import (
    KERNELS_SUBDIR,
    IndexCorrupt,
    IndexEntry,
    bundle_path,
    read_index,
    write_index,
)
from esper.sidecar.server import SyncMetrics, SyncServer
from esper.storage import BundleNotFound, StorageError, Store, open_store

log = logging.getLogger(__name__)

__all__ = [
    "ConfigError", "Desired", "KernelSync", "SyncConfig", "default_namespace", "desired_of",
    "make_api_client", "run_sync", "store_uri_of",
]  # fmt: skip

PLURAL = "kernels"
RESYNC_SECONDS = 30.0  # a reconcile pass at least this often, events or not


# ---- what a Kernel object asks for -----------------------------------------------------------------


@dataclass(frozen=True)
class Desired:
    """One Kernel that should be installed: its index entry-to-be and where its bundle is."""

    entry: IndexEntry
    bundle_uri: str


def desired_of(obj: Mapping[str, Any], namespace: str, targets: Collection[str] | str = ()) -> Desired | None:
    """The install a Kernel object asks for; None if not Ready or not of `targets` (one, or several;
    none: any); ValueError if malformed."""
    if isinstance(targets, str):  # one target, never matched as a substring ("cpu" in "cpu-avx512")
        targets = (targets,)
    meta, spec, status = obj.get("metadata") or {}, obj.get("spec") or {}, obj.get("status") or {}
    if status.get("phase") != "Ready" or not status.get("artifact"):
        return None
    if targets and spec.get("target") not in targets:
        return None
    try:
        artifact = ArtifactRef.model_validate(status["artifact"])
        name = meta["name"]
        entry = IndexEntry(
            name=name,
            namespace=meta.get("namespace") or namespace,
            key=spec.get("key", ""),
            sha256=artifact.sha256,
            target=spec.get("target", ""),
            blueprint=spec.get("blueprint", ""),
            path=f"{KERNELS_SUBDIR}/{name}",
            size=artifact.size,
        )
    except (ValidationError, KeyError) as e:
        raise ValueError(f"Kernel {meta.get('name')!r} is malformed: {e}") from None
    return Desired(entry, artifact.uri)


def store_uri_of(bundle_uri: str, key: str) -> str:
    """`s3://b/prefix/kernels/<key>` -> `s3://b/prefix`: the store the operator used."""
    suffix = f"/{KERNELS_SUBDIR}/{key}"
    uri = bundle_uri.rstrip("/")
    if not uri.endswith(suffix) or len(uri) == len(suffix):
        raise ValueError(f"artifact URI {bundle_uri!r} does not end with {suffix!r}")
    return uri[: -len(suffix)]


# ---- the sync loop ---------------------------------------------------------------------------------


@dataclass
class _Failure:
    sha256: str
    attempts: int
    next_at: float
    settled: bool  # bad content / missing / malformed: counts as done for readiness (still retried)
    error: str


@dataclass
class _Result:
    name: str
    desired: Desired
    outcome: str  # success, storage_error, artifact_error, not_found, error
    error: str = ""
    settled: bool = False


def make_api_client() -> Any:
    """An ApiClient from the in-cluster service account, else from $KUBECONFIG (read now, explicitly)."""
    from kubernetes import client, config

    if os.environ.get("KUBERNETES_SERVICE_HOST"):
        cfg = client.Configuration()
        config.load_incluster_config(client_configuration=cfg)
        return client.ApiClient(cfg)
    path = os.environ.get("KUBECONFIG") or os.path.expanduser("~/.kube/config")
    return config.new_client_from_config(config_file=path)


class KernelSync:
    """List + watch the wanted Kernels and keep `config.kernel_dir` matching them (see the module doc)."""

    def __init__(
        self,
        config: SyncConfig,
        *,
        api_client: Any = None,
        store_factory: Callable[[str], Store] = open_store,
        metrics: SyncMetrics | None = None,
    ) -> None:
        from kubernetes import client

        self.config = config
        self.dir = Path(config.kernel_dir)
        self.api = client.CustomObjectsApi(api_client if api_client is not None else make_api_client())
        self.store_factory = store_factory
        self.metrics = metrics or SyncMetrics()
        self._selector = parse_selector(config.selector) if config.selector else None
        self._lock = threading.RLock()
        self._reconcile_lock = threading.Lock()
        self._observed: dict[str, dict[str, Any]] | None = None  # None until the first list
        self._initial: set[str] | None = None  # desired names at the first list: what /readyz waits for
        self._ready = False
        self._installed: dict[str, IndexEntry] = {}
        self._written: list[IndexEntry] | None = None
        self._version = 0
        self._failures: dict[str, _Failure] = {}
        self._inflight: dict[str, Future[_Result]] = {}
        self._results: list[_Result] = []
        self._bad: dict[str, str] = {}  # name -> error already reported (log a malformed Kernel once)
        self._stores: dict[str, Store] = {}
        self._pool = ThreadPoolExecutor(config.workers, thread_name_prefix="esper-sync-fetch")
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._watch: Any = None
        self._threads: list[threading.Thread] = []
        self._load_existing()

    # -- state on disk at start (a restarted sidecar keeps its emptyDir) --

    def _load_existing(self) -> None:
        (self.dir / KERNELS_SUBDIR).mkdir(parents=True, exist_ok=True)
        for p in (self.dir / KERNELS_SUBDIR).iterdir():  # leftovers of an interrupted fetch or removal
            if p.name.startswith("."):
                _remove_path(p)
        try:
            index = read_index(self.dir)
        except IndexCorrupt as e:
            log.error("%s; starting from an empty index", e)
            self.metrics.errors.labels("index").inc()
            return
        self._version = index.version
        for entry in index.kernels:
            try:  # re-verify: only what matches a recorded sha256 is ever listed
                verify_bundle(
                    entry.bundle_dir(self.dir),
                    entry.sha256,
                    expected_key=entry.key,
                    trusted=self.config.trusted(),
                )
                self._installed[entry.name] = entry
            except ArtifactError as e:
                log.warning("dropping %s from the index: %s", entry.name, e)
        self._written = None  # rewrite once, so the index matches what was re-verified

    # -- what the watcher feeds --

    def wanted(self, obj: Mapping[str, Any]) -> bool:
        """Whether this pod asked for the Kernel: by name, or by label selector (either suffices)."""
        meta = obj.get("metadata") or {}
        if meta.get("name") in self.config.kernels:
            return True
        return self._selector is not None and selector_matches(self._selector, meta.get("labels") or {})

    def list_kernels(self) -> str:
        """List the namespace's Kernels into `observed`; returns the list's resourceVersion."""
        resp: dict[str, Any] = self.api.list_namespaced_custom_object(  # type: ignore[assignment]
            API_GROUP,
            API_VERSION,
            self.config.namespace,
            PLURAL,
            _request_timeout=(10, 60),
        )
        items = {o["metadata"]["name"]: o for o in resp.get("items") or [] if self.wanted(o)}
        with self._lock:
            self._observed = items
            if self._initial is None:
                self._initial = set(self._desired())
        self._wake.set()
        return str((resp.get("metadata") or {}).get("resourceVersion") or "")

    def apply_event(self, event: Mapping[str, Any]) -> None:
        """One watch event: record the object (or its absence) and wake the reconciler."""
        kind, obj = event.get("type"), event.get("raw_object") or event.get("object")
        if kind not in ("ADDED", "MODIFIED", "DELETED") or not isinstance(obj, dict):
            return
        name = str((obj.get("metadata") or {}).get("name") or "")
        with self._lock:
            if self._observed is None:
                self._observed = {}
            if kind != "DELETED" and self.wanted(obj):
                self._observed[name] = obj
            else:
                self._observed.pop(name, None)
        self._wake.set()

    def _watch_loop(self) -> None:
        from kubernetes import watch
        from kubernetes.client.rest import ApiException

        rv: str | None = None
        attempts = 0
        while not self._stop.is_set():
            try:
                if rv is None:
                    rv = self.list_kernels()
                w = self._watch = watch.Watch()
                for event in w.stream(
                    self.api.list_namespaced_custom_object,
                    API_GROUP,
                    API_VERSION,
                    self.config.namespace,
                    PLURAL,
                    resource_version=rv or None,
                    timeout_seconds=self.config.watch_timeout,
                    allow_watch_bookmarks=True,
                    _request_timeout=(10, self.config.watch_timeout + 30),
                ):
                    if self._stop.is_set():
                        break
                    self.apply_event(event)
                rv = w.resource_version or rv
                attempts = 0
            except ApiException as e:
                if self._stop.is_set():
                    break
                rv = None  # relist: level-triggered, so a missed event cannot matter
                if e.status == 410:
                    self.metrics.errors.labels("watch_expired").inc()
                    log.info("watch expired (410 Gone): relisting")
                    continue
                attempts += 1
                self.metrics.errors.labels("kube_api").inc()
                log.warning("Kubernetes API error (%s %s); retrying", e.status, e.reason)
                self._stop.wait(self._backoff(attempts))
            except Exception as e:  # unreachable API, timeouts, a dropped stream
                if self._stop.is_set():
                    break
                rv, attempts = None, attempts + 1
                self.metrics.errors.labels("kube_api").inc()
                log.warning("Kubernetes API unreachable (%s); serving what is installed, retrying", e)
                self._stop.wait(self._backoff(attempts))

    # -- reconcile --

    def _backoff(self, attempts: int) -> float:
        """Capped exponential backoff with jitter (half fixed, half random)."""
        delay = min(self.config.retry_max, self.config.retry_base * 2 ** max(attempts - 1, 0))
        return delay / 2 + random.uniform(0, delay / 2)

    def _desired(self) -> dict[str, Desired]:
        out: dict[str, Desired] = {}
        for name, obj in (self._observed or {}).items():
            try:
                d = desired_of(obj, self.config.namespace, self.config.targets)
            except ValueError as e:
                if self._bad.get(name) != str(e):
                    self._bad[name] = str(e)
                    self.metrics.errors.labels("bad_kernel").inc()
                    log.error("%s", e)
                continue
            self._bad.pop(name, None)
            if d is not None:
                out[name] = d
        return out

    def reconcile(self, wait: bool = False) -> bool:
        """One pass; with `wait`, also waits for the fetches it starts. True when everything is installed."""
        with self._reconcile_lock:
            self._collect()
            desired = self._snapshot()
            if desired is None:  # nothing listed yet: keep serving what is installed
                return False
            self._drop_unwanted(desired)
            started = self._start_fetches(desired)
            if wait and started:
                for f in started:
                    f.result()
                self._collect()
                desired = self._snapshot() or {}
                self._drop_unwanted(desired)
            with self._lock:
                done = all(self._installed.get(n) == d.entry for n, d in desired.items())
                if self._initial is not None and not self._ready:
                    self._ready = all(n in self._installed or n not in desired or
                                      ((failure := self._failures.get(n)) is not None and failure.settled)
                                      for n in self._initial)  # fmt: skip
                self.metrics.installed.set(len(self._installed))
            if done:
                self.metrics.last_success.set_to_current_time()
            return done

    def _snapshot(self) -> dict[str, Desired] | None:
        with self._lock:
            return None if self._observed is None else self._desired()

    def _drop_unwanted(self, desired: dict[str, Desired]) -> None:
        """Index first, files second: the index never names a directory that is not there.

        Make before break: while a wanted Kernel is still on its way (being fetched, or due a retry),
        Kernels no longer wanted stay installed, so a Blueprint that switches to a new Kernel never
        leaves training without one. Only a settled failure (bad or missing bundle) ends the wait.
        """
        with self._lock:
            arriving = any(
                self._installed.get(n) != d.entry
                and not (
                    (f := self._failures.get(n)) is not None and f.settled and f.sha256 == d.entry.sha256
                )
                for n, d in desired.items()
            )
            for name, entry in list(self._installed.items()):
                d = desired.get(name)
                if d is None and arriving:
                    continue
                if d is None or d.entry.sha256 != entry.sha256:
                    del self._installed[name]
                elif d.entry != entry:  # same bundle, other metadata (e.g. size): refresh the entry
                    self._installed[name] = d.entry
            for name in list(self._failures):
                if name not in desired:
                    del self._failures[name]
            busy = set(desired) | set(self._inflight) | set(self._installed)
        self._write_index()
        for p in (self.dir / KERNELS_SUBDIR).iterdir():
            if not p.name.startswith(".") and p.name not in busy:
                log.info("removing %s (no longer wanted)", p.name)
                _remove_path(p)

    def _write_index(self) -> None:
        with self._lock:
            entries = sorted(self._installed.values(), key=lambda e: e.name)
            if entries == self._written:
                return
            try:
                write_index(self.dir, entries, self._version + 1)
            except OSError as e:
                self.metrics.errors.labels("index").inc()
                log.error("cannot write the index: %s", e)
                return
            self._version += 1
            self._written = entries
        log.info("index v%d: %s", self._version, ", ".join(e.name for e in entries) or "(empty)")

    def _start_fetches(self, desired: dict[str, Desired]) -> list[Future[_Result]]:
        now, started = time.monotonic(), []
        with self._lock:
            for name, d in desired.items():
                if self._installed.get(name) == d.entry or name in self._inflight:
                    continue
                f = self._failures.get(name)
                if f is not None and f.sha256 == d.entry.sha256 and f.next_at > now:
                    continue
                fut = self._pool.submit(self._fetch, name, d)
                self._inflight[name] = fut
                fut.add_done_callback(lambda _f: self._wake.set())
                started.append(fut)
        return started

    def _store(self, d: Desired) -> Store:
        uri = self.config.store_uri or store_uri_of(d.bundle_uri, d.entry.key)
        with self._lock:
            if uri not in self._stores:
                self._stores[uri] = self.store_factory(uri)
            return self._stores[uri]

    def _fetch(self, name: str, d: Desired) -> _Result:
        """Runs in the pool: download + verify + atomic rename (all done by the store)."""
        t0 = time.monotonic()
        try:
            dest = bundle_path(self.dir, name)
            if not d.entry.sha256:  # only a bundle the operator recorded is ever installed
                raise ArtifactError(f"Kernel {name} records no manifest sha256")
            self._store(d).fetch_bundle(
                d.entry.key,
                dest,
                expected_sha256=d.entry.sha256,
                trusted=self.config.trusted(),
                max_bundle_bytes=self.config.max_bundle_bytes,
            )
            result = _Result(name, d, "success")
        except StorageError as e:
            result = _Result(name, d, "storage_error", str(e))
        except ArtifactError as e:
            result = _Result(name, d, "artifact_error", str(e), settled=True)
        except BundleNotFound as e:
            result = _Result(name, d, "not_found", str(e), settled=True)
        except ValueError as e:  # an artifact URI no store can open
            result = _Result(name, d, "error", str(e), settled=True)
        except Exception as e:
            log.exception("fetching %s failed unexpectedly", name)
            result = _Result(name, d, "error", repr(e))
        self.metrics.download_seconds.observe(time.monotonic() - t0)
        with self._lock:
            self._results.append(result)
        return result

    def _collect(self) -> None:
        """Apply finished fetches: installed ones join the index, failures get their next retry time."""
        with self._lock:
            results, self._results = self._results, []
            for r in results:
                self._inflight.pop(r.name, None)
                self.metrics.downloads.labels(r.outcome).inc()
                if r.outcome == "success":
                    self._failures.pop(r.name, None)
                    self._installed[r.name] = r.desired.entry  # _drop_unwanted drops it if stale
                    log.info("installed %s (%s)", r.name, r.desired.entry.sha256[:12])
                    continue
                kind = {"storage_error": "storage", "artifact_error": "artifact"}.get(r.outcome, r.outcome)
                self.metrics.errors.labels("internal" if kind == "error" else kind).inc()
                old = self._failures.get(r.name)
                attempts = old.attempts + 1 if old and old.sha256 == r.desired.entry.sha256 else 1
                delay = self._backoff(attempts)
                self._failures[r.name] = _Failure(
                    r.desired.entry.sha256, attempts, time.monotonic() + delay, r.settled, r.error
                )
                log.warning(
                    "%s not installed (attempt %d, retry in %.1fs): %s", r.name, attempts, delay, r.error
                )

    # -- status --

    def ready(self) -> bool:
        """True (and stays true) once the initial list is reconciled: /readyz."""
        return self._ready

    def failures(self) -> dict[str, str]:
        """Kernels that failed their last fetch, with the error (for status output and tests)."""
        with self._lock:
            return {n: f.error for n, f in self._failures.items()}

    # -- running --

    def run_once(self) -> bool:
        """List, then reconcile and wait for the fetches: one synchronous pass (tests, `--once`)."""
        self.list_kernels()
        return self.reconcile(wait=True)

    def _next_wait(self) -> float:
        with self._lock:
            due = [f.next_at for n, f in self._failures.items() if n not in self._inflight]
        return max(0.0, min([RESYNC_SECONDS, *(t - time.monotonic() for t in due)]))

    def _reconcile_loop(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()
            try:
                self.reconcile()
            except Exception:
                self.metrics.errors.labels("internal").inc()
                log.exception("reconcile failed; retrying")
                self._stop.wait(self._backoff(3))
            self._wake.wait(self._next_wait())

    def start(self) -> KernelSync:
        """Start the watcher and the reconciler in daemon threads (tests; `run()` for the sidecar)."""
        for target, name in ((self._watch_loop, "esper-sync-watch"), (self._reconcile_loop, "esper-sync")):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def request_stop(self) -> None:
        """Ask the loops to end (safe from a signal handler)."""
        self._stop.set()
        self._wake.set()
        if self._watch is not None:
            self._watch.stop()

    def stop(self, timeout: float = 10) -> None:
        self.request_stop()
        for t in self._threads:
            t.join(timeout)
        self._pool.shutdown(wait=True, cancel_futures=True)

    def run(self) -> None:
        """Watch in a thread, reconcile in this one, until `request_stop()`."""
        t = threading.Thread(target=self._watch_loop, name="esper-sync-watch", daemon=True)
        t.start()
        self._threads.append(t)
        try:
            self._reconcile_loop()
        finally:
            self.stop()


def _remove_path(p: Path) -> None:
    """Rename aside, then delete: the name disappears at once, never half-deleted."""
    aside = p.parent / f".{p.name}.del-{uuid.uuid4().hex[:8]}"
    try:
        os.rename(p, aside)
    except FileNotFoundError:
        return
    if aside.is_dir() and not aside.is_symlink():
        shutil.rmtree(aside, ignore_errors=True)
    else:
        aside.unlink(missing_ok=True)


def run_sync(config: SyncConfig | None = None, *, api_client: Any = None) -> int:
    """The sidecar's entry point (`esper kasmina sync`): serve probes and metrics, sync until SIGTERM."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = config or SyncConfig.from_env()
    sync = KernelSync(config, api_client=api_client)
    server = SyncServer(sync.metrics.registry, sync.ready, port=config.port, host=config.host).start()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: sync.request_stop())
    what = ", ".join(config.kernels) + (f" selector {config.selector!r}" if config.selector else "")
    log.info(
        "syncing %s in namespace %s into %s (port %d)", what, config.namespace, config.kernel_dir, server.port
    )
    try:
        sync.run()
    finally:
        server.stop()
    return 0
