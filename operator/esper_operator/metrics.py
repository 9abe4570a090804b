"""Prometheus metrics of the operator (served on ESPER_METRICS_PORT)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

RECONCILES = Counter("esper_reconciles_total", "Blueprint reconciliations.", ["resource", "outcome"])
ERRORS = Counter("esper_reconcile_errors_total", "Handler errors (retried with backoff).", ["handler"])
JOBS_CREATED = Counter("esper_compile_jobs_created_total", "Compile Jobs created.", ["target"])
JOB_SECONDS = Histogram(
    "esper_compile_job_seconds",
    "Compile Job duration, start to completion.",
    ["target", "outcome"],
    buckets=(5, 10, 20, 30, 60, 120, 300, 600, 1200, 1800, 3600),
)
KERNELS = Gauge("esper_kernels", "Kernels by phase.", ["phase"])

_phases: dict[tuple[str, str], str] = {}


def observe_kernel(namespace: str, name: str, phase: str | None) -> str | None:
    """Track a Kernel's phase (None: deleted) and refresh the per-phase gauge; return the phase before."""
    key = (namespace, name)
    old = _phases.pop(key, None)
    if phase is not None:
        _phases[key] = phase
    if old == phase:
        return old
    if old is not None:
        KERNELS.labels(old).dec()
    if phase is not None:
        KERNELS.labels(phase).inc()
    return old


def kernels_tracked() -> int:
    return len(_phases)


def serve(port: int) -> None:
    if port:
        start_http_server(port)
