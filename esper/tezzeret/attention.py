"""Which algorithm a compiled kernel's scaled dot-product attention uses on CPU.

Eager PyTorch runs `F.scaled_dot_product_attention` with its CPU flash kernel, and a program traced
as is keeps that kernel as an opaque call. Over a few positions the math form (two matmuls and a
softmax, which inductor fuses with the scaling and its backward) is faster; over many, flash is.
Measured on 2 cores of an AMD EPYC (one thread, `cpu-avx512`, embed 64, 4 heads), the compiled
attention block's training step over eager's: 1.55x with math against 1.28x with flash at 16
positions, 1.33x against 1.25x at 32, 1.38x against 1.33x at 64 (its forward slower), 1.02x against
1.26x at 128. So a CPU kernel whose every attention spans at most `MATH_MAX_POSITIONS` is compiled
with the math form; eager, the baseline and the reference, is untouched.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode

MATH_MAX_POSITIONS = 32


class AttentionLengths(TorchFunctionMode):
    """Records the query and key lengths of every scaled dot-product attention run under it."""

    def __init__(self) -> None:
        super().__init__()
        self.lengths: list[int] = []

    def __torch_function__(
        self, func: Callable[..., Any], types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            query = args[0] if args else kwargs["query"]
            key = args[1] if len(args) > 1 else kwargs["key"]
            self.lengths += [int(query.shape[-2]), int(key.shape[-2])]
        return func(*args, **kwargs)


def math_attention(lengths: list[int], device: torch.device) -> bool:
    """Whether to compile attention in its math form: on CPU, when every one spans few positions."""
    return device.type == "cpu" and bool(lengths) and max(lengths) <= MATH_MAX_POSITIONS


@contextlib.contextmanager
def attention_algorithm(math: bool) -> Iterator[None]:
    """Tracing and compiling under it gives the math form of attention (`math`), else the default."""
    if not math:
        yield
        return
    with sdpa_kernel([SDPBackend.MATH]):
        yield
