"""A real compiled kernel (AOTInductor inference forward, training forward and backward) loaded into
a seed: numerics, refusals, restore, which package runs when, and format v1 bundles.

One tiny MLP (16 -> 32 -> 16) is compiled once per session by the real compiler (tests.support.kernels).
"""

from __future__ import annotations

import math
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from prometheus_client import CollectorRegistry
from torch import nn

from esper import artifact, signing
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


def test_training_calls_save_the_manifest_activations_and_inference_calls_do_not(
    bundle: tuple[Path, str],
) -> None:
    """Under grad the training forward runs and autograd keeps exactly the manifest's saved tensors
    (plus the parameters); under no_grad, or with nothing requiring grad, only the inference forward."""
    path, sha = bundle
    k = load_kernel(path, sha, metrics=metrics())
    manifest = artifact.read_manifest(path)
    assert manifest.format == artifact.FORMAT and manifest.saved
    calls: dict[str, int] = {"forward": 0, "train_forward": 0, "backward": 0}

    def counted(name: str, runner: Any) -> Any:
        def run(*args: Any) -> Any:
            calls[name] += 1
            return runner(*args)

        return run

    k.forward_runner = counted("forward", k.forward_runner)
    k.train_forward_runner = counted("train_forward", k.train_forward_runner)
    k.backward_runner = counted("backward", k.backward_runner)
    ref = reference_module()
    batch = 6
    x = torch.randn(batch, F, requires_grad=True)
    packed: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t):
        y = k(x)
    assert calls == {"forward": 0, "train_forward": 1, "backward": 0}
    assert type(y.grad_fn).__name__ == "_TrainingFunctionBackward"
    want_shapes = [[d if isinstance(d, int) else batch for d in s.shape] for s in manifest.saved]
    assert all(d == "batch" or isinstance(d, int) for s in manifest.saved for d in s.shape)  # an MLP's
    assert [list(t.shape) for t in packed] == want_shapes + [p.shape for p in manifest.params]
    g = torch.randn(batch, F)
    y.backward(g)
    xr = x.detach().clone().requires_grad_()
    ref(xr).backward(g)
    assert calls["backward"] == 1
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-5, atol=1e-5)
    for pk, (_, pr) in zip(k.params, ref.named_parameters(), strict=True):
        torch.testing.assert_close(pk.grad, pr.grad, rtol=1e-5, atol=1e-4)

    with torch.no_grad():
        out = k(x)
    assert calls["forward"] == 1 and calls["train_forward"] == 1 and out.grad_fn is None
    torch.testing.assert_close(out, ref(x).detach(), rtol=1e-5, atol=1e-5)
    k.requires_grad_(False)  # a frozen kernel on an input that needs no grad: nothing to save
    k(x.detach())
    assert calls["forward"] == 2 and calls["train_forward"] == 1
    k.requires_grad_(True)
    k(x.detach()).sum().backward()  # the parameters still train
    assert calls["train_forward"] == 2 and calls["backward"] == 2


def test_a_format_v1_bundle_still_loads_and_recomputes_in_its_backward(
    bundle: tuple[Path, str], tmp_path: Path
) -> None:
    """A bundle written before the training packages: forward.pt2 + backward.pt2, manifest format v1."""
    path, _ = bundle
    old = tmp_path / "v1"
    old.mkdir()
    shutil.copy(path / artifact.FORWARD, old / artifact.FORWARD)
    shutil.copy(path / artifact.PARAMS, old / artifact.PARAMS)
    # Any package loads; this one stands in for the recomputing backward, which is never called here.
    shutil.copy(path / artifact.TRAIN_BACKWARD, old / artifact.BACKWARD)
    manifest = artifact.read_manifest(path).model_copy(update={"format": artifact.FORMAT_V1, "saved": []})
    sha, _ = artifact.write_manifest(old, manifest)
    signer = signing.signing_key_from(local=True)  # a compile signed it (the local key, as the fixture's)
    signing.sign_bundle(old, signer)
    k = load_kernel(old, sha, metrics=metrics())
    assert k.train_forward_runner is None and k.backward_runner is not None
    x = torch.randn(3, F, requires_grad=True)
    y = k(x)
    assert type(y.grad_fn).__name__ == "_CompiledFunctionBackward"
    torch.testing.assert_close(y, reference_module()(x), rtol=1e-5, atol=1e-5)
    (old / artifact.BACKWARD).unlink()
    manifest = manifest.model_copy(update={"files": {}})
    sha, _ = artifact.write_manifest(old, manifest)
    signing.sign_bundle(old, signer)
    with pytest.raises(KernelLoadError, match=r"IncompleteBundle: manifest lists no backward\.pt2"):
        load_kernel(old, sha, metrics=metrics())


