"""Blending's gradients equal autograd of `y + alpha * (s - y)` computed on copies of host and seed."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from esper.kasmina import SeedSlot, SeedState

F = 8


def _modules() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    host = nn.Sequential(nn.Linear(F, F), nn.Tanh())
    seed = nn.Sequential(nn.Linear(F, 16), nn.Tanh(), nn.Linear(16, F))
    return host, seed


@pytest.mark.parametrize(("blend_steps", "steps", "alpha"), [(4, 1, 0.25), (4, 3, 0.75), (8, 3, 0.375)])
def test_blending_value_and_gradients_follow_the_formula(blend_steps: int, steps: int, alpha: float) -> None:
    host, seed = _modules()
    ref_host, ref_seed = copy.deepcopy(host), copy.deepcopy(seed)
    slot = SeedSlot("s", host, blend_steps=blend_steps)
    assert slot.germinate(seed)
    slot.start_training()
    slot.start_blending()
    for _ in range(steps):
        slot.step()
    assert slot.state is SeedState.BLENDING and slot.alpha == alpha

    x = torch.randn(5, F)
    w = torch.randn(5, F)  # a non-uniform upstream gradient
    out = slot(x)
    (out * w).sum().backward()

    y = ref_host(x)
    expected = y + alpha * (ref_seed(y) - y)  # the seed sees y itself while blending
    (expected * w).sum().backward()

    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    for got, want in zip(host.parameters(), ref_host.parameters(), strict=True):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-5, atol=1e-7)
    for got, want in zip(seed.parameters(), ref_seed.parameters(), strict=True):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-5, atol=1e-7)


def test_the_host_path_carries_one_minus_alpha_of_the_gradient() -> None:
    """With a seed that ignores its input, d out / d y is exactly (1 - alpha): a detached y would give 1."""

    class Constant(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c = nn.Parameter(torch.zeros(F))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.c.expand_as(x)

    slot = SeedSlot("s", None, blend_steps=4)  # identity host: y is the input itself
    const = Constant()
    assert slot.germinate(const)
    slot.start_training()
    slot.start_blending()
    slot.step()  # alpha 1/4
    x = torch.randn(3, F, requires_grad=True)
    slot(x).sum().backward()
    assert x.grad is not None
    assert torch.equal(x.grad, torch.full((3, F), 0.75))
    assert const.c.grad is not None and torch.equal(const.c.grad, torch.full((F,), 3 * 0.25))
