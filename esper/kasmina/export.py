"""Export a grown model to plain PyTorch: seed slots out, fossils in as eager modules.

`unwrap(model)` replaces every SeedSlot (in place) by what it computes now:

- fossilized: `nn.Sequential(host, seed)` (the seed alone for a slot without a host), the seed as an
  eager module with its trained weights: a compiled kernel is rebuilt from the Blueprint graph in its
  manifest and given the kernel's parameters, then traced with `torch.fx` into a `GraphModule`, so the
  result holds only torch classes (besides the host's own) and ships without Esper;
- dormant, germinated, culled, training (which return the host's output exactly): the host itself, or
  `nn.Identity()` for a slot without one;
- blending: refused (its output is a mix the plain model cannot keep), unless `blending="drop"`.

A per-token slot's seed was fed `[B*T, F]`: its export is an fx `GraphModule` that flattens, calls
the seed (a leaf) and reshapes back, the slot's own computation.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from esper.kasmina.kernel import EagerKernel, KernelModule
from esper.kasmina.lifecycle import SeedState
from esper.kasmina.seed import SeedSlot

S = SeedState


class ExportError(ValueError):
    """The model cannot be exported as it is (a blending seed, a seed with no eager form)."""


def eager_seed(seed: nn.Module, *, per_token: bool = False) -> nn.Module:
    """A plain module computing `seed` (trained weights included), in eval mode if `seed` is."""
    if isinstance(seed, KernelModule):
        module = _rebuild(seed)
    elif isinstance(seed, EagerKernel):
        module = seed.module
    else:
        module = seed
    from esper.blueprint.builder import BlueprintModule

    if isinstance(module, BlueprintModule):
        traced = torch.fx.symbolic_trace(module)
        traced.train(module.training)
        module = traced
    return _per_token(module) if per_token else module


class _Flatten(nn.Module):
    """Traced once into a GraphModule (`seed` a leaf); the class itself is not part of the export."""

    def __init__(self, seed: nn.Module) -> None:
        super().__init__()
        self.seed = seed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.seed(x.reshape(-1, x.shape[-1])).reshape(x.shape)


class _SeedLeaf(torch.fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return qualname == "seed" or super().is_leaf_module(m, qualname)


def _per_token(seed: nn.Module) -> nn.Module:
    """`seed` applied to every position of `[B, T, F]` as the per-token slot did: flatten, call,
    reshape (a seed's output has its input's shape)."""
    root = _Flatten(seed)
    graph = _SeedLeaf().trace(root)
    gm = torch.fx.GraphModule(root, graph, class_name="PerToken")
    gm.train(seed.training)
    return gm


def _rebuild(kernel: KernelModule) -> nn.Module:
    from esper.blueprint import build_module
    from esper.blueprint.ir import Graph

    graph, names = kernel.meta.get("graph"), kernel.meta.get("params")
    if graph is None or names is None:
        raise ExportError(
            f"kernel {kernel.kernel_key[:16]} carries no Blueprint graph (not loaded by load_kernel): "
            "no eager form to export"
        )
    module = build_module(Graph.model_validate(graph))
    values = dict(zip(names, kernel.params, strict=True))
    own = dict(module.named_parameters())
    if set(own) != set(values):
        key = kernel.kernel_key[:16]
        raise ExportError(f"kernel {key}: graph parameters {sorted(own)} != manifest {sorted(values)}")
    with torch.no_grad():
        for name, p in own.items():
            p.copy_(values[name].detach().to(p.dtype))
    return module.to(kernel.device).train(kernel.training)


def _replacement(slot: SeedSlot, blending: str) -> nn.Module:
    host = slot._modules.get("host")
    state = slot.state
    if state is S.BLENDING and blending != "drop":
        raise ExportError(
            f"slot {slot.name} is blending (alpha {slot.alpha:.3f}): fossilize or cull it first, or pass "
            "blending='drop' to export the host alone"
        )
    if state is not S.FOSSILIZED or slot.seed is None:
        return host if host is not None else nn.Identity()
    seed = eager_seed(slot.seed, per_token=slot.per_token)
    return seed if host is None else nn.Sequential(host, seed)


def unwrap(model: nn.Module, *, blending: Literal["error", "drop"] = "error") -> nn.Module:
    """Replace every seed slot of `model` by plain modules (in place; returns `model`).

    All slots are checked before any is replaced: on an ExportError the model is unchanged.
    """
    if isinstance(model, SeedSlot):
        raise ExportError("unwrap the model that holds the slot, not the slot itself")
    found = [(path, m) for path, m in model.named_modules() if isinstance(m, SeedSlot)]
    plans = [(path, _replacement(slot, blending)) for path, slot in found]
    for name, new in plans:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, new)
    return model
