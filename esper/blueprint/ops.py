"""The op registry: every op a Blueprint graph may use, by name.

Each :class:`~esper.blueprint.opdef.OpDef` carries a params model, an arity, a pure-Python shape rule and
a parameter-count rule, so the operator validates graphs without torch; the torch constructors live in
:mod:`esper.blueprint.torch_ops` and load only when a module is built.
"""

from __future__ import annotations

from esper.blueprint.opdef import OpDef, Params, Shape, ShapeError
from esper.blueprint.ops_nn import NN_OPS
from esper.blueprint.ops_tensor import TENSOR_OPS

OPS: dict[str, OpDef] = {op.name: op for op in [*NN_OPS, *TENSOR_OPS]}
"""Every op, by name."""

__all__ = ["OPS", "OpDef", "Params", "Shape", "ShapeError"]
