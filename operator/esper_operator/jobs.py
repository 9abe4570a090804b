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

from esper.contracts import GROUP_VERSION, ArtifactRef, KernelSpec, Toolchain, ValidationReport
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
    *, name: str, namespace: str, kernel_name: str, kernel_uid: str, spec: KernelSpec, config: OperatorConfig
) -> dict[str, Any]:
    """The compile Job for one Kernel. Pure: the same inputs give the same manifest."""
    target = Target.parse(spec.target)
    gpu = target.kind == "cuda"
    labels = {MANAGED_BY: OPERATOR_NAME, LABEL_KERNEL: kernel_name, LABEL_TARGET: spec.target}
    if config.kueue_queue:
        labels["kueue.x-k8s.io/queue-name"] = config.kueue_queue
    env = [
        {"name": REQUEST_ENV, "value": compile_request(spec, namespace).to_env()},
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
        "volumeMounts": [{"name": "scratch", "mountPath": SCRATCH}],
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
        "volumes": [{"name": "scratch", "emptyDir": {"sizeLimit": "10Gi"}}],
    }
    node_selector = {**config.node_selector, **(config.gpu_node_selector if gpu else {})}
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
            "ownerReferences": [
                {
                    "apiVersion": GROUP_VERSION,
                    "kind": "Kernel",
                    "name": kernel_name,
                    "uid": kernel_uid,
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
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

    state: str  # "running", "succeeded", "failed"
    reason: str = ""
    message: str = ""
    artifact: ArtifactRef | None = None
    toolchain: Toolchain | None = None
    report: ValidationReport | None = None
    compile_seconds: float = 0.0


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
            "failed", "KeyMismatch", f"Job reported key {result.key!r}, Kernel has {expected_key}"
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
    )


def _error_message(terminated: dict[str, Any]) -> str:
    message = terminated.get("message") or ""
    try:
        error = json.loads(message).get("error") or {}
        return str(error.get("message") or message)
    except (json.JSONDecodeError, AttributeError):
        return message.strip()[-1000:]


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
