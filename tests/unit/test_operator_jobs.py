"""The compile Job manifest and how a finished Job is read back."""

from __future__ import annotations

import json

import pytest

from esper.contracts.job import REQUEST_ENV, CompileRequest
from esper_operator.config import ConfigError, OperatorConfig
from esper_operator.jobs import (
    build_job,
    controller_uid,
    interpret,
    job_name_for,
    own_pods,
    parse_result,
    waiting,
)
from esper_operator.plan import plan_blueprint

SPEC = {
    "template": {"name": "residual-mlp", "params": {"features": 16, "hidden": 32}},
    "targets": ["cpu", "cuda-sm90"],
}
CONFIG = OperatorConfig(
    store_uri="s3://bucket/kernels",
    s3_secret="esper-s3",
    s3_endpoint="http://minio:9000",
    kueue_queue="compile",
    gpu_node_selector={"gpu": "h100"},
    gpu_tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists"}],
    priority_class="batch-low",
)


def _jobs(config: OperatorConfig | None = None):
    plan = plan_blueprint("mlp", SPEC, torch_version="2.13.0")
    return {
        k.spec.target: build_job(
            name=k.job_name,
            namespace="ns",
            kernel_name=k.name,
            kernel_uid="uid-1",
            kernel_namespace="tenant",
            spec=k.spec,
            config=config or CONFIG,
        )
        for k in plan.kernels
    }, plan


def test_job_is_locked_down_and_names_its_kernel_by_labels() -> None:
    jobs, plan = _jobs()
    job = jobs["cpu"]
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert "ownerReferences" not in job["metadata"]  # the Kernel may live in another namespace
    labels = job["metadata"]["labels"]
    assert labels["esper.dev/kernel"] == plan.kernels[0].name
    assert labels["esper.dev/kernel-uid"] == "uid-1" and labels["esper.dev/kernel-namespace"] == "tenant"
    assert job["metadata"]["namespace"] == "ns"
    assert job["spec"]["template"]["metadata"]["labels"] == labels
    assert pod["automountServiceAccountToken"] is False
    assert pod["restartPolicy"] == "Never"
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["runAsNonRoot"] is True
    assert container["terminationMessagePolicy"] == "FallbackToLogsOnError"
    assert {"name": "scratch", "mountPath": "/scratch"} in container["volumeMounts"]
    assert job["spec"]["backoffLimit"] == CONFIG.backoff_limit
    assert job["spec"]["activeDeadlineSeconds"] == CONFIG.active_deadline_seconds
    assert job["spec"]["ttlSecondsAfterFinished"] == CONFIG.ttl_seconds_after_finished
    rule = job["spec"]["podFailurePolicy"]["rules"][0]
    assert rule["action"] == "FailJob" and rule["onExitCodes"]["values"] == [65, 66, 67]
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "compile"
    assert pod["priorityClassName"] == "batch-low"
    assert len(job["metadata"]["name"]) <= 63


def test_job_carries_the_request_and_secrets_by_reference() -> None:
    jobs, plan = _jobs()
    container = jobs["cpu"]["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in container["env"]}
    assert container["args"] == ["--store", "s3://bucket/kernels"]
    request = CompileRequest.model_validate_json(env[REQUEST_ENV]["value"])
    kernel = plan.kernels[0].spec
    assert (request.blueprint, request.namespace, request.target) == ("mlp", "tenant", "cpu")
    assert (request.expectKey, request.expectTorch) == (kernel.key, "2.13.0")
    assert request.spec.graph == kernel.graph and request.spec.graph.nodes
    assert "ESPER_EXPECT_TORCH" not in env and "targets" not in json.loads(env[REQUEST_ENV]["value"])["spec"]
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"] == {
        "name": "esper-s3",
        "key": "AWS_SECRET_ACCESS_KEY",
    }
    assert "value" not in env["AWS_ACCESS_KEY_ID"]
    assert env["ESPER_S3_ENDPOINT"]["value"] == "http://minio:9000"
    assert request.spec.compile.model_dump(mode="json") == {
        "maxBatch": 1024,
        "initSeed": 0,
        "validateBatches": [1, 7, 32],
        "benchmarkBatches": [8, 32, 128],
    }


