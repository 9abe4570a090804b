"""The compile Job's failure policy as a literal, and reading a Job back from several Pods."""

from __future__ import annotations

import json
from typing import Any

import pytest

from esper_operator.config import OperatorConfig
from esper_operator.jobs import build_job, interpret
from esper_operator.plan import plan_blueprint

KEY = "a" * 64
CONFIG = OperatorConfig(
    store_uri="s3://bucket/kernels",
    backoff_limit=5,
    active_deadline_seconds=900,
    ttl_seconds_after_finished=120,
)


def _job_manifest() -> dict[str, Any]:
    spec = {
        "template": {"name": "residual-mlp", "params": {"features": 16, "hidden": 32}},
        "targets": ["cpu"],
    }
    kernel = plan_blueprint("mlp", spec, torch_version="2.13.0").kernels[0]
    return build_job(
        name="job-1",
        namespace="ns",
        kernel_name="kernel-1",
        kernel_uid="u-1",
        spec=kernel.spec,
        config=CONFIG,
    )


def test_job_spec_and_failure_policy_are_the_documented_ones() -> None:
    """Kubernetes' podFailurePolicy: rules are tried in order; the first whose pattern matches decides.

    FailJob on the compiler's permanent exit codes (65 invalid Blueprint, 66 unsupported target,
    67 failed numerical validation): retrying cannot help. Ignore on DisruptionTarget (preemption,
    eviction, node drain): such a Pod does not count against backoffLimit. Anything else counts.
    """
    job = _job_manifest()
    spec = {k: v for k, v in job["spec"].items() if k != "template"}
    assert spec == {
        "backoffLimit": 5,
        "activeDeadlineSeconds": 900,
        "ttlSecondsAfterFinished": 120,
        "podFailurePolicy": {
            "rules": [
                {
                    "action": "FailJob",
                    "onExitCodes": {"containerName": "tezzeret", "operator": "In", "values": [65, 66, 67]},
                },
                {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]},
            ]
        },
    }
    # the rule names the container by the name the Pod template gives it
    assert [c["name"] for c in job["spec"]["template"]["spec"]["containers"]] == ["tezzeret"]
    assert job["spec"]["template"]["spec"]["restartPolicy"] == "Never"  # podFailurePolicy requires it
    assert job["metadata"]["labels"] == {
        "app.kubernetes.io/managed-by": "esper-operator",
        "esper.dev/kernel": "kernel-1",
        "esper.dev/kernel-namespace": "ns",  # Jobs live in the compile namespace: the Kernel's is a label
        "esper.dev/kernel-uid": "u-1",  # results count only for this Kernel (not an ownerReference)
        "esper.dev/target": "cpu",
    }
    assert (job["metadata"]["name"], job["metadata"]["namespace"]) == ("job-1", "ns")


def _failed_job(reason: str, failed: int) -> dict[str, Any]:
    cond = {"type": "Failed", "status": "True", "reason": reason}
    return {"metadata": {"name": "j"}, "status": {"failed": failed, "conditions": [cond]}}


def _pod(
    name: str, phase: str, finished: str, code: int, message: str = "", reason: str = ""
) -> dict[str, Any]:
    terminated = {"exitCode": code, "message": message, "reason": reason, "finishedAt": finished}
    return {
        "metadata": {"name": name},
        "status": {
            "phase": phase,
            "containerStatuses": [{"name": "tezzeret", "state": {"terminated": terminated}}],
        },
    }


# Three attempts; names sort opposite to time, and the list is in neither order.
EARLY = _pod("c-attempt", "Failed", "2026-01-01T10:00:00Z", 75, "s3 down")
MIDDLE = _pod("b-attempt", "Failed", "2026-01-01T10:10:00Z", 137, "", "OOMKilled")
LATE = _pod("a-attempt", "Failed", "2026-01-01T10:20:00Z", 65, '{"error":{"message":"spec.graph: bad"}}')


@pytest.mark.parametrize(
    ("pods", "reason", "detail"),
    [
        ([MIDDLE, LATE, EARLY], "InvalidBlueprint", "exit code 65; spec.graph: bad"),
        ([EARLY, MIDDLE], "OOMKilled", "exit code 137"),
        ([MIDDLE, EARLY], "OOMKilled", "exit code 137"),
        ([LATE, EARLY], "InvalidBlueprint", "exit code 65; spec.graph: bad"),
    ],
)
def test_the_latest_failed_pod_explains_the_failure(
    pods: list[dict[str, Any]], reason: str, detail: str
) -> None:
    outcome = interpret(_failed_job("PodFailurePolicy", len(pods)), pods, expected_key=KEY)
    assert (outcome.state, outcome.reason) == ("failed", reason)
    assert outcome.message == f"compile Job failed (PodFailurePolicy) after {len(pods)} attempt(s); {detail}"


def test_the_latest_failed_pod_wins_on_a_transient_exit() -> None:
    late_transient = _pod("a-attempt", "Failed", "2026-01-01T11:00:00Z", 75, "s3 down")
    outcome = interpret(_failed_job("BackoffLimitExceeded", 2), [late_transient, LATE], expected_key=KEY)
    assert outcome.reason == "BackoffLimitExceeded" and outcome.message.endswith("exit code 75; s3 down")


def _result(key: str, sha: str) -> str:
    return json.dumps({
        "key": key, "uri": f"s3://bucket/kernels/{key}", "manifestSha256": sha, "size": 10,
        "toolchain": {"torch": "2.13.0", "capability": "cpu-avx2", "python": "3.11"},
    })  # fmt: skip


def test_the_latest_succeeded_pod_carries_the_result() -> None:
    older = _pod("z-attempt", "Succeeded", "2026-01-01T10:00:00Z", 0, _result(KEY, "b" * 64))
    newer = _pod("y-attempt", "Succeeded", "2026-01-01T10:05:00Z", 0, _result(KEY, "c" * 64))
    failed = _pod("x-attempt", "Failed", "2026-01-01T10:10:00Z", 75, "s3 down")
    job = {"metadata": {"name": "j"}, "status": {"conditions": [{"type": "Complete", "status": "True"}]}}
    for pods in ([older, newer, failed], [failed, newer, older]):
        outcome = interpret(job, pods, expected_key=KEY)
        assert outcome.state == "succeeded"
        assert outcome.artifact is not None and outcome.artifact.sha256 == "c" * 64


def test_the_compiler_container_is_read_among_several() -> None:
    """A mesh sidecar listed first must not hide the compiler's exit code."""
    pod = _pod("p", "Failed", "2026-01-01T10:00:00Z", 65, '{"error":{"message":"spec.graph: bad"}}')
    proxy = {
        "name": "istio-proxy",
        "state": {"terminated": {"exitCode": 0, "message": "", "reason": "Completed"}},
    }
    pod["status"]["containerStatuses"].insert(0, proxy)
    outcome = interpret(_failed_job("PodFailurePolicy", 1), [pod], expected_key=KEY)
    assert outcome.reason == "InvalidBlueprint" and "exit code 65; spec.graph: bad" in outcome.message
