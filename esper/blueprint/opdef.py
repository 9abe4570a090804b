"""The pieces every op definition is made of: shapes, shape errors, param models, the OpDef record.

Kept free of torch: the operator validates Blueprints (shapes, parameter counts) without it. The torch
constructor of an op lives in :mod:`esper.blueprint.torch_ops` (BUILDERS, by op name), which imports
this module and never the reverse.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from esper.blueprint.ir import BATCH, MAX_DIM

Shape = tuple[int | str, ...]
"""A tensor shape: 'batch' first, then static sizes."""

ALL_DTYPES: frozenset[str] = frozenset({"float32", "float16", "bfloat16"})

Size = Annotated[int, Field(ge=1, le=MAX_DIM)]
KernelSize = Annotated[int, Field(ge=1, le=15)]
Stride = Annotated[int, Field(ge=1, le=8)]
Eps = Annotated[float, Field(gt=0, le=0.1)]
Prob = Annotated[float, Field(ge=0, lt=1)]
DimIndex = Annotated[int, Field(ge=-5, le=4, description="A dim of the full shape (batch is 0).")]


class ShapeError(ValueError):
    """A shape rule failed; `field` names the op parameter at fault, if one is."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


class Params(BaseModel):
    """Base of op and template parameter models: strict, closed, camelCase field names."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class NoParams(Params):
    """For ops without parameters."""


class FieldError(ValueError):
    """Raised by cross-field validators so the Problem can point at the field (see errors.py)."""

    def __init__(self, field: str | int | tuple[str | int, ...], message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


ShapeRule = Callable[[Any, list[Shape]], Shape]
CountRule = Callable[[Any, list[Shape]], int]


def _no_params(_p: Any, _ins: list[Shape]) -> int:
    return 0


@dataclass(frozen=True)
class OpDef:
    """One op: its params model, arity, shape rule, parameter-count rule and allowed dtypes."""

    name: str
    params: type[Params]
    arity: tuple[int, int]
    shape: ShapeRule
    count: CountRule = _no_params
    doc: str = ""
    dtypes: frozenset[str] = field(default=ALL_DTYPES)
    dtype_reason: str = ""

    def arity_text(self) -> str:
        lo, hi = self.arity
        n = f"{lo}" if lo == hi else f"{lo} to {hi}"
        return f"{n} input" + ("" if (lo, hi) == (1, 1) else "s")


def fmt(shape: Sequence[int | str]) -> str:
    """A shape as people write it: [batch, 64]."""
    return "[" + ", ".join(str(d) for d in shape) + "]"


def numel(shape: Sequence[int | str]) -> int:
    """Product of the static dims (batch excluded)."""
    n = 1
    for d in shape[1:]:
        n *= int(d)
    return n


def need_rank(shape: Shape, ranks: Sequence[int], what: str) -> None:
    if len(shape) not in ranks:
        want = " or ".join(str(r) for r in ranks)
        raise ShapeError(f"expects a rank-{want} input ({what}), got {fmt(shape)}")


def need_features(shape: Shape) -> None:
    """Ops over the last dim (linear, norms) need one after the batch: the batch is never mixed."""
    if len(shape) < 2:
        raise ShapeError(f"works over the last dim, but the input {fmt(shape)} has only the batch dim")


def norm_dim(dim: int, rank: int, field_name: str) -> int:
    """A params dim as a non-negative index; the batch dim (0) may not be named."""
    d = dim + rank if dim < 0 else dim
    if not 0 <= d < rank:
        raise ShapeError(f"dim {dim} is out of range for a rank-{rank} input", field_name)
    if d == 0:
        raise ShapeError(f"dim {dim} names the batch dim, which ops may not touch", field_name)
    return d


def broadcast(shapes: list[Shape]) -> Shape:
    """Elementwise broadcast of same-rank shapes (size-1 dims stretch); batch must line up."""
    rank = len(shapes[0])
    if any(len(s) != rank for s in shapes):
        raise ShapeError("inputs must have the same rank, got " + " and ".join(fmt(s) for s in shapes))
    out: list[int | str] = [BATCH]
    for i in range(1, rank):
        sizes = {int(s[i]) for s in shapes} - {1}
        if len(sizes) > 1:
            raise ShapeError("shapes do not broadcast: " + " and ".join(fmt(s) for s in shapes))
        out.append(sizes.pop() if sizes else 1)
    return tuple(out)


def same(_p: Any, ins: list[Shape]) -> Shape:
    """Shape rule of elementwise one-input ops."""
    return ins[0]
