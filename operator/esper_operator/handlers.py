"""kopf handlers: thin wiring from Kubernetes events to the Reconciler.

Run: `kopf run -A -m esper_operator.handlers --liveness=http://0.0.0.0:8080/healthz`.
"""

from __future__ import annotations

import logging
from typing import Any

import kopf

from esper.contracts import API_GROUP, API_VERSION
from esper.contracts.naming import MANAGED_BY, OPERATOR_NAME
from esper_operator import metrics
from esper_operator.config import ConfigError, OperatorConfig
from esper_operator.kube import Kube
from esper_operator.reconcile import Reconciler

BLUEPRINTS = (API_GROUP, API_VERSION, "blueprints")
KERNELS = (API_GROUP, API_VERSION, "kernels")
RESYNC_SECONDS: float = OperatorConfig.setting_from_env("resync_seconds")
RETRY_SECONDS = 10  # a failed handler (API conflict storm, store down) is retried this often, forever


def _emit(body: dict[str, Any], type_: str, reason: str, message: str) -> None:
    kopf.event(body, type=type_, reason=reason, message=message[:1024])


@kopf.on.startup()
async def configure(
    settings: kopf.OperatorSettings, memo: kopf.Memo, logger: logging.Logger, **_: Any
) -> None:
    """Own the esper.dev prefix for everything kopf stores on objects, and validate the config."""
    settings.persistence.finalizer = f"{API_GROUP}/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=API_GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=API_GROUP, key="last-handled-configuration"
    )
    settings.posting.reporting_component = OPERATOR_NAME
    settings.posting.event_name_prefix = "esper-"
    settings.batching.batch_window = 0.01  # react within milliseconds; our handlers are idempotent
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.execution.max_workers = 16
    try:
        config = OperatorConfig.from_env()
    except ConfigError as exc:
        logger.error("%s", exc)
        raise
    memo.reconciler = Reconciler(Kube(), config, _emit)
    metrics.serve(config.metrics_port)
    logger.info("esper operator ready: store %s, compile image %s", config.store_uri, config.compile_image)


@kopf.on.resume(*BLUEPRINTS, id="reconcile", backoff=RETRY_SECONDS)
@kopf.on.create(*BLUEPRINTS, id="reconcile", backoff=RETRY_SECONDS)
@kopf.on.update(*BLUEPRINTS, id="reconcile", backoff=RETRY_SECONDS)
async def reconcile_blueprint(body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, **_: Any) -> None:
    try:
        patch["status"] = await memo.reconciler.reconcile_blueprint(_plain(body))
    except Exception:
        metrics.ERRORS.labels("reconcile").inc()
        raise


@kopf.timer(
    *BLUEPRINTS, id="resync", interval=RESYNC_SECONDS, idle=RESYNC_SECONDS, initial_delay=RESYNC_SECONDS
)
async def resync_blueprint(body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, **_: Any) -> None:
    """Level-triggered safety net: heals lost events, deleted Kernels or Jobs."""
    if body.get("metadata", {}).get("deletionTimestamp"):
        return
    patch["status"] = await memo.reconciler.reconcile_blueprint(_plain(body))


@kopf.on.delete(*BLUEPRINTS, id="release", backoff=RETRY_SECONDS)
async def release_blueprint(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    await memo.reconciler.blueprint_deleted(_plain(body))


@kopf.on.event("batch", "v1", "jobs", labels={MANAGED_BY: OPERATOR_NAME}, id="observe-job")
async def observe_job(type: str, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    if type == "DELETED":
        return
    try:
        await memo.reconciler.observe_job(_plain(body))
    except Exception:
        metrics.ERRORS.labels("observe-job").inc()
        raise


@kopf.on.event(*KERNELS, id="kernel-metrics")
def kernel_metrics(type: str, name: str, namespace: str, status: kopf.Status, **_: Any) -> None:
    metrics.observe_kernel(namespace, name, None if type == "DELETED" else status.get("phase") or "Pending")


@kopf.on.delete(*KERNELS, id="cleanup", backoff=RETRY_SECONDS)
async def cleanup_kernel(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    await memo.reconciler.kernel_deleted(_plain(body))


@kopf.on.probe(id="kernels")
def kernels_probe(**_: Any) -> int:
    return metrics.kernels_tracked()


def _plain(body: kopf.Body) -> dict[str, Any]:
    """kopf's Body is a read-only view; the reconciler works on plain dicts."""
    return {
        "apiVersion": body.get("apiVersion"),
        "kind": body.get("kind"),
        "metadata": _deep(body.get("metadata", {})),
        "spec": _deep(body.get("spec", {})),
        "status": _deep(body.get("status", {})),
    }


def _deep(value: Any) -> Any:
    if isinstance(value, dict) or hasattr(value, "items"):
        return {k: _deep(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_deep(v) for v in value]
    return value
