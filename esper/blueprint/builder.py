"""Graph -> torch.nn.Module: deterministic parameters, evaluation in canonical topological order.

Parameters are named `nodes.<id>.<name>` and created node by node in the canonical order, from a local
generator seeded with `seed`: the same graph and seed give bit-identical parameters on any machine,
and the caller's global RNG is left untouched.
"""

from __future__ import annotations

import keyword
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from esper.blueprint.canonical import canonical_graph
from esper.blueprint.errors import BlueprintInvalid
from esper.blueprint.ir import Graph
from esper.blueprint.ops import OPS
from esper.blueprint.torch_ops import BUILDERS
from esper.blueprint.validate import analyze

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class _Nodes(nn.Module):
    """Plain container so parameter names are `nodes.<id>.weight` (ids are checked not to clash)."""


class BlueprintModule(nn.Module):
    """Evaluates a graph: forward(*inputs) -> one tensor, or a tuple for several outputs."""

    def __init__(self, graph: Graph, seed: int = 0) -> None:
        super().__init__()
        graph = canonical_graph(graph)
        filled, analysis = analyze(graph, "graph")
        if analysis.problems:
            raise BlueprintInvalid(analysis.problems)
        self.graph = filled
        self.input_names = [t.name for t in filled.inputs]
        self.output_names = list(filled.outputs)
        self.steps = [(n.id, list(n.inputs)) for n in filled.nodes]
        gen = torch.Generator().manual_seed(seed)
        self.nodes = _Nodes()
        for node in filled.nodes:
            op = OPS[node.op]
            params = op.params.model_validate(node.params)
            ins = [analysis.shapes[i] for i in node.inputs]
            self.nodes.add_module(node.id, BUILDERS[node.op](params, ins, gen))
        self.to(_DTYPES[filled.dtype])

    def forward(self, *inputs: Tensor) -> Tensor | tuple[Tensor, ...]:
        return self.run(inputs)

    def run(self, inputs: tuple[Tensor, ...]) -> Tensor | tuple[Tensor, ...]:
        """Evaluates the nodes in canonical order."""
        env: dict[str, Tensor] = dict(zip(self.input_names, inputs, strict=True))
        for nid, refs in self.steps:
            env[nid] = getattr(self.nodes, nid)(*(env[r] for r in refs))
        outs = tuple(env[o] for o in self.output_names)
        return outs[0] if len(outs) == 1 else outs


def _forward_with_signature(names: list[str]) -> Callable[..., Any]:
    """A forward taking the graph inputs by name: torch.export matches `dynamic_shapes` to them."""
    args = ", ".join(n + "_" if keyword.iskeyword(n) or n == "self" else n for n in names)
    namespace: dict[str, Any] = {}
    exec(f"def forward(self, {args}):\n    return self.run(({args},))\n", namespace)  # names are identifiers
    return namespace["forward"]


def build_module(graph: Graph, seed: int = 0) -> nn.Module:
    """A module computing `graph` (validated first; raises BlueprintInvalid if it is not valid).

    Its forward takes exactly the graph's inputs, by their names, so `torch.export.export(m, (x,),
    dynamic_shapes=({0: batch},))` works as for any hand-written module.
    """
    names = [t.name for t in graph.inputs]
    cls = type("BlueprintModule", (BlueprintModule,), {"forward": _forward_with_signature(names)})
    cls.__module__ = __name__
    return cls(graph, seed)
