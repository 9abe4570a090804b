"""The compile Job's contract: the request the operator hands it, the result it writes, its exit codes.

Both sides import these models, so a field renamed on one side is a type error on the other, not a
Kernel stuck in Compiling. The request travels as one JSON document in the Job's environment; the
result (or the error) as one JSON line in the Pod's termination message, which Kubernetes cuts at
4 KiB: `result_line` checks that bound where the line is written, shortening long strings rather than
writing a line the operator cannot parse. Importable without torch (the operator has none).
"""

from __future__ import annotations

import json
import os
from enum import IntEnum
from pathlib import Path
from typing import Any

from pydantic import Field

from esper.blueprint.ir import Graph
from esper.contracts.common import CompileOptions, Model, Toolchain, ValidationReport

REQUEST_ENV = "ESPER_COMPILE_REQUEST"
"""The environment variable that carries the CompileRequest JSON into the compile container."""

MAX_RESULT_BYTES = 4096
"""What Kubernetes keeps of a termination message."""

SHA256_PATTERN = r"^[0-9a-f]{64}$"


class ExitCode(IntEnum):
    """Exit codes of the compile Job.

    The operator's podFailurePolicy fails a Job at once on the permanent ones (retrying cannot help)
    and retries anything else (75, crashes, signals).
    """

    OK = 0
    USAGE = 2
    INVALID_BLUEPRINT = 65
    UNSUPPORTED_TARGET = 66
    VALIDATION_FAILED = 67
    INTERNAL = 70  # EX_SOFTWARE: an unexpected crash; not permanent, so retried like 75
    TRANSIENT = 75

    @property
    def permanent(self) -> bool:
        return self in PERMANENT_REASONS


PERMANENT_REASONS: dict[ExitCode, str] = {
    ExitCode.INVALID_BLUEPRINT: "InvalidBlueprint",
    ExitCode.UNSUPPORTED_TARGET: "UnsupportedTarget",
    ExitCode.VALIDATION_FAILED: "ValidationFailed",
}
"""The permanent exit codes and the Kernel reason each one gives."""


class CompileSpec(Model):
    """What to compile: the Blueprint's expanded graph and its compile options (no targets: one Job,
    one target, carried by the request)."""

    graph: Graph = Field(description="The expanded graph, defaults filled in.")
    compile: CompileOptions = Field(default_factory=CompileOptions, description="Compile options.")


class CompileRequest(Model):
    """What the operator asks one compile Job to build."""

    blueprint: str = Field(max_length=253, description="The Blueprint that asked for this Kernel.")
    namespace: str = Field(default="", max_length=63, description="The Blueprint's namespace.")
    spec: CompileSpec
    target: str = Field(
        max_length=64, description="The one target of this Job: cpu, cpu-avx512 or cuda-smNN."
    )
    expectKey: str | None = Field(
        default=None, pattern=SHA256_PATTERN, description="The kernel key the operator computed."
    )
    expectTorch: str | None = Field(
        default=None, max_length=64, description="The torch version the operator's toolchain names."
    )

    def to_env(self) -> str:
        """The compact, deterministic JSON for REQUEST_ENV."""
        return json.dumps(
            self.model_dump(mode="json", exclude_none=True), sort_keys=True, separators=(",", ":")
        )


class CompileResult(Model):
    """A successful compile: where the verified bundle is and what it measured."""

    key: str = Field(pattern=SHA256_PATTERN, description="The kernel key.")
    uri: str = Field(max_length=2048, description="Store URI of the bundle.")
    manifestSha256: str = Field(pattern=SHA256_PATTERN, description="sha256 of the bundle's manifest.json.")
    size: int = Field(ge=0, description="Bundle size in bytes (esper.artifact.bundle_size).")
    toolchain: Toolchain
    compileSeconds: float = Field(default=0.0, ge=0, description="Wall time of the Job's work.")
    reused: bool = Field(default=False, description="The bundle was already in the store: not recompiled.")
    replaced: str | None = Field(
        default=None,
        max_length=1024,
        description="Why a bundle found under the key was not trusted and was recompiled and replaced.",
    )
    report: ValidationReport | None = None


class CompileError(Model):
    """Why a compile failed: the exit code, a CamelCase reason and a human-readable message."""

    code: int = Field(ge=0, le=255)
    reason: str = Field(max_length=128)
    message: str = ""


class CompileFailure(Model):
    """The result line of a failed compile."""

    error: CompileError


def parse_result(text: str | bytes) -> CompileResult | CompileFailure:
    """The result line as written by `result_line`; pydantic.ValidationError if it is not one."""
    data = json.loads(text)
    if isinstance(data, dict) and "error" in data:
        return CompileFailure.model_validate(data)
    return CompileResult.model_validate(data)


def read_result(path: str | os.PathLike[str], code: int) -> CompileResult | CompileFailure:
    """The result a local compile process (exit `code`) wrote to `path`; a missing or malformed file,
    or an exit code that contradicts it, becomes a CompileFailure saying so."""
    try:
        result = parse_result(Path(path).read_bytes())
    except (OSError, ValueError) as e:  # pydantic.ValidationError is a ValueError
        reason = "NoResult" if isinstance(e, OSError) else "BadResult"
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        return CompileFailure(
            error=CompileError(code=code or ExitCode.INTERNAL, reason=reason, message=first)
        )
    if code and isinstance(result, CompileResult):
        message = f"exit {code} after writing a successful result"
        return CompileFailure(error=CompileError(code=code, reason="BadResult", message=message))
    return result


def result_line(result: CompileResult | CompileFailure, limit: int = MAX_RESULT_BYTES) -> str:
    """One line of JSON of at most `limit` bytes (exclude_none: an absent report stays absent)."""
    return fit_json(result.model_dump(mode="json", exclude_none=True), limit)


def fit_json(doc: dict[str, Any], limit: int = MAX_RESULT_BYTES) -> str:
    """One line of JSON of at most `limit` bytes: the longest strings are cut (with '...') until it fits.

    A cut message beats a result the operator cannot parse; a document with nothing left to cut
    becomes a ResultTooLarge error.
    """
    doc = json.loads(json.dumps(doc))  # a private copy
    while True:
        line = json.dumps(doc, separators=(",", ":"), ensure_ascii=False)
        excess = len(line.encode()) - limit
        if excess <= 0:
            return line
        holder, key, value = _longest_string(doc)
        if holder is None or len(value) <= 3:
            too_large = CompileError(code=ExitCode.INTERNAL, reason="ResultTooLarge")
            return json.dumps({"error": too_large.model_dump(mode="json")}, separators=(",", ":"))
        # Cut by the string's share of bytes: escapes and multi-byte characters make a char cost more
        # than one byte, so cutting `excess` chars could keep far less than fits (or nothing).
        encoded = len(json.dumps(value, ensure_ascii=False).encode()) - 2
        keep = min(len(value) - 4, int(len(value) * (encoded - excess - 3) / encoded))
        holder[key] = value[: max(0, keep)] + "..."


def _longest_string(node: Any, best: tuple[Any, Any, str] = (None, None, "")) -> tuple[Any, Any, str]:
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for k, v in items:
        if isinstance(v, str) and len(v) > len(best[2]):
            best = (node, k, v)
        elif isinstance(v, (dict, list)):
            best = _longest_string(v, best)
    return best
