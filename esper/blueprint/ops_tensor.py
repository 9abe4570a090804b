"""Parameter-free ops: activations, elementwise arithmetic, shape manipulation, reductions."""

from __future__ import annotations

import math
from typing import Annotated, Literal

from pydantic import Field, field_validator

from esper.blueprint.ir import BATCH
from esper.blueprint.opdef import (
    DimIndex,
    NoParams,
    OpDef,
    Params,
    Prob,
    Shape,
    ShapeError,
    broadcast,
    fmt,
    norm_dim,
    numel,
    same,
)


class GeluParams(Params):
    approximate: Literal["none", "tanh"] = "none"


class DropoutParams(Params):
    p: Prob = 0.1


class ScaleParams(Params):
    value: float = Field(ge=-1e6, le=1e6, allow_inf_nan=False, description="The constant factor.")


def _elementwise(_p: NoParams, ins: list[Shape]) -> Shape:
    return broadcast(ins)


class ConcatParams(Params):
    dim: DimIndex = -1


def _concat_shape(p: ConcatParams, ins: list[Shape]) -> Shape:
    rank = len(ins[0])
    if any(len(s) != rank for s in ins):
        raise ShapeError("inputs must have the same rank, got " + " and ".join(fmt(s) for s in ins))
    d = norm_dim(p.dim, rank, "dim")
    for i in range(1, rank):
        if i != d and len({s[i] for s in ins}) > 1:
            raise ShapeError(f"inputs differ outside dim {d}: " + " and ".join(fmt(s) for s in ins))
    out = list(ins[0])
    out[d] = sum(int(s[d]) for s in ins)
    return tuple(out)


SizeOrInfer = Annotated[int, Field(ge=-1, le=65536)]


class ReshapeParams(Params):
    shape: list[SizeOrInfer] = Field(
        min_length=1, max_length=4, description="The new shape after the batch dim; one entry may be -1."
    )

    @field_validator("shape")
    @classmethod
    def _check(cls, v: list[int]) -> list[int]:
        if 0 in v:
            raise ValueError("sizes must be positive (or -1 once)")
        if v.count(-1) > 1:
            raise ValueError("at most one size may be -1")
        return v


def _reshape_shape(p: ReshapeParams, ins: list[Shape]) -> Shape:
    total = numel(ins[0])
    known = math.prod(d for d in p.shape if d != -1)
    if -1 in p.shape:
        if total % known:
            raise ShapeError(f"cannot reshape {fmt(ins[0])} to [batch, {p.shape}]", "shape")
        resolved = [total // known if d == -1 else d for d in p.shape]
    else:
        resolved = list(p.shape)
    if math.prod(resolved) != total:
        raise ShapeError(
            f"cannot reshape {fmt(ins[0])} ({total} per sample) to {fmt([BATCH, *resolved])}", "shape"
        )
    return (BATCH, *resolved)


class FlattenParams(Params):
    startDim: DimIndex = 1
    endDim: DimIndex = -1


def _flatten_shape(p: FlattenParams, ins: list[Shape]) -> Shape:
    x = ins[0]
    s = norm_dim(p.startDim, len(x), "startDim")
    e = norm_dim(p.endDim, len(x), "endDim")
    if s > e:
        raise ShapeError(f"startDim {p.startDim} comes after endDim {p.endDim} for {fmt(x)}", "startDim")
    return (*x[:s], numel((BATCH, *x[s : e + 1])), *x[e + 1 :])


class TransposeParams(Params):
    dim0: DimIndex = -2
    dim1: DimIndex = -1


def _transpose_shape(p: TransposeParams, ins: list[Shape]) -> Shape:
    x = list(ins[0])
    a, b = norm_dim(p.dim0, len(x), "dim0"), norm_dim(p.dim1, len(x), "dim1")
    x[a], x[b] = x[b], x[a]
    return tuple(x)


def _matmul_shape(_p: NoParams, ins: list[Shape]) -> Shape:
    a, b = ins
    if len(a) != len(b) or len(a) < 3:
        raise ShapeError(f"expects two inputs of the same rank >= 3, got {fmt(a)} and {fmt(b)}")
    if a[-1] != b[-2]:
        raise ShapeError(f"inner sizes differ: {fmt(a)} @ {fmt(b)} ({a[-1]} != {b[-2]})")
    lead = broadcast([a[:-2], b[:-2]])
    return (*lead, a[-2], b[-1])


class SoftmaxParams(Params):
    dim: DimIndex = -1


def _softmax_shape(p: SoftmaxParams, ins: list[Shape]) -> Shape:
    norm_dim(p.dim, len(ins[0]), "dim")
    return ins[0]


class MeanParams(Params):
    dims: list[DimIndex] = Field(default_factory=lambda: [-1], min_length=1, max_length=4)
    keepdim: bool = False


def _mean_shape(p: MeanParams, ins: list[Shape]) -> Shape:
    x = ins[0]
    ds = [norm_dim(d, len(x), "dims") for d in p.dims]
    if len(set(ds)) != len(ds):
        raise ShapeError(f"dims {p.dims} name the same dim twice", "dims")
    if p.keepdim:
        return tuple(1 if i in ds else d for i, d in enumerate(x))
    return tuple(d for i, d in enumerate(x) if i not in ds)


TENSOR_OPS: list[OpDef] = [
    OpDef("relu", NoParams, (1, 1), same, doc="max(x, 0)."),
    OpDef("gelu", GeluParams, (1, 1), same, doc="Gaussian error linear unit."),
    OpDef("silu", NoParams, (1, 1), same, doc="x * sigmoid(x) (swish)."),
    OpDef("tanh", NoParams, (1, 1), same, doc="Hyperbolic tangent."),
    OpDef("sigmoid", NoParams, (1, 1), same, doc="Logistic sigmoid."),
    OpDef("dropout", DropoutParams, (1, 1), same, doc="Zeroes elements with probability p in training."),
    OpDef("identity", NoParams, (1, 1), same, doc="Returns its input."),
    OpDef("scale", ScaleParams, (1, 1), same, doc="Multiplies by a constant."),
    OpDef("add", NoParams, (2, 2), _elementwise, doc="Elementwise sum (size-1 dims broadcast)."),
    OpDef("mul", NoParams, (2, 2), _elementwise, doc="Elementwise product (size-1 dims broadcast)."),
    OpDef("concat", ConcatParams, (2, 4), _concat_shape, doc="Concatenates along dim."),
    OpDef("reshape", ReshapeParams, (1, 1), _reshape_shape, doc="Reshapes the non-batch dims."),
    OpDef("flatten", FlattenParams, (1, 1), _flatten_shape, doc="Merges dims startDim..endDim."),
    OpDef("transpose", TransposeParams, (1, 1), _transpose_shape, doc="Swaps two non-batch dims."),
    OpDef("matmul", NoParams, (2, 2), _matmul_shape, doc="Batched matrix product."),
    OpDef("softmax", SoftmaxParams, (1, 1), _softmax_shape, doc="Softmax along dim."),
    OpDef("mean", MeanParams, (1, 1), _mean_shape, doc="Mean over dims (optionally keeping them)."),
]
