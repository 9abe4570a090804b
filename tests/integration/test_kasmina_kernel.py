"""A real compiled kernel (AOTInductor forward + backward) loaded into a seed: numerics, refusals, restore.

One tiny MLP (16 -> 32 -> 16) is compiled once per session (~25 s on 2 cores) with the recipe of
docs/notes/aoti-road-experiment.py, in the bundle format of esper.artifact.
"""

from __future__ import annotations

import hashlib
import math
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from prometheus_client import CollectorRegistry
from torch import nn

from esper import artifact
from esper.contracts.common import CompileOptions, Toolchain
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

pytestmark = pytest.mark.slow
F, HID, MAX_BATCH = 16, 32, 64


def reference_module() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(F, HID), nn.GELU(), nn.Linear(HID, F)).eval()


def compile_bundle(out: Path) -> None:
    """forward.pt2 = (x, params) -> y; backward.pt2 = (x, g, params) -> (gx, *gparams); params; manifest."""
    from safetensors.torch import save_file
    from torch.func import functional_call
    from torch.fx.experimental.proxy_tensor import make_fx

    m = reference_module()
    names = [n for n, _ in m.named_parameters()]
    params = [p.detach() for _, p in m.named_parameters()]

    class Fwd(nn.Module):
        def forward(self, x: torch.Tensor, ps: tuple[torch.Tensor, ...]) -> torch.Tensor:
            return functional_call(m, dict(zip(names, ps, strict=True)), (x,))

    def joint(x: torch.Tensor, g: torch.Tensor, *ps: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = x.detach().requires_grad_(True)
        leaves = [p.detach().requires_grad_(True) for p in ps]
        with torch.enable_grad():
            y = functional_call(m, dict(zip(names, leaves, strict=True)), (x,))
            return torch.autograd.grad(y, [x, *leaves], g)

    x, g = torch.randn(4, F), torch.randn(4, F)
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    pspec = tuple(None for _ in params)
    fwd = torch.export.export(Fwd(), (x, tuple(params)), dynamic_shapes=({0: batch}, pspec))
    gm = make_fx(joint, tracing_mode="symbolic")(x, g, *params)

    class Bwd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gm = gm

        def forward(self, x: torch.Tensor, g: torch.Tensor, ps: tuple[torch.Tensor, ...]) -> Any:
            return tuple(self.gm(x, g, *ps))

    bwd = torch.export.export(Bwd(), (x, g, tuple(params)), dynamic_shapes=({0: batch}, {0: batch}, pspec))
    out.mkdir(parents=True)
    torch._inductor.aoti_compile_and_package(fwd, package_path=str(out / artifact.FORWARD))
    torch._inductor.aoti_compile_and_package(bwd, package_path=str(out / artifact.BACKWARD))
    save_file({n: p.contiguous() for n, p in zip(names, params, strict=True)}, str(out / artifact.PARAMS))

    options = CompileOptions(maxBatch=MAX_BATCH)
    toolchain = Toolchain(torch=torch.__version__.split("+")[0], capability="cpu-avx2")
    digest = hashlib.sha256(b"test-mlp-16-32-16").hexdigest()
    spec = [artifact.IOSpec(name="x", shape=["batch", F])]
    manifest = artifact.Manifest(
        key=artifact.kernel_key(digest, "cpu", options, toolchain), irDigest=digest, target="cpu",
        options=options, toolchain=toolchain, graph={"note": "test graph"}, inputs=spec,
        outputs=[artifact.IOSpec(name="y", shape=["batch", F])],
        params=[artifact.ParamSpec(name=n, shape=list(p.shape), dtype="float32")
                for n, p in zip(names, params, strict=True)],
    )  # fmt: skip
    artifact.write_manifest(out, manifest)


@pytest.fixture(scope="session")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    d = tmp_path_factory.mktemp("kasmina") / "bundle"
    compile_bundle(d)
    return d, artifact.sha256_bytes((d / artifact.MANIFEST).read_bytes())


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
