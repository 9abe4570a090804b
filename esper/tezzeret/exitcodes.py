"""Exit codes of the compile Job and the exceptions that carry them.

The operator's podFailurePolicy fails a Job at once on 65-67 (permanent: retrying cannot help) and
retries anything else (75, crashes, signals), so every failure must map to exactly one code here.
"""

from __future__ import annotations

from typing import ClassVar

OK = 0
INVALID_BLUEPRINT = 65
UNSUPPORTED_TARGET = 66
VALIDATION_FAILED = 67
TRANSIENT = 75
INTERNAL = 70  # EX_SOFTWARE: an unexpected crash; not permanent, so the operator retries it like 75

PERMANENT = frozenset({INVALID_BLUEPRINT, UNSUPPORTED_TARGET, VALIDATION_FAILED})


class TezzeretError(Exception):
    """Base of compile failures; `code` is the process exit code, `reason` a CamelCase word."""

    code: ClassVar[int] = TRANSIENT
    reason: ClassVar[str] = "Transient"

    @property
    def permanent(self) -> bool:
        return self.code in PERMANENT


class InvalidBlueprint(TezzeretError):
    """The Blueprint is missing, unreadable or fails validation (65)."""

    code = INVALID_BLUEPRINT
    reason = "InvalidBlueprint"


class UnsupportedTarget(TezzeretError):
    """Unknown target, missing device, wrong capability, or toolchain / kernel key mismatch (66)."""

    code = UNSUPPORTED_TARGET
    reason = "UnsupportedTarget"


class ToolchainMismatch(UnsupportedTarget):
    """The image's torch or the recomputed kernel key differs from what the operator expected (66)."""

    reason = "ToolchainMismatch"


class ValidationFailed(TezzeretError):
    """Compiled outputs or gradients differ from eager beyond tolerance, or are not finite (67)."""

    code = VALIDATION_FAILED
    reason = "ValidationFailed"


class TransientError(TezzeretError):
    """Storage unreachable, out of resources: worth a retry (75)."""

    code = TRANSIENT
    reason = "Transient"


class StorageUnavailable(TransientError):
    """The store could not be read or written (75)."""

    reason = "StorageUnavailable"


def code_for(exc: BaseException) -> int:
    """Exit code for any exception: ours carry one; out of memory is transient; the rest a crash (70)."""
    if isinstance(exc, TezzeretError):
        return exc.code
    if isinstance(exc, MemoryError):
        return TRANSIENT
    return INTERNAL


def reason_for(exc: BaseException) -> str:
    """CamelCase reason for the result JSON."""
    if isinstance(exc, TezzeretError):
        return exc.reason
    if isinstance(exc, MemoryError):
        return "OutOfMemory"
    return "InternalError"