def test_gpu_targets_request_a_gpu_and_land_on_gpu_nodes() -> None:
    jobs, _ = _jobs()
    cpu, gpu = jobs["cpu"]["spec"]["template"]["spec"], jobs["cuda-sm90"]["spec"]["template"]["spec"]
    assert gpu["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert "nvidia.com/gpu" not in cpu["containers"][0]["resources"]["limits"]
    assert gpu["nodeSelector"] == {"gpu": "h100"} and "nodeSelector" not in cpu
    assert gpu["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists"}]


KEY = "a" * 64
RESULT = {
    "key": KEY,
    "uri": "s3://bucket/kernels/" + KEY,
    "manifestSha256": "b" * 64,
    "size": 1234,
    "toolchain": {"torch": "2.13.0", "capability": "cpu-avx2", "python": "3.11"},
    "compileSeconds": 12.5,
    "report": {
        "tolerance": 1e-4,
        "maxAbsError": 1e-7,
        "eagerMicros": 100.0,
        "compiledMicros": 50.0,
        "speedup": 2.0,
    },
}


def _job(condition: str | None, reason: str = "", failed: int = 0) -> dict:
    status: dict = {"failed": failed}
    if condition:
        status["conditions"] = [{"type": condition, "status": "True", "reason": reason}]
    return {"metadata": {"name": "j"}, "status": status}


def _pod(phase: str, exit_code: int, message: str, reason: str = "") -> dict:
    terminated = {
        "exitCode": exit_code,
        "message": message,
        "reason": reason,
        "finishedAt": "2026-01-01T00:00:00Z",
    }
    return {
        "metadata": {"name": f"p-{phase}"},
        "status": {
            "phase": phase,
            "containerStatuses": [{"name": "tezzeret", "state": {"terminated": terminated}}],
        },
    }


def test_success_is_read_from_the_termination_message() -> None:
    outcome = interpret(_job("Complete"), [_pod("Succeeded", 0, json.dumps(RESULT))], expected_key=KEY)
    assert outcome.state == "succeeded"
    assert outcome.artifact and outcome.artifact.sha256 == "b" * 64 and outcome.artifact.size == 1234
    assert outcome.report and outcome.report.speedup == 2.0
    assert outcome.compile_seconds == 12.5


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        ("not json", "BadResult"),
        (json.dumps({"uri": "x"}), "BadResult"),
        (json.dumps({**RESULT, "manifestSha256": "short"}), "BadResult"),
        (json.dumps({**RESULT, "size": -1}), "BadResult"),
        (json.dumps({k: v for k, v in RESULT.items() if k != "toolchain"}), "BadResult"),
    ],
)
def test_a_bad_result_fails_the_kernel_instead_of_marking_it_ready(message: str, reason: str) -> None:
    outcome = parse_result(message, expected_key=KEY)
    assert (outcome.state, outcome.reason) == ("failed", reason)


@pytest.mark.parametrize(
    "result",
    [
        {**RESULT, "key": "c" * 64},
        {**RESULT, "uri": f"s3://bucket/kernels/kernels/{'c' * 64}"},
        {**RESULT, "uri": f"s3://bucket/kernels/{KEY}X"},  # the last part only starts with the key
        {**RESULT, "uri": "no-path"},
    ],
    ids=["result-key", "uri-key", "uri-key-prefix", "uri-without-slash"],
)
def test_a_result_for_another_key_is_rejected_not_applied(result: dict) -> None:
    outcome = parse_result(json.dumps(result), expected_key=KEY)
    assert (outcome.state, outcome.reason) == ("rejected", "KeyMismatch") and outcome.artifact is None


def test_a_rejected_result_says_which_key_or_uri_was_wrong() -> None:
    other = "c" * 64
    uri = f"s3://bucket/kernels/{other}"
    by_key = parse_result(json.dumps({**RESULT, "key": other}), expected_key=KEY)
    assert by_key.message == f"Job reported key '{other}', Kernel has {KEY}"
    by_uri = parse_result(json.dumps({**RESULT, "uri": uri}), expected_key=KEY)
    assert by_uri.message == f"Job reported artifact '{uri}', not under key {KEY}"


def test_a_trailing_slash_after_the_key_is_still_the_key() -> None:
    outcome = parse_result(json.dumps({**RESULT, "uri": f"s3://bucket/kernels/{KEY}/"}), expected_key=KEY)
    assert (outcome.state, outcome.reason) == ("succeeded", "Compiled")


