"""The exceptions that carry the compile Job's exit codes (esper.contracts.job.ExitCode).

Every failure must map to exactly one code: the operator decides retry vs fail from it.
"""

from __future__ import annotations

from typing import ClassVar

from esper.contracts.job import ExitCode


class TezzeretError(Exception):
    """Base of compile failures; `code` is the process exit code, `reason` a CamelCase word."""

    code: ClassVar[ExitCode] = ExitCode.TRANSIENT
    reason: ClassVar[str] = "Transient"

    @property
    def permanent(self) -> bool:
        return self.code.permanent


class InvalidBlueprint(TezzeretError):
    """The Blueprint is missing, unreadable or fails validation (65)."""

    code = ExitCode.INVALID_BLUEPRINT
    reason = "InvalidBlueprint"


class UnsupportedTarget(TezzeretError):
    """Unknown target, missing device, wrong capability, or toolchain / kernel key mismatch (66)."""

    code = ExitCode.UNSUPPORTED_TARGET
    reason = "UnsupportedTarget"


class ToolchainMismatch(UnsupportedTarget):
    """The image's torch or the recomputed kernel key differs from what the operator expected (66)."""

    reason = "ToolchainMismatch"


class CompilerUnusable(UnsupportedTarget):
    """The image's C++ compiler would build packages that cannot load (66): an image to fix, not a
    Blueprint to retry."""

    reason = "CompilerUnusable"


class ValidationFailed(TezzeretError):
    """Compiled outputs or gradients differ from eager beyond tolerance, or are not finite (67)."""

    code = ExitCode.VALIDATION_FAILED
    reason = "ValidationFailed"


class TransientError(TezzeretError):
    """Storage unreachable, out of resources: worth a retry (75)."""

    code = ExitCode.TRANSIENT
    reason = "Transient"


class StorageUnavailable(TransientError):
    """The store could not be read or written (75)."""

    reason = "StorageUnavailable"


class NoSigningKey(TransientError):
    """No usable signing key (a Secret not mounted yet, a bad file): fixed by configuration, so
    retried rather than failing the Kernel for good (75)."""

    reason = "NoSigningKey"


def code_for(exc: BaseException) -> ExitCode:
    """Exit code for any exception: ours carry one; out of memory is transient; the rest a crash (70)."""
    if isinstance(exc, TezzeretError):
        return exc.code
    if isinstance(exc, MemoryError):
        return ExitCode.TRANSIENT
    return ExitCode.INTERNAL


def reason_for(exc: BaseException) -> str:
    """CamelCase reason for the result JSON."""
    if isinstance(exc, TezzeretError):
        return exc.reason
    if isinstance(exc, MemoryError):
        return "OutOfMemory"
    return "InternalError"
