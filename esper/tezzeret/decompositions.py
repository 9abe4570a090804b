"""Decompositions the compiler traces a kernel's graphs with, where inductor's own CPU code is slow.

Exact GELU, `x Phi(x)`, and its input gradient, `g (Phi(x) + x phi(x))`. PyTorch decomposes them
into `erf(x / sqrt 2)` and `exp(-x^2 / 2)`; inductor's CPU code evaluates `erf` as Abramowitz-Stegun
7.1.26, which calls `exp` itself, and every `exp` is an out-of-line SLEEF call. So the backward paid
two SLEEF calls and a division per element: measured on 2 cores of an AMD EPYC (one thread, 512 x 128
floats, AVX2), inductor's `gelu_backward` took 1.3-2.6x as long as eager's, and at batch 512 the
residual MLP's compiled training step spent a fifth of its time in GELU.

Written out here: the same formula (same coefficients and error bound, |error| <= 1.5e-7 for erf)
with `exp(-x^2 / 2)` computed once and shared, since `erf(|x| / sqrt 2) = 1 - t r(t) exp(-x^2 / 2)`
with `t = 1 / (1 + p |x| / sqrt 2)`, and that `exp` evaluated inline as `2^n 2^f` (`n` the nearest
integer, `2^f` its degree-6 Taylor polynomial on [-1/2, 1/2], relative error about 1.2e-7, `2^n` built
in the float's exponent bits), which inductor fuses with the rest into one vectorized loop.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

aten = torch.ops.aten

# Abramowitz & Stegun 7.1.26, the coefficients of ATen's vectorized erf
_P = 0.3275911
_A = (0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429)
_P_SQRT1_2 = _P / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_LOG2E = 1.0 / math.log(2.0)
_EXP2_TAYLOR = tuple(math.log(2.0) ** k / math.factorial(k) for k in range(7))
_MIN_EXPONENT = -126.0  # of a normal float32; below it the result is flushed to 0


def exp_nonpositive(y: torch.Tensor) -> torch.Tensor:
    """e^y for float32 y <= 0 (0 below e^-87), from multiplications and the exponent bits only.

    Relative error below 1e-6 for y > -10, up to 4e-6 towards e^-87 (float32's rounding of y log2 e).
    """
    z = torch.clamp(y * _LOG2E, min=_MIN_EXPONENT)
    n = torch.round(z)
    f = z - n  # in [-1/2, 1/2]
    poly: Any = _EXP2_TAYLOR[-1]
    for c in reversed(_EXP2_TAYLOR[:-1]):
        poly = poly * f + c
    two_n = ((n.to(torch.int32) + 127) << 23).view(torch.float32)
    return torch.where(y * _LOG2E <= _MIN_EXPONENT, 0.0, poly * two_n)


def _normal_cdf_and_scaled_pdf(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Phi(x) and sqrt(2 pi) phi(x) = exp(-x^2 / 2), sharing that one exponential."""
    t = 1.0 / (1.0 + _P_SQRT1_2 * x.abs())
    poly = (((_A[4] * t + _A[3]) * t + _A[2]) * t + _A[1]) * t + _A[0]
    density = exp_nonpositive(-0.5 * x * x)
    erf_abs = 1.0 - t * poly * density  # erf(|x| / sqrt 2)
    return 0.5 * (1.0 + torch.where(x < 0, -erf_abs, erf_abs)), density


def _exact_float32(x: torch.Tensor, approximate: str) -> bool:
    return approximate == "none" and x.dtype == torch.float32


def gelu(x: torch.Tensor, approximate: str = "none") -> Any:
    """Exact float32 GELU; the tanh form and other dtypes are left to PyTorch."""
    if not _exact_float32(x, approximate):
        return NotImplemented
    return x * _normal_cdf_and_scaled_pdf(x)[0]


def gelu_backward(grad: torch.Tensor, x: torch.Tensor, approximate: str = "none") -> Any:
    """Exact float32 GELU's input gradient; the tanh form and other dtypes are left to PyTorch."""
    if not _exact_float32(x, approximate):
        return NotImplemented
    cdf, density = _normal_cdf_and_scaled_pdf(x)
    return grad * (cdf + x * density * _INV_SQRT_2PI)


TABLE: dict[Any, Callable[..., Any]] = {
    aten.gelu.default: gelu,
    aten.gelu_backward.default: gelu_backward,
}
"""What a CPU kernel's joint forward + backward graph is traced with, and its inference forward
rewritten with."""


def for_device(device: torch.device) -> dict[Any, Callable[..., Any]]:
    """TABLE for CPU code; nothing elsewhere (inductor's GPU code calls the device's own erf and exp,
    and was not measured against this)."""
    return TABLE if device.type == "cpu" else {}


def rewrite(
    table: dict[Any, Callable[..., Any]], program: torch.export.ExportedProgram
) -> torch.export.ExportedProgram:
    """The exported program with `table`'s ops decomposed; as it is (no retrace, ~0.5 s) without any."""
    if not any(n.op == "call_function" and n.target in table for n in program.graph.nodes):
        return program
    return program.run_decompositions(table)
