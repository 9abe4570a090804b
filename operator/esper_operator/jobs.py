"""Compile Jobs: the manifest the operator creates, and what it reads back when one finishes.

The Job is the whole contract with the compiler (esper.contracts.job): one CompileRequest in its
environment, one CompileResult or CompileFailure in the Pod's termination message. Compile Pods get no
Kubernetes API rights, so the termination message, written by the container and relayed by the
kubelet, is the trust anchor for the artifact's sha256; the operator checks it against the Kernel's
key and, when configured, the store.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from esper.contracts import ArtifactRef, KernelSpec, Toolchain, ValidationReport
from esper.contracts.job import (
    PERMANENT_REASONS,
    REQUEST_ENV,
    CompileFailure,
    CompileRequest,
    CompileResult,
    CompileSpec,
)
from esper.contracts.job import parse_result as parse_result_line
from esper.contracts.naming import LABEL_KERNEL, LABEL_TARGET, MANAGED_BY, OPERATOR_NAME
from esper.targets import Target
from esper_operator.config import OperatorConfig

SCRATCH = "/scratch"
SIGNING_DIR = "/var/run/esper/signing"
SIGNING_VOLUME = "signing-key"
LABEL_KERNEL_NAMESPACE = "esper.dev/kernel-namespace"
LABEL_KERNEL_UID = "esper.dev/kernel-uid"
CONTROLLER_UID_LABELS = ("batch.kubernetes.io/controller-uid", "controller-uid")
WAITING_REASONS = frozenset(
    {
        "CreateContainerConfigError",
        "CreateContainerError",
        "ErrImagePull",
        "ImagePullBackOff",
        "InvalidImageName",
        "Unschedulable",
    }
)
"""Why a compile Pod cannot start that someone must act on (a missing Secret, a bad image, no node that
fits its placement): said on the Kernel, which stays Compiling, and cleared once the Pod starts."""
# Where a Pod of each kind of target must land, for the message when none fits.
_PLACEMENT = {
    "cpu-avx512": "a cpu-avx512 Job needs an AVX-512 node with the labels of compile.avx512.nodeSelector "
    "(Node Feature Discovery's by default)",
    "cuda": "a CUDA Job needs a node with the GPU resource (compile.gpuResource) and compile.gpu's placement",
}


def job_name_for(base: str, kernel_uid: str) -> str:
    """The compile Job's name in the compile namespace: the key-derived name plus the Kernel's uid,
    so Kernels of one key in two namespaces each get their own Job (<= 63 characters)."""
    return f"{base}-{kernel_uid.replace('-', '')[:8]}"


def compile_request(spec: KernelSpec, namespace: str = "") -> CompileRequest:
    """What the compile Job for this Kernel is asked to build: expanded graph, one target, the key."""
    return CompileRequest(
        blueprint=spec.blueprint,
        namespace=namespace,
        spec=CompileSpec(graph=spec.graph, compile=spec.compile),
        target=spec.target,
        expectKey=spec.key,
        expectTorch=spec.toolchain.torch,
    )


def build_job(
    *,
    name: str,
    namespace: str,
    kernel_name: str,
    kernel_uid: str,
    spec: KernelSpec,
    config: OperatorConfig,
    kernel_namespace: str | None = None,
) -> dict[str, Any]:
    """The compile Job for one Kernel, in the compile `namespace` (where the bucket's write key and
    the signing key are; never a tenant's). Pure: the same inputs give the same manifest.

    No ownerReference (those cannot cross namespaces): the labels name the Kernel's namespace, name
    and uid, and the operator deletes the Job when the Kernel goes.
    """
    kernel_namespace = kernel_namespace or namespace
    target = Target.parse(spec.target)
    gpu = target.kind == "cuda"
    labels = {
        MANAGED_BY: OPERATOR_NAME,
        LABEL_KERNEL: kernel_name,
        LABEL_KERNEL_NAMESPACE: kernel_namespace,
        LABEL_KERNEL_UID: kernel_uid,
        LABEL_TARGET: spec.target,
    }
    if config.kueue_queue:
        labels["kueue.x-k8s.io/queue-name"] = config.kueue_queue
    env: list[dict[str, Any]] = [
        {"name": REQUEST_ENV, "value": compile_request(spec, kernel_namespace).to_env()},
        {"name": "AWS_REGION", "value": config.s3_region},
        {"name": "TORCHINDUCTOR_CACHE_DIR", "value": f"{SCRATCH}/inductor"},
        {"name": "HOME", "value": SCRATCH},
        {"name": "TMPDIR", "value": SCRATCH},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
    ]
    if config.s3_endpoint:
        env.append({"name": "ESPER_S3_ENDPOINT", "value": config.s3_endpoint})
    if config.s3_secret:
        for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            ref = {"name": config.s3_secret, "key": var}
            env.append({"name": var, "valueFrom": {"secretKeyRef": ref}})
    mounts: list[dict[str, Any]] = [{"name": "scratch", "mountPath": SCRATCH}]
    volumes: list[dict[str, Any]] = [{"name": "scratch", "emptyDir": {"sizeLimit": "10Gi"}}]
    if config.signing_secret:
        env.append({"name": "ESPER_SIGNING_KEY", "value": f"{SIGNING_DIR}/signing.key"})
        mounts.append({"name": SIGNING_VOLUME, "mountPath": SIGNING_DIR, "readOnly": True})
        secret = {
            "secretName": config.signing_secret,
            "items": [{"key": "signing.key", "path": "signing.key"}],
        }
        volumes.append({"name": SIGNING_VOLUME, "secret": {**secret, "defaultMode": 0o400}})
    resources: dict[str, dict[str, str]] = {
        "requests": {"cpu": config.cpu_request, "memory": config.memory_request},
        "limits": {"memory": config.memory_limit},
    }
    if gpu:
        resources["limits"][config.gpu_resource] = "1"
    container = {
        "name": "tezzeret",
        "image": config.compile_image,
        "imagePullPolicy": config.image_pull_policy,
        "command": list(config.compile_command),
        "args": ["--store", config.store_uri],
        "env": env,
        "resources": resources,
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": mounts,
    }
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": 10001,
            "runAsGroup": 10001,
            "fsGroup": 10001,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": volumes,
    }
    avx512 = target.capability == "cpu-avx512"
    node_selector = {
        **config.node_selector,
        **(config.gpu_node_selector if gpu else {}),
        **(config.avx512_node_selector if avx512 else {}),
    }
    tolerations = [*config.tolerations, *(config.gpu_tolerations if gpu else [])]
    if node_selector:
        pod_spec["nodeSelector"] = node_selector
    if tolerations:
        pod_spec["tolerations"] = tolerations
    if config.priority_class:
        pod_spec["priorityClassName"] = config.priority_class
    if config.service_account:
        pod_spec["serviceAccountName"] = config.service_account
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": labels,
        },
        "spec": {
            "backoffLimit": config.backoff_limit,
            "activeDeadlineSeconds": config.active_deadline_seconds,
            "ttlSecondsAfterFinished": config.ttl_seconds_after_finished,
            "podFailurePolicy": {
                "rules": [
                    {
                        "action": "FailJob",
                        "onExitCodes": {
                            "containerName": "tezzeret",
                            "operator": "In",
                            "values": sorted(int(code) for code in PERMANENT_REASONS),
                        },
                    },
                    {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]},
                ]
            },
            "template": {"metadata": {"labels": labels}, "spec": pod_spec},
        },
    }


# --- reading a finished Job back ------------------------------------------------------------------


@dataclass(frozen=True)
class JobOutcome:
    """What a finished (or running) Job means for its Kernel."""

    state: str  # "running", "succeeded", "failed", "rejected" (ignored: the Kernel stays as it is)
    reason: str = ""
    message: str = ""
    artifact: ArtifactRef | None = None
    toolchain: Toolchain | None = None
    report: ValidationReport | None = None
    compile_seconds: float = 0.0
    replaced: str | None = None


def _condition(job: dict[str, Any], type_: str) -> dict[str, Any] | None:
    for cond in (job.get("status") or {}).get("conditions") or []:
        if cond.get("type") == type_ and cond.get("status") == "True":
            return cond
    return None


def _terminated(pod: dict[str, Any]) -> dict[str, Any]:
    for status in (pod.get("status") or {}).get("containerStatuses") or []:
        if status.get("name") in (None, "tezzeret"):
            return (status.get("state") or {}).get("terminated") or {}
    return {}


def _last(pods: list[dict[str, Any]], phase: str) -> dict[str, Any] | None:
    matching = [p for p in pods if (p.get("status") or {}).get("phase") == phase]
    matching.sort(key=lambda p: (_terminated(p).get("finishedAt") or "", p["metadata"].get("name", "")))
    return matching[-1] if matching else None


def parse_result(message: str, *, expected_key: str) -> JobOutcome:
    """Check a compile Pod's termination message; a wrong or missing field is a failure, not a Ready."""
    try:
        result = parse_result_line(message)
    except (json.JSONDecodeError, TypeError):
        return JobOutcome("failed", "BadResult", f"termination message is not JSON: {message[:200]!r}")
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "result"
        return JobOutcome(
            "failed", "BadResult", f"termination message is not a compile result: {where}: {first['msg']}"
        )
    if isinstance(result, CompileFailure):
        return JobOutcome("failed", "BadResult", f"a succeeded Job reported an error: {result.error.message}")
    if result.key != expected_key:
        return JobOutcome(
            "rejected", "KeyMismatch", f"Job reported key {result.key!r}, Kernel has {expected_key}"
        )
    if result.uri.rstrip("/").rsplit("/", 1)[-1] != expected_key:
        return JobOutcome(
            "rejected", "KeyMismatch", f"Job reported artifact {result.uri!r}, not under key {expected_key}"
        )
    return outcome_of(result)


def outcome_of(result: CompileResult) -> JobOutcome:
    """A successful result as the Kernel's outcome."""
    return JobOutcome(
        "succeeded",
        "Compiled",
        "",
        artifact=ArtifactRef(uri=result.uri, sha256=result.manifestSha256, size=result.size),
        toolchain=result.toolchain,
        report=result.report,
        compile_seconds=result.compileSeconds,
        replaced=result.replaced,
    )


def _error_message(terminated: dict[str, Any]) -> str:
    message = terminated.get("message") or ""
    try:
        error = json.loads(message).get("error") or {}
        return str(error.get("message") or message)
    except (json.JSONDecodeError, AttributeError):
        return message.strip()[-1000:]


def controller_uid(pod: dict[str, Any]) -> str:
    """The uid of the Job that created this Pod: its controller ownerReference (which only the Job
    controller sets together with the controller-uid label); "" for a bare Pod."""
    meta = pod.get("metadata") or {}
    labels = meta.get("labels") or {}
    by_label = {labels.get(k) for k in CONTROLLER_UID_LABELS} - {None, ""}
    for ref in meta.get("ownerReferences") or []:
        if ref.get("kind") == "Job" and ref.get("controller") and ref.get("uid") in by_label:
            return str(ref["uid"])
    return ""


def own_pods(pods: list[dict[str, Any]], job_uid: str) -> tuple[list[dict[str, Any]], list[str]]:
    """(the Pods the Job `job_uid` created, names of the others that merely carry its job-name)."""
    own = [p for p in pods if job_uid and controller_uid(p) == job_uid]
    strangers = [str((p.get("metadata") or {}).get("name")) for p in pods if p not in own]
    return own, strangers


def waiting(pod: dict[str, Any]) -> tuple[str, str] | None:
    """(reason, message) of a compile Pod that no node can take, or whose container is stuck in a state
    that waiting will not fix."""
    for cond in (pod.get("status") or {}).get("conditions") or []:
        if (cond.get("type"), cond.get("status"), cond.get("reason")) == (
            "PodScheduled",
            "False",
            "Unschedulable",
        ):
            target = str(((pod.get("metadata") or {}).get("labels") or {}).get(LABEL_TARGET, ""))
            hint = _PLACEMENT.get(target) or _PLACEMENT.get(target.split("-", 1)[0])
            message = str(cond.get("message") or "no node fits it")
            return "Unschedulable", f"{message} ({hint})" if hint else message
    for status in (pod.get("status") or {}).get("containerStatuses") or []:
        state = (status.get("state") or {}).get("waiting") or {}
        if state.get("reason") in WAITING_REASONS:
            return str(state["reason"]), str(state.get("message") or "")
    return None


def interpret(job: dict[str, Any], pods: list[dict[str, Any]], *, expected_key: str) -> JobOutcome:
    """The Kernel-level meaning of a Job and its Pods."""
    if _condition(job, "Complete") or _condition(job, "SuccessCriteriaMet"):
        pod = _last(pods, "Succeeded")
        if pod is None:
            return JobOutcome("running", "AwaitingPod", "Job complete; its Pod is not visible yet")
        return parse_result(_terminated(pod).get("message") or "", expected_key=expected_key)
    failed = _condition(job, "Failed") or _condition(job, "FailureTarget")
    if not failed:
        return JobOutcome("running")
    pod = _last(pods, "Failed")
    terminated = _terminated(pod) if pod else {}
    code = terminated.get("exitCode")
    detail = _error_message(terminated)
    job_reason = failed.get("reason") or "Failed"
    if terminated.get("reason") == "OOMKilled":
        reason = "OOMKilled"
    elif job_reason == "DeadlineExceeded":
        reason = "DeadlineExceeded"
    elif code in PERMANENT_REASONS:
        reason = PERMANENT_REASONS[code]
    elif pod and (pod.get("status") or {}).get("reason") == "Evicted":
        reason = "Evicted"
    elif job_reason == "BackoffLimitExceeded":
        reason = "BackoffLimitExceeded"
    else:
        reason = job_reason
    attempts = (job.get("status") or {}).get("failed", 0)
    parts = [f"compile Job failed ({job_reason}) after {attempts} attempt(s)"]
    if code is not None:
        parts.append(f"exit code {code}")
    if detail:
        parts.append(detail)
    return JobOutcome("failed", reason, "; ".join(parts))