def test_signing_key_is_mounted_from_its_secret_into_compile_pods_only() -> None:
    jobs, _ = _jobs(CONFIG.model_copy(update={"signing_secret": "esper-signing"}))
    pod = jobs["cpu"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    volume = next(v for v in pod["volumes"] if v["name"] == "signing-key")
    assert volume["secret"]["secretName"] == "esper-signing" and volume["secret"]["defaultMode"] == 0o400
    only_the_private_key = [{"key": "signing.key", "path": "signing.key"}]  # not the rest of the Secret
    assert volume["secret"] == {
        "secretName": "esper-signing",
        "items": only_the_private_key,
        "defaultMode": 0o400,
    }
    mount = next(m for m in container["volumeMounts"] if m["name"] == "signing-key")
    assert mount["readOnly"] is True
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["ESPER_SIGNING_KEY"] == mount["mountPath"] + "/signing.key"


def test_only_pods_the_job_created_count() -> None:
    job_uid = "job-uid-1"
    own = _pod("Succeeded", 0, json.dumps(RESULT))
    own["metadata"] = {
        "name": "own",
        "labels": {"job-name": "j", "controller-uid": job_uid, "batch.kubernetes.io/controller-uid": job_uid},
        "ownerReferences": [{"kind": "Job", "name": "j", "uid": job_uid, "controller": True}],
    }
    bare = _pod("Succeeded", 0, json.dumps({**RESULT, "uri": "s3://evil/kernels/" + KEY}))
    bare["metadata"] = {"name": "bare", "labels": {"job-name": "j", "controller-uid": job_uid}}
    forged = {**bare, "metadata": {**bare["metadata"], "name": "other-job-pod"}}
    forged["metadata"]["ownerReferences"] = [{"kind": "Job", "name": "j", "uid": "other", "controller": True}]
    assert own_pods([own, bare, forged], job_uid) == ([own], ["bare", "other-job-pod"])
    assert own_pods([own], "") == ([], ["own"])


@pytest.mark.parametrize(
    ("job", "pod", "reason"),
    [
        (
            _job("Failed", "PodFailurePolicy", 1),
            _pod("Failed", 65, '{"error":{"message":"spec.graph: bad"}}'),
            "InvalidBlueprint",
        ),
        (_job("Failed", "PodFailurePolicy", 1), _pod("Failed", 66, "target"), "UnsupportedTarget"),
        (_job("Failed", "PodFailurePolicy", 1), _pod("Failed", 67, "numerics"), "ValidationFailed"),
        (_job("Failed", "BackoffLimitExceeded", 4), _pod("Failed", 75, "s3 down"), "BackoffLimitExceeded"),
        (_job("Failed", "BackoffLimitExceeded", 4), _pod("Failed", 137, "", "OOMKilled"), "OOMKilled"),
        (_job("Failed", "DeadlineExceeded", 1), _pod("Failed", 137, ""), "DeadlineExceeded"),
    ],
)
def test_failures_are_classified(job: dict, pod: dict, reason: str) -> None:
    outcome = interpret(job, [pod], expected_key=KEY)
    assert (outcome.state, outcome.reason) == ("failed", reason)
    assert (
        f"exit code {pod['status']['containerStatuses'][0]['state']['terminated']['exitCode']}"
        in outcome.message
    )


def test_the_compiler_error_message_reaches_the_kernel() -> None:
    pod = _pod(
        "Failed",
        65,
        json.dumps({"error": {"code": 65, "reason": "InvalidBlueprint", "message": "spec.x: y"}}),
    )
    outcome = interpret(_job("Failed", "PodFailurePolicy", 1), [pod], expected_key=KEY)
    assert outcome.message.endswith("spec.x: y")


def test_running_job_is_running() -> None:
    assert interpret(_job(None), [], expected_key=KEY).state == "running"


def test_config_from_env_names_the_bad_variable() -> None:
    with pytest.raises(ConfigError, match="ESPER_BACKOFF_LIMIT"):
        OperatorConfig.from_env({"ESPER_STORE_URI": "s3://bucket/x", "ESPER_BACKOFF_LIMIT": "-1"})
    with pytest.raises(ConfigError, match="ESPER_TOLERATIONS: not valid JSON"):
        OperatorConfig.from_env({"ESPER_STORE_URI": "s3://bucket/x", "ESPER_TOLERATIONS": "[oops"})
    with pytest.raises(ConfigError, match="ESPER_STORE_URI"):
        OperatorConfig.from_env({"ESPER_STORE_URI": "gs://bucket"})
    with pytest.raises(ConfigError, match="ESPER_STORE_URI"):
        OperatorConfig.from_env({})
    config = OperatorConfig.from_env(
        {
            "ESPER_STORE_URI": "s3://bucket/x",
            "ESPER_NODE_SELECTOR": '{"a": "b"}',
            "ESPER_VERIFY_ARTIFACTS": "false",
        }
    )
    assert config.node_selector == {"a": "b"} and config.verify_artifacts is False


def test_job_name_is_the_base_plus_the_first_eight_hex_digits_of_the_kernel_uid() -> None:
    uid = "0a1b2c3d-4e5f-6789-abcd-ef0123456789"
    assert job_name_for("compile-abc", uid) == "compile-abc-0a1b2c3d"
    assert job_name_for("compile-abc", "0a-1b-2c-3d-4e") == "compile-abc-0a1b2c3d"  # dashes dropped first
    assert job_name_for("b", "abc") == "b-abc"  # a short uid is used whole


def _waiting_pod(*states: dict[str, object]) -> dict[str, object]:
    return {"status": {"containerStatuses": [{"name": f"c{i}", "state": s} for i, s in enumerate(states)]}}


@pytest.mark.parametrize(
    "reason",
    [
        "CreateContainerConfigError",
        "CreateContainerError",
        "ErrImagePull",
        "ImagePullBackOff",
        "InvalidImageName",
    ],
)
def test_a_container_stuck_in_a_state_that_does_not_heal_is_reported(reason: str) -> None:
    pod = _waiting_pod({"running": {}}, {"waiting": {"reason": reason, "message": 'secret "s3" not found'}})
    assert waiting(pod) == (reason, 'secret "s3" not found')
    assert waiting(_waiting_pod({"waiting": {"reason": reason}})) == (reason, "")  # no message given


@pytest.mark.parametrize(
    "pod",
    [
        {},
        {"status": None},
        {"status": {"containerStatuses": None}},
        _waiting_pod({}),
        _waiting_pod({"waiting": None}),
        _waiting_pod({"waiting": {"reason": "ContainerCreating"}}),  # heals by waiting
        _waiting_pod({"terminated": {"reason": "Error"}}),
    ],
    ids=["no-status", "null-status", "null-statuses", "no-state", "null-waiting", "creating", "terminated"],
)
def test_a_container_that_may_still_start_is_not_reported(pod: dict[str, object]) -> None:
    assert waiting(pod) is None


def test_a_replaced_bundle_is_reported_with_the_outcome() -> None:
    why = "the bundle under the key failed verification: sha256 mismatch"
    outcome = parse_result(json.dumps({**RESULT, "replaced": why}), expected_key=KEY)
    assert (outcome.state, outcome.reason, outcome.message) == ("succeeded", "Compiled", "")
    assert outcome.replaced == why
    assert parse_result(json.dumps(RESULT), expected_key=KEY).replaced is None


def _owned(labels: dict[str, str], *refs: dict[str, object]) -> dict[str, object]:
    return {"metadata": {"name": "p", "labels": labels, "ownerReferences": list(refs)}}


JOB_REF = {"kind": "Job", "name": "j", "uid": "u1", "controller": True}


@pytest.mark.parametrize(
    ("pod", "uid"),
    [
        (_owned({"batch.kubernetes.io/controller-uid": "u1"}, JOB_REF), "u1"),
        (_owned({"controller-uid": "u1"}, JOB_REF), "u1"),  # the label's older name
        (_owned({"controller-uid": "u1"}, {**JOB_REF, "kind": "ReplicaSet"}, JOB_REF), "u1"),
        (_owned({}, JOB_REF), ""),  # no label: not made by the Job controller
        (_owned({"controller-uid": "u2"}, JOB_REF), ""),  # the label names another Job
        (_owned({"controller-uid": "u1"}, {**JOB_REF, "controller": False}), ""),  # not the controller
        (_owned({"controller-uid": "u1"}, {**JOB_REF, "kind": "ReplicaSet"}), ""),
        (_owned({"controller-uid": ""}, {**JOB_REF, "uid": ""}), ""),
        ({"metadata": {"name": "bare"}}, ""),
        ({}, ""),
    ],
    ids=[
        "label",
        "old-label",
        "second-ref",
        "no-label",
        "other-uid",
        "not-controller",
        "not-a-job",
        "empty",
        "bare",
        "no-metadata",
    ],
)
def test_controller_uid_needs_the_job_controller_reference_and_its_label(pod: dict, uid: str) -> None:
    assert controller_uid(pod) == uid
