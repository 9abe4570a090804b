"""Numerical validation: the packages, loaded back as the trainer will load them, must match eager.

The inference forward's outputs, the training forward's outputs, and every gradient (inputs and
parameters) the training backward computes from the activations the training forward saved are
compared at each of `options.validateBatches`, because a kernel that is right forward but wrong
backward trains silently wrong. Any failure is permanent (exit 67): recompiling the same graph with
the same toolchain would produce the same kernel.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from esper.aoti import gather_saved, load_package
from esper.tezzeret.exitcodes import ValidationFailed

if TYPE_CHECKING:
    import torch

    from esper.contracts.common import CompileOptions
    from esper.tezzeret.compile import CompileResult


@dataclass(frozen=True)
class Tolerance:
    """Allowed error: |got - want| <= atol * max(1, max|want|) + rtol * |want|, elementwise.

    The atol term is scaled by the tensor's magnitude because parameter gradients are sums over the
    batch: their rounding error grows with their size even where an element cancels to near zero.
    """

    atol: float
    rtol: float

    def allowed(self, want: torch.Tensor) -> torch.Tensor:
        scale = max(1.0, float(want.abs().max())) if want.numel() else 1.0
        return self.atol * scale + self.rtol * want.abs()


TOLERANCES: dict[str, Tolerance] = {
    "float32": Tolerance(1e-4, 1e-4),
    "float16": Tolerance(1e-2, 1e-2),
    "bfloat16": Tolerance(5e-2, 5e-2),
}


def tolerance_for(dtype: str | Any) -> Tolerance:
    """Tolerance of a dtype given as "float16" or torch.float16; unknown dtypes get float32's."""
    name = str(dtype).removeprefix("torch.")
    return TOLERANCES.get(name, TOLERANCES["float32"])


@dataclass
class ValidationResult:
    """Largest errors seen (forward, gradients), the dtype's atol, and the batches checked."""

    max_abs_error: float = 0.0
    max_grad_error: float = 0.0
    tolerance: float = 0.0
    batches: tuple[int, ...] = ()


def compare(what: str, got: torch.Tensor, want: torch.Tensor, tol: Tolerance) -> float:
    """Max |got - want|; raise ValidationFailed naming `what` on shape mismatch, NaN/Inf or excess error."""
    import torch

    if got.shape != want.shape:
        raise ValidationFailed(f"{what}: compiled shape {tuple(got.shape)} != eager {tuple(want.shape)}")
    if not bool(torch.isfinite(want).all()):
        raise ValidationFailed(f"{what}: eager result has NaN/Inf (the graph itself is not finite here)")
    if not bool(torch.isfinite(got).all()):
        raise ValidationFailed(f"{what}: compiled result has NaN/Inf where eager is finite")
    g, w = got.double(), want.double()
    diff = (g - w).abs()
    err = float(diff.max()) if diff.numel() else 0.0
    excess = diff - tol.allowed(w)
    if diff.numel() and float(excess.max()) > 0:
        i = int(excess.argmax())
        raise ValidationFailed(
            f"{what}: max abs error {err:.3g} exceeds tolerance (atol {tol.atol:g} x max(1,|eager|max)"
            f" + rtol {tol.rtol:g} x |eager|); worst element {i}: compiled {float(g.flatten()[i]):.6g}"
            f" vs eager {float(w.flatten()[i]):.6g}"
        )
    return err


class Packages(NamedTuple):
    """A bundle's three packages: inference forward, training forward, training backward."""

    forward: Callable[..., Any]
    train_forward: Callable[..., Any]
    train_backward: Callable[..., Any]


def load_packages(forward: Path, train_forward: Path, train_backward: Path) -> Packages:
    """Load the three packages the way the runtime does (native code: verify the bundle first)."""
    return Packages(*(load_package(p) for p in (forward, train_forward, train_backward)))


def load_result_packages(result: CompileResult) -> Packages:
    """The packages `compile_module` wrote."""
    return load_packages(result.forward_path, result.train_forward_path, result.train_backward_path)


