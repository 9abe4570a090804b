"""A compile Pod's termination message read back to the letter, and which Pod is read when several ran."""

from __future__ import annotations

import json
from typing import Any

import pytest

from esper.contracts import ArtifactRef, Toolchain, ValidationReport
from esper_operator.jobs import JobOutcome, compile_request, interpret, parse_result
from esper_operator.plan import plan_blueprint

KEY = "a" * 64
TOOLCHAIN = {"torch": "2.13.0", "capability": "cpu-avx2", "python": "3.11"}
REPORT = {
    "tolerance": 1e-4,
    "maxAbsError": 1e-7,
    "eagerMicros": 100.0,
    "compiledMicros": 50.0,
    "speedup": 2.0,
}
RESULT = {
    "key": KEY,
    "uri": "s3://bucket/kernels/" + KEY,
    "manifestSha256": "b" * 64,
    "size": 1234,
    "toolchain": TOOLCHAIN,
    "compileSeconds": 12.5,
    "report": REPORT,
}


def test_a_result_becomes_the_whole_outcome() -> None:
    assert parse_result(json.dumps(RESULT), expected_key=KEY) == JobOutcome(
        "succeeded",
        "Compiled",
        "",
        artifact=ArtifactRef(uri="s3://bucket/kernels/" + KEY, sha256="b" * 64, size=1234),
        toolchain=Toolchain(**TOOLCHAIN),
        report=ValidationReport(**REPORT),
        compile_seconds=12.5,
    )


@pytest.mark.parametrize(
    ("message", "state", "reason", "text"),
    [
        ("y" * 300, "failed", "BadResult", "termination message is not JSON: " + repr("y" * 200)),
        (
            json.dumps({**RESULT, "toolchain": {"capability": "cpu-avx2", "python": "3.11"}}),
            "failed",
            "BadResult",
            "termination message is not a compile result: toolchain.torch: Field required",
        ),
        (
            "[1]",  # no field to name: the result as a whole
            "failed",
            "BadResult",
            "termination message is not a compile result: result: "
            "Input should be a valid dictionary or instance of CompileResult",
        ),
        (
            json.dumps({**RESULT, "key": "c" * 64}),
            "rejected",  # ignored: the Kernel stays as it is
            "KeyMismatch",
            f"Job reported key {'c' * 64!r}, Kernel has {KEY}",
        ),
        (
            json.dumps({"error": {"code": 65, "reason": "InvalidBlueprint", "message": "spec.x: y"}}),
            "failed",
            "BadResult",
            "a succeeded Job reported an error: spec.x: y",
        ),
    ],
)
def test_a_bad_result_says_what_is_wrong(message: str, state: str, reason: str, text: str) -> None:
    assert parse_result(message, expected_key=KEY) == JobOutcome(state, reason, text)


def _failed(name: str, code: int, finished: str | None) -> dict[str, Any]:
    terminated: dict[str, Any] = {"exitCode": code, "message": f"from {name}"}
    if finished is not None:
        terminated["finishedAt"] = finished
    return {
        "metadata": {"name": name},
        "status": {
            "phase": "Failed",
            "containerStatuses": [{"name": "tezzeret", "state": {"terminated": terminated}}],
        },
    }


JOB = {
    "metadata": {"name": "j"},
    "status": {
        "failed": 2,
        "conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}],
    },
}


@pytest.mark.parametrize("order", [1, -1])
def test_pods_finished_at_the_same_second_are_ordered_by_name(order: int) -> None:
    """Timestamps have one-second resolution; the later name (attempt-b) is read."""
    pods = [
        _failed("attempt-a", 65, "2026-01-01T10:00:00Z"),
        _failed("attempt-b", 66, "2026-01-01T10:00:00Z"),
    ]
    outcome = interpret(JOB, pods[::order], expected_key=KEY)
    assert (outcome.reason, outcome.message) == (
        "UnsupportedTarget",
        "compile Job failed (BackoffLimitExceeded) after 2 attempt(s); exit code 66; from attempt-b",
    )


@pytest.mark.parametrize("order", [1, -1])
def test_a_pod_without_a_finish_time_counts_as_the_earliest(order: int) -> None:
    """A termination without finishedAt sorts before any with one: the timed Pod is read."""
    pods = [_failed("z-untimed", 65, None), _failed("a-timed", 67, "2026-01-01T10:00:00Z")]
    outcome = interpret(JOB, pods[::order], expected_key=KEY)
    assert outcome.reason == "ValidationFailed" and outcome.message.endswith("exit code 67; from a-timed")


def test_the_request_carries_the_kernels_own_compile_options() -> None:
    """Options unlike the defaults: a request built with the defaults instead would differ."""
    spec = {
        "template": {"name": "residual-mlp", "params": {"features": 16, "hidden": 32}},
        "targets": ["cpu"],
        "compile": {"maxBatch": 64, "initSeed": 7, "validateBatches": [2, 3], "benchmarkBatches": [4]},
    }
    kernel = plan_blueprint("mlp", spec, torch_version="2.13.0").kernels[0].spec
    request = compile_request(kernel)
    assert request.namespace == ""  # no namespace given
    assert request.spec.compile.model_dump(mode="json") == {
        "maxBatch": 64,
        "initSeed": 7,
        "validateBatches": [2, 3],
        "benchmarkBatches": [4],
    }


def test_a_deadline_outranks_the_exit_code_and_an_eviction() -> None:
    """The Job ran out of time: retrying the same Kernel would too, whatever its last Pod said."""
    pod = _failed("p", 65, "2026-01-01T10:00:00Z")
    pod["status"]["reason"] = "Evicted"
    job = {"metadata": {"name": "j"}, "status": {"failed": 1, "conditions": [
        {"type": "Failed", "status": "True", "reason": "DeadlineExceeded"}]}}  # fmt: skip
    outcome = interpret(job, [pod], expected_key=KEY)
    assert (outcome.reason, outcome.message) == (
        "DeadlineExceeded",
        "compile Job failed (DeadlineExceeded) after 1 attempt(s); exit code 65; from p",
    )


def test_a_succeeded_pod_without_a_message_is_a_bad_result() -> None:
    pod = _failed("p", 0, "2026-01-01T10:00:00Z")
    pod["status"]["phase"] = "Succeeded"
    del pod["status"]["containerStatuses"][0]["state"]["terminated"]["message"]
    job = {"metadata": {"name": "j"}, "status": {"conditions": [{"type": "Complete", "status": "True"}]}}
    assert interpret(job, [pod], expected_key=KEY) == JobOutcome(
        "failed", "BadResult", "termination message is not JSON: ''"
    )
