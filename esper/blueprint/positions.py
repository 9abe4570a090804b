"""Does a graph mix positions, and is it causal? Read off the ops, without torch.

A language model may only grow seeds that never let a position see later ones. For a graph whose
values are `[batch, F]` there are no positions: it is position-wise, hence causal. For `[batch, T, F]`
(or any rank above 2) an op is *position-wise* when it acts on the last dim alone (elementwise ops,
`linear`, the norms, and `softmax`/`mean`/`concat` over the last dim); `multihead_attention` mixes
positions, causally when its `causal` param is true; every other op (conv, pooling, reshape,
transpose, matmul, a mean over positions, ...) is taken to mix positions non-causally. The rule is
conservative: a graph it calls causal is causal; some causal graphs are called non-causal.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from esper.blueprint.ir import Graph

#: Ops that act on each position on its own, whatever the rank.
POSITIONWISE_OPS = frozenset(
    {"relu", "gelu", "silu", "tanh", "sigmoid", "dropout", "identity", "scale", "add", "mul", "linear",
     "layer_norm", "rms_norm"}
)  # fmt: skip
#: Ops that are position-wise when their `dim`/`dims` name only the last dim.
LAST_DIM_OPS = frozenset({"softmax", "mean", "concat"})


@dataclass(frozen=True)
class Positions:
    """`mixesPositions`: some output position depends on another input position. `causal`: no output
    position depends on a later input position (true for every graph that does not mix)."""

    mixesPositions: bool
    causal: bool

    def to_json(self) -> dict[str, bool]:
        return {"mixesPositions": self.mixesPositions, "causal": self.causal}


def _dims(op: str, params: dict[str, Any]) -> list[int]:
    if op == "mean":
        return [int(d) for d in params.get("dims", [-1])]
    return [int(params.get("dim", -1))]


def positions(graph: Graph) -> Positions:
    """How `graph` treats positions (a valid graph; shapes come from the IR's shape inference)."""
    from esper.blueprint.validate import analyze

    filled, analysis = analyze(graph, "graph")
    shapes = analysis.shapes
    mixes, causal = False, True
    for node in filled.nodes:
        ranks = [len(shapes[i]) for i in node.inputs if i in shapes]
        if all(r <= 2 for r in ranks) or node.op in POSITIONWISE_OPS:
            continue
        if node.op in LAST_DIM_OPS:
            rank = max(ranks)
            if all(d % rank == rank - 1 for d in _dims(node.op, node.params)):
                continue
        mixes = True
        if not (node.op == "multihead_attention" and node.params.get("causal") is True):
            causal = False
    return Positions(mixes, causal)
