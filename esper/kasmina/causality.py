"""What a seed kernel does with positions: does it mix them, is it causal? (for `wrap(causal=True)`)

A compiled kernel says so in its manifest (`mixesPositions`, `causal`, written by the compiler from
`esper.blueprint.positions`); a kernel built from a Blueprint graph is analysed the same way; a kernel
whose inputs are `[batch, F]` has no positions; any other module may declare a `causal` attribute
(itself or, for an EagerKernel, the module it wraps). Anything else is unknown (None), which a causal
slot refuses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from esper.kasmina.kernel import EagerKernel, KernelModule


@dataclass(frozen=True)
class Causality:
    """`mixes_positions` and `causal`: True, False, or None when the kernel does not say."""

    mixes_positions: bool | None
    causal: bool | None


def _of_graph(graph: Any) -> Causality:
    from esper.blueprint.ir import Graph
    from esper.blueprint.positions import positions

    p = positions(graph if isinstance(graph, Graph) else Graph.model_validate(graph))
    return Causality(p.mixesPositions, p.causal)


def kernel_causality(module: nn.Module) -> Causality:
    """How `module` (a seed kernel) treats positions, as far as it is known."""
    from esper.blueprint.builder import BlueprintModule

    if isinstance(module, KernelModule):
        meta = module.meta
        if meta.get("causal") is not None:
            return Causality(meta.get("mixesPositions"), bool(meta["causal"]))
        if meta.get("graph") is not None:
            return _of_graph(meta["graph"])
        if module.input_shapes and all(len(s) <= 2 for s in module.input_shapes):
            return Causality(False, True)
        return Causality(None, None)
    inner = module.module if isinstance(module, EagerKernel) else module
    for m in (module, inner):
        declared = getattr(m, "causal", None)
        if isinstance(declared, bool):
            mixes = getattr(m, "mixes_positions", None)
            return Causality(mixes if isinstance(mixes, bool) else None, declared)
    if isinstance(inner, BlueprintModule):
        return _of_graph(inner.graph)
    return Causality(None, None)
