"""GELU as the compiler writes it out: the same function as PyTorch's, within float32's reach."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.fx.experimental.proxy_tensor import make_fx

from esper.tezzeret import decompositions
from esper.tezzeret.decompositions import exp_nonpositive, gelu, gelu_backward

aten = torch.ops.aten


def _inputs() -> torch.Tensor:
    """Normal activations, a wide range, and the points where GELU's pieces switch or saturate."""
    gen = torch.Generator().manual_seed(0)
    edges = torch.tensor(
        [0.0, -0.0, 1e-30, -1e-30, 1e-4, -1e-4, 5.0, -5.0, 9.0, -9.0, 13.3, -13.3, 60.0, -60.0]
    )
    return torch.cat([torch.randn(20_000, generator=gen), 8 * torch.randn(20_000, generator=gen), edges])


def test_the_exponential_matches_math_exp() -> None:
    y = -torch.linspace(0.0, 87.0, 100_001)
    expected = torch.tensor([math.exp(v) for v in y.tolist()], dtype=torch.float64)
    rel = ((exp_nonpositive(y).double() - expected) / expected).abs()
    assert rel[y > -10].max().item() < 1e-6
    assert rel.max().item() < 5e-6


def test_the_exponential_flushes_to_zero_below_the_normal_range() -> None:
    y = torch.tensor([-87.5, -100.0, -1e30, -math.inf])
    assert exp_nonpositive(y).tolist() == [0.0, 0.0, 0.0, 0.0]
    assert exp_nonpositive(torch.tensor([0.0])).tolist() == [1.0]


def test_gelu_matches_the_float64_definition() -> None:
    x = _inputs()
    xd = x.double()
    expected = xd * 0.5 * (1 + torch.special.erf(xd / math.sqrt(2)))  # x Phi(x), independently of F.gelu
    # absolute below |x| = 1, relative to |x| above (x Phi(x) ~ x there, and so is float32's spacing)
    assert ((gelu(x).double() - expected).abs() / xd.abs().clamp(min=1)).max().item() < 1e-6


def test_gelu_backward_matches_autograd_of_the_definition() -> None:
    x = _inputs()
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    xd = x.double().requires_grad_(True)
    (xd * 0.5 * (1 + torch.special.erf(xd / math.sqrt(2)))).backward(grad.double())
    assert xd.grad is not None
    assert (gelu_backward(grad, x).double() - xd.grad).abs().max().item() < 2e-6


def test_non_finite_inputs_propagate_as_in_pytorch() -> None:
    x = torch.tensor([math.nan, math.inf, -math.inf])
    g = torch.ones(3)
    assert torch.isnan(gelu_backward(g, x)).all() and torch.isnan(aten.gelu_backward(g, x)).all()
    assert torch.isnan(gelu(x)[0]) and gelu(x)[2].isnan() == F.gelu(x)[2].isnan()


@pytest.mark.parametrize(
    ("x", "approximate"),
    [
        (torch.randn(4), "tanh"),
        (torch.randn(4, dtype=torch.float64), "none"),
        (torch.randn(4).half(), "none"),
    ],
)
def test_other_forms_and_dtypes_are_left_to_pytorch(x: torch.Tensor, approximate: str) -> None:
    assert gelu(x, approximate) is NotImplemented
    assert gelu_backward(torch.ones_like(x), x, approximate) is NotImplemented


def test_a_traced_training_step_evaluates_gelu_without_erf_or_exp_calls() -> None:
    """What the compiler's joint graph holds: GELU and its gradient as arithmetic inductor fuses."""
    lin = torch.nn.Linear(8, 8)

    def step(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = F.gelu(lin(x))
        return (out, *torch.autograd.grad(out.sum(), (x, lin.weight)))

    x = torch.randn(4, 8, requires_grad=True)
    traced = make_fx(step, decomposition_table=decompositions.TABLE)(x)
    ops = {str(n.target) for n in traced.graph.nodes if n.op == "call_function"}
    assert not {o for o in ops if o.split(".")[1] in ("gelu", "gelu_backward", "erf", "exp")}, ops
    plain = {str(n.target) for n in make_fx(step)(x).graph.nodes if n.op == "call_function"}
    assert {"aten.gelu.default", "aten.gelu_backward.default"} <= plain
    for got, want in zip(traced(x), step(x), strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_an_exported_forward_is_rewritten_only_when_it_holds_gelu() -> None:
    relu = torch.export.export(
        torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU()), (torch.randn(2, 4),)
    )
    assert decompositions.rewrite(decompositions.TABLE, relu) is relu  # nothing to decompose: no retrace
    module = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.GELU())
    x = torch.randn(3, 4)
    gelu_program = decompositions.rewrite(decompositions.TABLE, torch.export.export(module, (x,)))
    ops = {str(n.target) for n in gelu_program.graph.nodes if n.op == "call_function"}
    assert "aten.gelu.default" not in ops and "aten.erf.default" not in ops, ops
    torch.testing.assert_close(gelu_program.module()(x), module(x), atol=1e-6, rtol=1e-5)


def test_only_cpu_code_is_traced_with_the_table() -> None:
    assert decompositions.for_device(torch.device("cpu")) is decompositions.TABLE
    assert decompositions.for_device(torch.device("cuda", 0)) == {}
