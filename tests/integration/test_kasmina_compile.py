"""torch.compile over compiled kernels: the call is a custom op (no graph break), forward and backward
match eager, and the guard keeps its rules inside a compiled model.

The kernel is the session's MLP (tests.support.kernels: `[batch, 16]`, maxBatch 64).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import torch._dynamo
from torch import nn

from esper.kasmina import KernelShapeError, KernelShapeWarning, SeedSlot, warmup, wrap
from tests.support.kernels import MAX_BATCH, F

pytestmark = pytest.mark.slow


def host_with_fossils(bundle: tuple[Path, str]) -> tuple[nn.Module, dict[str, SeedSlot]]:
    warmup()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(F, F), nn.ReLU(), nn.Linear(F, F), nn.Linear(F, F))
    ss = wrap(model, ["0", "2"])
    model(torch.randn(4, F))
    for s in ss.values():
        assert s.germinate(bundle[0], expected_sha256=bundle[1])
        s.start_training()
        s.start_blending(blend_steps=1)
        s.step()
        s.fossilize()
    return model, ss


def test_no_graph_break_and_compiled_gradients_match_eager(mlp_bundle: tuple[Path, str]) -> None:
    model, _ = host_with_fossils(mlp_bundle)
    x = torch.randn(8, F)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(x)
    assert (explained.graph_break_count, explained.graph_count) == (0, 1), explained.break_reasons
    assert "\n".join(g.code for g in explained.graphs).count("esper.kernel_forward") == 2

    torch._dynamo.reset()
    out = torch.compile(model, backend="aot_eager")(x)
    out.square().sum().backward()
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    ref = model(x)
    ref.square().sum().backward()
    assert torch.allclose(out, ref, atol=1e-6, rtol=0)
    pairs = zip(got, model.parameters(), strict=True)
    assert all(torch.allclose(g, p.grad, atol=1e-5, rtol=1e-5) for g, p in pairs)


def test_the_guard_keeps_its_rules_inside_a_compiled_model(mlp_bundle: tuple[Path, str]) -> None:
    model, ss = host_with_fossils(mlp_bundle)
    torch._dynamo.reset()
    fast = torch.compile(model, backend="aot_eager")
    big = torch.ones(MAX_BATCH + 1, F)
    model.eval()
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fast(big)
        host_only = model[3](model[2].host(model[1](model[0].host(big))))
    assert torch.equal(out, host_only)  # both fossils left out of this evaluation call
    assert [s.telemetry.skipped_calls for s in ss.values()] == [1, 1]
    assert any(issubclass(w.category, KernelShapeWarning) for w in caught)
    model.train()
    with pytest.raises(KernelShapeError, match=r"dim 0 \(batch\) is 65, outside 1..64"):
        fast(big)
