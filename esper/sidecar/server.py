"""The sync sidecar's metrics and its small HTTP endpoint: /readyz, /healthz, /metrics.

/readyz gates the pod: the injected startupProbe holds the trainer back until the first sync is done.
A plain http.server in a daemon thread: three endpoints do not justify a framework.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

log = logging.getLogger(__name__)


class SyncMetrics:
    """The sidecar's metrics, in their own registry (several syncs may share a process in tests)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.installed = Gauge(
            "esper_sync_kernels_installed", "Kernels installed and listed in the index.", registry=r
        )
        self.downloads = Counter(
            "esper_sync_downloads",
            "Bundle fetches by outcome (success, storage_error, artifact_error, not_found, error).",
            ["outcome"],
            registry=r,
        )
        self.download_seconds = Histogram(
            "esper_sync_download_seconds",
            "Wall time of one bundle fetch.",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
            registry=r,
        )
        self.errors = Counter(
            "esper_sync_errors",
            "Errors by kind (storage, artifact, not_found, kube_api, "
            "watch_expired, bad_kernel, index, internal).",
            ["kind"],
            registry=r,
        )
        self.last_success = Gauge(
            "esper_sync_last_success_timestamp",
            "Unix time of the last reconcile that left every wanted kernel installed.",
            registry=r,
        )


class SyncServer:
    """Serves /readyz (200 once `ready()` is true, else 503), /healthz and /metrics."""

    def __init__(
        self,
        registry: CollectorRegistry,
        ready: Callable[[], bool],
        *,
        port: int = 9090,
        host: str = "0.0.0.0",
    ) -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._send(200, generate_latest(registry), CONTENT_TYPE_LATEST)
                elif path == "/healthz":
                    self._send(200, b"ok\n")
                elif path == "/readyz":
                    ok = ready()
                    self._send(200 if ok else 503, b"ok\n" if ok else b"initial sync not done\n")
                else:
                    self._send(404, b"not found\n")

            def _send(self, code: int, body: bytes, ctype: str = "text/plain; charset=utf-8") -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:  # probes every second: quiet
                log.debug("http: " + format, *args)

        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True
        self.port: int = self.httpd.server_address[1]
        self._thread: threading.Thread | None = None

    def start(self) -> SyncServer:
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="esper-sync-http", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self.httpd.shutdown()
            self._thread.join(5)
        self.httpd.server_close()
