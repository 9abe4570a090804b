"""Compile Jobs: the manifest the operator creates, and what it reads back when one finishes.

The Job is the whole contract with the compiler: its command line and environment carry the request,
the Pod's termination message carries the result. Compile Pods get no Kubernetes API rights, so the
termination message, written by the container and relayed by the kubelet, is the trust anchor for the
artifact's sha256; the operator checks it against the Kernel's key and, when configured, the store.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from esper.contracts import ArtifactRef, KernelSpec, Toolchain, ValidationReport
from esper.contracts.naming import LABEL_KERNEL, LABEL_TARGET, MANAGED_BY, OPERATOR_NAME
from esper.targets import Target
from esper_operator.config import OperatorConfig

# The compiler's exit codes (esper.tezzeret.exitcodes), mirrored here so the operator needs no torch.
PERMANENT_EXIT_CODES = {65: "InvalidBlueprint", 66: "UnsupportedTarget", 67: "ValidationFailed"}
TRANSIENT_EXIT_CODE = 75
SCRATCH = "/scratch"


def compile_request(spec: KernelSpec) -> str:
    """The Blueprint as the compile Job receives it (ESPER_BLUEPRINT_JSON): expanded graph, one target."""
    body = {
        "graph": spec.graph.model_dump(mode="json"),
        "targets": [spec.target],
        "compile": spec.compile.model_dump(mode="json"),
    }
    return json.dumps(body, sort_keys=True, separators=(",", ":"))


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
        {"name": "ESPER_BLUEPRINT_JSON", "value": compile_request(spec)},
        {"name": "ESPER_EXPECT_TORCH", "value": spec.toolchain.torch},
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
        "args": ["--target", spec.target, "--store", config.store_uri, "--expect-key", spec.key],
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
                    "apiVersion": "esper.dev/v1alpha1",
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
                            "values": sorted(PERMANENT_EXIT_CODES),
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
        data = json.loads(message)
    except (json.JSONDecodeError, TypeError):
        return JobOutcome("failed", "BadResult", f"termination message is not JSON: {message[:200]!r}")
    if not isinstance(data, dict) or "key" not in data:
        return JobOutcome("failed", "BadResult", "termination message has no kernel key")
    if data["key"] != expected_key:
        return JobOutcome(
            "failed", "KeyMismatch", f"Job reported key {data['key']!r}, Kernel has {expected_key}"
        )
    try:
        artifact = ArtifactRef(uri=data["uri"], sha256=data["manifestSha256"], size=data["size"])
        toolchain = Toolchain.model_validate(data["toolchain"])
        report = ValidationReport.model_validate(data["report"]) if data.get("report") else None
        seconds = float(data.get("compileSeconds", 0.0))
    except (KeyError, ValueError, ValidationError, TypeError) as exc:
        return JobOutcome("failed", "BadResult", f"termination message incomplete: {exc}".splitlines()[0])
    return JobOutcome(
        "succeeded",
        "Compiled",
        "",
        artifact=artifact,
        toolchain=toolchain,
        report=report,
        compile_seconds=seconds,
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
    elif code in PERMANENT_EXIT_CODES:
        reason = PERMANENT_EXIT_CODES[code]
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
