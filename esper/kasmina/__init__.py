"""Kasmina: seed slots in a host model, the seed lifecycle, compiled-kernel loading, the policy and
telemetry; the in-process runtime of a training pod (its sidecar is esper.sidecar).

Names are imported lazily (PEP 562): `import esper.kasmina` is cheap, while
`from esper.kasmina import SeedSlot` imports torch on first use. Never imports kopf.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS: dict[str, str] = {
    **dict.fromkeys(
        ["EagerKernel", "KernelLoadError", "KernelModule", "KernelShapeError", "KernelShapeWarning",
         "from_module", "kernel_key_of", "load_kernel", "warmup"],
        "kernel",
    ),
    **dict.fromkeys(
        ["TRANSITIONS", "IllegalTransition", "Lifecycle", "SeedState", "Transition", "can_transition"],
        "lifecycle",
    ),
    **dict.fromkeys(["CatalogEntry", "KernelCatalog", "PlateauPolicy"], "policy"),
    **dict.fromkeys(
        ["KernelRestoreError", "SeedSlot", "set_kernel_resolver", "slots", "status_json", "step_slots",
         "wrap"],
        "seed",
    ),
    **dict.fromkeys(["KasminaMetrics", "SeedTelemetry", "default_metrics"], "telemetry"),
}  # fmt: skip
__all__ = [
    "TRANSITIONS",
    "CatalogEntry",
    "EagerKernel",
    "IllegalTransition",
    "KasminaMetrics",
    "KernelCatalog",
    "KernelLoadError",
    "KernelModule",
    "KernelRestoreError",
    "KernelShapeError",
    "KernelShapeWarning",
    "Lifecycle",
    "PlateauPolicy",
    "SeedSlot",
    "SeedState",
    "SeedTelemetry",
    "Transition",
    "can_transition",
    "default_metrics",
    "from_module",
    "kernel_key_of",
    "load_kernel",
    "set_kernel_resolver",
    "slots",
    "status_json",
    "step_slots",
    "warmup",
    "wrap",
]

if TYPE_CHECKING:
    from esper.kasmina.kernel import (
        EagerKernel,
        KernelLoadError,
        KernelModule,
        KernelShapeError,
        KernelShapeWarning,
        from_module,
        kernel_key_of,
        load_kernel,
        warmup,
    )
    from esper.kasmina.lifecycle import (
        TRANSITIONS,
        IllegalTransition,
        Lifecycle,
        SeedState,
        Transition,
        can_transition,
    )
    from esper.kasmina.policy import CatalogEntry, KernelCatalog, PlateauPolicy
    from esper.kasmina.seed import (
        KernelRestoreError,
        SeedSlot,
        set_kernel_resolver,
        slots,
        status_json,
        step_slots,
        wrap,
    )
    from esper.kasmina.telemetry import KasminaMetrics, SeedTelemetry, default_metrics


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'esper.kasmina' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"esper.kasmina.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
