"""Reconciliation: Blueprints into Kernels and Jobs, finished Jobs into Kernel status.

Every step is idempotent and keyed by deterministic names, so a retry, a second operator replica's
stale event or a restart mid-way adopts what exists instead of duplicating it: a Kernel or Job that
already exists (HTTP 409 on create) is the one we wanted.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import hashlib
import json
import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from esper.blueprint import BlueprintInvalid
from esper.contracts import GROUP_VERSION, KernelSpec
from esper.contracts.naming import (
    ANNOTATION_RETRY,
    FINALIZER,
    LABEL_IR_DIGEST,
    LABEL_KERNEL,
    LABEL_TARGET,
    LABEL_TEMPLATE,
    MANAGED_BY,
    OPERATOR_NAME,
    job_name,
    label_value,
    requester_label,
)
from esper.storage import Store, open_store
from esper_operator import metrics, queue
from esper_operator.config import OperatorConfig
from esper_operator.faults import crash_point
from esper_operator.jobs import (
    LABEL_KERNEL_NAMESPACE,
    LABEL_KERNEL_UID,
    WAITING_REASONS,
    JobOutcome,
    build_job,
    controller_uid,
    interpret,
    job_name_for,
    own_pods,
    waiting,
)
from esper_operator.kube import Body, Conflict, Kube
from esper_operator.plan import Plan, PlannedKernel, plan_blueprint
from esper_operator.requesters import requesters_status, set_role
from esper_operator.rollout import CANDIDATE, CARRIED, SERVING, advance, held
from esper_operator.status import blueprint_status, invalid_status, kernel_status

log = logging.getLogger("esper.operator")
Emit = Callable[[Body, str, str, str], None]
FINAL = ("Ready", "Failed")
OWNER_RETRIES = 8
CONCURRENT_RECONCILES = 32
PREPARED_LIMIT = 4096  # prepared Blueprints not yet reconciled (deleted at once, say) are forgotten beyond


@dataclass(frozen=True)
class HeadStart:
    """A new Blueprint's plan and Kernels, made from its first watch event (`prepare_blueprint`)."""

    generation: int
    plan: Plan
    kernels: dict[str, Body]
    superseded: bool  # an earlier generation had a head start too: its Kernels may be held by nobody's status


def _owner_ref(body: Body) -> Body:
    return {
        "apiVersion": body.get("apiVersion", GROUP_VERSION),
        "kind": body.get("kind", "Blueprint"),
        "name": body["metadata"]["name"],
        "uid": body["metadata"]["uid"],
    }


def phase_of(obj: Body | None) -> str:
    """A Kernel's phase; Pending while it has none."""
    return ((obj or {}).get("status") or {}).get("phase") or "Pending"


