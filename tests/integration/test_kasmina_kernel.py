"""A real compiled kernel (AOTInductor forward + backward) loaded into a seed: numerics, refusals, restore.

One tiny MLP (16 -> 32 -> 16) is compiled once per session by the real compiler (tests.support.kernels).
"""

from __future__ import annotations

import math
import shutil
import time
from pathlib import Path

import pytest
import torch
from prometheus_client import CollectorRegistry
from torch import nn

from esper import artifact
from esper.kasmina import (
    KasminaMetrics,
    KernelLoadError,
    KernelModule,
    SeedSlot,
    SeedState,
    load_kernel,
    set_kernel_resolver,
    warmup,
    wrap,
)
from tests.support.kernels import MAX_BATCH, F, reference_module

pytestmark = pytest.mark.slow


@pytest.fixture
def bundle(mlp_bundle: tuple[Path, str]) -> tuple[Path, str]:
    return mlp_bundle


def metrics() -> KasminaMetrics:
    return KasminaMetrics(CollectorRegistry())


def test_compiled_forward_and_backward_match_eager(bundle: tuple[Path, str]) -> None:
    path, sha = bundle
    warm_s = warmup()
    t0 = time.perf_counter()
    k = load_kernel(path, sha)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    load_kernel(path, sha)
    print(f"\nwarmup {warm_s:.3f}s, load after warmup {first:.3f}s, again {time.perf_counter() - t0:.3f}s")
    assert isinstance(k, KernelModule) and k.kernel_key == artifact.read_manifest(path).key
    ref = reference_module()
    for n, p in zip(k.param_names, k.params, strict=True):
        assert torch.equal(p, dict(ref.named_parameters())[n])
    for bs in (1, 5, MAX_BATCH):
        x = torch.randn(bs, F)
        xk, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
        yk, yr = k(xk), ref(xr)
        torch.testing.assert_close(yk, yr, rtol=1e-5, atol=1e-5)
        g = torch.randn(bs, F)
        yk.backward(g)
        yr.backward(g)
        torch.testing.assert_close(xk.grad, xr.grad, rtol=1e-5, atol=1e-5)
        for pk, (_, pr) in zip(k.params, ref.named_parameters(), strict=True):
            torch.testing.assert_close(pk.grad, pr.grad, rtol=1e-5, atol=1e-4)
        k.zero_grad()
        ref.zero_grad()
    with pytest.raises(ValueError, match="maxBatch"):
        k(torch.randn(MAX_BATCH + 1, F))


class Host(nn.Module):
    def __init__(self, width: int = F) -> None:
        super().__init__()
        self.blocks = nn.Sequential(nn.Linear(width, width), nn.Tanh(), nn.Linear(width, width))
        self.head = nn.Linear(width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(x))


def train(model: nn.Module, opt: torch.optim.Optimizer, steps: int, width: int = F) -> float:
    loss = math.nan
    for _ in range(steps):
        x = torch.randn(16, width)
        out = (model(x) - x[:, :1].sin()).pow(2).mean()
        out.backward()
        opt.step()
        for m in model.modules():
            if isinstance(m, SeedSlot):
                m.step()
        opt.zero_grad()
        loss = float(out.detach())
    return loss


def test_hot_load_compiled_seed_through_its_life_and_a_checkpoint(bundle: tuple[Path, str]) -> None:
    path, sha = bundle
    torch.manual_seed(0)
    model = Host()
    slot = wrap(model, at=["blocks.1"], metrics=metrics())["blocks.1"]
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    train(model, opt, 3)
    assert slot.germinate(path, expected_sha256=sha)
    assert slot.telemetry.load_seconds is not None
    opt.add_param_group(slot.param_group(lr=0.01))
    slot.start_training()
    before = [p.detach().clone() for p in slot.seed_parameters()]
    assert math.isfinite(train(model, opt, 3))
    assert any(not torch.equal(a, b) for a, b in zip(before, slot.seed_parameters(), strict=True))
    slot.start_blending(blend_steps=2)
    assert math.isfinite(train(model, opt, 2))
    slot.fossilize()
    assert math.isfinite(train(model, opt, 2))

    sd = model.state_dict()
    torch.manual_seed(1)
    fresh = Host()
    wrap(fresh, at=["blocks.1"], metrics=metrics())
    set_kernel_resolver(fresh, lambda key: load_kernel(path, sha))
    fresh.load_state_dict(sd)
    x = torch.randn(4, F)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    assert fresh.blocks[1].state is SeedState.FOSSILIZED


def test_tampered_bundle_is_refused_and_training_goes_on(bundle: tuple[Path, str], tmp_path: Path) -> None:
    path, sha = bundle
    bad = tmp_path / "bad"
    shutil.copytree(path, bad)
    data = bytearray((bad / artifact.FORWARD).read_bytes())
    data[len(data) // 2] ^= 0x01
    (bad / artifact.FORWARD).write_bytes(bytes(data))
    with pytest.raises(KernelLoadError) as ei:
        load_kernel(bad)
    assert ei.value.reason == "VerificationFailed" and "forward.pt2" in str(ei.value)

    m = metrics()
    torch.manual_seed(0)
    model = Host()
    slot = wrap(model, at=["blocks.1"], metrics=m)["blocks.1"]
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    train(model, opt, 2)
    assert not slot.germinate(bad, expected_sha256=sha)
    assert slot.state is SeedState.DORMANT and slot.seed is None
    assert "VerificationFailed" in (slot.telemetry.last_error or "")
    labels = {"reason": "VerificationFailed"}
    failures = m.registry.get_sample_value("esper_kernel_load_failures_total", labels)
    assert failures == 1
    assert math.isfinite(train(model, opt, 2))
    assert not slot.germinate(path, expected_sha256="0" * 64)  # the trusted hash does not match


def test_a_kernel_that_does_not_fit_the_slot_is_refused_before_loading(bundle: tuple[Path, str]) -> None:
    path, sha = bundle
    model = Host(width=8)
    slot = wrap(model, at=["blocks.1"], metrics=metrics())["blocks.1"]
    model(torch.randn(2, 8))
    assert not slot.germinate(path, expected_sha256=sha)
    assert slot.state is SeedState.DORMANT and "ShapeMismatch" in (slot.telemetry.last_error or "")
