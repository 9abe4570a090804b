"""Crash points for fault-injection tests: the operator SIGKILLs itself on reaching an armed one.

`ESPER_FAULT_POINTS=name[,name]` is read once, at import. Unset (always, in production) a point costs
one lookup in an empty frozenset. A kill is a real SIGKILL: no handler, no cleanup, no flushed
buffers, as when a node dies or the OOM killer strikes; what was written to the API server before it
is all a restarted operator finds.
"""

from __future__ import annotations

import os
import signal

ENV = "ESPER_FAULT_POINTS"

POINTS: dict[str, str] = {
    "plan": "a Blueprint validated and planned; nothing created for it yet",
    "kernel-created": "a Kernel created; no Job, no status yet",
    "kernel-adopted": "this Blueprint added as an owner of an existing Kernel",
    "job-create": "about to create a compile Job",
    "job-created": "a compile Job created; its Kernel not yet Compiling",
    "kernel-compiling": "a Kernel marked Compiling; its Blueprint's status not written",
    "blueprint-status": "every Kernel and Job ensured; the Blueprint's status not written",
    "job-observed": "a finished Job's Pods read; the result not yet verified",
    "kernel-finishing": "a Job's result verified; the Kernel's status not yet written",
    "kernel-finished": "a Kernel Ready or Failed; its Blueprints not yet refreshed",
    "blueprint-refresh": "a Blueprint's new phase computed from its Kernels; not yet written",
    "kernel-release": "a deleted Blueprint's Kernel about to be released or deleted",
    "kernel-cleanup": "a deleted Kernel's Job deleted; the finalizer not yet removed",
}
"""Every crash point and the state the cluster is left in when the operator dies there."""


def _armed(raw: str) -> frozenset[str]:
    names = frozenset(n.strip() for n in raw.split(",") if n.strip())
    unknown = sorted(names - POINTS.keys())
    if unknown:
        raise ValueError(f"{ENV}: unknown fault point(s) {', '.join(unknown)}; known: {', '.join(POINTS)}")
    return names


ARMED = _armed(os.environ.get(ENV, ""))


def crash_point(name: str) -> None:
    """Die here, at once, if `name` is armed (the name is logged first, straight to stderr)."""
    if name in ARMED:
        os.write(2, f"esper fault point {name}: SIGKILL\n".encode())
        os.kill(os.getpid(), signal.SIGKILL)