class Reconciler:
    def __init__(self, kube: Kube, config: OperatorConfig, emit: Emit) -> None:
        self.kube = kube
        self.config = config
        self.emit = emit
        self._job_slots = asyncio.Lock()
        # A burst of new Blueprints is planned a few dozen at a time, not all at once: as fast (the API
        # server is the bottleneck) with a fraction of the memory (plans hold expanded graphs).
        self._planning = asyncio.Semaphore(CONCURRENT_RECONCILES)
        # Blueprint uid -> its head start (`prepare_blueprint`), for the reconcile that follows.
        self._prepared: OrderedDict[str, HeadStart] = OrderedDict()

    @functools.cached_property
    def store(self) -> Store:
        """The artifact store, opened once (a boto3 client is not free to build)."""
        return open_store(self.config.store_uri)

    # --- Blueprints ------------------------------------------------------------------------------

    async def reconcile_blueprint(self, body: Body) -> Body:
        """Ensure the Blueprint's Kernels and Jobs exist; return its new status."""
        async with self._planning:
            return await self._reconcile_blueprint(body)

    async def prepare_blueprint(self, body: Body) -> None:
        """Create the Kernels and compile Jobs of a Blueprint that was never reconciled.

        Called from the watch event that announces a new Blueprint: kopf spends that event's cycle
        adding its finalizer and runs the reconcile handler only on the next one, so the compile
        starts a cycle earlier this way. The reconcile that follows finds the Kernels here (for the
        same uid and generation) and only writes the status. Not reached: a Blueprint that
        does not plan (the reconcile reports it), or one with a status (reconciled before).
        """
        meta = body["metadata"]
        uid, generation = meta["uid"], int(meta.get("generation") or 1)
        earlier = self._prepared.get(uid)
        if earlier is not None and earlier.generation == generation:  # kopf's finalizer write: a 2nd event
            return
        try:
            plan = plan_blueprint(
                meta["name"], body.get("spec") or {}, torch_version=self.config.torch_version
            )
        except BlueprintInvalid:
            return
        async with self._planning:
            kernels = {planned.name: await self._kernel_with_job(body, planned) for planned in plan.kernels}
        self._prepared[uid] = HeadStart(generation, plan, kernels, superseded=earlier is not None)
        while len(self._prepared) > PREPARED_LIMIT:
            self._prepared.popitem(last=False)

    async def _reconcile_blueprint(self, body: Body) -> Body:
        meta = body["metadata"]
        name = meta["name"]
        generation = int(meta.get("generation") or 1)
        previous = body.get("status") or {}
        head = self._prepared.pop(meta["uid"], None)
        plan, prepared = (head.plan, head.kernels) if head and head.generation == generation else (None, {})
        # Kernels made for an earlier generation before any status named them: released below.
        leftovers = (head.superseded or head.generation != generation) if head else generation > 1
        if plan is None:
            try:
                plan = plan_blueprint(name, body.get("spec") or {}, torch_version=self.config.torch_version)
            except BlueprintInvalid as exc:
                return await self.keep_last_good(body, str(exc))
        crash_point("plan")
        refs, bodies = [], {}
        for planned in plan.kernels:
            kernel = prepared.get(planned.name) or await self._kernel_with_job(body, planned)
            refs.append({"target": planned.spec.target, "name": planned.name, "phase": phase_of(kernel)})
            bodies[planned.name] = kernel
        if leftovers and not previous.get("kernels"):
            await self._release_unplanned(body, set(bodies))
        metrics.RECONCILES.labels("blueprint", "ok").inc()
        crash_point("blueprint-status")
        status = blueprint_status(previous=previous, digest=plan.digest, kernels=refs, generation=generation)
        return await self._roll(body, status, history_limit=plan.history_limit, known=bodies)

    async def _release_unplanned(self, blueprint: Body, planned: set[str]) -> None:
        """Release the Kernels this Blueprint holds beyond its plan while no status lists any.

        A spec edited before the first status was written leaves the head start's Kernels (made for
        an earlier generation) held by the Blueprint but named in no status, so no rollout would ever
        release them. Only then is a list worth its read (held by owner reference, not always by label:
        an adopted Kernel gets its label from the rollout).
        """
        meta = blueprint["metadata"]
        owner = _owner_ref(blueprint)
        for kernel in await self.kube.list_in("kernels", meta["namespace"], f"{MANAGED_BY}={OPERATOR_NAME}"):
            name = kernel["metadata"]["name"]
            owned = any(o.get("uid") == owner["uid"] for o in kernel["metadata"].get("ownerReferences") or [])
            if name not in planned and owned:
                await set_role(self.kube, meta["namespace"], name, owner, None, known=kernel)

    async def _roll(
        self, blueprint: Body, status: Body, *, history_limit: int, known: dict[str, Body] | None = None
    ) -> Body:
        """Advance the keep-last-good rollout; label the Kernels by role; release what it no longer holds.

        Kernels that start serving are labelled before the ones they replace stop, so a sidecar
        selecting `=serving` sees the new Kernel before the old one leaves.
        """
        meta = blueprint["metadata"]
        namespace = meta["namespace"]
        previous = blueprint.get("status") or {}
        before = held(previous)
        phases = {}
        for name in before:
            kernel = await self.kube.get("kernels", namespace, name)
            if kernel is not None and not kernel["metadata"].get("deletionTimestamp"):
                phases[name] = phase_of(kernel)
        phases.update({k["name"]: k["phase"] for k in status["kernels"]})
        rollout = advance(
            previous, digest=status["digest"], current=status["kernels"], phases=phases,
            history_limit=history_limit,
        )  # fmt: skip
        owner = _owner_ref(blueprint)
        order = sorted(rollout.roles.items(), key=lambda item: item[1] != SERVING)
        for name, role in order:
            await set_role(self.kube, namespace, name, owner, role, known=(known or {}).get(name))
        for name in sorted(before - set(rollout.roles)):
            await set_role(self.kube, namespace, name, owner, None)
        return {**status, **rollout.status_fields(len(status["kernels"]))}

    async def keep_last_good(self, body: Body, message: str) -> Body:
        """Status of a Blueprint whose new spec is invalid: Invalid with `message`, and nothing released:
        the last valid revision's Kernels (and what they serve) stay."""
        previous = body.get("status") or {}
        generation = int(body["metadata"].get("generation") or 1)
        if previous.get("phase") != "Invalid" or previous.get("message") != message:
            self.emit(body, "Warning", "Invalid", message)
        metrics.RECONCILES.labels("blueprint", "invalid").inc()
        status = invalid_status(previous=previous, message=message, generation=generation)
        kept = ("kernels", "kernelsReady", "kernelsTotal", "kernelsSummary", "digest", *CARRIED)
        return {**status, **{k: previous[k] for k in kept if k in previous}}

    async def refuse_blueprint(self, body: Body, message: str) -> Body:
        """Status of a Blueprint that cannot be processed: Invalid with `message`; its Kernels released."""
        previous = body.get("status") or {}
        generation = int(body["metadata"].get("generation") or 1)
        if previous.get("phase") != "Invalid" or previous.get("message") != message:
            self.emit(body, "Warning", "Invalid", message)
        await self._release(body)
        metrics.RECONCILES.labels("blueprint", "invalid").inc()
        return invalid_status(previous=previous, message=message, generation=generation)

    async def ensure_kernel(self, blueprint: Body, planned: PlannedKernel) -> Body:
        """Create the Kernel, or adopt an existing one by adding this Blueprint as an owner."""
        namespace = blueprint["metadata"]["namespace"]
        owner = _owner_ref(blueprint)
        body = {
            "apiVersion": GROUP_VERSION,
            "kind": "Kernel",
            "metadata": {
                "name": planned.name,
                "namespace": namespace,
                "labels": {
                    MANAGED_BY: OPERATOR_NAME,
                    LABEL_TARGET: planned.spec.target,
                    LABEL_IR_DIGEST: planned.spec.irDigest[:32],
                    requester_label(blueprint["metadata"]["name"]): CANDIDATE,
                    **({LABEL_TEMPLATE: label_value(planned.spec.template)} if planned.spec.template else {}),
                },
                "ownerReferences": [owner],
                # kopf's own finalizer, set here so that kopf need not add it with a second write
                "finalizers": [FINALIZER],
            },
            "spec": planned.spec.model_dump(mode="json"),
        }
        try:
            kernel = await self.kube.create("kernels", namespace, body)
        except Conflict:
            kernel = await self._adopt(namespace, planned.name, owner)
        else:
            crash_point("kernel-created")  # no Event: the Blueprint's status lists its Kernels
        return kernel

    async def _kernel_with_job(self, blueprint: Body, planned: PlannedKernel) -> Body:
        """The planned Kernel, created or adopted, with its compile Job (unless Ready or Failed)."""
        kernel = await self.ensure_kernel(blueprint, planned)
        return await self.ensure_job(kernel, planned.job_name)

    async def _adopt(self, namespace: str, name: str, owner: Body) -> Body:
        for _ in range(OWNER_RETRIES):
            kernel = await self.kube.get("kernels", namespace, name)
            if kernel is None:
                raise RuntimeError(f"Kernel {name} vanished while being adopted; will retry")
            owners = kernel["metadata"].get("ownerReferences") or []
            if any(o.get("uid") == owner["uid"] for o in owners):
                return kernel
            patch = {
                "metadata": {
                    "resourceVersion": kernel["metadata"]["resourceVersion"],
                    "ownerReferences": [*owners, owner],
                }
            }
            try:
                patched = await self.kube.patch("kernels", namespace, name, patch)
            except Conflict:
                continue
            if patched is not None:
                crash_point("kernel-adopted")
                return patched
        raise RuntimeError(f"could not add owner to Kernel {name}: too many conflicts; will retry")

    async def _release(self, blueprint: Body) -> None:
        """Drop this Blueprint from every Kernel it holds; delete those left with no owner."""
        meta = blueprint["metadata"]
        for name in sorted(held(blueprint.get("status") or {})):
            await set_role(self.kube, meta["namespace"], name, _owner_ref(blueprint), None)

    async def refresh_blueprints(self, kernel: Body) -> None:
        """Recompute the status of every Blueprint that owns this Kernel."""
        namespace = kernel["metadata"]["namespace"]
        for owner in kernel["metadata"].get("ownerReferences") or []:
            if owner.get("kind") == "Blueprint":
                await self.refresh_blueprint(namespace, owner["name"])

    async def refresh_blueprint(self, namespace: str, name: str) -> None:
        """Recompute a Blueprint's status from its Kernels as they are now; write it if it changed.

        A Blueprint with no status yet is left alone: its reconcile is under way and writes one.
        """
        blueprint = await self.kube.get("blueprints", namespace, name)
        if blueprint is None or blueprint["metadata"].get("deletionTimestamp"):
            return
        status = blueprint.get("status") or {}
        if status.get("phase") == "Invalid" or not status.get("kernels"):
            return
        refs = []
        for ref in status["kernels"]:
            current = await self.kube.get("kernels", namespace, ref["name"])
            refs.append({**ref, "phase": phase_of(current)})
        generation = int(status.get("observedGeneration") or blueprint["metadata"].get("generation") or 1)
        new = blueprint_status(
            previous=status, digest=status.get("digest", ""), kernels=refs, generation=generation
        )
        limit = int((blueprint.get("spec") or {}).get("historyLimit", 3))
        new = await self._roll(blueprint, new, history_limit=limit)
        if any(new.get(k) != status.get(k) for k in ("phase", "kernels", "serving", "history")):
            crash_point("blueprint-refresh")
            await self.kube.patch_status("blueprints", namespace, name, new)
            if new["phase"] in ("Ready", "Failed"):
                kind = "Normal" if new["phase"] == "Ready" else "Warning"
                self.emit(blueprint, kind, new["phase"], new["message"])

    # --- Jobs ------------------------------------------------------------------------------------

    @functools.cached_property
    def compile_namespace(self) -> str:
        return self.config.job_namespace()

    async def ensure_job(self, kernel: Body, job_name: str) -> Body:
        """Make sure a Kernel that is neither Ready nor Failed has its compile Job (in the compile
        namespace), and that its status records that Job's uid.

        `job_name` is the key-derived base name. Attempt n's Job is named from the Kernel's uid and n,
        never from what the status says; a Kernel waiting to retry (back-off) gets nothing before its
        time, and with a cap on concurrent Jobs one that finds no free slot waits Pending/Queued.
        """
        if phase_of(kernel) in FINAL:
            return kernel
        meta = kernel["metadata"]
        namespace = self.compile_namespace
        status = kernel.get("status") or {}
        if queue.waits_for_job(status) and not queue.due(status, dt.datetime.now(dt.UTC)):
            return kernel
        attempts = int(status.get("attempts") or 0)
        attempt = max(1, attempts if phase_of(kernel) == "Compiling" else attempts + 1)
        first = job_name_for(job_name, meta["uid"])
        name = queue.attempt_job_name(first, attempt)
        spec = KernelSpec.model_validate(kernel["spec"])
        cap = self.config.max_concurrent_jobs
        # A Kernel whose status records no Job most likely has none: create it straight away (a 409
        # adopts the one an earlier pass made) rather than read first; the cap needs the count anyway.
        job = await self.kube.get_job(namespace, name) if cap or status.get("jobUid") else None
        if job is None:
            if not cap:
                job = await self._create_job(kernel, spec, namespace, name, attempt)
            else:
                async with self._job_slots:  # counting running Jobs and creating one is a single step
                    job = await self.kube.get_job(namespace, name)  # a concurrent pass may have made it
                    if job is None:
                        running = await self.kube.active_jobs(namespace, f"{MANAGED_BY}={OPERATOR_NAME}")
                        if running >= cap:
                            return await self._queued(kernel, running)
                        job = await self._create_job(kernel, spec, namespace, name, attempt)
            if attempt > 1:  # the failed attempt's Job (and its Pods) go
                await self.kube.delete_job(namespace, queue.attempt_job_name(first, attempt - 1))
        if job is None or (job["metadata"].get("labels") or {}).get(LABEL_KERNEL_UID) != meta["uid"]:
            raise RuntimeError(f"compile Job {namespace}/{name} vanished or is not this Kernel's; will retry")
        job_uid = job["metadata"].get("uid") or ""
        if phase_of(kernel) != "Compiling" or status.get("jobUid") != job_uid:
            new = kernel_status(
                status,
                phase="Compiling",
                reason="JobCreated",
                message=f"compiling in Job {namespace}/{name}",
                generation=int(meta.get("generation") or 1),
                jobName=name,
                jobNamespace=namespace,
                jobUid=job_uid,
                attempts=attempt,
                retryAt="",
                **requesters_status(kernel),  # in this write, so the rollout that follows needs none
            )
            patched = await self.kube.patch_status("kernels", meta["namespace"], meta["name"], new)
            if patched is None or patched["metadata"].get("deletionTimestamp"):
                # The Kernel was deleted while this pass read it and made its Job (a resync racing a
                # deletion): its cleanup has run, or runs now and finds this Job gone; none is orphaned.
                await self.kube.delete_job(namespace, name)
                log.info("deleted compile Job %s/%s: its Kernel was deleted meanwhile", namespace, name)
                return patched or kernel
            kernel = patched
            crash_point("kernel-compiling")
        if finished(job):
            # Finished while nobody watched (operator down, event lost): carry it over now.
            await self.observe_job(job)
            return await self.kube.get("kernels", meta["namespace"], meta["name"]) or kernel
        return kernel

    async def _create_job(
        self, kernel: Body, spec: KernelSpec, namespace: str, name: str, attempt: int
    ) -> Body | None:
        meta = kernel["metadata"]
        manifest = build_job(
            name=name,
            namespace=namespace,
            kernel_name=meta["name"],
            kernel_namespace=meta["namespace"],
            kernel_uid=meta["uid"],
            spec=spec,
            config=self.config,
        )
        crash_point("job-create")
        try:
            job = await self.kube.create_job(namespace, manifest)
        except Conflict:
            return await self.kube.get_job(namespace, name)  # created by an earlier attempt: adopt it
        crash_point("job-created")
        metrics.JOBS_CREATED.labels(spec.target).inc()
        if attempt > 1:  # the first Job is named in the status this pass writes; a retry is news
            self.emit(kernel, "Normal", "JobCreated", f"compile Job {namespace}/{name}, attempt {attempt}")
        return job

    async def observe_job(self, job: Body) -> None:
        """Carry a compile Job's outcome into its Kernel (and the Kernel's Blueprints).

        Only the Job whose uid the Kernel's status records counts, and only through the Pods that Job
        created: a Job someone else made with the same labels, or a bare Pod with its job-name, is
        ignored with a Warning Event on the Kernel. A finished Job whose Kernel is gone is deleted.
        """
        meta = job["metadata"]
        labels = meta.get("labels") or {}
        kernel_name = labels.get(LABEL_KERNEL)
        if not kernel_name or not finished(job):
            return  # a running Job is read once, when it ends (a deleted Kernel deletes its Job)
        kernel_ns = labels.get(LABEL_KERNEL_NAMESPACE) or meta["namespace"]
        kernel = await self.kube.get("kernels", kernel_ns, kernel_name)
        ours = meta["namespace"] == self.compile_namespace and LABEL_KERNEL_UID in labels
        if kernel is None or kernel["metadata"].get("uid") != labels.get(LABEL_KERNEL_UID):
            if ours:
                await self.kube.delete_job(meta["namespace"], meta["name"])  # its Kernel is gone
                log.info("deleted compile Job %s/%s: its Kernel is gone", meta["namespace"], meta["name"])
            if kernel is None:
                return
        if kernel["metadata"].get("deletionTimestamp"):
            return
        status = kernel.get("status") or {}
        if (
            ours
            and labels.get(LABEL_KERNEL_UID) == kernel["metadata"].get("uid")
            and status.get("jobName")
            and status["jobName"] != meta["name"]
        ):
            return  # an earlier attempt's Job of this Kernel (deleted when the next one starts)
        if not status.get("jobUid") or meta.get("uid") != status.get("jobUid"):
            self.emit(
                kernel,
                "Warning",
                "ForeignJob",
                f"ignored Job {meta['namespace']}/{meta['name']}: not the compile Job this Kernel recorded",
            )
            return
        retrying = status.get("reason") in (queue.RETRY_BACKOFF, queue.RETRY_REQUESTED)
        settled = status.get("phase") in FINAL or (status.get("phase") == "Pending" and retrying)
        if settled and status.get("jobName") == meta["name"]:
            return  # already carried over (a retrying Kernel's next attempt waits for its time)
        pods = await self.kube.job_pods(meta["namespace"], meta["name"])
        pods, strangers = own_pods(pods, meta["uid"])
        if strangers:
            self.emit(
                kernel,
                "Warning",
                "ForeignPod",
                f"ignored Pod(s) {', '.join(strangers[:5])}: labelled job-name={meta['name']} "
                "but not created by that Job",
            )
        outcome = interpret(job, pods, expected_key=kernel["spec"]["key"])
        if outcome.state == "running":
            return
        crash_point("job-observed")
        if outcome.state == "succeeded":
            outcome = await self._verify(outcome, kernel["spec"]["key"])
        if outcome.state == "rejected":
            self.emit(
                kernel,
                "Warning",
                outcome.reason,
                f"ignored the result of Job {meta['name']}: {outcome.message}",
            )
            return
        crash_point("kernel-finishing")
        await self._finish(kernel, job, outcome)

    async def observe_pod(self, pod: Body) -> None:
        """Say on the Kernel, at once, why its compile Pod cannot start (a missing Secret, a bad
        image) rather than leaving it Compiling until the Job's deadline."""
        meta = pod["metadata"]
        if meta.get("namespace") != self.compile_namespace:
            return
        job_uid = controller_uid(pod)
        labels = meta.get("labels") or {}
        kernel_name, kernel_ns = labels.get(LABEL_KERNEL), labels.get(LABEL_KERNEL_NAMESPACE)
        if not job_uid or not kernel_name or not kernel_ns:
            return
        kernel = await self.kube.get("kernels", kernel_ns, kernel_name)
        status = (kernel or {}).get("status") or {}
        if kernel is None or status.get("jobUid") != job_uid or status.get("phase") != "Compiling":
            return
        stuck = waiting(pod)
        if stuck is None:
            if status.get("reason") not in WAITING_REASONS:
                return
            reason, message = (
                "JobCreated",
                f"compiling in Job {status.get('jobNamespace')}/{status.get('jobName')}",
            )
        else:
            reason, message = stuck[0], f"compile Pod {meta['name']} cannot start: {stuck[1]}"
            if status.get("reason") == reason and status.get("message") == message:
                return
            self.emit(kernel, "Warning", reason, message)
        new = kernel_status(
            status,
            phase="Compiling",
            reason=reason,
            message=message,
            generation=int(kernel["metadata"].get("generation") or 1),
        )
        await self.kube.patch_status("kernels", kernel_ns, kernel_name, new)

    async def _verify(self, outcome: JobOutcome, expected_key: str) -> JobOutcome:
        """Check the reported manifest sha256 against the store, and that the stored manifest is the
        Kernel's key: a Ready Kernel's bundle exists as stated."""
        if not self.config.verify_artifacts or outcome.artifact is None:
            return outcome
        artifact = outcome.artifact
        key = artifact.uri.rstrip("/").rsplit("/", 1)[-1]
        try:
            store = self.store
            if artifact.uri != store.bundle_uri(key):
                return JobOutcome("failed", "BadResult", f"artifact URI {artifact.uri} is outside the store")
            data = await asyncio.to_thread(store.read_manifest_bytes, key)
        except Exception as exc:
            raise RuntimeError(f"cannot verify artifact {artifact.uri}: {exc}; will retry") from exc
        if hashlib.sha256(data).hexdigest() != artifact.sha256:
            return JobOutcome(
                "failed", "ArtifactMismatch", f"manifest in the store does not match {artifact.sha256}"
            )
        try:  # only the key is compared here; the runtime checks the whole manifest and its signature
            doc = json.loads(data)
            stored_key = doc.get("key") if isinstance(doc, dict) else None
        except ValueError:
            stored_key = None
        if stored_key != expected_key:
            return JobOutcome(
                "rejected", "KeyMismatch", f"the stored manifest is for key {stored_key}, not {expected_key}"
            )
        return outcome

    async def _finish(self, kernel: Body, job: Body, outcome: JobOutcome) -> None:
        meta = kernel["metadata"]
        generation = int(meta.get("generation") or 1)
        previous = kernel.get("status") or {}
        job_name = job["metadata"]["name"]
        target = kernel["spec"]["target"]
        if outcome.state == "succeeded":
            fields: dict[str, Any] = {
                "jobName": job_name,
                "artifact": outcome.artifact.model_dump() if outcome.artifact else None,
                "toolchain": outcome.toolchain.model_dump() if outcome.toolchain else None,
                "report": outcome.report.model_dump() if outcome.report else None,
                "compileSeconds": round(outcome.compile_seconds, 3),
            }
            status = kernel_status(
                previous, phase="Ready", reason="Compiled", generation=generation, **fields
            )
            if outcome.replaced:
                self.emit(kernel, "Warning", "BundleReplaced", outcome.replaced)
            speedup = outcome.report.speedup if outcome.report else 0.0
            uri = outcome.artifact.uri if outcome.artifact else "?"
            self.emit(kernel, "Normal", "Compiled", f"Ready: {uri} ({speedup:.2f}x over eager)")
        elif queue.should_retry(outcome.reason, previous, self.config.retry_limit):
            attempts = int(previous.get("attempts") or 1)
            delay = queue.backoff_seconds(
                attempts, self.config.retry_base_seconds, self.config.retry_max_seconds
            )
            at = queue.rfc3339(dt.datetime.now(dt.UTC) + dt.timedelta(seconds=delay))
            message = f"attempt {attempts} failed ({outcome.reason}: {outcome.message}); retry at {at}"
            status = kernel_status(
                previous,
                phase="Pending",
                reason=queue.RETRY_BACKOFF,
                message=message,
                generation=generation,
                jobName=job_name,
                retryAt=at,
            )
            self.emit(kernel, "Warning", outcome.reason, message)
        else:
            status = kernel_status(
                previous,
                phase="Failed",
                reason=outcome.reason,
                message=outcome.message,
                generation=generation,
                jobName=job_name,
            )
            self.emit(kernel, "Warning", outcome.reason, outcome.message)
        metrics.JOB_SECONDS.labels(target, outcome.state).observe(_job_seconds(job))
        patched = await self.kube.patch_status("kernels", meta["namespace"], meta["name"], status)
        if patched is not None:
            crash_point("kernel-finished")
            await self.refresh_blueprints(patched)

    async def _queued(self, kernel: Body, running: int) -> Body:
        meta = kernel["metadata"]
        previous = kernel.get("status") or {}
        message = f"waiting for a compile slot: {running} of {self.config.max_concurrent_jobs} in use"
        if previous.get("reason") == queue.QUEUED and phase_of(kernel) == "Pending":
            return kernel
        status = kernel_status(
            previous,
            phase="Pending",
            reason=queue.QUEUED,
            message=message,
            generation=int(meta.get("generation") or 1),
            retryAt="",
        )
        self.emit(kernel, "Normal", queue.QUEUED, message)
        return await self.kube.patch_status("kernels", meta["namespace"], meta["name"], status) or kernel

    async def kernel_tick(self, kernel: Body) -> None:
        """Periodic, per Kernel: start a waiting Kernel's next Job when due; act on a user retry."""
        meta = kernel["metadata"]
        if meta.get("deletionTimestamp"):
            return
        status = kernel.get("status") or {}
        base = job_name(kernel["spec"]["target"], kernel["spec"]["key"])
        token = (meta.get("annotations") or {}).get(ANNOTATION_RETRY, "")
        if queue.retry_requested(status, token):
            attempts = int(status.get("attempts") or 1)
            message = f"retry requested after {attempts} attempt(s): {status.get('reason', '')}"
            patch = kernel_status(
                status,
                phase="Pending",
                reason=queue.RETRY_REQUESTED,
                message=message,
                generation=int(meta.get("generation") or 1),
                retryToken=token,
                retryBase=attempts,
                retryAt="",
            )
            self.emit(kernel, "Normal", queue.RETRY_REQUESTED, message)
            kernel = await self.kube.patch_status("kernels", meta["namespace"], meta["name"], patch) or kernel
            await self.refresh_blueprints(kernel)
        elif not queue.waits_for_job(status):
            return
        kernel = await self.ensure_job(kernel, base)
        if phase_of(kernel) == "Compiling":
            await self.refresh_blueprints(kernel)

    # --- deletion --------------------------------------------------------------------------------

    async def blueprint_deleted(self, body: Body) -> None:
        """Release every Kernel of a deleted Blueprint; the last owner takes the Kernel with it."""
        await self._release(body)

    async def kernel_deleted(self, kernel: Body) -> None:
        """Remove the Kernel's Job, and its artifact when the retention policy says so and no other
        Kernel, in any namespace, still uses that key (bundles are shared by key)."""
        meta = kernel["metadata"]
        status = kernel.get("status") or {}
        spec = kernel.get("spec") or {}
        jobs = (
            {(status.get("jobNamespace") or meta["namespace"], status["jobName"])}
            if status.get("jobName")
            else set()
        )
        if spec.get("target") and spec.get("key"):  # also when the status never recorded it (a crash)
            jobs.add(
                (self.compile_namespace, job_name_for(job_name(spec["target"], spec["key"]), meta["uid"]))
            )
        for namespace, name in sorted(jobs):
            await self.kube.delete_job(namespace, name)
            crash_point("kernel-cleanup")
        if self.config.retention == "delete":
            key = kernel["spec"]["key"]
            users = [
                f"{k['metadata'].get('namespace')}/{k['metadata'].get('name')}"
                for k in await self.kube.list_all("kernels", meta["namespace"])
                if (k.get("spec") or {}).get("key") == key
                and k["metadata"].get("uid") != meta.get("uid")
                and not k["metadata"].get("deletionTimestamp")
            ]
            if users:
                log.info("kept artifact %s of Kernel %s: still used by %s", key[:16], meta["name"], users[:3])
                return
            await asyncio.to_thread(self.store.delete_bundle, key)
            log.info("deleted artifact of Kernel %s (retention=delete)", meta["name"])


def finished(job: Body) -> bool:
    """Whether a Job has ended (Complete or Failed): only then is its outcome read."""
    conditions = (job.get("status") or {}).get("conditions") or []
    return any(c.get("type") in ("Complete", "Failed") and c.get("status") == "True" for c in conditions)


def _job_seconds(job: Body) -> float:
    status = job.get("status") or {}
    start, end = status.get("startTime"), status.get("completionTime")
    try:
        if start and end:
            fmt = "%Y-%m-%dT%H:%M:%SZ"
            return max(0.0, (datetime.strptime(end, fmt) - datetime.strptime(start, fmt)).total_seconds())
    except ValueError:
        pass
    return 0.0
