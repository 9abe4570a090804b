"""Ops with weights or windows: linear, convolutions, norms, attention, pooling (pure-Python rules)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from esper.blueprint.ir import BATCH
from esper.blueprint.opdef import (
    CountRule,
    Eps,
    FieldError,
    KernelSize,
    OpDef,
    Params,
    Shape,
    ShapeError,
    ShapeRule,
    Size,
    Stride,
    fmt,
    need_features,
    need_rank,
)

Init = Literal["default", "zeros"]


class LinearParams(Params):
    outFeatures: Size
    bias: bool = True
    init: Init = Field(default="default", description="'zeros' starts the layer at 0 (e.g. LoRA's B).")


def _linear_shape(p: LinearParams, ins: list[Shape]) -> Shape:
    need_features(ins[0])
    return (*ins[0][:-1], p.outFeatures)


def _linear_count(p: LinearParams, ins: list[Shape]) -> int:
    return int(ins[0][-1]) * p.outFeatures + (p.outFeatures if p.bias else 0)


class ConvParams(Params):
    outChannels: Size
    kernelSize: KernelSize = 3
    stride: Stride = 1
    padding: int | Literal["same"] = Field(default=0, description="0..15 or 'same' (stride 1 only).")
    dilation: Stride = 1
    groups: Size = 1
    bias: bool = True
    init: Init = "default"

    @model_validator(mode="after")
    def _check(self) -> ConvParams:
        if self.padding == "same" and self.stride != 1:
            raise FieldError("padding", "'same' needs stride 1")
        if isinstance(self.padding, int) and not 0 <= self.padding <= 15:
            raise FieldError("padding", "must be 0..15 or 'same'")
        if self.outChannels % self.groups:
            raise FieldError("groups", f"must divide outChannels ({self.outChannels})")
        return self


def _conv_out(size: int, p: ConvParams) -> int:
    if p.padding == "same":
        return size
    return (size + 2 * int(p.padding) - p.dilation * (p.kernelSize - 1) - 1) // p.stride + 1


def _conv_shape(spatial: int) -> ShapeRule:
    def rule(p: ConvParams, ins: list[Shape]) -> Shape:
        x = ins[0]
        need_rank(x, [2 + spatial], "[batch, channels, length]" if spatial == 1 else "[batch, C, H, W]")
        if int(x[1]) % p.groups:
            raise ShapeError(f"groups {p.groups} must divide the input channels {x[1]}", "groups")
        out = [_conv_out(int(d), p) for d in x[2:]]
        if min(out) < 1:
            msg = f"kernelSize {p.kernelSize} is larger than the padded input {fmt(x)}"
            raise ShapeError(msg, "kernelSize")
        return (BATCH, p.outChannels, *out)

    return rule


def _conv_count(spatial: int) -> CountRule:
    def rule(p: ConvParams, ins: list[Shape]) -> int:
        per = int(ins[0][1]) // p.groups * p.kernelSize**spatial
        return p.outChannels * per + (p.outChannels if p.bias else 0)

    return rule


class BatchNormParams(Params):
    eps: Eps = 1e-5
    momentum: float = Field(default=0.1, ge=0, le=1)
    affine: bool = True


def _last_dim_shape(p: Params, ins: list[Shape]) -> Shape:
    need_features(ins[0])
    return ins[0]


def _bn_count(p: BatchNormParams, ins: list[Shape]) -> int:
    return 2 * int(ins[0][1]) if p.affine else 0


class LayerNormParams(Params):
    eps: Eps = 1e-5
    elementwiseAffine: bool = True
    bias: bool = True


def _ln_count(p: LayerNormParams, ins: list[Shape]) -> int:
    if not p.elementwiseAffine:
        return 0
    return int(ins[0][-1]) * (2 if p.bias else 1)


class RMSNormParams(Params):
    eps: Eps = 1e-6
    elementwiseAffine: bool = True


def _rms_count(p: RMSNormParams, ins: list[Shape]) -> int:
    return int(ins[0][-1]) if p.elementwiseAffine else 0


class AttentionParams(Params):
    heads: Annotated[int, Field(ge=1, le=256)] = 1
    bias: bool = True
    causal: bool = False


def _attn_shape(p: AttentionParams, ins: list[Shape]) -> Shape:
    x = ins[0]
    need_rank(x, [3], "[batch, seq, embed]")
    if int(x[2]) % p.heads:
        raise ShapeError(f"heads {p.heads} must divide the embed size {x[2]}", "heads")
    return x


def _attn_count(p: AttentionParams, ins: list[Shape]) -> int:
    e = int(ins[0][2])
    return 4 * e * e + (4 * e if p.bias else 0)


class PoolParams(Params):
    kernelSize: KernelSize = 2
    stride: Stride | None = Field(default=None, description="Defaults to kernelSize.")
    padding: int = Field(default=0, ge=0, le=7)

    @model_validator(mode="after")
    def _check(self) -> PoolParams:
        if self.stride is None:
            self.stride = self.kernelSize
        if self.padding > self.kernelSize // 2:
            raise FieldError("padding", f"must be at most half the kernelSize ({self.kernelSize // 2})")
        return self


def _pool_shape(p: PoolParams, ins: list[Shape]) -> Shape:
    x = ins[0]
    need_rank(x, [4], "[batch, channels, height, width]")
    stride = p.stride or p.kernelSize
    out = [(int(d) + 2 * p.padding - p.kernelSize) // stride + 1 for d in x[2:]]
    if min(out) < 1:
        raise ShapeError(f"kernelSize {p.kernelSize} is larger than the padded input {fmt(x)}", "kernelSize")
    return (BATCH, x[1], *out)


class AdaptivePoolParams(Params):
    outputSize: list[Size] = Field(default_factory=lambda: [1, 1], min_length=2, max_length=2)


def _adaptive_shape(p: AdaptivePoolParams, ins: list[Shape]) -> Shape:
    x = ins[0]
    need_rank(x, [4], "[batch, channels, height, width]")
    return (BATCH, x[1], *p.outputSize)


def _bn_shape(p: BatchNormParams, ins: list[Shape]) -> Shape:
    need_rank(ins[0], [2, 3, 4, 5], "[batch, channels, ...]")
    return ins[0]


NN_OPS: list[OpDef] = [
    OpDef("linear", LinearParams, (1, 1), _linear_shape, _linear_count, "y = x W^T + b over the last dim."),
    OpDef("conv1d", ConvParams, (1, 1), _conv_shape(1), _conv_count(1), "1-d convolution of [batch, C, L]"),
    OpDef("conv2d", ConvParams, (1, 1), _conv_shape(2), _conv_count(2), "2-d convolution, [batch, C, H, W]"),
    OpDef(
        "batch_norm",
        BatchNormParams,
        (1, 1),
        _bn_shape,
        _bn_count,
        "Batch norm over dim 1 (channels), with running statistics.",
        dtypes=frozenset({"float32", "bfloat16"}),
        dtype_reason="its running variance loses range in float16; use float32 or bfloat16",
    ),
    OpDef("layer_norm", LayerNormParams, (1, 1), _last_dim_shape, _ln_count, "Layer norm over the last dim."),
    OpDef("rms_norm", RMSNormParams, (1, 1), _last_dim_shape, _rms_count, "RMS norm over the last dim."),
    OpDef(
        "multihead_attention",
        AttentionParams,
        (1, 1),
        _attn_shape,
        _attn_count,
        "Self-attention over [batch, seq, embed] (fused qkv projection, scaled dot product).",
    ),
    OpDef("avg_pool2d", PoolParams, (1, 1), _pool_shape, doc="Average pooling of [batch, C, H, W]."),
    OpDef("max_pool2d", PoolParams, (1, 1), _pool_shape, doc="Max pooling of [batch, C, H, W]."),
    OpDef(
        "adaptive_avg_pool2d",
        AdaptivePoolParams,
        (1, 1),
        _adaptive_shape,
        doc="Average pooling of [batch, C, H, W] to a fixed outputSize.",
    ),
]