def train_step(
    result: CompileResult, packages: Packages, xs: Sequence[torch.Tensor], gs: Sequence[torch.Tensor]
) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """A compiled training step as the runtime runs it: outputs, then gradients of (inputs..., params...)."""
    params = tuple(result.params)
    res = packages.train_forward(*xs, params)
    n_out = result.num_outputs
    outs, acts = tuple(res[:n_out]), res[n_out:]
    saved = gather_saved(result.saved, xs, outs, acts)
    return outs, tuple(packages.train_backward(*saved, *gs, params))


def eager_step(
    result: CompileResult, xs: Sequence[torch.Tensor], gs: Sequence[torch.Tensor]
) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """Eager reference: outputs, then gradients of (inputs..., params...) via autograd."""
    import torch
    from torch.func import functional_call

    names = [p.name for p in result.param_specs]
    xr = [x.detach().clone().requires_grad_(True) for x in xs]
    pr = [p.detach().clone().requires_grad_(True) for p in result.params]
    with torch.enable_grad():
        out = functional_call(result.module, dict(zip(names, pr, strict=True)), tuple(xr))
        outs = tuple(out) if isinstance(out, (tuple, list)) else (out,)
        grads = torch.autograd.grad(outs, [*xr, *pr], list(gs), allow_unused=True, materialize_grads=True)
    return tuple(o.detach() for o in outs), tuple(grads)


def validate(
    result: CompileResult,
    options: CompileOptions,
    packages: Packages | None = None,
) -> ValidationResult:
    """Compare loaded packages with eager at each validate batch; raise ValidationFailed (67) on any miss."""
    import torch

    from esper.tezzeret.compile import sample_inputs

    packages = packages or load_result_packages(result)
    fwd = packages.forward
    device = result.params[0].device if result.params else torch.device("cpu")
    dtype = result.input_specs[0].dtype
    tol = tolerance_for(dtype)
    batches = tuple(b for b in options.validateBatches if b <= options.maxBatch) or (options.maxBatch,)
    names = [f"input {s.name}" for s in result.input_specs] + [f"param {p.name}" for p in result.param_specs]
    out = ValidationResult(tolerance=tol.atol, batches=batches)
    params = tuple(result.params)
    for i, b in enumerate(batches):
        xs = sample_inputs(result.input_specs, b, device, seed=1000 + i)
        with torch.no_grad():
            got = fwd(*xs, params)
        got_out = tuple(got) if isinstance(got, (tuple, list)) else (got,)
        gen = torch.Generator().manual_seed(2000 + i)
        gs = [torch.randn(o.shape, generator=gen).to(o) for o in got_out]
        want_out, want_grads = eager_step(result, xs, gs)
        if len(got_out) != len(want_out):
            raise ValidationFailed(f"batch {b}: compiled gives {len(got_out)} outputs, eager {len(want_out)}")
        for k, (g, w) in enumerate(zip(got_out, want_out, strict=True)):
            err = compare(f"batch {b}: forward output {k}", g, w, tol)
            out.max_abs_error = max(out.max_abs_error, err)
        with torch.no_grad():
            train_out, got_grads = train_step(result, packages, xs, gs)
        for k, (g, w) in enumerate(zip(train_out, want_out, strict=True)):
            err = compare(f"batch {b}: training forward output {k}", g, w, tol)
            out.max_abs_error = max(out.max_abs_error, err)
        if len(got_grads) != len(want_grads):
            raise ValidationFailed(
                f"batch {b}: compiled backward gives {len(got_grads)} gradients, expected {len(want_grads)}"
            )
        for name, g, w in zip(names, got_grads, want_grads, strict=True):
            err = compare(f"batch {b}: gradient of {name}", g, w, tol)
            out.max_grad_error = max(out.max_grad_error, err)
    if not (math.isfinite(out.max_abs_error) and math.isfinite(out.max_grad_error)):
        raise ValidationFailed("validation produced a non-finite error")
    return out
