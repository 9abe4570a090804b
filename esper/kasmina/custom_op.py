"""A compiled kernel's call as a PyTorch custom op, so `torch.compile` traces through seeds.

Dynamo cannot look into an AOTInductor package (a native runner object): left alone, every kernel
call is a graph break. Under `torch.compile` (`torch.compiler.is_compiling()`), `KernelModule.forward`
calls `esper::kernel_forward` instead: an opaque op with a fake implementation (output shapes from the
manifest, named dims bound from the inputs) and an autograd formula that calls `esper::kernel_backward`
(the backward package). The guard (`KernelModule._match`) still runs first, traced, so the compiled
graph carries the shape checks as guards.

Eager calls do not go through here (the autograd Functions in kernel.py are cheaper per call). Under
compile the backward recomputes the forward (a v2 bundle's training forward, then its backward on
the tensors that forward saves): activations do not cross the op boundary. A kernel
is named in the graph by a string handle into a registry of live kernels (weak: a culled kernel is
not kept alive by a compiled graph; calling a graph whose kernel has gone raises).
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from esper.kasmina.kernel import KernelModule

_kernels: weakref.WeakValueDictionary[str, KernelModule] = weakref.WeakValueDictionary()
_handles = itertools.count(1)


def register(kernel: KernelModule) -> str:
    """A new handle for `kernel` (a string: dynamo keeps it a constant of the graph). Called when the
    kernel is built, never while tracing."""
    h = f"{kernel.kernel_key[:16]}-{next(_handles)}"
    _kernels[h] = kernel
    return h


def _kernel(handle: str) -> KernelModule:
    k = _kernels.get(handle)
    if k is None:
        raise RuntimeError(f"esper kernel handle {handle} is gone (the seed was culled or freed)")
    return k


def _as_list(out: Any) -> list[torch.Tensor]:
    return list(out) if isinstance(out, tuple | list) else [out]


@torch.library.custom_op("esper::kernel_forward", mutates_args=())
def kernel_forward(handle: str, inputs: list[torch.Tensor], params: list[torch.Tensor]) -> list[torch.Tensor]:
    """The forward package on checked inputs; one tensor per kernel output."""
    return _as_list(_kernel(handle).forward_runner(*inputs, tuple(params)))


@kernel_forward.register_fake
def _(handle: str, inputs: list[torch.Tensor], params: list[torch.Tensor]) -> list[torch.Tensor]:
    k = _kernel(handle)
    bound: dict[str, Any] = {}
    for x, shape in zip(inputs, k.input_shapes, strict=True):
        for n, d in zip(x.shape, shape, strict=True):
            if isinstance(d, str):
                bound.setdefault(d, n)
    outs = []
    for shape, e in zip(k.output_shapes, k._out_expects, strict=True):
        dims = [d if isinstance(d, int) else bound[d] for d in shape]
        outs.append(inputs[0].new_empty(dims, dtype=e.dtype))
    return outs


@torch.library.custom_op("esper::kernel_backward", mutates_args=())
def kernel_backward(
    handle: str, inputs: list[torch.Tensor], grads: list[torch.Tensor], params: list[torch.Tensor]
) -> list[torch.Tensor]:
    """The backward package: gradients of every input, then of every parameter."""
    k = _kernel(handle)
    bound: dict[str, int] = {}
    k._match(inputs, k._in_expects, bound)
    gs = k._match(grads, k._out_expects, bound)
    if k.train_forward_runner is None:  # format v1: the backward package recomputes the forward
        out = k.backward_runner(*inputs, *gs, tuple(params))
    else:  # format v2: recompute the training forward here, then the backward on what it saves
        from esper.aoti import gather_saved

        res = _as_list(k.train_forward_runner(*inputs, tuple(params)))
        outs, acts = res[: k.n_outputs], res[k.n_outputs :]
        out = k.backward_runner(*gather_saved(k.saved, inputs, outs, acts), *gs, tuple(params))
    return [g.contiguous() for g in _as_list(out)]


@kernel_backward.register_fake
def _(
    handle: str, inputs: list[torch.Tensor], grads: list[torch.Tensor], params: list[torch.Tensor]
) -> list[torch.Tensor]:
    return [torch.empty_like(t) for t in [*inputs, *params]]


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    handle, xs, params = inputs
    ctx.handle, ctx.n_inputs = handle, len(xs)
    ctx.out_meta = [(o.shape, o.dtype, o.device) for o in output]
    ctx.save_for_backward(*xs, *params)


Grads = list[torch.Tensor]


def _backward(ctx: Any, grads: Sequence[torch.Tensor | None]) -> tuple[None, Grads, Grads]:
    saved = ctx.saved_tensors
    xs, params = list(saved[: ctx.n_inputs]), list(saved[ctx.n_inputs :])
    gs = [
        torch.zeros(shape, dtype=dtype, device=device) if g is None else g.contiguous()
        for g, (shape, dtype, device) in zip(grads, ctx.out_meta, strict=True)
    ]
    out = torch.ops.esper.kernel_backward(ctx.handle, xs, gs, params)
    return None, list(out[: ctx.n_inputs]), list(out[ctx.n_inputs :])


kernel_forward.register_autograd(_backward, setup_context=_setup_context)


def compiled_call(kernel: KernelModule, inputs: Sequence[torch.Tensor]) -> Any:
    """`kernel(*inputs)` as the custom op (checked by the kernel's guard first)."""
    if len(inputs) != kernel.n_inputs:
        raise kernel._error(f"takes {kernel.n_inputs} input(s), got {len(inputs)}", "InputCount")
    if kernel._in_expects:
        inputs = kernel._match(inputs, kernel._in_expects, {})
    params = list(kernel._modules["params"]._parameters.values())  # type: ignore[union-attr]
    outs = torch.ops.esper.kernel_forward(kernel.op_handle, list(inputs), params)
    return outs[0] if len(outs) == 1 else tuple(outs)
