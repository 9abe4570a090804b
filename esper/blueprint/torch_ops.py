"""Torch modules of the ops (imported only by the builder: the rest of the package is torch-free).

Parameters are created in a fixed order and initialized from the caller's generator, never the global
RNG, so the same graph and seed give bit-identical parameters. Forward code uses no Python control flow
on the batch size, so modules export with a dynamic batch dim.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from esper.blueprint.opdef import Params, Shape
from esper.blueprint.ops_nn import (
    AdaptivePoolParams,
    AttentionParams,
    BatchNormParams,
    ConvParams,
    LayerNormParams,
    LinearParams,
    PoolParams,
    RMSNormParams,
)
from esper.blueprint.ops_tensor import (
    ConcatParams,
    DropoutParams,
    FlattenParams,
    GeluParams,
    MeanParams,
    ReshapeParams,
    ScaleParams,
    SoftmaxParams,
    TransposeParams,
)
from esper.blueprint.ops_tensor import _reshape_shape as reshape_shape


def _uniform(shape: tuple[int, ...], bound: float, gen: torch.Generator) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape).uniform_(-bound, bound, generator=gen))


def _const(shape: tuple[int, ...], value: float) -> nn.Parameter:
    return nn.Parameter(torch.full(shape, value))


class Fn(nn.Module):
    """A parameter-free op: a function of the inputs."""

    def __init__(self, fn: Callable[..., Tensor], name: str) -> None:
        super().__init__()
        self.fn = fn
        self.name = name

    def forward(self, *xs: Tensor) -> Tensor:
        return self.fn(*xs)

    def extra_repr(self) -> str:
        return self.name


class Linear(nn.Module):
    def __init__(self, p: LinearParams, ins: list[Shape], gen: torch.Generator) -> None:
        super().__init__()
        n_in = int(ins[0][-1])
        bound = 0.0 if p.init == "zeros" else 1 / math.sqrt(n_in)
        self.weight = _uniform((p.outFeatures, n_in), bound, gen)
        self.bias = _uniform((p.outFeatures,), bound, gen) if p.bias else None

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)


class Conv(nn.Module):
    def __init__(self, p: ConvParams, ins: list[Shape], gen: torch.Generator, spatial: int) -> None:
        super().__init__()
        per_group = int(ins[0][1]) // p.groups
        fan_in = per_group * p.kernelSize**spatial
        bound = 0.0 if p.init == "zeros" else 1 / math.sqrt(fan_in)
        self.weight = _uniform((p.outChannels, per_group) + (p.kernelSize,) * spatial, bound, gen)
        self.bias = _uniform((p.outChannels,), bound, gen) if p.bias else None
        self.conv = F.conv1d if spatial == 1 else F.conv2d
        self.kw: dict[str, Any] = {
            "stride": p.stride,
            "padding": p.padding,
            "dilation": p.dilation,
            "groups": p.groups,
        }

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x, self.weight, self.bias, **self.kw)


class BatchNorm(nn.Module):
    running_mean: Tensor
    running_var: Tensor

    def __init__(self, p: BatchNormParams, ins: list[Shape], gen: torch.Generator) -> None:
        super().__init__()
        c = int(ins[0][1])
        self.weight = _const((c,), 1.0) if p.affine else None
        self.bias = _const((c,), 0.0) if p.affine else None
        self.register_buffer("running_mean", torch.zeros(c))
        self.register_buffer("running_var", torch.ones(c))
        self.eps, self.momentum = p.eps, p.momentum

    def forward(self, x: Tensor) -> Tensor:
        return F.batch_norm(
            x,
            self.running_mean,
            self.running_var,
            self.weight,
            self.bias,
            self.training,
            self.momentum,
            self.eps,
        )


class LayerNorm(nn.Module):
    def __init__(self, p: LayerNormParams, ins: list[Shape], gen: torch.Generator) -> None:
        super().__init__()
        n = int(ins[0][-1])
        self.shape = (n,)
        self.weight = _const(self.shape, 1.0) if p.elementwiseAffine else None
        self.bias = _const(self.shape, 0.0) if p.elementwiseAffine and p.bias else None
        self.eps = p.eps

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, self.shape, self.weight, self.bias, self.eps)


class RMSNorm(nn.Module):
    def __init__(self, p: RMSNormParams, ins: list[Shape], gen: torch.Generator) -> None:
        super().__init__()
        self.shape = (int(ins[0][-1]),)
        self.weight = _const(self.shape, 1.0) if p.elementwiseAffine else None
        self.eps = p.eps

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, self.shape, self.weight, self.eps)


class SelfAttention(nn.Module):
    """Fused qkv projection and scaled dot-product attention; the seq and head sizes are static."""

    def __init__(self, p: AttentionParams, ins: list[Shape], gen: torch.Generator) -> None:
        super().__init__()
        _, seq, embed = (int(d) if d != "batch" else 0 for d in ins[0])
        self.seq, self.embed, self.heads, self.causal = seq, embed, p.heads, p.causal
        bound = math.sqrt(6 / (4 * embed))  # xavier-uniform over the fused [3E, E] matrix
        self.in_proj_weight = _uniform((3 * embed, embed), bound, gen)
        self.in_proj_bias = _const((3 * embed,), 0.0) if p.bias else None
        self.out_proj_weight = _uniform((embed, embed), 1 / math.sqrt(embed), gen)
        self.out_proj_bias = _const((embed,), 0.0) if p.bias else None

    def forward(self, x: Tensor) -> Tensor:
        b = x.shape[0]
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        qkv = qkv.reshape(b, self.seq, 3, self.heads, self.embed // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], is_causal=self.causal)
        out = out.transpose(1, 2).reshape(b, self.seq, self.embed)
        return F.linear(out, self.out_proj_weight, self.out_proj_bias)


class Dropout(nn.Module):
    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        return F.dropout(x, self.p, self.training)


def _dim(d: int, rank: int) -> int:
    return d + rank if d < 0 else d


def _reshape(p: ReshapeParams, ins: list[Shape]) -> Fn:
    sizes = [int(d) for d in reshape_shape(p, ins)[1:]]
    return Fn(lambda x: x.reshape(x.shape[0], *sizes), f"shape=[batch, {sizes}]")


def _fn(fn: Callable[..., Tensor], name: str) -> Callable[[Params, list[Shape], torch.Generator], nn.Module]:
    return lambda p, ins, gen: Fn(fn, name)


Builder = Callable[[Any, list[Shape], torch.Generator], nn.Module]

BUILDERS: dict[str, Builder] = {
    "linear": Linear,
    "conv1d": lambda p, ins, gen: Conv(p, ins, gen, 1),
    "conv2d": lambda p, ins, gen: Conv(p, ins, gen, 2),
    "batch_norm": BatchNorm,
    "layer_norm": LayerNorm,
    "rms_norm": RMSNorm,
    "multihead_attention": SelfAttention,
    "avg_pool2d": lambda p, ins, gen: _pool(F.avg_pool2d, p),
    "max_pool2d": lambda p, ins, gen: _pool(F.max_pool2d, p),
    "adaptive_avg_pool2d": lambda p, ins, gen: _adaptive(p),
    "relu": _fn(F.relu, "relu"),
    "gelu": lambda p, ins, gen: _gelu(p),
    "silu": _fn(F.silu, "silu"),
    "tanh": _fn(torch.tanh, "tanh"),
    "sigmoid": _fn(torch.sigmoid, "sigmoid"),
    "dropout": lambda p, ins, gen: _dropout(p),
    "identity": _fn(lambda x: x, "identity"),
    "scale": lambda p, ins, gen: _scale(p),
    "add": _fn(torch.add, "add"),
    "mul": _fn(torch.mul, "mul"),
    "concat": lambda p, ins, gen: _concat(p, len(ins[0])),
    "reshape": lambda p, ins, gen: _reshape(p, ins),
    "flatten": lambda p, ins, gen: _flatten(p, len(ins[0])),
    "transpose": lambda p, ins, gen: _transpose(p, len(ins[0])),
    "matmul": _fn(torch.matmul, "matmul"),
    "softmax": lambda p, ins, gen: _softmax(p),
    "mean": lambda p, ins, gen: _mean(p, len(ins[0])),
}


def _pool(fn: Callable[..., Tensor], p: PoolParams) -> Fn:
    return Fn(lambda x: fn(x, p.kernelSize, p.stride, p.padding), f"k={p.kernelSize}, s={p.stride}")


def _adaptive(p: AdaptivePoolParams) -> Fn:
    size = (p.outputSize[0], p.outputSize[1])
    return Fn(lambda x: F.adaptive_avg_pool2d(x, size), f"size={size}")


def _gelu(p: GeluParams) -> Fn:
    return Fn(lambda x: F.gelu(x, approximate=p.approximate), f"approximate={p.approximate}")


def _dropout(p: DropoutParams) -> nn.Module:
    return Dropout(p.p)


def _scale(p: ScaleParams) -> Fn:
    v = float(p.value)
    return Fn(lambda x: x * v, f"value={v}")


def _concat(p: ConcatParams, rank: int) -> Fn:
    d = _dim(p.dim, rank)
    return Fn(lambda *xs: torch.cat(xs, dim=d), f"dim={d}")


def _flatten(p: FlattenParams, rank: int) -> Fn:
    s, e = _dim(p.startDim, rank), _dim(p.endDim, rank)
    return Fn(lambda x: x.flatten(s, e), f"start={s}, end={e}")


def _transpose(p: TransposeParams, rank: int) -> Fn:
    a, b = _dim(p.dim0, rank), _dim(p.dim1, rank)
    return Fn(lambda x: x.transpose(a, b), f"{a}, {b}")


def _softmax(p: SoftmaxParams) -> Fn:
    return Fn(lambda x: F.softmax(x, dim=p.dim), f"dim={p.dim}")


def _mean(p: MeanParams, rank: int) -> Fn:
    dims = [_dim(d, rank) for d in p.dims]
    return Fn(lambda x: x.mean(dim=dims, keepdim=p.keepdim), f"dims={dims}, keepdim={p.keepdim}")
