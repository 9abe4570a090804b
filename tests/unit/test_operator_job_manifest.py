"""The compile Job as a whole document, written out by hand, for a GPU and a CPU target.

Each configuration setting is given a value unlike its default, so a setting read from the wrong
field, dropped, or renamed shows up as a difference in the manifest.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from esper.contracts.job import REQUEST_ENV
from esper_operator.config import OperatorConfig
from esper_operator.jobs import build_job, interpret
from esper_operator.plan import plan_blueprint

SPEC = {
    "template": {"name": "residual-mlp", "params": {"features": 16, "hidden": 32}},
    "targets": ["cpu", "cuda-sm90", "cpu-avx512"],
}
FULL = OperatorConfig(
    store_uri="s3://bucket/kernels",
    s3_endpoint="http://minio:9000",
    s3_secret="esper-s3",
    s3_region="eu-west-1",
    compile_image="registry.local/esper:9",
    compile_command=["esper-compile", "--verbose"],
    image_pull_policy="Always",
    gpu_resource="amd.com/gpu",
    node_selector={"pool": "compile"},
    tolerations=[{"key": "dedicated", "operator": "Exists"}],
    gpu_node_selector={"gpu": "h100"},
    gpu_tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists"}],
    priority_class="batch-low",
    service_account="compiler",
    cpu_request="4",
    memory_request="16Gi",
    memory_limit="32Gi",
    backoff_limit=2,
    active_deadline_seconds=600,
    ttl_seconds_after_finished=60,
    kueue_queue="compile",
)


def _build(target: str, config: OperatorConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """The Job for the Kernel of one target, and the decoded request in its environment."""
    kernel = next(
        k for k in plan_blueprint("mlp", SPEC, torch_version="2.13.0").kernels if k.spec.target == target
    )
    job = build_job(
        name="job-1",
        namespace="ns",
        kernel_name="kernel-1",
        kernel_uid="u-1",
        spec=kernel.spec,
        config=config,
    )
    env = job["spec"]["template"]["spec"]["containers"][0]["env"]
    request = json.loads(env[0]["value"])
    assert env[0]["name"] == REQUEST_ENV == "ESPER_COMPILE_REQUEST"
    assert (request["blueprint"], request["namespace"], request["target"]) == ("mlp", "ns", target)
    assert request["expectKey"] == kernel.spec.key and request["expectTorch"] == "2.13.0"
    env[0]["value"] = "<request>"
    return job, request


def _expected(
    *,
    labels: dict[str, str],
    region: str,
    extra_env: list[dict[str, Any]],
    container: dict[str, Any],
    pod: dict[str, Any],
    spec: dict[str, Any],
) -> dict[str, Any]:
    base_env = [
        {"name": "ESPER_COMPILE_REQUEST", "value": "<request>"},
        {"name": "AWS_REGION", "value": region},
        {"name": "TORCHINDUCTOR_CACHE_DIR", "value": "/scratch/inductor"},
        {"name": "HOME", "value": "/scratch"},
        {"name": "TMPDIR", "value": "/scratch"},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
        *extra_env,
    ]
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": "job-1",
            "namespace": "ns",
            "labels": labels,
        },
        "spec": {
            **spec,
            "podFailurePolicy": {
                "rules": [
                    {
                        "action": "FailJob",
                        "onExitCodes": {
                            "containerName": "tezzeret",
                            "operator": "In",
                            "values": [65, 66, 67],
                        },
                    },
                    {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]},
                ]
            },
            "template": {
                "metadata": {"labels": labels},
                "spec": {
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
                    "containers": [
                        {
                            "name": "tezzeret",
                            **container,
                            "env": base_env,
                            "terminationMessagePolicy": "FallbackToLogsOnError",
                            "securityContext": {
                                "allowPrivilegeEscalation": False,
                                "readOnlyRootFilesystem": True,
                                "runAsNonRoot": True,
                                "capabilities": {"drop": ["ALL"]},
                            },
                            "volumeMounts": [{"name": "scratch", "mountPath": "/scratch"}],
                        }
                    ],
                    "volumes": [{"name": "scratch", "emptyDir": {"sizeLimit": "10Gi"}}],
                    **pod,
                },
            },
        },
    }


def _secret(var: str) -> dict[str, Any]:
    return {"name": var, "valueFrom": {"secretKeyRef": {"name": "esper-s3", "key": var}}}


def test_a_gpu_job_with_every_setting_is_the_documented_manifest() -> None:
    job, _ = _build("cuda-sm90", FULL)
    labels = {
        "app.kubernetes.io/managed-by": "esper-operator",
        "esper.dev/kernel": "kernel-1",
        "esper.dev/kernel-namespace": "ns",
        "esper.dev/kernel-uid": "u-1",
        "esper.dev/target": "cuda-sm90",
        "kueue.x-k8s.io/queue-name": "compile",
    }
    assert job == _expected(
        labels=labels,
        region="eu-west-1",
        extra_env=[
            {"name": "ESPER_S3_ENDPOINT", "value": "http://minio:9000"},
            _secret("AWS_ACCESS_KEY_ID"),
            _secret("AWS_SECRET_ACCESS_KEY"),
        ],
        container={
            "image": "registry.local/esper:9",
            "imagePullPolicy": "Always",
            "command": ["esper-compile", "--verbose"],
            "args": ["--store", "s3://bucket/kernels"],
            "resources": {
                "requests": {"cpu": "4", "memory": "16Gi"},
                "limits": {"memory": "32Gi", "amd.com/gpu": "1"},
            },
        },
        pod={
            "nodeSelector": {"pool": "compile", "gpu": "h100"},
            "tolerations": [
                {"key": "dedicated", "operator": "Exists"},
                {"key": "nvidia.com/gpu", "operator": "Exists"},
            ],
            "priorityClassName": "batch-low",
            "serviceAccountName": "compiler",
        },
        spec={"backoffLimit": 2, "activeDeadlineSeconds": 600, "ttlSecondsAfterFinished": 60},
    )


def test_a_cpu_job_gets_no_gpu_and_only_the_general_placement() -> None:
    job, _ = _build("cpu", FULL)
    pod = job["spec"]["template"]["spec"]
    assert pod["containers"][0]["resources"] == {
        "requests": {"cpu": "4", "memory": "16Gi"},
        "limits": {"memory": "32Gi"},
    }
    assert pod["nodeSelector"] == {"pool": "compile"}
    assert pod["tolerations"] == [{"key": "dedicated", "operator": "Exists"}]


def test_a_cpu_job_with_the_defaults_is_the_documented_manifest() -> None:
    """Unset optional settings leave their fields out: no queue label, placement, secrets or endpoint."""
    job, _ = _build("cpu", OperatorConfig(store_uri="s3://bucket/kernels"))
    labels = {
        "app.kubernetes.io/managed-by": "esper-operator",
        "esper.dev/kernel": "kernel-1",
        "esper.dev/kernel-namespace": "ns",
        "esper.dev/kernel-uid": "u-1",
        "esper.dev/target": "cpu",
    }
    assert job == _expected(
        labels=labels,
        region="us-east-1",
        extra_env=[],
        container={
            "image": "ghcr.io/esper-dev/esper:0.1.0",
            "imagePullPolicy": "IfNotPresent",
            "command": ["python", "-m", "esper.tezzeret"],
            "args": ["--store", "s3://bucket/kernels"],
            "resources": {"requests": {"cpu": "1", "memory": "2Gi"}, "limits": {"memory": "8Gi"}},
        },
        pod={},
        spec={"backoffLimit": 3, "activeDeadlineSeconds": 1800, "ttlSecondsAfterFinished": 3600},
    )


def test_a_gpu_placement_alone_still_lands_a_gpu_job() -> None:
    """Only GPU node selectors and tolerations configured: the GPU Job gets them, the CPU Job none."""
    config = OperatorConfig(
        store_uri="s3://bucket/kernels",
        gpu_node_selector={"gpu": "h100"},
        gpu_tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists"}],
    )
    gpu = _build("cuda-sm90", config)[0]["spec"]["template"]["spec"]
    cpu = _build("cpu", config)[0]["spec"]["template"]["spec"]
    assert gpu["nodeSelector"] == {"gpu": "h100"}
    assert gpu["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists"}]
    assert gpu["containers"][0]["resources"]["limits"] == {"memory": "8Gi", "nvidia.com/gpu": "1"}
    assert "nodeSelector" not in cpu and "tolerations" not in cpu


def test_an_avx512_job_lands_on_an_avx512_node() -> None:
    """cpu-avx512 Jobs validate and benchmark their code, so they need x86-64-v4: by default Node
    Feature Discovery's five labels; the configured selector replaces them and joins the common one."""
    nfd = "feature.node.kubernetes.io/cpu-cpuid."
    default = OperatorConfig(store_uri="s3://bucket/kernels")
    pod = _build("cpu-avx512", default)[0]["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {
        f"{nfd}{f}": "true" for f in ("AVX512F", "AVX512BW", "AVX512CD", "AVX512DQ", "AVX512VL")
    }
    assert "nodeSelector" not in _build("cpu", default)[0]["spec"]["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"] == {"memory": "8Gi"}  # no GPU
    config = FULL.model_copy(update={"avx512_node_selector": {"cpu": "sapphire-rapids"}})
    pod = _build("cpu-avx512", config)[0]["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"pool": "compile", "cpu": "sapphire-rapids"}
    assert pod["tolerations"] == [{"key": "dedicated", "operator": "Exists"}]  # not the GPU ones
    assert _build("cpu", config)[0]["spec"]["template"]["spec"]["nodeSelector"] == {"pool": "compile"}
    assert "cpu" not in _build("cuda-sm90", config)[0]["spec"]["template"]["spec"]["nodeSelector"]
    env = OperatorConfig.from_env(
        {"ESPER_STORE_URI": "s3://bucket/x", "ESPER_AVX512_NODE_SELECTOR": '{"avx": "512"}'}
    )
    assert env.avx512_node_selector == {"avx": "512"}


KEY = "a" * 64


def _pod(name: str, phase: str, terminated: dict[str, Any] | None, **status: Any) -> dict[str, Any]:
    statuses = [{"name": "tezzeret", "state": {"terminated": terminated}}] if terminated is not None else []
    return {"metadata": {"name": name}, "status": {"phase": phase, "containerStatuses": statuses, **status}}


def _job(cond_type: str, reason: str | None, failed: int | None = None) -> dict[str, Any]:
    cond: dict[str, Any] = {"type": cond_type, "status": "True"}
    if reason is not None:
        cond["reason"] = reason
    status: dict[str, Any] = {"conditions": [cond]}
    if failed is not None:
        status["failed"] = failed
    return {"metadata": {"name": "j"}, "status": status}


@pytest.mark.parametrize(
    ("job", "pods", "reason", "message"),
    [
        # an evicted Pod with a transient exit: the eviction is the reason
        (
            _job("Failed", "BackoffLimitExceeded", 4),
            [_pod("p", "Failed", {"exitCode": 143, "message": "terminated"}, reason="Evicted")],
            "Evicted",
            "compile Job failed (BackoffLimitExceeded) after 4 attempt(s); exit code 143; terminated",
        ),
        # no Pod left to read: the Job's own reason, no exit code, and no attempt count given
        (
            _job("Failed", "BackoffLimitExceeded"),
            [],
            "BackoffLimitExceeded",
            "compile Job failed (BackoffLimitExceeded) after 0 attempt(s)",
        ),
        # a Job condition without a reason
        (_job("Failed", None, 1), [], "Failed", "compile Job failed (Failed) after 1 attempt(s)"),
        # FailureTarget (set before Failed on Kubernetes >= 1.31) is already a failure
        (
            _job("FailureTarget", "PodFailurePolicy", 1),
            [],
            "PodFailurePolicy",
            "compile Job failed (PodFailurePolicy) after 1 attempt(s)",
        ),
        # a termination message that is not JSON: its last 1000 characters, stripped
        (
            _job("Failed", "BackoffLimitExceeded", 1),
            [_pod("p", "Failed", {"exitCode": 1, "message": "  " + "x" * 1500 + "TAIL\n"})],
            "BackoffLimitExceeded",
            "compile Job failed (BackoffLimitExceeded) after 1 attempt(s); exit code 1; "
            + "x" * 996
            + "TAIL",
        ),
        # JSON without an error object: the message itself
        (
            _job("Failed", "BackoffLimitExceeded", 1),
            [_pod("p", "Failed", {"exitCode": 1, "message": '{"note": 1}'})],
            "BackoffLimitExceeded",
            'compile Job failed (BackoffLimitExceeded) after 1 attempt(s); exit code 1; {"note": 1}',
        ),
        # a JSON list is not an error document either
        (
            _job("Failed", "BackoffLimitExceeded", 1),
            [_pod("p", "Failed", {"exitCode": 1, "message": " [1, 2] "})],
            "BackoffLimitExceeded",
            "compile Job failed (BackoffLimitExceeded) after 1 attempt(s); exit code 1; [1, 2]",
        ),
        # exit code 0 is still reported
        (
            _job("Failed", "BackoffLimitExceeded", 1),
            [_pod("p", "Failed", {"exitCode": 0})],
            "BackoffLimitExceeded",
            "compile Job failed (BackoffLimitExceeded) after 1 attempt(s); exit code 0",
        ),
    ],
)
def test_failed_jobs_are_read_to_the_whole_message(
    job: dict[str, Any], pods: list[dict[str, Any]], reason: str, message: str
) -> None:
    outcome = interpret(job, pods, expected_key=KEY)
    assert (outcome.state, outcome.reason, outcome.message) == ("failed", reason, message)


def test_a_succeeded_pod_is_not_read_for_a_failure_nor_a_failed_one_for_a_success() -> None:
    succeeded = _pod(
        "s", "Succeeded", {"exitCode": 0, "message": "ignored", "finishedAt": "2026-01-01T11:00:00Z"}
    )
    failed = _pod("f", "Failed", {"exitCode": 66, "message": "target", "finishedAt": "2026-01-01T10:00:00Z"})
    outcome = interpret(_job("Failed", "PodFailurePolicy", 1), [failed, succeeded], expected_key=KEY)
    assert (outcome.reason, outcome.message) == (
        "UnsupportedTarget",
        "compile Job failed (PodFailurePolicy) after 1 attempt(s); exit code 66; target",
    )
    complete = {"metadata": {"name": "j"}, "status": {"conditions": [{"type": "Complete", "status": "True"}]}}
    outcome = interpret(complete, [failed], expected_key=KEY)
    assert (outcome.state, outcome.reason) == ("running", "AwaitingPod")


def test_success_criteria_met_is_complete_and_a_false_condition_is_not() -> None:
    """SuccessCriteriaMet comes before Complete on Kubernetes >= 1.31; a condition is set only when True."""
    met = {
        "metadata": {"name": "j"},
        "status": {"conditions": [{"type": "SuccessCriteriaMet", "status": "True"}]},
    }
    outcome = interpret(met, [], expected_key=KEY)
    assert (outcome.state, outcome.reason, outcome.message) == (
        "running",
        "AwaitingPod",
        "Job complete; its Pod is not visible yet",
    )
    not_yet = {"metadata": {"name": "j"}, "status": {"conditions": [{"type": "Failed", "status": "False"}]}}
    outcome = interpret(not_yet, [], expected_key=KEY)
    assert (outcome.state, outcome.reason, outcome.message) == ("running", "", "")
