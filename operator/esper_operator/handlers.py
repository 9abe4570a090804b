"""kopf handlers: thin wiring from Kubernetes events to the Reconciler.

Run: `kopf run -A -m esper_operator.handlers --liveness=http://0.0.0.0:8080/healthz`.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import Iterable
from typing import Any, cast

import kopf

from esper.contracts import API_GROUP, API_VERSION
from esper.contracts.naming import ANNOTATION_RETRY, FINALIZER, MANAGED_BY, OPERATOR_NAME
from esper_operator import metrics, queue
from esper_operator.bodies import BodyRefused, plain, survive_any_body
from esper_operator.config import ConfigError, OperatorConfig
from esper_operator.kube import Kube
from esper_operator.reconcile import FINAL, Reconciler, finished, phase_of

BLUEPRINTS = (API_GROUP, API_VERSION, "blueprints")
KERNELS = (API_GROUP, API_VERSION, "kernels")
RESYNC_SECONDS: float = OperatorConfig.setting_from_env("resync_seconds")
# A failed handler (API conflict storm, store down) is retried this often, forever.
RETRY_SECONDS: float = OperatorConfig.setting_from_env("retry_seconds")
API_TIMEOUT_SECONDS: float = OperatorConfig.setting_from_env("api_timeout_seconds")
OBSERVE_ATTEMPTS = 6  # then the periodic resync carries a finished Job over
TIMER_EXIT_WAIT_SECONDS = 0.2  # a resync in flight at deletion: waited for this long in the same cycle,
TIMER_EXIT_POLL_SECONDS = 1.0  # then re-checked this often (a touch of the object each time)
QUEUE_SECONDS: float = OperatorConfig.setting_from_env("queue_seconds")
DIFF_BASE_FIELD = "status.operatorState.lastHandledConfiguration"
GC_THRESHOLD = 10_000  # allocations between collections of the youngest generation (Python's default: 700)

survive_any_body()  # before kopf decodes its first body


def _why(exc: BaseException) -> str:
    """An exception for a log line: its message, or its type where it has none (a time-out)."""
    return str(exc) or type(exc).__name__


def _emit(body: dict[str, Any], type_: str, reason: str, message: str) -> None:
    kopf.event(cast(kopf.Body, body), type=type_, reason=reason, message=message[:1024])


class BlueprintDiffBase(kopf.StatusDiffBaseStorage):
    """kopf's last-handled configuration, kept in the Blueprint's status and on Blueprints only.

    In the status it travels in the one status patch the reconcile handler makes anyway; as an
    annotation (kopf's default) it cost a write of its own per Blueprint. Kernels get none: no create
    or update handler reads it there. Blueprints handled by an earlier operator still carry it as the
    annotation `esper.dev/last-handled-configuration`: it is read from there until the first store,
    which moves it into the status.
    """

    def __init__(self) -> None:
        super().__init__(field=DIFF_BASE_FIELD)
        self.legacy = kopf.AnnotationsDiffBaseStorage(prefix=API_GROUP, key="last-handled-configuration")

    def build(self, *, body: kopf.Body, extra_fields: Any = None) -> kopf.BodyEssence:
        essence = super().build(body=body, extra_fields=extra_fields)
        annotations = cast(dict[str, Any], essence).get("metadata", {}).get("annotations", {})
        for key in self.legacy.make_keys(self.legacy.key, body=body):
            annotations.pop(key, None)
        self.remove_empty_stanzas(essence)
        return essence

    def fetch(self, *, body: kopf.Body) -> kopf.BodyEssence | None:
        return super().fetch(body=body) or self.legacy.fetch(body=body)

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: kopf.BodyEssence) -> None:
        if body.get("kind") == "Kernel":
            return
        super().store(body=body, patch=patch, essence=essence)
        for key in self.legacy.make_keys(self.legacy.key, body=body):
            if key in body.metadata.annotations:
                patch.metadata.annotations[key] = None


class ProgressAnnotations(kopf.AnnotationsProgressStorage):
    """kopf's handler progress in `esper.dev/*` annotations, with kopf's `esper.dev/kopf-managed`
    marker written only beside a record that stays.

    kopf stores a record (and the marker) for every handler outcome, then purges the records of a
    cause whose handlers are all done, in the same patch; the marker stayed, and with it a write of
    its own for every Blueprint whose handler succeeded at once. A retried handler's record stays,
    and so does the marker beside it.
    """

    def purge(self, *, key: kopf.HandlerId, body: kopf.Body, patch: kopf.Patch) -> None:
        super().purge(key=key, body=body, patch=patch)
        marker = f"{self.prefix}/kopf-managed"
        annotations = cast(dict[str, Any], patch).get("metadata", {}).get("annotations", {})
        if marker not in annotations or marker in body.metadata.annotations:
            return
        ours = [k for k, v in annotations.items() if k != marker and k.startswith(f"{self.prefix}/") and v]
        if not ours:
            del annotations[marker]
            self.remove_empty_stanzas(cast(kopf.BodyEssence, patch))


def tune_garbage_collection() -> None:
    """Fewer, cheaper garbage collections: under a burst of Blueprints they took a fifth of the
    operator's CPU (1.9 s of 9.7 s for 1,000 Blueprints, benchmarks/operator.py).

    What is loaded by now (modules, kopf's registry, the clients) lives as long as the process: frozen,
    no collection walks it again. The youngest generation is collected after GC_THRESHOLD allocations
    instead of 700: each watch event allocates thousands of short-lived objects, freed by reference
    counting anyway; cycles (rare here) wait a little longer.
    """
    gc.freeze()
    gc.set_threshold(GC_THRESHOLD, *gc.get_threshold()[1:])


# kopf's handler protocols spell out every keyword a handler may take; handlers here take what they use
# and `**_`, which kopf supports but its stubs cannot express (hence the arg-type ignores).
@kopf.on.startup()  # type: ignore[arg-type]
async def configure(
    settings: kopf.OperatorSettings, memo: kopf.Memo, logger: logging.Logger, **_: Any
) -> None:
    """Own the esper.dev prefix for everything kopf stores on objects, and validate the config."""
    settings.persistence.finalizer = FINALIZER
    # kopf's own "Handler succeeded" / "Creation is processed" Events are two writes per Blueprint that
    # nobody reads; the operator's Events say what happened, and kopf's warnings and errors still post.
    settings.posting.level = logging.WARNING
    settings.persistence.progress_storage = ProgressAnnotations(prefix=API_GROUP)
    settings.persistence.diffbase_storage = BlueprintDiffBase()
    settings.posting.reporting_component = OPERATOR_NAME
    settings.posting.event_name_prefix = "esper-"
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.execution.max_workers = 16
    settings.networking.request_timeout = API_TIMEOUT_SECONDS
    # kopf keeps a deleted object's finalizer until its timers have exited. A resync caught mid-reconcile
    # is given a moment to finish, then re-checked each second; kopf's default re-check (60 s) held such
    # deletions for a minute, longer than `kubectl delete`'s patience in scripts.
    settings.background.instant_exit_timeout = TIMER_EXIT_WAIT_SECONDS
    settings.background.cancellation_polling = TIMER_EXIT_POLL_SECONDS
    try:
        config = OperatorConfig.from_env()
    except ConfigError as exc:
        logger.error("%s", exc)
        raise
    memo.reconciler = Reconciler(Kube(timeout=API_TIMEOUT_SECONDS), config, _emit)
    metrics.serve(config.metrics_port)
    tune_garbage_collection()
    logger.info("esper operator ready: store %s, compile image %s", config.store_uri, config.compile_image)


@kopf.on.cleanup()
async def close(memo: kopf.Memo, **_: Any) -> None:
    """The API session's connections, closed as kopf stops."""
    reconciler = getattr(memo, "reconciler", None)
    if reconciler is not None:
        await reconciler.kube.close()


@kopf.on.resume(*BLUEPRINTS, id="reconcile", backoff=RETRY_SECONDS)
@kopf.on.create(*BLUEPRINTS, id="reconcile", backoff=RETRY_SECONDS)
@kopf.on.update(*BLUEPRINTS, id="reconcile", backoff=RETRY_SECONDS)
async def reconcile_blueprint(body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, **_: Any) -> None:
    try:
        patch["status"] = await _reconcile(body, memo)
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
    patch["status"] = await _reconcile(body, memo)


async def _reconcile(body: kopf.Body, memo: kopf.Memo) -> dict[str, Any]:
    """Reconcile a Blueprint; one whose body cannot be processed safely becomes Invalid, with why."""
    try:
        checked = plain(body)
    except BodyRefused as exc:
        return await memo.reconciler.refuse_blueprint(_metadata_and_status(body), str(exc))
    return await memo.reconciler.reconcile_blueprint(checked)


def _metadata_and_status(body: kopf.Body) -> dict[str, Any]:
    """What releasing a Blueprint's Kernels needs, even when its spec (or status) is refused."""
    try:
        return plain(body, parts=("status",))
    except BodyRefused:
        return plain(body, parts=())


def _never_reconciled(body: kopf.Body, **_: Any) -> bool:
    return not body.get("status") and not body.get("metadata", {}).get("deletionTimestamp")


@kopf.on.event(*BLUEPRINTS, id="prepare", when=_never_reconciled)  # type: ignore[arg-type]
async def prepare_blueprint(
    type: str, body: kopf.Body, memo: kopf.Memo, logger: logging.Logger, **_: Any
) -> None:
    """A new Blueprint's Kernels and Jobs, made in the cycle where kopf adds its finalizer.

    Only a head start: whatever fails here, the reconcile handler that follows does again and
    reports, so nothing is raised (kopf would post an error Event and never retry an event handler).
    """
    if type == "DELETED":
        return
    try:
        await memo.reconciler.prepare_blueprint(plain(body))
    except Exception as exc:
        logger.info("no head start for this Blueprint (%s); the reconcile handler takes it", _why(exc))


@kopf.on.delete(*BLUEPRINTS, id="release", backoff=RETRY_SECONDS)
async def release_blueprint(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    await memo.reconciler.blueprint_deleted(_metadata_and_status(body))


def _job_ended(body: kopf.Body, **_: Any) -> bool:
    """Only an ended Job has an outcome to read; kopf skips the handler for the others."""
    return finished(cast(dict[str, Any], body))


@kopf.on.event(  # type: ignore[arg-type]
    "batch", "v1", "jobs", labels={MANAGED_BY: OPERATOR_NAME}, when=_job_ended, id="observe-job"
)
async def observe_job(type: str, body: kopf.Body, memo: kopf.Memo, logger: logging.Logger, **_: Any) -> None:
    """kopf never retries an event handler: a failed observation is retried here, else left to resync."""
    if type == "DELETED":
        return
    job = plain(body)
    for attempt in range(1, OBSERVE_ATTEMPTS + 1):
        try:
            await memo.reconciler.observe_job(job)
            return
        except Exception as exc:
            metrics.ERRORS.labels("observe-job").inc()
            if attempt == OBSERVE_ATTEMPTS:
                raise
            logger.warning("observing the Job failed (%s); retrying in %s s", _why(exc), RETRY_SECONDS)
            await asyncio.sleep(RETRY_SECONDS)


@kopf.on.event("", "v1", "pods", labels={MANAGED_BY: OPERATOR_NAME}, id="observe-compile-pod")
async def observe_compile_pod(type: str, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """A compile Pod stuck before it starts (a missing Secret) is reported on its Kernel at once."""
    if type == "DELETED":
        return
    await memo.reconciler.observe_pod(plain(body, parts=("status",)))


@kopf.index(*KERNELS, id="kernel_phases")  # type: ignore[arg-type]
async def kernel_phases(namespace: str, name: str, body: kopf.Body, **_: Any) -> dict[Any, str]:
    """Each Kernel's phase as the watch last showed it, for `check-phases`.

    An index, because kopf starts no handler before every index has listed its objects: a Blueprint's
    status is never checked against Kernels not listed yet (a slow list at start would hide them).
    """
    return {(namespace, name): phase_of(cast(dict[str, Any], body))}


@kopf.on.event(*KERNELS, id="kernel-phase")  # type: ignore[arg-type]
async def kernel_phase(
    type: str, name: str, namespace: str, body: kopf.Body, memo: kopf.Memo, logger: logging.Logger, **_: Any
) -> None:
    """Track each Kernel's phase (the per-phase gauge); one that turns Ready or Failed refreshes the
    status of its Blueprints.

    The Job observer refreshes them too, at once, but a Blueprint whose reconcile is under way then has
    no status to refresh, and that reconcile may write the phase it read before. Whichever of the two
    watch events comes last sees the difference: this one, or the Blueprint's (`check-phases`).
    """
    phase = None if type == "DELETED" else phase_of(cast(dict[str, Any], body))
    before = metrics.observe_kernel(namespace, name, phase)
    if before is None or phase == before or phase not in FINAL:
        return  # first sight (listed Kernels are checked from their Blueprints' side), or no news
    try:
        await memo.reconciler.refresh_blueprints(plain(body))
    except Exception as exc:  # an event handler is never retried: the periodic resync carries it
        metrics.ERRORS.labels("kernel-phase").inc()
        logger.warning("refreshing this Kernel's Blueprints failed (%s); the resync will", _why(exc))


def _behind_its_kernels(status: kopf.Status, namespace: str, kernel_phases: kopf.Index, **_: Any) -> bool:
    """A Blueprint status that lists a Kernel in another phase than the (final) one the watch showed."""
    for ref in status.get("kernels") or []:
        for known in kernel_phases.get((namespace, ref.get("name")), ()):
            if known in FINAL and ref.get("phase") != known:
                return True
    return False


@kopf.on.event(*BLUEPRINTS, id="check-phases", when=_behind_its_kernels)  # type: ignore[arg-type]
async def check_phases(
    type: str, name: str, namespace: str, memo: kopf.Memo, logger: logging.Logger, **_: Any
) -> None:
    """A Blueprint status written with a Kernel's phase from before it turned Ready or Failed is
    refreshed from the Kernels as they are (see `kernel_phase`)."""
    if type == "DELETED":
        return
    try:
        await memo.reconciler.refresh_blueprint(namespace, name)
    except Exception as exc:
        metrics.ERRORS.labels("check-phases").inc()
        logger.warning("refreshing this Blueprint's status failed (%s); the resync will", _why(exc))


def _waits_for_a_job(status: kopf.Status, annotations: kopf.Annotations, **_: Any) -> bool:
    """Kernels the queue's timer serves: Pending for a slot or a back-off, or Failed with a new retry
    request. kopf runs a timer only while its object matches, so Compiling and Ready Kernels (nearly
    all of them) cost no timer at all."""
    return queue.waits_for_job(status) or queue.retry_requested(
        status, annotations.get(ANNOTATION_RETRY) or ""
    )


@kopf.timer(*KERNELS, id="queue", interval=QUEUE_SECONDS, initial_delay=QUEUE_SECONDS, when=_waits_for_a_job)
async def kernel_queue(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """Waiting Kernels (queued for a slot, backing off, retry asked for) get their next Job here."""
    try:
        await memo.reconciler.kernel_tick(plain(body))
    except Exception:
        metrics.ERRORS.labels("queue").inc()
        raise


@kopf.on.delete(*KERNELS, id="cleanup", backoff=RETRY_SECONDS)
async def cleanup_kernel(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    await memo.reconciler.kernel_deleted(plain(body))


@kopf.on.probe(id="kernels")
def kernels_probe(**_: Any) -> int:
    return metrics.kernels_tracked()


@kopf.on.probe(id="watching")
async def watching_probe(**_: Any) -> list[str]:
    """Liveness fails (HTTP 500) once a resource's watch has died: kopf does not restart it."""
    return WATCHES.check(t.get_name() for t in asyncio.all_tasks())


class Watches:
    """The resources kopf watches, from its task names (`watcher for <resource>@<namespace>`)."""

    PREFIX = "watcher for "

    def __init__(self) -> None:
        self.seen: set[str] = set()

    def check(self, task_names: Iterable[str]) -> list[str]:
        """The watched resources; RuntimeError if one watched before has no watch task any more."""
        live = {n[len(self.PREFIX) :].rsplit("@", 1)[0] for n in task_names if n.startswith(self.PREFIX)}
        lost = self.seen - live
        self.seen |= live
        if lost:
            raise RuntimeError(f"the watch of {', '.join(sorted(lost))} has stopped; restart the operator")
        return sorted(live)


WATCHES = Watches()
