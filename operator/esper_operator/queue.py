"""Compile attempts: automatic retries of transient failures with back-off, user retries, and a cap on
concurrent compile Jobs (pure policy; the Reconciler does the I/O).

A Kernel's compile is a sequence of attempts, one Job each (`tezzeret-<target>-<key16>`, then `-2`,
`-3`, ...), so a retry never races the failed Job's own objects. The Job's own back-off retries Pods
within an attempt; these retries start a new attempt after the Job has failed (evicted, out of memory,
past its deadline: things a later try on another node may not meet). Permanent failures (an invalid
Blueprint, an unsupported target, failed numerics) are never retried automatically; a user retry
(`esper retry`, the annotation esper.dev/retry) compiles any Failed Kernel again.
"""

from __future__ import annotations

import datetime as dt
import random
from collections.abc import Mapping
from typing import Any

TRANSIENT_REASONS = frozenset({"OOMKilled", "DeadlineExceeded", "Evicted", "BackoffLimitExceeded"})
RETRY_BACKOFF, QUEUED, RETRY_REQUESTED = "RetryBackoff", "Queued", "RetryRequested"
WAITING = (RETRY_BACKOFF, QUEUED, RETRY_REQUESTED)
"""Reasons of a Pending Kernel that waits for its next Job (the periodic tick starts it)."""


def waits_for_job(status: Mapping[str, Any]) -> bool:
    """A Pending Kernel waiting for its next Job: a free compile slot, its back-off, a requested retry."""
    return (status.get("phase") or "Pending") == "Pending" and status.get("reason") in WAITING


def retry_requested(status: Mapping[str, Any], token: str) -> bool:
    """A Failed Kernel whose retry annotation holds `token`, a request not yet acted on."""
    return status.get("phase") == "Failed" and bool(token) and token != status.get("retryToken", "")


def attempt_job_name(base: str, attempt: int) -> str:
    """The Job of attempt `attempt` (1-based): the base name first, then `-2`, `-3`, ..."""
    return base if attempt <= 1 else f"{base}-{attempt}"


def backoff_seconds(failures: int, base: float, cap: float, rand: random.Random | None = None) -> float:
    """Capped exponential back-off with jitter: half fixed, half random (failures >= 1)."""
    delay = min(cap, base * 2 ** max(failures - 1, 0))
    return delay / 2 + (rand or random).uniform(0, delay / 2)


def should_retry(reason: str, status: dict[str, Any], limit: int) -> bool:
    """A transient failure with automatic retries left since the last user retry."""
    done = int(status.get("attempts") or 0) - int(status.get("retryBase") or 0)
    return reason in TRANSIENT_REASONS and done <= limit


def due(status: dict[str, Any], now: dt.datetime) -> bool:
    """Whether a waiting Kernel's next attempt may start now."""
    at = status.get("retryAt") or ""
    if not at:
        return True
    return now >= dt.datetime.fromisoformat(at.replace("Z", "+00:00"))


def rfc3339(t: dt.datetime) -> str:
    return t.astimezone(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
