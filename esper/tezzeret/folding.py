"""Batch norm folded into the convolution before it, in the programs a kernel is compiled from.

A kernel runs batch norm with its running statistics (eval semantics, see `esper.tezzeret.compile`),
so `bn(conv(x, W, b))` is one convolution: `conv(x, W s, (b - mean) s + beta)` per output channel with
`s = gamma / sqrt(var + eps)`. Traced that way, the forward loses a pass over the activation and the
backward its batch-norm reductions over it (gamma's and beta's gradients come from the convolution's
weight and bias gradients, a few hundred numbers), and the weights stay the Blueprint's own: same
parameters, same names, the folding recomputed from them at every call, so they still train. Eager
evaluation (the reference the kernel is validated and benchmarked against) is untouched.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from esper.blueprint.builder import BlueprintModule
from esper.blueprint.torch_ops import BatchNorm, Conv

CONVOLUTIONS = frozenset({"conv1d", "conv2d"})
# Folding rounds W s once more: measured, and within the compiler's tolerance, in float32 only.
FOLDED_DTYPES = frozenset({"float32"})


def foldable_pairs(module: BlueprintModule) -> dict[str, str]:
    """{batch-norm node: the convolution node it folds into}: in a float32 Blueprint, each convolution
    whose output only that batch norm reads (not another node, not a graph output)."""
    if module.graph.dtype not in FOLDED_DTYPES:
        return {}
    ops = {n.id: n.op for n in module.graph.nodes}
    readers: dict[str, list[str]] = {}
    for nid, refs in module.steps:
        for r in refs:
            readers.setdefault(r, []).append(nid)
    pairs = {}
    for nid, refs in module.steps:
        if ops[nid] != "batch_norm" or len(refs) != 1:
            continue
        (src,) = refs
        if ops.get(src) in CONVOLUTIONS and readers[src] == [nid] and src not in module.output_names:
            pairs[nid] = src
    return pairs


def conv_batch_norm(conv: Conv, bn: BatchNorm, x: Tensor) -> Tensor:
    """`bn(conv(x))` with running statistics, as one convolution with folded weight and bias."""
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        scale = bn.weight * scale
    shift = -bn.running_mean * scale
    if conv.bias is not None:
        shift = shift + conv.bias * scale
    if bn.bias is not None:
        shift = shift + bn.bias
    weight = conv.weight * scale.reshape(-1, *([1] * (conv.weight.dim() - 1)))
    return conv.conv(x, weight, shift, **conv.kw)


@contextlib.contextmanager
def folded_batch_norms(module: nn.Module) -> Iterator[dict[str, str]]:
    """Within it, `module` (a Blueprint module in eval mode) evaluates its foldable pairs folded;
    yields them. Any other module, or one in training mode, is left as it is.

    Each pair's convolution passes its input through (the batch norm is its only reader) and the batch
    norm runs the folded convolution on it: the module's own evaluation order and parameter lookup
    (`functional_call` swaps them in) are untouched."""
    pairs = foldable_pairs(module) if isinstance(module, BlueprintModule) and not module.training else {}
    patched: list[nn.Module] = []
    try:
        for bn_id, conv_id in pairs.items():
            conv, bn = getattr(module.nodes, conv_id), getattr(module.nodes, bn_id)
            vars(conv)["forward"] = _identity
            vars(bn)["forward"] = functools.partial(conv_batch_norm, conv, bn)
            patched += [conv, bn]
        yield pairs
    finally:
        for node in patched:  # their class's forward again
            del vars(node)["forward"]


def _identity(x: Tensor) -> Tensor:
    return x
