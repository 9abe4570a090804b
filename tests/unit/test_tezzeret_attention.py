"""The attention algorithm a CPU kernel is compiled with: chosen from the lengths the module attends over."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.fx.experimental.proxy_tensor import make_fx

from esper.blueprint import build_module, validate_source
from esper.tezzeret.attention import MATH_MAX_POSITIONS, AttentionLengths, attention_algorithm, math_attention

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def test_the_lengths_of_every_attention_call_are_recorded() -> None:
    q, k = torch.randn(2, 4, 8, 16), torch.randn(2, 4, 24, 16)
    with AttentionLengths() as seen:
        F.scaled_dot_product_attention(q, k, k)
        F.scaled_dot_product_attention(query=k, key=q, value=q)
        torch.softmax(q, -1)  # other functions pass through untouched
    assert seen.lengths == [8, 24, 24, 8]


def test_a_blueprint_attention_block_reports_its_sequence_length() -> None:
    spec = {"template": {"name": "attention-block", "params": {"embed": 16, "heads": 2, "seq": 12}}}
    module = build_module(validate_source(spec))
    with torch.no_grad(), AttentionLengths() as seen:
        out = module(torch.randn(3, 12, 16))
    assert seen.lengths == [12, 12] and out.shape == (3, 12, 16)


@pytest.mark.parametrize(
    ("lengths", "device", "math"),
    [
        ([16, 16], CPU, True),
        ([MATH_MAX_POSITIONS, 8], CPU, True),
        ([8, MATH_MAX_POSITIONS + 1], CPU, False),  # one long attention: flash for the kernel
        ([16, 16], CUDA, False),  # measured on CPU only
        ([], CPU, False),  # no attention at all
    ],
)
def test_math_is_chosen_for_short_attention_on_cpu(
    lengths: list[int], device: torch.device, math: bool
) -> None:
    assert math_attention(lengths, device) is math


@pytest.mark.parametrize("math", [True, False])
def test_tracing_under_the_choice_gives_that_algorithm(math: bool) -> None:
    """What the compile traces: the flash kernel's op, or matmuls and a softmax instead."""
    q, k, v = (torch.randn(2, 2, 8, 4, requires_grad=True) for _ in range(3))

    def step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = F.scaled_dot_product_attention(q, k, v)
        return (out, *torch.autograd.grad(out.sum(), (q, k, v)))

    with attention_algorithm(math):
        gm = make_fx(step)(q, k, v)
    ops = {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}
    flash = {o for o in ops if "flash_attention" in o}
    assert bool(flash) is not math, ops
    if math:
        softmax = {"aten._safe_softmax.default", "aten._softmax_backward_data.default"}
        assert {*softmax, "aten.bmm.default"} <= ops
    outside = make_fx(step)(q, k, v)  # the choice does not outlive its block
    assert any("flash_attention" in str(n.target) for n in outside.graph.nodes)