@pytest.mark.parametrize("how", ["unsigned", "foreign-key", "planted-package"])
def test_a_bundle_esper_did_not_sign_is_refused_before_any_load(
    bundle: tuple[Path, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    """Consistent hashes are not enough: a planted package with a manifest recomputed to match it
    (what a bucket writer can do) is refused for its signature, and no package is ever opened."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    import esper.aoti
    from esper import signing

    path, _ = bundle
    bad = tmp_path / "bad"
    shutil.copytree(path, bad)
    if how == "unsigned":
        (bad / artifact.SIGNATURE).unlink()
    elif how == "foreign-key":
        signing.sign_bundle(bad, Ed25519PrivateKey.generate())
    else:
        (bad / artifact.BACKWARD).write_bytes((bad / artifact.FORWARD).read_bytes())
        manifest = artifact.read_manifest(bad)
        artifact.write_manifest(bad, manifest)  # hashes consistent again; the signature is stale
    opened: list[Path] = []
    monkeypatch.setattr(esper.aoti, "load_package", lambda p, **_: opened.append(Path(p)))
    sha = artifact.sha256_bytes((bad / artifact.MANIFEST).read_bytes())
    with pytest.raises(KernelLoadError) as ei:
        load_kernel(bad, sha)
    assert ei.value.reason == "SignatureRefused"
    expected = {"unsigned": "unsigned", "foreign-key": "not trusted", "planted-package": "does not match"}
    assert expected[how] in str(ei.value)
    assert opened == []


def test_packages_load_from_a_private_verified_copy(
    bundle: tuple[Path, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """What is loaded is a copy made and verified by this process: a file swapped in the shared
    directory between the check and the load is never the one loaded."""
    import esper.aoti

    path, sha = bundle
    real = esper.aoti.load_package
    opened: list[Path] = []

    def spy(p: Path, **kw: object) -> object:
        opened.append(Path(p))
        return real(p, **kw)

    monkeypatch.setattr(esper.aoti, "load_package", spy)
    load_kernel(path, sha)
    assert [p.name for p in opened] == [artifact.FORWARD, artifact.TRAIN_BACKWARD, artifact.TRAIN_FORWARD]
    assert all(path.resolve() not in p.resolve().parents for p in opened)
    assert all(not p.exists() for p in opened)  # the private copy is gone once loaded


def test_gradients_of_a_kernels_gradients_are_refused_and_first_order_ones_are_not(
    bundle: tuple[Path, str],
) -> None:
    """The packages give first-order gradients only: `create_graph` itself is fine (the gradients come
    out, and match eager), differentiating them again raises instead of silently giving zero."""
    path, sha = bundle
    k = load_kernel(path, sha, metrics=metrics())
    ref = reference_module()
    x = torch.randn(4, F, requires_grad=True)
    (gx,) = torch.autograd.grad(k(x).square().sum(), x, create_graph=True)
    xr = x.detach().clone().requires_grad_()
    (want,) = torch.autograd.grad(ref(xr).square().sum(), xr)
    torch.testing.assert_close(gx, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        gx.sum().backward()
    x.grad = None
    k(x).sum().backward()  # the usual backward, no graph of the gradients
    assert x.grad is not None and not x.grad.requires_grad
