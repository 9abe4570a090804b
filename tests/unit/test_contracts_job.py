"""The compile Job's contract: request and result round trips, the 4 KiB bound, malformed results."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from esper.blueprint.ir import Graph
from esper.contracts.common import CompileOptions, Toolchain, ValidationReport
from esper.contracts.job import (
    MAX_RESULT_BYTES,
    PERMANENT_REASONS,
    CompileError,
    CompileFailure,
    CompileRequest,
    CompileResult,
    CompileSpec,
    ExitCode,
    fit_json,
    parse_result,
    read_result,
    result_line,
)
from esper_operator.jobs import parse_result as operator_parse_result

KEY = "a" * 64
GRAPH = {
    "inputs": [{"name": "x", "shape": ["batch", 8]}],
    "nodes": [{"id": "y", "op": "relu", "inputs": ["x"]}],
    "outputs": ["y"],
}


def _result(**fields: object) -> CompileResult:
    base: dict[str, object] = {
        "key": KEY,
        "uri": f"s3://bucket/kernels/{KEY}",
        "manifestSha256": "b" * 64,
        "size": 2048,
        "toolchain": Toolchain(torch="2.13.0", capability="cpu-avx2", python="3.11"),
        "compileSeconds": 3.5,
        "report": ValidationReport(
            tolerance=1e-4, maxAbsError=1e-7, eagerMicros=100.0, compiledMicros=50.0, speedup=2.0
        ),
    }
    return CompileResult.model_validate({**base, **fields})


def test_exit_codes_and_permanent_reasons() -> None:
    assert [int(c) for c in ExitCode] == [0, 2, 65, 66, 67, 70, 75]
    assert {int(c): r for c, r in PERMANENT_REASONS.items()} == {
        65: "InvalidBlueprint",
        66: "UnsupportedTarget",
        67: "ValidationFailed",
    }
    assert [c for c in ExitCode if c.permanent] == [65, 66, 67]
    assert PERMANENT_REASONS.get(66) == "UnsupportedTarget"  # a Pod's plain int exit code finds its reason


def test_request_round_trips_through_the_env_json() -> None:
    request = CompileRequest(
        blueprint="mlp",
        namespace="ml",
        spec=CompileSpec(graph=Graph.model_validate(GRAPH), compile=CompileOptions(maxBatch=256)),
        target="cuda-sm90",
        expectKey=KEY,
        expectTorch="2.13.0",
    )
    text = request.to_env()
    assert CompileRequest.model_validate_json(text) == request
    doc = json.loads(text)
    assert doc["target"] == "cuda-sm90" and "targets" not in doc["spec"]  # the target is written once
    assert doc["spec"]["compile"]["maxBatch"] == 256
    assert text == request.to_env()  # deterministic: the Job manifest stays the same


@pytest.mark.parametrize(
    "change",
    [
        {"expectKey": "short"},
        {"target": None},
        {"spec": {"graph": GRAPH, "targets": ["cpu"]}},  # targets belong to the request
        {"extra": 1},
    ],
)
def test_a_malformed_request_is_refused(change: dict[str, object]) -> None:
    doc = {"blueprint": "mlp", "spec": {"graph": GRAPH}, "target": "cpu", **change}
    with pytest.raises(ValidationError):
        CompileRequest.model_validate(doc)


def test_result_and_failure_round_trip_through_the_line() -> None:
    for result in (_result(), _result(report=None, reused=True, compileSeconds=0.0)):
        line = result_line(result)
        assert "\n" not in line and parse_result(line) == result
    failure = CompileFailure(
        error=CompileError(code=65, reason="InvalidBlueprint", message="spec.graph: bad")
    )
    assert parse_result(result_line(failure)) == failure


def test_a_pathological_message_is_cut_to_4_kib_and_stays_parseable() -> None:
    message = "spec.graph.nodes[0]: é ✓ bad\n" * 5000  # multi-byte characters, far past the limit
    failure = CompileFailure(error=CompileError(code=65, reason="InvalidBlueprint", message=message))
    line = result_line(failure)
    assert len(line.encode()) <= MAX_RESULT_BYTES == 4096
    parsed = parse_result(line)
    assert isinstance(parsed, CompileFailure)
    assert (parsed.error.code, parsed.error.reason) == (65, "InvalidBlueprint")
    assert message.startswith(parsed.error.message[:-3]) and parsed.error.message.endswith("...")
    assert len(line.encode()) > MAX_RESULT_BYTES - 16  # cut just enough, not to nothing


def test_a_document_with_nothing_to_cut_becomes_result_too_large() -> None:
    doc = {"numbers": list(range(2000))}
    line = fit_json(doc)
    assert len(line.encode()) <= MAX_RESULT_BYTES
    assert parse_result(line) == CompileFailure(error=CompileError(code=70, reason="ResultTooLarge"))


def test_small_documents_are_written_unchanged() -> None:
    small = {"key": "k", "report": {"speedup": 1.5}}
    assert json.loads(fit_json(small)) == small


@pytest.mark.parametrize(
    ("line", "where"),
    [
        (json.dumps({**_result().model_dump(mode="json"), "size": "big"}), "size"),
        (json.dumps({**_result().model_dump(mode="json"), "extra": 1}), "extra"),
        (json.dumps({k: v for k, v in _result().model_dump(mode="json").items() if k != "uri"}), "uri"),
        (json.dumps({**_result().model_dump(mode="json"), "compileSeconds": -1}), "compileSeconds"),
    ],
)
def test_the_operator_refuses_a_malformed_result(line: str, where: str) -> None:
    outcome = operator_parse_result(line, expected_key=KEY)
    assert (outcome.state, outcome.reason) == ("failed", "BadResult")
    assert where in outcome.message and outcome.artifact is None


def test_the_operator_refuses_an_error_line_from_a_succeeded_job() -> None:
    failure = CompileFailure(error=CompileError(code=65, reason="InvalidBlueprint", message="oops"))
    outcome = operator_parse_result(result_line(failure), expected_key=KEY)
    assert (outcome.state, outcome.reason) == ("failed", "BadResult") and "oops" in outcome.message


def test_the_operator_accepts_a_written_result() -> None:
    outcome = operator_parse_result(result_line(_result()), expected_key=KEY)
    assert outcome.state == "succeeded" and outcome.artifact is not None
    assert (outcome.artifact.sha256, outcome.artifact.size, outcome.compile_seconds) == ("b" * 64, 2048, 3.5)


def test_read_result_reports_a_missing_bad_or_contradicted_file(tmp_path: Path) -> None:
    missing = read_result(tmp_path / "none", 137)
    assert isinstance(missing, CompileFailure) and (missing.error.code, missing.error.reason) == (
        137,
        "NoResult",
    )
    (tmp_path / "bad").write_text("{not json")
    bad = read_result(tmp_path / "bad", 0)
    assert isinstance(bad, CompileFailure) and (bad.error.code, bad.error.reason) == (70, "BadResult")
    (tmp_path / "ok").write_text(result_line(_result()))
    assert read_result(tmp_path / "ok", 0) == _result()
    contradicted = read_result(tmp_path / "ok", 75)
    assert isinstance(contradicted, CompileFailure) and contradicted.error.code == 75


def test_the_contract_imports_without_torch() -> None:
    code = "import sys, esper.contracts.job; sys.exit('torch' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr or "esper.contracts.job imported torch"
